"""The eager backend: every op in plain torch, on any device and dtype. The twin every other
backend is tested against, and numerically the reference model's math."""
import torch
import torch.nn.functional as F

from .fp8 import Fp8Rows, Fp8Weight, quantize_rows


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU (upstream's FFN and mouse MLP) in x's dtype; the Triton kernels' twin is
    `gelu_tanh` in wan/kernels/triton/common.py."""
    return F.gelu(x, approximate="tanh")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention without a mask: [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D].
    Scores in float32 at least (float64 stays float64), scale 1/sqrt(D). float32/float64 inputs go
    through torch's SDPA in their own dtype (exact in that dtype, and several times faster on a CPU
    than materialising the scores); half precision is widened to float32 first."""
    if q.dtype not in (torch.float32, torch.float64):
        return attention(q.float(), k.float(), v.float()).to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _maybe_quantized(out, quantize: bool):
    """The norms' output as it is, or as Fp8Rows for an FP8 GEMM (`quantize=True`)."""
    return quantize_rows(out) if quantize else out


def layer_norm_modulate(x, shift, scale, eps, quantize=False):
    """x [B, F*S, C]; shift, scale [B, F, 1, C] -> LayerNorm(x) * (1 + scale) + shift (as
    Fp8Rows with `quantize`)."""
    frames = shift.shape[1]
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps).unflatten(1, (frames, -1))
    return _maybe_quantized(torch.addcmul(shift, normed, 1 + scale).flatten(1, 2), quantize)


def gated_residual(x, y, gate):
    """x + y * gate; x, y [B, F*S, C], gate [B, F, 1, C]."""
    frames = gate.shape[1]
    return torch.addcmul(x.unflatten(1, (frames, -1)), y.unflatten(1, (frames, -1)),
                         gate).flatten(1, 2)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim with an optional affine weight/bias."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def gated_residual_layer_norm_modulate(x, y, gate, shift, scale, eps, quantize=False):
    """(s, LayerNorm(s) * (1 + scale) + shift) for s = x + y * gate (per frame); the second as
    Fp8Rows with `quantize`."""
    total = gated_residual(x, y, gate)
    return total, layer_norm_modulate(total, shift, scale, eps, quantize)


def gated_residual_layer_norm(x, y, gate, weight, bias, eps, quantize=False, sum_bias=None):
    """(s, LayerNorm(s) [* weight + bias]) for s = x + y * gate (per frame); the second as
    Fp8Rows with `quantize`. With `sum_bias` [C] the first is s + sum_bias: the bias of the
    residual add that follows, added ahead so that its GEMM can accumulate into the stream; it
    is added to s before s is rounded to x's dtype (one rounding, as the Triton kernel)."""
    total = gated_residual(x, y, gate)
    normed = _maybe_quantized(layer_norm(total, weight, bias, eps), quantize)
    if sum_bias is None:
        return total, normed
    compute = torch.promote_types(x.dtype, torch.float32)
    raw = gated_residual(x.to(compute), y.to(compute), gate.to(compute))
    return (raw + sum_bias.to(compute)).to(x.dtype), normed


def frame_bias_gelu(x, bias):
    """gelu_tanh(x + bias); x [B, F*S, C], bias [B, F, 1, C] (one row per frame)."""
    frames = bias.shape[1]
    return gelu_tanh(x.unflatten(1, (frames, -1)) + bias).flatten(1, 2)


