"""Row-wise kernels over the tokens x [B, F*S, C] with per-frame factors [B, F, 1, C]:

* LayerNorm + adaLN modulation `LN(x) * (1 + scale) + shift` in one pass, and the same kernel as a
  plain affine LayerNorm `LN(x) * weight + bias` (the factors are then one row shared by all tokens);
* the gated residual add `x + y * gate`, alone or followed in the same pass by either LayerNorm (the
  sum is stored too: it is the residual stream);
* with `quantize=True` the LayerNorms write their output as e4m3 with one scale per token
  (Fp8Rows, wan/kernels/fp8.py) for the FP8 GEMM that reads it;
* `gelu_tanh(x + bias)` with a per-frame bias (the mouse MLP's first layer, whose mouse-window part
  is one row per frame).

The eager twins (wan/kernels/eager.py) broadcast the factors through strided views, which torch
runs with its slow non-vectorized kernel, and LayerNorm and modulation are two passes there. One
program takes one token row; two warps per row measured fastest on an H100 (6.4 vs 6.7 us with
four, for 2640 rows of 1536).
"""
import torch
import triton
import triton.language as tl

from ..fp8 import E4M3, E4M3_MAX, MIN_SCALE, Fp8Rows
from .common import e4m3_row_scale, gelu_tanh

NUM_WARPS = 2
# the e4m3 row scale's constants (wan/kernels/fp8.py), for the kernels that quantize
FP8_SCALE = dict(E4M3_MAX=E4M3_MAX, MIN_SCALE=MIN_SCALE)


@triton.jit
def _normalize(x, a, shift, ok, c, eps, MODULATE: tl.constexpr, dtype: tl.constexpr):
    """One row x (float32): MODULATE: LN(x) rounded to `dtype` (as LayerNorm's output),
    * (1 + a) + shift. Otherwise LN(x) * a + shift in float32 (as torch's affine LayerNorm)."""
    mean = tl.sum(x, axis=0) / c
    centered = tl.where(ok, x - mean, 0.0)
    normed = centered * (1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / c + eps))
    if MODULATE:
        return normed.to(dtype).to(tl.float32) * (1.0 + a) + shift
    return normed * a + shift


