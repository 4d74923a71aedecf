"""The action module's attention in one kernel: q/k RMS norm + RoPE, the cache store, and attention
over a handful of keys.

mouse: B * 880 sequences of 3 queries over <= window (6) key frames; keyboard: every token (2640
queries) over the same <= 6 key frames. A general flash kernel tiles 64+ queries and 64+ keys, so
most of each tile would be padding, and norm, RoPE and the cache write would be separate passes over
strided views of the projections. Here one program takes a (sequence, head) pair and a block of
queries and:

1. RMS-normalises and rotates this call's keys (one per frame), writes them and the values into
   their ring slots of the cache, and waits for the whole program to see those writes;
2. normalises and rotates its queries in registers and attends over the cache's first `attended`
   slots, all keys in registers (an online-softmax loop covers longer key lists).

With several query blocks per sequence (keyboard) every program writes the same key rows with the
same values, so the duplicate writes are harmless. Inputs are read through their strides: the
unbind views of a fused qkv projection need no copy.
"""
import torch
import triton
import triton.language as tl

from .common import rotate_pairs


@triton.jit
def _norm_rope_rounded(x, frame, cos_ptr, sin_ptr, eps, ok, dtype: tl.constexpr,
                       NORM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows x [R, HEAD_DIM] (float32) -> RMS-normed over HEAD_DIM, rounded to `dtype` (as the eager
    norm's output is), rotated pairwise in float32 by the angles of each row's frame, rounded."""
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        x = (x * rstd[:, None]).to(dtype).to(tl.float32)
    pairs = tl.arange(0, HEAD_DIM // 2)
    angle = frame[:, None] * (HEAD_DIM // 2) + pairs[None, :]
    cos = tl.load(cos_ptr + angle, mask=ok[:, None], other=1.0)
    sin = tl.load(sin_ptr + angle, mask=ok[:, None], other=0.0)
    return rotate_pairs(x, cos, sin, HEAD_DIM).to(dtype)


@triton.jit
def _action_attention_kernel(
        q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr, slots_ptr, cos_ptr, sin_ptr,
        lq, frames, attended, heads, rows_per_frame, scale, eps,
        sq_n, sq_l, sq_h, sk_n, sk_l, sk_h, sv_n, sv_l, sv_h,
        skc_n, skc_l, skc_h, svc_n, svc_l, svc_h, so_n, so_l, so_h,
        HEAD_DIM: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr, NORM: tl.constexpr, IEEE: tl.constexpr):
    pid_nh = tl.program_id(0)
    pid_q = tl.program_id(1)
    n = pid_nh // heads
    h = pid_nh % heads
    dims = tl.arange(0, HEAD_DIM)
    dtype = kc_ptr.dtype.element_ty

    # 1. this call's keys (normed, rotated) and values into their ring slots
    f = tl.arange(0, BLOCK_F)
    f_ok = f < frames
    slot = tl.load(slots_ptr + f, mask=f_ok, other=0)
    k_new = tl.load(k_ptr + n * sk_n + h * sk_h + f[:, None] * sk_l + dims[None, :],
                    mask=f_ok[:, None], other=0.0).to(tl.float32)
    k_new = _norm_rope_rounded(k_new, f, cos_ptr, sin_ptr, eps, f_ok, dtype, NORM, HEAD_DIM)
    tl.store(kc_ptr + n * skc_n + h * skc_h + slot[:, None] * skc_l + dims[None, :], k_new,
             mask=f_ok[:, None])
    v_new = tl.load(v_ptr + n * sv_n + h * sv_h + f[:, None] * sv_l + dims[None, :],
                    mask=f_ok[:, None], other=0.0)
    tl.store(vc_ptr + n * svc_n + h * svc_h + slot[:, None] * svc_l + dims[None, :], v_new,
             mask=f_ok[:, None])
    tl.debug_barrier()  # every thread of the program sees the new slots before reading the cache

    # 2. this block of queries, normed and rotated in registers, over the first `attended` slots
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < lq
    q = tl.load(q_ptr + n * sq_n + h * sq_h + rows[:, None] * sq_l + dims[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    q = _norm_rope_rounded(q, rows // rows_per_frame, cos_ptr, sin_ptr, eps, row_ok, dtype, NORM,
                           HEAD_DIM)
    q = (q.to(tl.float32) * scale).to(dtype)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    for start in range(0, attended, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < attended
        k = tl.load(kc_ptr + n * skc_n + h * skc_h + cols[:, None] * skc_l + dims[None, :],
                    mask=col_ok[:, None], other=0.0)
        v = tl.load(vc_ptr + n * svc_n + h * svc_h + cols[:, None] * svc_l + dims[None, :],
                    mask=col_ok[:, None], other=0.0)
        if IEEE:  # float32 inputs: no TF32 rounding
            scores = tl.dot(q, tl.trans(k), out_dtype=tl.float32, input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        correction = tl.exp(m - m_new)
        denom = denom * correction + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(dtype), v, out_dtype=tl.float32, input_precision="ieee")
        else:
            pv = tl.dot(p.to(dtype), v, out_dtype=tl.float32)
        acc = acc * correction[:, None] + pv
        m = m_new
    out = acc / denom[:, None]
    tl.store(o_ptr + n * so_n + h * so_h + rows[:, None] * so_l + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def action_attention(q, k, v, k_cache, v_cache, slots, attended: int, cos, sin, eps):
    """See eager.action_attention: raw q [N, Lq, H, D], this call's raw k/v [N, F, H, D] (stored,
    normed and rotated, at rows `slots` [F] of k_cache/v_cache [N, R, H, D]), attention over the
    first `attended` cache rows; cos/sin [F, D/2] float32 per frame; eps None = no norm."""
    n, lq, heads, head_dim = q.shape
    frames = k.shape[1]
    _check(q, k, v, k_cache, v_cache, slots, attended, cos, sin)
    out = torch.empty_like(q)  # q's layout order: a frame-major q gives a frame-major output
    tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)]
    block_q = 16 if lq <= 16 else 64
    grid = (n * heads, triton.cdiv(lq, block_q))
    _action_attention_kernel[grid](
        *tensors, k_cache, v_cache, out, slots, cos.float().contiguous(), sin.float().contiguous(),
        lq, frames, attended, heads, lq // frames, head_dim ** -0.5, eps or 0.0,
        *(s for t in (*tensors, k_cache, v_cache, out) for s in t.stride()[:3]),
        HEAD_DIM=head_dim, BLOCK_F=max(2, triton.next_power_of_2(frames)), BLOCK_Q=block_q,
        BLOCK_K=16 if attended <= 16 else 32, NORM=eps is not None,
        IEEE=q.dtype == torch.float32,
        # a mouse program holds 3 queries: one warp does it fastest (H100: 38 us vs 65 us with 4
        # warps per layer); the keyboard's 64-query blocks want 4
        num_warps=1 if lq <= 16 else 4)
    return out


def _check(q, k, v, k_cache, v_cache, slots, attended, cos, sin):
    n, lq, heads, head_dim = q.shape
    frames = k.shape[1]
    if (k.shape[0] != n or k.shape[2:] != q.shape[2:] or v.shape != k.shape
            or k_cache.shape[0] != n or k_cache.shape[2:] != q.shape[2:]
            or v_cache.shape != k_cache.shape):
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k/v {tuple(k.shape)}/"
                         f"{tuple(v.shape)}, caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim {head_dim} must be a power of two >= 16")
    if slots.shape != (frames,) or cos.shape != (frames, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"slots must be [{frames}] and cos/sin [{frames}, {head_dim // 2}], got "
                         f"{tuple(slots.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    if lq % frames:
        raise ValueError(f"{lq} queries do not split into {frames} frames")
    if not 0 < attended <= k_cache.shape[1]:
        raise ValueError(f"attended {attended} must be in [1, {k_cache.shape[1]}] cache rows")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches need contiguous channels")
