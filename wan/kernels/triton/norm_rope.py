"""RMSNorm + RoPE + store in one pass: the q/k/v of self-attention, the cross-attention q, and
the mouse/keyboard q/k/v of the action module.

Reads one row (a token's or frame's projection, C = H * D, any row stride), RMS-normalises it in
float32 (over all of C with the learned scale, as the backbone's WanRMSNorm; or per head without a
scale, as the action module's norm), rotates each head's channel pairs by the row's angles, and
writes the result to a fresh [N, R, H, D] tensor or straight into its ring-buffer slot of a cache
(row `slots[r // S] * S + r % S`). Without a norm and angles it only stores (v).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rope_store_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, slots_ptr, rows, heads,
                            half, per_frame, rows_per_angle, eps, s_xn, s_xr, s_on, s_or,
                            NORM: tl.constexpr, PER_HEAD: tl.constexpr, WEIGHT: tl.constexpr,
                            ROPE: tl.constexpr, SLOTS: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // rows
    r = pid % rows
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (h < heads) & (i < half)
    channel = h * (2 * half) + 2 * i  # even channel of each pair
    src = x_ptr + n * s_xn + r * s_xr + channel
    even = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    odd = tl.load(src + 1, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if NORM:
        squares = even * even + odd * odd
        if PER_HEAD:
            rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=1)[:, None] / (2 * half) + eps)
        else:
            rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(squares, axis=1), axis=0) / (2 * half * heads) + eps)
        # rounded to the input dtype before the scale, as upstream's norm output is
        even = (even * rstd).to(dtype).to(tl.float32)
        odd = (odd * rstd).to(dtype).to(tl.float32)
        if WEIGHT:
            even = (even * tl.load(w_ptr + channel, mask=ok, other=0.0).to(tl.float32)).to(dtype)
            odd = (odd * tl.load(w_ptr + channel + 1, mask=ok, other=0.0).to(tl.float32)).to(dtype)
            even = even.to(tl.float32)
            odd = odd.to(tl.float32)
    if ROPE:
        angle = (r // rows_per_angle) * half + i
        cos = tl.load(cos_ptr + angle, mask=i < half, other=1.0)
        sin = tl.load(sin_ptr + angle, mask=i < half, other=0.0)
        even, odd = even * cos - odd * sin, even * sin + odd * cos
    if SLOTS:
        dest_row = tl.load(slots_ptr + r // per_frame) * per_frame + r % per_frame
    else:
        dest_row = r
    dest = out_ptr + n * s_on + dest_row * s_or + channel
    tl.store(dest, even.to(dtype), mask=ok)
    tl.store(dest + 1, odd.to(dtype), mask=ok)


def norm_rope_store(x, weight, eps, cos, sin, heads, dest=None, slots=None, rope_dtype=None,
                    per_head_norm=False, rows_per_angle=1):
    """x [N, R, H*D] -> dest [N, R', H, D] (returned; a new [N, R, H, D] when None).

    Norm: over H*D with `weight` (the backbone's), per head without weight when `per_head_norm`
    (the action module's), none when neither. RoPE with cos/sin [R / rows_per_angle, D/2] when
    given. Rows land at r, or with `slots` [F] at slots[r // S] * S + r % S (S = R / F).
    `rope_dtype` belongs to the eager twin's signature: this kernel rotates in float32."""
    n, rows, c = x.shape
    head_dim = c // heads
    if heads * head_dim != c or head_dim % 2:
        raise ValueError(f"{c} channels do not split into {heads} heads of an even size")
    if dest is None:
        dest = torch.empty(n, rows, heads, head_dim, dtype=x.dtype, device=x.device)
    if dest.shape[0] != n or dest.shape[2:] != (heads, head_dim):
        raise ValueError(f"dest {tuple(dest.shape)} does not hold x {tuple(x.shape)}")
    if not (dest.stride(3) == 1 and dest.stride(2) == head_dim):
        raise ValueError("dest must have contiguous heads and channels")
    if cos is not None and (cos.shape != (rows // rows_per_angle, head_dim // 2)
                            or sin.shape != cos.shape):
        raise ValueError(f"cos/sin must be [{rows // rows_per_angle}, {head_dim // 2}], got "
                         f"{tuple(cos.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    per_frame = rows // slots.shape[0] if slots is not None else rows
    cos32 = cos.float().contiguous() if cos is not None else x
    sin32 = sin.float().contiguous() if sin is not None else x
    _norm_rope_store_kernel[(n * rows,)](
        x, weight if weight is not None else x, cos32, sin32, dest,
        slots if slots is not None else x, rows, heads, head_dim // 2, per_frame, rows_per_angle,
        eps or 0.0, x.stride(0), x.stride(1), dest.stride(0), dest.stride(1),
        NORM=weight is not None or per_head_norm, PER_HEAD=per_head_norm,
        WEIGHT=weight is not None, ROPE=cos is not None, SLOTS=slots is not None,
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(head_dim // 2))
    return dest
