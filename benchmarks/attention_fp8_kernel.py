"""Self-attention with FP8 (e4m3) tensor-core products and a bfloat16 output: a flash-attention
forward in Triton (one program per 128 queries of one head, online softmax over the keys).

A measured experiment, not part of the library (lab notebook step 39): at the real shape it ran
slower than cuDNN's bf16 attention (0.203 vs 0.148 ms) at 16-50x its error, so the model does
not use it; `benchmarks/attention_fp8.py` reruns the comparison.

Why our own: cuDNN's FP8 attention writes e4m3 on Hopper (bf16 output is Blackwell-only; lab
notebook step 35), which costs 25x bf16's attention error. Here the products run in FP8 and
everything else (softmax, accumulation, output) in float32 / bf16.

Two FP8 levels (`pv_fp8`):
* QK^T in FP8, P V in bf16 ("qk"): q and k quantized per (token, head) row, one float32 scale
  each (a row's scales factor out of its dot products exactly: S = sq_i sk_j (q^_i . k^_j)).
* both products in FP8 ("qk+pv"): also P (scaled by 2^8, exact, so that small probabilities stay
  normal e4m3 numbers) and v, quantized per (head, channel) over the keys (the scale of a channel
  factors out of P V exactly; a per-token scale would not: tokens are P V's reduction axis). v is
  stored transposed, [B, H, D, Lk]: Hopper's FP8 tensor-core product takes its second operand
  K-major.
And, for comparison in the benchmark, the same kernel with no FP8 at all (bf16 products).

The quantization passes (`quantize_qk`, `quantize_v`) run before the kernel over this call's
queries and the whole key window (the cache holds bf16). Their eager twins, and the attention's,
are `*_reference` below: float32 math on the same quantized operands.
"""
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from wan.kernels.fp8 import E4M3, E4M3_MAX, MIN_SCALE, quantize_rows
from wan.kernels.triton.fp8_rows import quantize_fp8

LOG2E = 1.4426950408889634
P_SCALE = 256.0  # P in [0, 1] times 2^8: e4m3's normal range reaches down to 2^-6 / 2^8
# (block_m, block_n, warps, stages) per variant: measured on an H200 at the real shape
# (2640 queries x 5280 keys, 12 heads of 128; benchmarks/attention_fp8.py)
CONFIGS = {"none": (128, 64, 8, 3), "qk": (64, 128, 4, 3), "qk+pv": (64, 128, 4, 3)}


class Fp8ChannelsT(NamedTuple):
    """v [B, Lk, H, D] as e4m3 `data` [B, H, D, Lk] (transposed) and float32 `scale` [B, H, D]."""
    data: torch.Tensor
    scale: torch.Tensor


def quantize_qk(x: torch.Tensor):
    """q or k [B, L, H, D] -> Fp8Rows with data [B, L, H, D] and scale [B, L, H, 1]."""
    return quantize_fp8(x, rows_per_program=16, chunk=triton.next_power_of_2(x.shape[-1]),
                        num_warps=4)


@triton.jit
def _v_amax_kernel(v_ptr, amax_ptr, Lk, H, s_vb, s_vl, s_vh, HEAD_DIM: tl.constexpr,
                   BLOCK_L: tl.constexpr):
    bh, block = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    tokens = block * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, HEAD_DIM)
    v = tl.load(v_ptr + b * s_vb + h * s_vh + tokens[:, None] * s_vl + d[None, :],
                mask=(tokens < Lk)[:, None], other=0.0)
    tl.atomic_max(amax_ptr + bh * HEAD_DIM + d, tl.max(tl.abs(v.to(tl.float32)), axis=0))


