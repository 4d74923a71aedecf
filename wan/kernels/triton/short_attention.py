"""Attention over a handful of keys (the action module's mouse and keyboard attention).

mouse: 880 * B sequences of 3 queries over <= window (6) key frames; keyboard: every token
(2640 queries) over the same <= 6 key frames. A general flash kernel tiles 64+ queries and 64+ keys,
so most of each tile is padding; here one program takes a (sequence, head) pair and a block of
queries, keeps every key of the sequence in registers (a loop with an online softmax covers longer
key lists), and reads q, k, v through their strides, so unbind/transpose views need no copy.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _short_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lq, lk, heads, scale,
        sq_n, sq_l, sq_h, sk_n, sk_l, sk_h, sv_n, sv_l, sv_h, so_n, so_l, so_h,
        HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_nh = tl.program_id(0)
    pid_q = tl.program_id(1)
    n = pid_nh // heads
    h = pid_nh % heads
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < lq
    q = tl.load(q_ptr + n * sq_n + h * sq_h + rows[:, None] * sq_l + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    q = (q.to(tl.float32) * scale).to(q.dtype)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    for start in range(0, lk, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < lk
        k = tl.load(k_ptr + n * sk_n + h * sk_h + cols[:, None] * sk_l + dims[None, :],
                    mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptr + n * sv_n + h * sv_h + cols[:, None] * sv_l + dims[None, :],
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
            pv = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        acc = acc * correction[:, None] + pv
        m = m_new
    out = acc / denom[:, None]
    tl.store(o_ptr + n * so_n + h * so_h + rows[:, None] * so_l + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[N, Lq, H, D] x [N, Lk, H, D] -> [N, Lq, H, D] (any strides with a unit last stride)."""
    n, lq, heads, head_dim = q.shape
    lk = k.shape[1]
    if k.shape[0] != n or k.shape[2:] != q.shape[2:] or v.shape != k.shape:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim {head_dim} must be a power of two >= 16")
    if lk == 0:
        raise ValueError("attention over zero keys")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(n, lq, heads, head_dim, dtype=q.dtype, device=q.device)
    block_q = 16 if lq <= 16 else 64
    block_k = 16 if lk <= 16 else 32
    grid = (n * heads, triton.cdiv(lq, block_q))
    _short_attention_kernel[grid](
        q, k, v, out, lq, lk, heads, head_dim ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=head_dim, BLOCK_Q=block_q, BLOCK_K=block_k, IEEE=q.dtype == torch.float32)
    return out
