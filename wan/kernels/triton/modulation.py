"""adaLN in one pass each: LayerNorm + modulation, and the gated residual add.

Both work row by row over x [B, F*S, C] with the per-frame factors [B, F, 1, C]; the eager twins
(wan/kernels/eager.py) broadcast those through strided views, which torch runs with its slow
non-vectorized kernel, and LayerNorm and modulation are two passes over the tokens.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _layer_norm_modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, c, tokens, per_frame, eps,
                                s_xb, s_xl, s_mb, s_mf, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    b = row // tokens
    frame = (row % tokens) // per_frame
    cols = tl.arange(0, BLOCK_C)
    ok = cols < c
    x = tl.load(x_ptr + b * s_xb + (row % tokens) * s_xl + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / c
    centered = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / c + eps)
    # round the normalised value to the input dtype, as LayerNorm's output is, then modulate
    normed = (centered * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    m_off = b * s_mb + frame * s_mf + cols
    shift = tl.load(shift_ptr + m_off, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + m_off, mask=ok, other=0.0).to(tl.float32)
    out = normed * (1.0 + scale) + shift
    tl.store(out_ptr + row * c + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, c, tokens, per_frame,
                           s_xb, s_xl, s_yb, s_yl, s_gb, s_gf, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    b = row // tokens
    token = row % tokens
    frame = token // per_frame
    cols = tl.arange(0, BLOCK_C)
    ok = cols < c
    x = tl.load(x_ptr + b * s_xb + token * s_xl + cols, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * s_yb + token * s_yl + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * s_gb + frame * s_gf + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * c + cols, (x + y * gate).to(out_ptr.dtype.element_ty), mask=ok)


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


def layer_norm_modulate(x, shift, scale, eps):
    """LayerNorm(x) * (1 + scale) + shift; x [B, F*S, C], shift/scale [B, F, 1, C]."""
    b, length, c, per_frame = _check(x, shift, "shift")
    _check(x, scale, "scale")
    x = _unit_channel_stride(x)
    if shift.stride() != scale.stride() or shift.stride(-1) != 1:  # one set of strides for both
        shift, scale = shift.contiguous(), scale.contiguous()
    out = torch.empty(b, length, c, dtype=x.dtype, device=x.device)
    _layer_norm_modulate_kernel[(b * length,)](
        x, shift, scale, out, c, length, per_frame, eps, x.stride(0), x.stride(1),
        shift.stride(0), shift.stride(1), BLOCK_C=triton.next_power_of_2(c))
    return out


def gated_residual(x, y, gate):
    """x + y * gate; x, y [B, F*S, C], gate [B, F, 1, C]."""
    b, length, c, per_frame = _check(x, gate, "gate")
    if y.shape != x.shape:
        raise ValueError(f"y {tuple(y.shape)} must match x {tuple(x.shape)}")
    x, y, gate = (_unit_channel_stride(t) for t in (x, y, gate))
    out = torch.empty(b, length, c, dtype=x.dtype, device=x.device)
    _gated_residual_kernel[(b * length,)](
        x, y, gate, out, c, length, per_frame, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        gate.stride(0), gate.stride(1), BLOCK_C=triton.next_power_of_2(c))
    return out
