"""The cublas backend: GEMMs through cuBLAS(Lt), with what it can fuse.

`linear_gelu` runs through torch's `_addmm_activation(bias, x, W^T, use_gelu=True)`, which on CUDA
selects cuBLASLt's GELU+bias epilogue (the tanh form of GELU; where torch cannot use cuBLASLt it
applies the same tanh GELU after the GEMM). The FFN's [tokens, 8960] hidden activation is then
written once instead of being written, read and written again by a separate GELU kernel. On a CPU
that function applies the exact GELU instead, so the backend refuses anything but CUDA.

`linear_fp8` runs torch's `_scaled_mm` on e4m3 operands with row-wise scales (one per token of x,
one per output channel of the weight), which cuBLASLt applies in the GEMM's epilogue together with
the bias; it accumulates in float32 and writes bfloat16 (wan/kernels/fp8.py).
"""
import torch

from .fp8 import Fp8Rows, Fp8Weight


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """gelu_tanh(x @ weight^T + bias) for x [..., in], weight [out, in], bias [out] or None."""
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_fp8(x: Fp8Rows, weight: Fp8Weight, bias):
    """x @ weight^T + bias for x as Fp8Rows [..., K] and weight as Fp8Weight [N, K]."""
    rows = x.data.reshape(-1, x.data.shape[-1])
    out = torch._scaled_mm(rows, weight.data.t(), scale_a=x.scale.reshape(-1, 1),
                           scale_b=weight.scale.view(1, -1), bias=bias, out_dtype=weight.dtype)
    return out.view(*x.data.shape[:-1], weight.data.shape[0])


OPS = {"linear_gelu": linear_gelu, "linear_fp8": linear_fp8}
