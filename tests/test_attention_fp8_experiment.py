"""The FP8 self-attention experiment (benchmarks/attention_fp8_kernel.py, lab notebook step 39):
the kernel's attention math (online softmax, masked query and key tails, strided views of a
longer key window) against float64 with no FP8, in Triton's interpreter on a CPU; on a GPU the
FP8 variants against their eager twin on the same quantized operands, and against float64 within
e4m3's error. (The interpreter rounds float8 wrongly, tests/test_fp8.py's note: the FP8 variants
are checked on the GPU only.)"""
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import HAS_CUDA, assert_close_elementwise, rel_err, requires_cuda

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import attention_fp8_kernel as fa8  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# (batch, Lq, Lk, heads, head dim, extra keys after the window): tails that are not a multiple
# of any block, one query, one key, a window that is a prefix of a longer cache buffer
CASES = [(1, 70, 150, 2, 64, 0), (2, 33, 65, 3, 32, 7), (1, 1, 1, 1, 16, 0),
         (1, 130, 257, 2, 128, 11)]
SMALL_CONFIG = (32, 32, 4, 1)


def _inputs(b, lq, lk, h, d, extra, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=gen)
    cache = torch.randn(2, b, lk + extra, h, d, generator=gen)
    q, cache = q.to(DEVICE, dtype), cache.to(DEVICE, dtype)
    return q, cache[0, :, :lk], cache[1, :, :lk]  # k and v: views into the longer buffers


def _exact(q, k, v):
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", torch.softmax(s, -1), v.double())


@pytest.mark.parametrize("case", CASES)
def test_attention_without_fp8_matches_float64(case):
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    q, k, v = _inputs(*case, dtype, seed=1)
    out = fa8.attention_fp8(q, k, v, "none", config=None if HAS_CUDA else SMALL_CONFIG)
    exact = _exact(q, k, v)
    twin = fa8.attention_fp8_reference(q, k, v, "none")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close_elementwise(out, exact.to(torch.float64), dtype=dtype, twin=twin.double())
    assert rel_err(out, exact) <= (1e-2 if HAS_CUDA else 1e-6)


@requires_cuda
@pytest.mark.parametrize("fp8", ["qk", "qk+pv"])
@pytest.mark.parametrize("case", [c for c in CASES if c[4] >= 32], ids=str)
def test_fp8_attention_matches_its_twin_and_float64_within_e4m3(case, fp8):
    q, k, v = _inputs(*case, torch.bfloat16, seed=2)
    out = fa8.attention_fp8(q, k, v, fp8)
    twin = fa8.attention_fp8_reference(q, k, v, fp8)
    exact = _exact(q, k, v)
    err, twin_err = rel_err(out, exact), rel_err(twin, exact)
    # e4m3 keeps 3 mantissa bits: ~4-9% of the output's norm on random inputs (step 39)
    assert twin_err <= 0.15
    if fp8 == "qk":  # the same quantized q and k; P in bf16 either way: close to the twin
        assert rel_err(out, twin) <= 3e-2, (err, twin_err)
    # with P in e4m3 the kernel rounds it against each row's running maximum, the twin against
    # the final one: two roundings of the same size, not the same roundings
    assert err <= max(1.5 * twin_err, 2e-2), (err, twin_err)


def test_fp8_needs_a_head_dim_of_32():
    q = torch.zeros(1, 4, 2, 16)
    for fp8 in ("qk", "qk+pv"):
        with pytest.raises(ValueError, match="at least 32"):
            fa8.attention_fp8(q, q, q, fp8)


def test_bad_arguments_are_refused():
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(ValueError, match="fp8 must be one of"):
        fa8.attention_fp8(q, q, q, "e5m2")
    with pytest.raises(ValueError, match="expected"):
        fa8.attention_fp8(q, q[:, :, :1], q, "none")
    with pytest.raises(ValueError, match="head dim"):
        fa8.attention_fp8(torch.zeros(1, 4, 2, 24), torch.zeros(1, 4, 2, 24),
                          torch.zeros(1, 4, 2, 24), "none")
