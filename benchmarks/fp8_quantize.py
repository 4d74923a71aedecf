"""The FP8 row-quantization kernel (wan/kernels/triton/fp8_rows.py) at the model's shapes, for
each chunk width and warp count it could use; and torch._scaled_mm against its emulated twin
(how far Hopper's FP8 accumulation is from float32's). GPU only.

    python benchmarks/fp8_quantize.py
"""
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from wan.kernels import cublas, eager  # noqa: E402
from wan.kernels.fp8 import quantize_rows, quantize_weight  # noqa: E402
from wan.kernels.triton import fp8_rows  # noqa: E402

SHAPES = [((2640, 1536), False), ((2640, 8960), True)]  # attention outputs; the FFN's hidden


def main():
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    for shape, gelu in SHAPES:
        x = torch.randn(shape, device="cuda").bfloat16()
        moved = 2 * x.numel() + x.numel()  # bytes read (bf16) + written (e4m3)
        expected = eager.quantize_fp8(x, gelu=gelu)
        for rows in (1, 2, 4, 8):
            for chunk in (512, 1024, 2048):
                for warps in (4, 8):
                    if rows * chunk > 32 * 32 * warps:  # > 32 values per thread: spills
                        continue
                    fn = lambda: fp8_rows.quantize_fp8(x, gelu=gelu, rows_per_program=rows,
                                                       chunk=chunk, num_warps=warps)
                    got = fn()
                    same = (got.data.float() == expected.data.float()).float().mean().item()
                    us = 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200)
                    print(f"  {str(shape):<13} gelu={gelu!s:<5} rows {rows} chunk {chunk:>5} "
                          f"warps {warps}: {us:7.1f} us  {moved / us / 1e6:5.2f} TB/s  "
                          f"equal {same:.5f}")
    for m, k, n in ((2640, 1536, 4608), (2640, 8960, 1536), (17, 64, 48)):
        x = torch.randn(m, k, device="cuda").bfloat16()
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
        b = (0.02 * torch.randn(n, device="cuda")).bfloat16()
        xq, wq = quantize_rows(x), quantize_weight(w)
        got, expected = cublas.linear_fp8(xq, wq, b).float(), eager.linear_fp8(xq, wq, b).float()
        diff = (got - expected).abs()
        print(f"  scaled_mm {m}x{k}x{n}: rel {(diff.norm() / expected.norm()).item():.2e}, max abs "
              f"{diff.max().item():.3e} (max |out| {expected.abs().max().item():.2f}), max diff / "
              f"|out| where |out| > 0.1: {(diff / expected.abs())[expected.abs() > 0.1].max().item():.3e}")


if __name__ == "__main__":
    main()
