"""Per-token FP8 quantization of an activation that no fused norm produces: the attention outputs
(before the self- and cross-attention's output projections) and the FFN's hidden activation, whose
tanh GELU runs here too (`gelu=True`: the FP8 GEMM before it has no GELU epilogue).

A program takes a few rows, in chunks: a first pass finds each row's largest magnitude (of the GELU taken
in float32 and rounded to the model's dtype, as the eager twin's separate GELU would round it), a
second pass reads the row again (from cache: a row is at most 18 KB) and stores it as e4m3 with that
scale (wan/kernels/fp8.py). Chunks keep the registers per thread low for 8960-wide rows, where
holding the whole row spilled (measured by a benchmark since removed: docs/LAB_NOTEBOOK.md,
"Experiments that left the tree").
"""
import torch
import triton
import triton.language as tl

from ..fp8 import E4M3, E4M3_MAX, MIN_SCALE, Fp8Rows
from .common import e4m3_row_scale, gelu_tanh

# rows per program, chunk width and warps, measured on an H200 (docs/LAB_NOTEBOOK.md, step 28)
ROWS, CHUNK, NUM_WARPS = 1, 1024, 8


@triton.jit
def _load_activation(x_ptr, offsets, ok, GELU: tl.constexpr):
    """A tile of rows in float32, through the tanh GELU rounded to x's dtype when GELU."""
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0)
    value = x.to(tl.float32)
    if GELU:
        value = gelu_tanh(value).to(x.dtype).to(tl.float32)
    return value


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_rows, k, s_xr, GELU: tl.constexpr,
                          ROWS_PER_PROGRAM: tl.constexpr, CHUNK_K: tl.constexpr,
                          E4M3_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    rows = tl.program_id(0) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    row_ok = rows < n_rows
    amax = tl.zeros([ROWS_PER_PROGRAM, CHUNK_K], dtype=tl.float32)
    for start in range(0, k, CHUNK_K):
        cols = start + tl.arange(0, CHUNK_K)
        ok = row_ok[:, None] & (cols < k)[None, :]
        value = _load_activation(x_ptr, rows[:, None] * s_xr + cols[None, :], ok, GELU)
        amax = tl.maximum(amax, tl.abs(value))
    scale = e4m3_row_scale(tl.max(amax, axis=1), E4M3_MAX, MIN_SCALE)
    for start in range(0, k, CHUNK_K):
        cols = start + tl.arange(0, CHUNK_K)
        ok = row_ok[:, None] & (cols < k)[None, :]
        value = _load_activation(x_ptr, rows[:, None] * s_xr + cols[None, :], ok, GELU)
        tl.store(out_ptr + rows[:, None] * k + cols[None, :],
                 tl.math.div_rn(value, scale[:, None]).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


def quantize_fp8(x: torch.Tensor, gelu: bool = False, rows_per_program: int = ROWS,
                 chunk: int = CHUNK, num_warps: int = NUM_WARPS) -> Fp8Rows:
    """x [..., K] (or gelu_tanh(x)) -> Fp8Rows: e4m3 [..., K] and float32 scales [..., 1]."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n = rows.shape[0]
    out = torch.empty(x.shape, dtype=E4M3, device=x.device)
    scales = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    chunk = min(chunk, triton.next_power_of_2(k))
    _quantize_rows_kernel[(triton.cdiv(n, rows_per_program),)](
        rows, out, scales, n, k, rows.stride(0), GELU=gelu, ROWS_PER_PROGRAM=rows_per_program,
        CHUNK_K=chunk, E4M3_MAX=E4M3_MAX, MIN_SCALE=MIN_SCALE, num_warps=num_warps)
    return Fp8Rows(out, scales)
