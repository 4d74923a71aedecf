"""RMSNorm + RoPE + store in one pass, for the self-attention q/k/v (one launch for all three)
and the cross-attention q and k.

Reads one token's projection [C = H * D], normalises it over C in float32 (rounding to the input
dtype, then the learned scale, as upstream's WanRMSNorm), rotates each head's channel pairs by the
token's angles, and writes the result either to a fresh [B, L, H, D] tensor or straight into the
token's ring-buffer slot of the cache (row `slots[frame] * S + s`). Without a weight it skips the
norm, without angles the rotation: v goes to its slot in the same pass.
"""
import torch
import triton
import triton.language as tl

from .common import rotate_pairs


@triton.jit
def _norm_rope_store_row(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, slots_ptr, row, heads, tokens,
                         per_frame, eps, s_xb, s_xl, s_ob, s_ol, NORM: tl.constexpr,
                         ROPE: tl.constexpr, SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    # one token as a [heads, head_dim] tile: contiguous (vectorised) loads and stores; the channel
    # pairs are split in registers for the rotation
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
        pairs = tl.arange(0, HEAD_DIM // 2)
        cos = tl.load(cos_ptr + token * (HEAD_DIM // 2) + pairs)[None, :]
        sin = tl.load(sin_ptr + token * (HEAD_DIM // 2) + pairs)[None, :]
        x = rotate_pairs(x, cos, sin, HEAD_DIM)
    if SLOTS:
        slot = tl.load(slots_ptr + token // per_frame)
        dest_row = slot * per_frame + token % per_frame
    else:
        dest_row = token
    tl.store(out_ptr + b * s_ob + dest_row * s_ol + channels, x.to(dtype), mask=ok)


@triton.jit
def _norm_rope_store_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, slots_ptr, heads, tokens,
                            per_frame, eps, s_xb, s_xl, s_ob, s_ol,
                            NORM: tl.constexpr, ROPE: tl.constexpr, SLOTS: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    _norm_rope_store_row(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, slots_ptr, tl.program_id(0),
                         heads, tokens, per_frame, eps, s_xb, s_xl, s_ob, s_ol, NORM, ROPE, SLOTS,
                         HEAD_DIM, BLOCK_H)


@triton.jit
def _qkv_norm_rope_store_kernel(q_ptr, k_ptr, v_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_out_ptr,
                                k_cache_ptr, v_cache_ptr, slots_ptr, heads, tokens, per_frame, eps,
                                s_xb, s_xl, s_qb, s_ql, s_cb, s_cl, NORM: tl.constexpr,
                                HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    # axis 1 picks the tensor: q (normed, rotated, to q_out), k (normed, rotated, to its slot),
    # v (to its slot); one launch instead of three
    row = tl.program_id(0)
    part = tl.program_id(1)
    if part == 0:
        _norm_rope_store_row(q_ptr, wq_ptr, cos_ptr, sin_ptr, q_out_ptr, slots_ptr, row, heads,
                             tokens, per_frame, eps, s_xb, s_xl, s_qb, s_ql, NORM, True, False,
                             HEAD_DIM, BLOCK_H)
    elif part == 1:
        _norm_rope_store_row(k_ptr, wk_ptr, cos_ptr, sin_ptr, k_cache_ptr, slots_ptr, row, heads,
                             tokens, per_frame, eps, s_xb, s_xl, s_cb, s_cl, NORM, True, True,
                             HEAD_DIM, BLOCK_H)
    else:
        _norm_rope_store_row(v_ptr, wk_ptr, cos_ptr, sin_ptr, v_cache_ptr, slots_ptr, row, heads,
                             tokens, per_frame, eps, s_xb, s_xl, s_cb, s_cl, False, False, True,
                             HEAD_DIM, BLOCK_H)


def norm_rope_store(x, weight, eps, cos, sin, heads, dest=None, slots=None, rope_dtype=None):
    """x [B, L, H*D] -> dest [B, R, H, D] (returned; a new [B, L, H, D] when None): RMS-normed over
    H*D when `weight` is given, rotated by cos/sin [L, D/2] when given, stored at rows [0, L) or,
    with `slots` [F], at row slots[l // S] * S + l % S (S = L / F). `rope_dtype` belongs to the
    eager twin's signature: this kernel rotates in float32."""
    b, length, c = x.shape
    if dest is None:
        dest = torch.empty(b, length, heads, c // heads, dtype=x.dtype, device=x.device)
    _check_dest(x, dest, heads, cos, sin)
    head_dim = dest.shape[3]
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


def qkv_norm_rope_store(q, k, v, q_weight, k_weight, eps, cos, sin, heads, k_cache, v_cache,
                        slots, rope_dtype=None):
    """The self-attention's projections q, k, v [B, L, H*D] in one launch: q RMS-normed (when the
    weights are given) and rotated into a new [B, L, H, D] tensor (returned), k normed and rotated
    into its ring slots of k_cache [B, R, H, D], v into its slots of v_cache. As three
    norm_rope_store calls; `rope_dtype` belongs to the eager twin's signature (float32 here)."""
    b, length, c = q.shape
    head_dim = c // heads
    if k.shape != q.shape or v.shape != q.shape or q.stride() != k.stride() or q.stride() != v.stride():
        raise ValueError(f"q, k, v must have one shape and layout, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                         f"must have one shape and layout")
    q_out = torch.empty(b, length, heads, head_dim, dtype=q.dtype, device=q.device)
    for dest in (q_out, k_cache):
        _check_dest(q, dest, heads, cos, sin)
    if q.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _qkv_norm_rope_store_kernel[(b * length, 3)](
        q, k, v, q_weight if q_weight is not None else q, k_weight if k_weight is not None else q,
        cos.float().contiguous(), sin.float().contiguous(), q_out, k_cache, v_cache, slots, heads,
        length, length // slots.shape[0], eps or 0.0, q.stride(0), q.stride(1), q_out.stride(0),
        q_out.stride(1), k_cache.stride(0), k_cache.stride(1), NORM=q_weight is not None,
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(heads))
    return q_out


def _check_dest(x, dest, heads, cos, sin):
    b, length, c = x.shape
    head_dim = dest.shape[3]
    if heads * head_dim != c or dest.shape[0] != b:
        raise ValueError(f"dest {tuple(dest.shape)} does not hold x {tuple(x.shape)}")
    if head_dim & (head_dim - 1) or head_dim < 2:
        raise ValueError(f"head_dim {head_dim} must be a power of two (the kernel's tile width)")
    if not (dest.stride(3) == 1 and dest.stride(2) == head_dim):
        raise ValueError("dest must have contiguous heads and channels")
    if cos is not None and (cos.shape != (length, head_dim // 2) or sin.shape != cos.shape):
        raise ValueError(f"cos/sin must be [{length}, {head_dim // 2}], got {tuple(cos.shape)}")

