"""Per-token FP8 quantization of an activation that no fused norm produces: the attention outputs
(before the self- and cross-attention's output projections) and the FFN's hidden activation, whose
tanh GELU runs here too (`gelu=True`: the FP8 GEMM before it has no GELU epilogue).

One program per row: the whole row is loaded once (up to 8960 values for the FFN), its GELU taken
in float32 and rounded to the model's dtype (as the eager twin's separate GELU would round it),
its largest magnitude found, and the row stored as e4m3 with that scale (wan/kernels/fp8.py).
"""
import torch
import triton
import triton.language as tl

from ..fp8 import E4M3, Fp8Rows


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, k, s_xr, GELU: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    ok = cols < k
    x = tl.load(x_ptr + row * s_xr + cols, mask=ok, other=0.0)
    dtype = x.dtype
    value = x.to(tl.float32)
    if GELU:
        inner = 0.7978845608028654 * (value + 0.044715 * value * value * value)
        tanh = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        value = (0.5 * value * (1.0 + tanh)).to(dtype).to(tl.float32)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(value), axis=0), 448.0), 1e-12)
    tl.store(out_ptr + row * k + cols, tl.math.div_rn(value, scale).to(out_ptr.dtype.element_ty),
             mask=ok)
    tl.store(scale_ptr + row, scale)


def quantize_fp8(x: torch.Tensor, gelu: bool = False) -> Fp8Rows:
    """x [..., K] (or gelu_tanh(x)) -> Fp8Rows: e4m3 [..., K] and float32 scales [..., 1]."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=E4M3, device=x.device)
    scales = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(rows.shape[0],)](rows, out, scales, k, rows.stride(0), GELU=gelu,
                                            BLOCK_K=block, num_warps=8 if block > 4096 else 4)
    return Fp8Rows(out, scales)
