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
def _norm_rope_store_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, slots_ptr, c, tokens,
                            per_frame, eps, s_xb, s_xl, s_ob, s_ol, half_head,
                            NORM: tl.constexpr, ROPE: tl.constexpr, SLOTS: tl.constexpr,
                            BLOCK_PAIRS: tl.constexpr):
    row = tl.program_id(0)
    b = row // tokens
    token = row % tokens
    pairs = tl.arange(0, BLOCK_PAIRS)
    ok = pairs < c // 2
    base = x_ptr + b * s_xb + token * s_xl + 2 * pairs
    even = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    odd = tl.load(base + 1, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(even * even, axis=0) + tl.sum(odd * odd, axis=0)) / c + eps)
        w_even = tl.load(w_ptr + 2 * pairs, mask=ok, other=0.0).to(tl.float32)
        w_odd = tl.load(w_ptr + 2 * pairs + 1, mask=ok, other=0.0).to(tl.float32)
        even = ((even * rstd).to(dtype).to(tl.float32) * w_even).to(dtype).to(tl.float32)
        odd = ((odd * rstd).to(dtype).to(tl.float32) * w_odd).to(dtype).to(tl.float32)
    if ROPE:
        angle = token * half_head + pairs % half_head
        cos = tl.load(cos_ptr + angle, mask=ok, other=1.0)
        sin = tl.load(sin_ptr + angle, mask=ok, other=0.0)
        even, odd = even * cos - odd * sin, even * sin + odd * cos
    if SLOTS:
        slot = tl.load(slots_ptr + token // per_frame)
        dest_row = slot * per_frame + token % per_frame
    else:
        dest_row = token
    dest = out_ptr + b * s_ob + dest_row * s_ol + 2 * pairs
    tl.store(dest, even.to(dtype), mask=ok)
    tl.store(dest + 1, odd.to(dtype), mask=ok)


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
        slots if slots is not None else x, c, length, per_frame, eps or 0.0,
        x.stride(0), x.stride(1), dest.stride(0), dest.stride(1), head_dim // 2,
        NORM=weight is not None, ROPE=cos is not None, SLOTS=slots is not None,
        BLOCK_PAIRS=triton.next_power_of_2(c // 2))
    return dest