def rms_norm(x, weight, eps, compute_dtype=None):
    """RMS norm over the last dim, computed in `compute_dtype` (default x's), then [* weight].
    Half-precision inputs asking for float32 go straight in: torch accumulates them in float32."""
    compute = compute_dtype or x.dtype
    if compute == x.dtype or (compute == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        out = F.rms_norm(x, (x.shape[-1],), eps=eps)
    else:
        out = F.rms_norm(x.to(compute), (x.shape[-1],), eps=eps).to(x.dtype)
    return out if weight is None else out * weight


def rope(x, cos, sin, compute_dtype):
    """Rotate the channel pairs (2i, 2i+1) of x [N, L, H, D] by angles with cos/sin [L, D/2],
    as one complex multiply in `compute_dtype` (float32 or float64). The Triton kernels' twin is
    `rotate_pairs` in wan/kernels/triton/common.py; the reference model's is wan/modules/rope.py."""
    xr = x.to(compute_dtype)
    if xr.stride(-1) != 1 or any(s % 2 for s in xr.stride()[:-1]):
        xr = xr.contiguous()
    rotation = torch.complex(cos.to(compute_dtype), sin.to(compute_dtype))[:, None, :]
    rotated = torch.view_as_complex(xr.unflatten(-1, (-1, 2))) * rotation
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def norm_rope_store(x, weight, eps, cos, sin, heads, dest=None, slots=None,
                    rope_dtype=torch.float32):
    """x [B, L, H*D]: RMS norm over H*D in float32 with `weight` (skipped when None), RoPE with
    cos/sin [L, D/2] in `rope_dtype` (skipped when None); returned as [B, L, H, D], or stored into
    dest [B, R, H, D] at rows slots[l // S] * S + l % S (S = L / len(slots)) and dest returned."""
    b, length, c = x.shape
    y = rms_norm(x, weight, eps, torch.float32) if weight is not None else x
    y = y.reshape(b, length, heads, c // heads)
    if cos is not None:
        y = rope(y, cos, sin, rope_dtype)
    if dest is None:
        return y
    if slots is None:
        return dest.copy_(y)
    per_frame = length // slots.shape[0]
    dest.view(b, -1, per_frame, heads, c // heads).index_copy_(
        1, slots, y.view(b, -1, per_frame, heads, c // heads))
    return dest


def qkv_norm_rope_store(q, k, v, q_weight, k_weight, eps, cos, sin, heads, k_cache, v_cache,
                        slots, rope_dtype=torch.float32):
    """The self-attention's q, k, v [B, L, H*D]: q normed and rotated into a new [B, L, H, D]
    tensor (returned), k normed and rotated into its ring slots of k_cache, v into v_cache's."""
    norm_rope_store(k, k_weight, eps, cos, sin, heads, dest=k_cache, slots=slots,
                    rope_dtype=rope_dtype)
    norm_rope_store(v, weight=None, eps=None, cos=None, sin=None, heads=heads, dest=v_cache,
                    slots=slots)
    return norm_rope_store(q, q_weight, eps, cos, sin, heads, rope_dtype=rope_dtype)


def linear_gelu(x, weight, bias):
    """gelu_tanh(x @ weight^T + bias): the FFN's first layer and activation (upstream's FFN uses the
    tanh GELU)."""
    return gelu_tanh(F.linear(x, weight, bias))


def quantize_fp8(x, gelu=False):
    """x [..., K] (or gelu_tanh(x), computed in x's dtype) -> Fp8Rows with one scale per row."""
    return quantize_rows(gelu_tanh(x) if gelu else x)


def linear_fp8(x: Fp8Rows, weight: Fp8Weight, bias):
    """x @ weight^T + bias from FP8 operands, emulated: both dequantized to float32, one float32
    GEMM, the bias added in float32, rounded to the model's dtype once (what the FP8 tensor cores
    compute, up to summation order). For tests on any device; the registry never picks it on its
    own (select it by name: backend={'linear_fp8': 'eager'})."""
    out = x.dequantize() @ weight.dequantize().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(weight.dtype)


def action_attention_over(attend):
    """The action module's attention op with `attend(q, k, v)` as its core (the flash backend
    passes its own): see `action_attention`."""

    def action_attention(q, k, v, k_cache, v_cache, slots, attended: int, cos, sin, eps):
        """q [N, Lq, H, D] raw queries (query row r is in frame r // (Lq / F)); k, v [N, F, H, D]
        this call's raw keys/values of F frames. q and k are RMS-normed over D without weight
        (skipped when eps is None; in their dtype, half types accumulating in float32), then
        rotated by their frame's cos/sin [F, D/2] in float32; k and v are written to rows `slots`
        [F] of k_cache/v_cache [N, R, H, D]; the result is attention over the first `attended`
        cache rows, [N, Lq, H, D]."""
        frames = k.shape[1]

        def norm_rope(x, angle_rows):
            if eps is not None:
                x = rms_norm(x, None, eps)
            # float32 whatever x's dtype, as upstream's action RoPE
            return rope(x, cos.repeat_interleave(angle_rows, 0), sin.repeat_interleave(angle_rows, 0),
                        torch.float32)

        k_cache.index_copy_(1, slots, norm_rope(k, 1))
        v_cache.index_copy_(1, slots, v)
        q = norm_rope(q, q.shape[1] // frames)
        return attend(q, k_cache[:, :attended], v_cache[:, :attended])

    return action_attention


action_attention = action_attention_over(attention)

def rms_norm_silu(x, gamma, out=None, bias=None):
    """The VAE decoder's RMS norm over channels (dim 1: x / ||x|| * sqrt(C) * gamma, as upstream's
    `RMS_norm`) then SiLU, for x [B, C, T, H, W], after adding `bias` [C] (the preceding
    convolution's, when given); written into `out` when given."""
    if bias is not None:
        x = x + bias.view(1, -1, 1, 1, 1)
    y = F.silu(F.normalize(x, dim=1) * x.shape[1] ** 0.5 * gamma)
    return y if out is None else out.copy_(y)


def bias_residual_add(h, bias, residual):
    """(h + bias) + residual: a convolution's output [B, C, T, H, W], its bias [C], the shortcut."""
    return (h + bias.view(1, -1, 1, 1, 1)) + residual


def bias_residual_add_rms_norm_silu(h, bias, residual, gamma, out):
    """s = bias_residual_add(h, bias, residual), returned, and rms_norm_silu(s, gamma) written
    into `out` (the next block's norm of the sum, as its own op would compute it)."""
    s = bias_residual_add(h, bias, residual)
    rms_norm_silu(s, gamma, out)
    return s


def check_upsample_conv(x, weight, bias):
    """The shapes upsample_conv2d takes (every backend): frames [N, Cin, H, W], a 3x3 weight
    [Cout, Cin, 3, 3], bias [Cout] or None."""
    if x.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) \
            or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x [N, Cin, H, W] and a 3x3 weight [Cout, Cin, 3, 3] expected, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def upsample_conv2d(x, weight, bias=None):
    """conv2d(nearest 2x upsampling of x, weight, padding 1) + bias: the decoder's resample, frames
    [N, Cin, H, W] -> [N, Cout, 2H, 2W] (torch's conv over the upsampled frames)."""
    check_upsample_conv(x, weight, bias)
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def conv3d_narrow(x, weight, bias=None):
    """conv3d of the window x [B, Cin, KT - 1 + T, H, W] with weight [Cout, Cin, KT, KH, KW], valid
    in time, zero-padded (KH - 1) / 2, (KW - 1) / 2 in height and width, + bias (torch's conv in
    x's dtype: cuDNN on CUDA); channels-last out."""
    _, _, _, kh, kw = weight.shape
    y = F.conv3d(x, weight, bias, padding=(0, (kh - 1) // 2, (kw - 1) // 2))
    return y.contiguous(memory_format=torch.channels_last_3d)


OPS = {
    "self_attention": attention,
    "cross_attention": attention,
    "mouse_attention": action_attention,
    "keyboard_attention": action_attention,
    "layer_norm_modulate": layer_norm_modulate,
    "layer_norm": layer_norm,
    "gated_residual": gated_residual,
    "gated_residual_layer_norm_modulate": gated_residual_layer_norm_modulate,
    "gated_residual_layer_norm": gated_residual_layer_norm,
    "frame_bias_gelu": frame_bias_gelu,
    "norm_rope_store": norm_rope_store,
    "qkv_norm_rope_store": qkv_norm_rope_store,
    "linear_gelu": linear_gelu,
    "quantize_fp8": quantize_fp8,
    "linear_fp8": linear_fp8,
    "rms_norm_silu": rms_norm_silu,
    "bias_residual_add": bias_residual_add,
    "bias_residual_add_rms_norm_silu": bias_residual_add_rms_norm_silu,
    "upsample_conv2d": upsample_conv2d,
    "conv3d_narrow": conv3d_narrow,
}
