"""RMSNorm + RoPE + store in one pass, for the self-attention q/k/v and the cross-attention q.

Reads one token's projection [C = H * D], normalises it over C in float32 (rounding to the input
dtype, then the learned scale, as upstream's WanRMSNorm), rotates each head's channel pairs by the
token's angles, and writes the result either to a fresh [B, L, H, D] tensor or straight into the
token's ring-buffer slot of the cache (row `slots[frame] * S + s`). Without a weight it skips the
norm, without angles the rotation: v goes to its slot in the same pass.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_store_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, slots_ptr, heads, tokens,
                            per_frame, eps, s_xb, s_xl, s_ob, s_ol,
                            NORM: tl.constexpr, ROPE: tl.constexpr, SLOTS: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    # one token per program, as a [heads, head_dim] tile: contiguous (vectorised) loads and stores;
    # the channel pairs are split in registers for the rotation
    row = tl.program_id(0)
    b = row // tokens
    token = row % tokens
    h = tl.arange(0, BLOCK_H)
    channels = h[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    ok = (h < heads)[:, None]
    x = tl.load(x_ptr + b * s_xb + token * s_xl + channels, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if NORM:
        mean_square = tl.sum(tl.sum(x * x, axis=1), axis=0) / (heads * HEAD_DIM)
        w = tl.load(w_ptr + channels, mask=ok, other=0.0).to(tl.float32)
        x = ((x * (1.0 / tl.sqrt(mean_square + eps))).to(dtype).to(tl.float32) * w)
        x = x.to(dtype).to(tl.float32)
    if ROPE:
        even, odd = tl.split(tl.reshape(x, [BLOCK_H, HEAD_DIM // 2, 2]))
        pairs = tl.arange(0, HEAD_DIM // 2)
        cos = tl.load(cos_ptr + token * (HEAD_DIM // 2) + pairs)[None, :]
        sin = tl.load(sin_ptr + token * (HEAD_DIM // 2) + pairs)[None, :]
        x = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), [BLOCK_H, HEAD_DIM])
    if SLOTS:
        slot = tl.load(slots_ptr + token // per_frame)
        dest_row = slot * per_frame + token % per_frame
    else:
        dest_row = token
    tl.store(out_ptr + b * s_ob + dest_row * s_ol + channels, x.to(dtype), mask=ok)


def norm_rope_store(x, weight, eps, cos, sin, heads, dest=None, slots=None, rope_dtype=None):
    """x [B, L, H*D] -> dest [B, R, H, D] (returned; a new [B, L, H, D] when None): RMS-normed over
    H*D when `weight` is given, rotated by cos/sin [L, D/2] when given, stored at rows [0, L) or,
    with `slots` [F], at row slots[l // S] * S + l % S (S = L / F). `rope_dtype` belongs to the
    eager twin's signature: this kernel rotates in float32."""
    b, length, c = x.shape
    if dest is None:
        dest = torch.empty(b, length, heads, c // heads, dtype=x.dtype, device=x.device)
    head_dim = dest.shape[3]
    if heads * head_dim != c or dest.shape[0] != b:
        raise ValueError(f"dest {tuple(dest.shape)} does not hold x {tuple(x.shape)}")
    if head_dim & (head_dim - 1) or head_dim < 2:
        raise ValueError(f"head_dim {head_dim} must be a power of two (the kernel's tile width)")
    if not (dest.stride(3) == 1 and dest.stride(2) == head_dim):
        raise ValueError("dest must have contiguous heads and channels")
    if cos is not None and (cos.shape != (length, head_dim // 2) or sin.shape != cos.shape):
        raise ValueError(f"cos/sin must be [{length}, {head_dim // 2}], got {tuple(cos.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    per_frame = length // slots.shape[0] if slots is not None else length
    cos32 = cos.float().contiguous() if cos is not None else x
    sin32 = sin.float().contiguous() if sin is not None else x
    _norm_rope_store_kernel[(b * length,)](
        x, weight if weight is not None else x, cos32, sin32, dest,
        slots if slots is not None else x, heads, length, per_frame, eps or 0.0,
        x.stride(0), x.stride(1), dest.stride(0), dest.stride(1),
        NORM=weight is not None, ROPE=cos is not None, SLOTS=slots is not None,
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(heads))
    return dest