@triton.jit
def _v_store_kernel(v_ptr, scale_ptr, out_ptr, Lk, H, s_vb, s_vl, s_vh,
                    HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr, E4M3_MAX: tl.constexpr,
                    MIN_SCALE: tl.constexpr):
    bh, block = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    tokens = block * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, HEAD_DIM)
    ok = (tokens < Lk)[:, None]
    v = tl.load(v_ptr + b * s_vb + h * s_vh + tokens[:, None] * s_vl + d[None, :], mask=ok,
                other=0.0).to(tl.float32)
    amax = tl.load(scale_ptr + bh * HEAD_DIM + d)
    scale = tl.maximum(tl.math.div_rn(amax, E4M3_MAX), MIN_SCALE)
    q = tl.math.div_rn(v, scale[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + bh * HEAD_DIM * Lk + d[None, :] * Lk + tokens[:, None], q, mask=ok)


def quantize_v(v: torch.Tensor, block_l: int = 64) -> Fp8ChannelsT:
    """v [B, Lk, H, D] (last dim contiguous) -> e4m3 [B, H, D, Lk] with one scale per (b, h, d)."""
    b, lk, h, d = v.shape
    if v.stride(-1) != 1:
        v = v.contiguous()
    amax = torch.zeros(b, h, d, device=v.device, dtype=torch.float32)
    grid = (b * h, triton.cdiv(lk, block_l))
    _v_amax_kernel[grid](v, amax, lk, h, v.stride(0), v.stride(1), v.stride(2), HEAD_DIM=d,
                         BLOCK_L=block_l)
    data = torch.empty(b, h, d, lk, device=v.device, dtype=E4M3)
    _v_store_kernel[grid](v, amax, data, lk, h, v.stride(0), v.stride(1), v.stride(2),
                          HEAD_DIM=d, BLOCK_L=block_l, E4M3_MAX=E4M3_MAX, MIN_SCALE=MIN_SCALE)
    # the store kernel derived each scale from `amax` the same way (correctly rounded amax / 448)
    return Fp8ChannelsT(data, (amax / E4M3_MAX).clamp_min(MIN_SCALE))


def quantize_v_reference(v: torch.Tensor) -> Fp8ChannelsT:
    """The eager twin of quantize_v: float32 math."""
    scale = (v.float().abs().amax(dim=1) / E4M3_MAX).clamp_min(MIN_SCALE)  # [B, H, D]
    data = (v.float() / scale[:, None]).to(E4M3).permute(0, 2, 3, 1).contiguous()
    return Fp8ChannelsT(data, scale)


@triton.jit
def _attention_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr, Lq, Lk, H, qk_scale,
                      s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vh, s_vx, s_vy, s_ob, s_ol, s_oh,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      QK_FP8: tl.constexpr, PV_FP8: tl.constexpr, P_SCALE: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head). v's strides (s_vx, s_vy) are
    (token, channel) for a bf16 v [B, Lk, H, D] and (channel, token) for an FP8 v^T
    [B, H, D, Lk]."""
    block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_ql + d[None, :],
                mask=row_ok[:, None], other=0.0)
    # the softmax scale (and log2 e: exp2 below) rides on q's row scales
    if QK_FP8:
        q_scale = tl.load(qs_ptr + (b * Lq + rows) * H + h, mask=row_ok, other=0.0) * qk_scale
    else:
        q_scale = tl.full([BLOCK_M], qk_scale, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, Lk, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Lk
        k = tl.load(k_ptr + b * s_kb + h * s_kh + cols[:, None] * s_kl + d[None, :],
                    mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k))
        if QK_FP8:
            k_scale = tl.load(ks_ptr + (b * Lk + cols) * H + h, mask=col_ok, other=0.0)
            s = s * q_scale[:, None] * k_scale[None, :]
        else:
            s = s * q_scale[:, None]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if PV_FP8:
            vt = tl.load(v_ptr + b * s_vb + h * s_vh + d[:, None] * s_vx + cols[None, :] * s_vy,
                         mask=col_ok[None, :], other=0.0)
            acc = tl.dot((p * P_SCALE).to(vt.dtype), tl.trans(vt), acc)
        else:
            v = tl.load(v_ptr + b * s_vb + h * s_vh + cols[:, None] * s_vx + d[None, :] * s_vy,
                        mask=col_ok[:, None], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * (tl.load(vs_ptr + bh * HEAD_DIM + d) / P_SCALE)[None, :]
    tl.store(o_ptr + b * s_ob + h * s_oh + rows[:, None] * s_ol + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def attention_fp8(q, k, v, fp8: str = "qk", config=None, out_dtype=None):
    """softmax(q k^T / sqrt(D)) v for q [B, Lq, H, D], k, v [B, Lk, H, D] (bf16 or fp16, last dim
    contiguous) -> [B, Lq, H, D] in q's dtype (or `out_dtype`). `fp8`: "qk" (QK^T in FP8), "qk+pv"
    (both products) or "none" (no FP8: the kernel's bf16 baseline). `config`: (block_m, block_n,
    warps, stages), default CONFIGS[fp8]."""
    if fp8 not in CONFIGS:
        raise ValueError(f"fp8 must be one of {sorted(CONFIGS)}, got {fp8!r}")
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if k.shape != (b, lk, h, d) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         "[B, Lq, H, D] and two [B, Lk, H, D]")
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {d}: the kernel takes a power of two from 16 to 256")
    if fp8 != "none" and d < 32:
        raise ValueError(f"head dim {d}: FP8 tensor-core products take at least 32 per step")
    block_m, block_n, warps, stages = config or CONFIGS[fp8]
    qk_scale = LOG2E / math.sqrt(d)
    if fp8 == "none":
        qq, kk = q, k
        q_scale = k_scale = q  # unused
    else:
        qq, kq = quantize_qk(q), quantize_qk(k)
        qq, q_scale, kk, k_scale = qq.data, qq.scale, kq.data, kq.scale
    out = torch.empty(q.shape, device=q.device, dtype=out_dtype or q.dtype)
    if fp8 == "qk+pv":
        vq = quantize_v(v)
        vv, v_scale = vq.data, vq.scale
        v_strides = vv.stride()  # [B, H, D, Lk]: batch, head, channel, token
    else:
        vv = v if v.stride(-1) == 1 else v.contiguous()
        v_scale = vv  # unused
        v_strides = (vv.stride(0), vv.stride(2), vv.stride(1), 1)  # batch, head, token, channel
    grid = (triton.cdiv(lq, block_m), b * h)
    _attention_kernel[grid](
        qq, q_scale, kk, k_scale, vv, v_scale, out, lq, lk, h, qk_scale,
        qq.stride(0), qq.stride(1), qq.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
        *v_strides, out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, QK_FP8=fp8 != "none",
        PV_FP8=fp8 == "qk+pv", P_SCALE=P_SCALE, num_warps=warps, num_stages=stages)
    return out


def attention_fp8_reference(q, k, v, fp8: str = "qk"):
    """The eager twin: the same quantized operands, float32 math, one softmax over all keys (P's
    e4m3 rounding is taken against the row's final maximum; the kernel's against its running one,
    so the two differ by P's rounding, not more)."""
    if fp8 not in CONFIGS:
        raise ValueError(f"fp8 must be one of {sorted(CONFIGS)}, got {fp8!r}")
    d = q.shape[-1]
    if fp8 == "none":
        qf, kf = q.float(), k.float()
    else:
        qf, kf = quantize_rows(q).dequantize(), quantize_rows(k).dequantize()
    s = torch.einsum("blhd,bmhd->bhlm", qf, kf) / math.sqrt(d)
    p = torch.softmax(s, dim=-1)
    if fp8 == "qk+pv":
        vq = quantize_v_reference(v)
        p = (p * P_SCALE).to(E4M3).float() / P_SCALE
        vf = vq.data.float() * vq.scale[..., None]  # [B, H, D, Lk]
        out = torch.einsum("bhlm,bhdm->blhd", p, vf)
    else:
        out = torch.einsum("bhlm,bmhd->blhd", p.to(v.dtype).float() if fp8 != "none" else p,
                           v.float())
    return out.to(q.dtype)
