"""FP8 (e4m3) GEMM operands: what `precision="fp8"` feeds to the GEMMs it runs in FP8.

* Weights are quantized once (when the model's plan is built, i.e. after a load or a switch of
  precision) with one scale per output channel: W[n, :] ~ data[n, :] * scale[n].
* Activations are quantized per token (one scale per row) by the op that produces them: the
  LayerNorm + modulation kernels, a standalone row kernel (attention outputs), or the FFN's
  GELU kernel. x[m, :] ~ data[m, :] * scale[m].

A scale maps the row's largest magnitude onto e4m3's largest finite value (448), so nothing
saturates; the quantized value is round-to-nearest of x / scale. Every implementation computes
the scale in float32 from the value rounded to the model's dtype (what the unfused path would
quantize), so the fused kernels and the eager twin agree up to float32 arithmetic order.
"""
from typing import NamedTuple, Optional

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# an all-zero row gets this scale (its data are zeros whatever the scale)
MIN_SCALE = 1e-12


class Fp8Rows(NamedTuple):
    """An activation [..., K] as e4m3 `data` [..., K] and float32 `scale` [..., 1] per row."""
    data: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """float32 data * scale (the eager twin's view of what the GEMM reads)."""
        return self.data.float() * self.scale


class Fp8Weight(NamedTuple):
    """A Linear's weight [N, K] as e4m3 `data` and float32 `scale` [N] per output channel; `dtype`
    is the model's dtype (the GEMM's output dtype)."""
    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        return self.data.float() * self.scale[:, None]


def row_scales(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., 1]: each row's largest magnitude / E4M3_MAX (MIN_SCALE for all-zero rows); the
    Triton kernels' twin is `e4m3_row_scale` in wan/kernels/triton/common.py."""
    return (x.float().abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(MIN_SCALE)


def quantize_rows(x: torch.Tensor) -> Fp8Rows:
    """x [..., K] (any floating dtype) -> Fp8Rows, in float32 math (the eager twin of the kernels)."""
    scale = row_scales(x)
    return Fp8Rows((x.float() / scale).to(E4M3), scale)


def quantize_weight(weight: torch.Tensor) -> Fp8Weight:
    """A Linear's weight [N, K] -> Fp8Weight with one scale per output channel."""
    rows = quantize_rows(weight.detach())
    return Fp8Weight(rows.data.contiguous(), rows.scale.view(-1).contiguous(), weight.dtype)


def fp8_gemm_problem(device, dtype) -> Optional[str]:
    """Why FP8 GEMMs (torch._scaled_mm with row-wise scales) cannot run here, or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"FP8 GEMMs need an NVIDIA GPU with FP8 tensor cores (Ada or Hopper, compute "
                f"capability 8.9+); got {device}")
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"FP8 GEMMs need compute capability 8.9+ (Ada or Hopper); "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if dtype != torch.bfloat16:
        return f"row-wise scaled FP8 GEMMs write bfloat16: the model must be bfloat16, got {dtype}"
    return None


PRECISIONS = ("native", "fp8")
