"""The self-attention's q/k/v projection: one GEMM over the packed [3C, C] weight against three
[C, C] GEMMs, at the streaming shape (3 frames x 880 tokens, C = 1536), CUDA events, medians.

    python benchmarks/qkv_gemm.py [--dtype bf16]
"""
import argparse

import torch
import torch.nn.functional as F

from attention_ops import time_ms  # CUDA events, warm-up, median (puts the repository on the path)
from wan.kernels.dtypes import DTYPES  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--tokens", type=int, default=3 * 880)
    p.add_argument("--dim", type=int, default=1536)
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    x = torch.randn(1, args.tokens, args.dim, device="cuda", dtype=dtype)
    w = torch.randn(3 * args.dim, args.dim, device="cuda", dtype=dtype) / args.dim ** 0.5
    b = torch.randn(3 * args.dim, device="cuda", dtype=dtype) * 0.02
    parts = [(w[i * args.dim:(i + 1) * args.dim].clone(), b[i * args.dim:(i + 1) * args.dim].clone())
             for i in range(3)]
    fused = time_ms(lambda: F.linear(x, w, b), runs=200, warmup=20)
    three = time_ms(lambda: [F.linear(x, wi, bi) for wi, bi in parts], runs=200, warmup=20)
    print(f"q/k/v projection, {args.tokens} x {args.dim} {args.dtype}: one GEMM {fused * 1e3:.1f} us, "
          f"three GEMMs {three * 1e3:.1f} us ({(three - fused) * 1e3:+.1f} us per layer)")


if __name__ == "__main__":
    main()
