"""RMSNorm + RoPE + store in one pass: the q/k/v of self-attention, the cross-attention q and the
mouse/keyboard q/k/v of the action module.

Two kernels behind one op:
* rows (a token's projection, C = H * D): the backbone's norm over all of C in float32 with its
  learned scale (rounded to the input dtype, then scaled, as upstream's WanRMSNorm), RoPE per head,
  the result stored to a fresh tensor or straight into the token's ring-buffer slot. Without a
  weight it skips the norm, without angles the rotation: v goes to its slot in the same pass.
* head rows (the action module: many short heads of 64): a tile of 64 head-rows per program, each
  normalised on its own without weight (upstream's action norm), rotated by its frame's angle.
A row goes to dest row r, or with `slots` to slots[r // S] * S + r % S.
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


@triton.jit
def _head_norm_rope_store_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, slots_ptr, head_rows, rows,
                                 heads, half, per_frame, rows_per_angle, eps, s_xn, s_xr, s_on,
                                 s_or, ROPE: tl.constexpr, SLOTS: tl.constexpr,
                                 BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    g = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (n, r, h) flattened
    h = g % heads
    r = (g // heads) % rows
    n = g // (heads * rows)
    i = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (g < head_rows)[:, None] & (i < half)
    channel = (h * (2 * half))[:, None] + 2 * i
    src = x_ptr + (n * s_xn + r * s_xr)[:, None] + channel
    even = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    odd = tl.load(src + 1, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    rstd = 1.0 / tl.sqrt(tl.sum(even * even + odd * odd, axis=1) / (2 * half) + eps)
    even = (even * rstd[:, None]).to(dtype).to(tl.float32)
    odd = (odd * rstd[:, None]).to(dtype).to(tl.float32)
    if ROPE:
        angle = (r // rows_per_angle)[:, None] * half + i
        cos = tl.load(cos_ptr + angle, mask=ok, other=1.0)
        sin = tl.load(sin_ptr + angle, mask=ok, other=0.0)
        even, odd = even * cos - odd * sin, even * sin + odd * cos
    if SLOTS:
        dest_row = tl.load(slots_ptr + r // per_frame, mask=g < head_rows, other=0) * per_frame \
            + r % per_frame
    else:
        dest_row = r
    dest = out_ptr + (n * s_on + dest_row * s_or)[:, None] + channel
    tl.store(dest, even.to(dtype), mask=ok)
    tl.store(dest + 1, odd.to(dtype), mask=ok)


def norm_rope_store(x, weight, eps, cos, sin, heads, dest=None, slots=None, rope_dtype=None,
                    per_head_norm=False, rows_per_angle=1):
    """x [N, R, H*D] -> dest [N, R', H, D] (returned; a new [N, R, H, D] when None).

    Norm: over H*D with `weight` (the backbone's), per head without weight when `per_head_norm`
    (the action module's), none when neither. RoPE with cos/sin [R / rows_per_angle, D/2] when
    given. Rows land at r, or with `slots` [F] at slots[r // S] * S + r % S (S = R / F).
    `rope_dtype` belongs to the eager twin's signature: these kernels rotate in float32."""
    n, rows, c = x.shape
    head_dim = c // heads
    if heads * head_dim != c or head_dim % 2:
        raise ValueError(f"{c} channels do not split into {heads} heads of an even size")
    if per_head_norm and weight is not None:
        raise ValueError("the per-head (action) norm has no weight")
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
    slots_arg = slots if slots is not None else x
    if per_head_norm:
        block_rows = 64
        _head_norm_rope_store_kernel[(triton.cdiv(n * rows * heads, block_rows),)](
            x, cos32, sin32, dest, slots_arg, n * rows * heads, rows, heads, head_dim // 2,
            per_frame, rows_per_angle, eps, x.stride(0), x.stride(1), dest.stride(0),
            dest.stride(1), ROPE=cos is not None, SLOTS=slots is not None, BLOCK_ROWS=block_rows,
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2))
        return dest
    if rows_per_angle != 1:
        raise ValueError("rows_per_angle applies to the per-head (action) form only")
    _norm_rope_store_kernel[(n * rows,)](
        x, weight if weight is not None else x, cos32, sin32, dest, slots_arg, c, rows, per_frame,
        eps or 0.0, x.stride(0), x.stride(1), dest.stride(0), dest.stride(1), head_dim // 2,
        NORM=weight is not None, ROPE=cos is not None, SLOTS=slots is not None,
        BLOCK_PAIRS=triton.next_power_of_2(c // 2))
    return dest