@triton.jit
def _gated_sum(x_ptr, y_ptr, gate_ptr, row, tokens, per_frame, cols, ok, s_xb, s_xl, s_yb, s_yl,
               s_gb, s_gf):
    """x + y * gate of one token row, in float32 (the gate is its frame's row)."""
    b = row // tokens
    token = row % tokens
    x = tl.load(x_ptr + b * s_xb + token * s_xl + cols, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * s_yb + token * s_yl + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * s_gb + (token // per_frame) * s_gf + cols, mask=ok,
                   other=0.0).to(tl.float32)
    return x + y * gate


@triton.jit
def _store_row(out_ptr, scale_ptr, row, c, cols, ok, value, dtype: tl.constexpr,
               QUANT: tl.constexpr, E4M3_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """Store one row rounded to `dtype`; QUANT: as e4m3 with the row's scale (the rounded row's
    largest magnitude / E4M3_MAX) stored at scale_ptr[row] (wan/kernels/fp8.py)."""
    value = value.to(dtype)
    if QUANT:
        value = value.to(tl.float32)
        scale = e4m3_row_scale(tl.max(tl.abs(value), axis=0), E4M3_MAX, MIN_SCALE)
        tl.store(out_ptr + row * c + cols,
                 tl.math.div_rn(value, scale).to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(scale_ptr + row, scale)
    else:
        tl.store(out_ptr + row * c + cols, value, mask=ok)


@triton.jit
def _layer_norm_kernel(x_ptr, a_ptr, b_ptr, out_ptr, scale_ptr, c, tokens, per_frame, eps,
                       s_xb, s_xl, s_mb, s_mf, MODULATE: tl.constexpr, QUANT: tl.constexpr,
                       BLOCK_C: tl.constexpr, E4M3_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    row = tl.program_id(0)
    b = row // tokens
    frame = (row % tokens) // per_frame
    cols = tl.arange(0, BLOCK_C)
    ok = cols < c
    x = tl.load(x_ptr + b * s_xb + (row % tokens) * s_xl + cols, mask=ok, other=0.0).to(tl.float32)
    m_off = b * s_mb + frame * s_mf + cols
    a = tl.load(a_ptr + m_off, mask=ok, other=0.0).to(tl.float32)
    shift = tl.load(b_ptr + m_off, mask=ok, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    _store_row(out_ptr, scale_ptr, row, c, cols, ok,
               _normalize(x, a, shift, ok, c, eps, MODULATE, dtype), dtype, QUANT, E4M3_MAX,
               MIN_SCALE)


@triton.jit
def _gated_residual_layer_norm_kernel(x_ptr, y_ptr, gate_ptr, a_ptr, b_ptr, sum_bias_ptr,
                                      sum_ptr, out_ptr, scale_ptr, c, tokens, per_frame, eps, s_xb,
                                      s_xl, s_yb, s_yl, s_gb, s_gf, s_mb, s_mf,
                                      MODULATE: tl.constexpr, QUANT: tl.constexpr,
                                      SUM_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
                                      E4M3_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """sum = x + y * gate (rounded: the residual stream), then the LayerNorm of the sum. The sum
    is stored, with SUM_BIAS plus a bias row (the next residual add's bias, added ahead so that
    its GEMM can accumulate into the stream) added to the unrounded sum: one rounding, not two
    (rounding the sum first, then the sum plus the bias, made the DiT's bf16 error 1.13x the
    reference's; this keeps it at 1.00x: notebook step 46)."""
    row = tl.program_id(0)
    b = row // tokens
    frame = (row % tokens) // per_frame
    cols = tl.arange(0, BLOCK_C)
    ok = cols < c
    dtype = sum_ptr.dtype.element_ty
    raw = _gated_sum(x_ptr, y_ptr, gate_ptr, row, tokens, per_frame, cols, ok, s_xb, s_xl, s_yb,
                     s_yl, s_gb, s_gf)
    total = raw.to(dtype)
    if SUM_BIAS:
        ahead = tl.load(sum_bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(sum_ptr + row * c + cols, (raw + ahead).to(dtype), mask=ok)
    else:
        tl.store(sum_ptr + row * c + cols, total, mask=ok)
    m_off = b * s_mb + frame * s_mf + cols
    a = tl.load(a_ptr + m_off, mask=ok, other=0.0).to(tl.float32)
    shift = tl.load(b_ptr + m_off, mask=ok, other=0.0).to(tl.float32)
    _store_row(out_ptr, scale_ptr, row, c, cols, ok,
               _normalize(total.to(tl.float32), a, shift, ok, c, eps, MODULATE, dtype), dtype,
               QUANT, E4M3_MAX, MIN_SCALE)


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, c, tokens, per_frame,
                           s_xb, s_xl, s_yb, s_yl, s_gb, s_gf, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < c
    total = _gated_sum(x_ptr, y_ptr, gate_ptr, row, tokens, per_frame, cols, ok, s_xb, s_xl, s_yb,
                       s_yl, s_gb, s_gf)
    tl.store(out_ptr + row * c + cols, total.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _frame_bias_gelu_kernel(x_ptr, bias_ptr, out_ptr, c, tokens, per_frame, s_xb, s_xl, s_bb,
                            s_bf, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    b = row // tokens
    token = row % tokens
    cols = tl.arange(0, BLOCK_C)
    ok = cols < c
    x = tl.load(x_ptr + b * s_xb + token * s_xl + cols, mask=ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + b * s_bb + (token // per_frame) * s_bf + cols, mask=ok,
                   other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    h = (x + bias).to(dtype).to(tl.float32)  # the eager twin rounds the sum before the GELU
    tl.store(out_ptr + row * c + cols, gelu_tanh(h).to(dtype), mask=ok)


def _check(x, factors, name):
    b, length, c = x.shape
    if factors.ndim != 4 or factors.shape[0] != b or factors.shape[2] != 1 or factors.shape[3] != c:
        raise ValueError(f"{name} must be [B, F, 1, C] for x {tuple(x.shape)}, got "
                         f"{tuple(factors.shape)}")
    if length % factors.shape[1]:
        raise ValueError(f"{length} tokens do not split into {factors.shape[1]} frames")
    return b, length, c, length // factors.shape[1]


def _unit_channel_stride(t):
    """The kernels index rows through strides but need contiguous channels."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _outputs(x, rows_shape, quantize: bool):
    """The norm's output buffer, and with `quantize` its e4m3 twin's scales [rows, 1] (float32)."""
    if not quantize:
        return torch.empty(rows_shape, dtype=x.dtype, device=x.device), None
    scales = torch.empty(*rows_shape[:-1], 1, dtype=torch.float32, device=x.device)
    return torch.empty(rows_shape, dtype=E4M3, device=x.device), scales


def _result(out, scales):
    return out if scales is None else Fp8Rows(out, scales)


def layer_norm_modulate(x, shift, scale, eps, quantize=False):
    """LayerNorm(x) * (1 + scale) + shift; x [B, F*S, C], shift/scale [B, F, 1, C]. With
    `quantize`: Fp8Rows (e4m3, one scale per token) of that, for an FP8 GEMM."""
    b, length, c, per_frame = _check(x, shift, "shift")
    _check(x, scale, "scale")
    x = _unit_channel_stride(x)
    if shift.stride() != scale.stride() or shift.stride(-1) != 1:  # one set of strides for both
        shift, scale = shift.contiguous(), scale.contiguous()
    out, scales = _outputs(x, (b, length, c), quantize)
    _layer_norm_kernel[(b * length,)](
        x, scale, shift, out, scales, c, length, per_frame, eps, x.stride(0), x.stride(1),
        shift.stride(0), shift.stride(1), MODULATE=True, QUANT=quantize,
        BLOCK_C=triton.next_power_of_2(c), **FP8_SCALE, num_warps=NUM_WARPS)
    return _result(out, scales)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim of x [..., C] with an optional affine weight/bias [C]."""
    c = x.shape[-1]
    rows = _unit_channel_stride(x).reshape(-1, c)
    weight = weight if weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
    bias = bias if bias is not None else torch.zeros(c, dtype=x.dtype, device=x.device)
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"weight and bias must be [{c}], got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    n = rows.shape[0]
    _layer_norm_kernel[(n,)](
        rows, weight, bias, out, None, c, n, n, eps, 0, rows.stride(0), 0, 0, MODULATE=False,
        QUANT=False, BLOCK_C=triton.next_power_of_2(c), **FP8_SCALE, num_warps=NUM_WARPS)
    return out.view(x.shape)


def gated_residual(x, y, gate):
    """x + y * gate; x, y [B, F*S, C], gate [B, F, 1, C]."""
    b, length, c, per_frame = _check(x, gate, "gate")
    if y.shape != x.shape:
        raise ValueError(f"y {tuple(y.shape)} must match x {tuple(x.shape)}")
    x, y, gate = (_unit_channel_stride(t) for t in (x, y, gate))
    out = torch.empty(b, length, c, dtype=x.dtype, device=x.device)
    _gated_residual_kernel[(b * length,)](
        x, y, gate, out, c, length, per_frame, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        gate.stride(0), gate.stride(1), BLOCK_C=triton.next_power_of_2(c), num_warps=NUM_WARPS)
    return out


def gated_residual_layer_norm_modulate(x, y, gate, shift, scale, eps, quantize=False):
    """(s, LayerNorm(s) * (1 + scale) + shift) for s = x + y * gate; x, y [B, F*S, C], gate,
    shift, scale [B, F, 1, C]. With `quantize` the second is Fp8Rows."""
    _check(x, shift, "shift")
    _check(x, scale, "scale")
    if shift.stride() != scale.stride() or shift.stride(-1) != 1:
        shift, scale = shift.contiguous(), scale.contiguous()
    return _gated_residual_layer_norm(x, y, gate, scale, shift, shift.stride(0), shift.stride(1),
                                      eps, modulate=True, quantize=quantize)


def gated_residual_layer_norm(x, y, gate, weight, bias, eps, quantize=False, sum_bias=None):
    """(s, LayerNorm(s) [* weight + bias]) for s = x + y * gate; x, y [B, F*S, C], gate
    [B, F, 1, C], weight/bias [C] or None. With `quantize` the second is Fp8Rows. With
    `sum_bias` [C] the first is s + sum_bias (the LayerNorm still of s)."""
    c = x.shape[-1]
    if sum_bias is not None and sum_bias.shape != (c,):
        raise ValueError(f"sum_bias must be [{c}], got {tuple(sum_bias.shape)}")
    weight = weight if weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
    bias = bias if bias is not None else torch.zeros(c, dtype=x.dtype, device=x.device)
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"weight and bias must be [{c}], got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    return _gated_residual_layer_norm(x, y, gate, weight, bias, 0, 0, eps, modulate=False,
                                      quantize=quantize, sum_bias=sum_bias)


def _gated_residual_layer_norm(x, y, gate, a, b, s_mb, s_mf, eps, modulate, quantize,
                               sum_bias=None):
    batch, length, c, per_frame = _check(x, gate, "gate")
    if y.shape != x.shape:
        raise ValueError(f"y {tuple(y.shape)} must match x {tuple(x.shape)}")
    x, y, gate = (_unit_channel_stride(t) for t in (x, y, gate))
    total = torch.empty(batch, length, c, dtype=x.dtype, device=x.device)
    out, scales = _outputs(x, (batch, length, c), quantize)
    _gated_residual_layer_norm_kernel[(batch * length,)](
        x, y, gate, a, b, sum_bias, total, out, scales, c, length, per_frame, eps, x.stride(0),
        x.stride(1), y.stride(0), y.stride(1), gate.stride(0), gate.stride(1), s_mb, s_mf,
        MODULATE=modulate, QUANT=quantize, SUM_BIAS=sum_bias is not None,
        BLOCK_C=triton.next_power_of_2(c), **FP8_SCALE, num_warps=NUM_WARPS)
    return total, _result(out, scales)


def frame_bias_gelu(x, bias):
    """gelu_tanh(x + bias); x [B, F*S, C], bias [B, F, 1, C] (one row per frame)."""
    b, length, c, per_frame = _check(x, bias, "bias")
    x, bias = _unit_channel_stride(x), _unit_channel_stride(bias)
    out = torch.empty(b, length, c, dtype=x.dtype, device=x.device)
    _frame_bias_gelu_kernel[(b * length,)](
        x, bias, out, c, length, per_frame, x.stride(0), x.stride(1), bias.stride(0),
        bias.stride(1), BLOCK_C=triton.next_power_of_2(c), num_warps=NUM_WARPS)
    return out
