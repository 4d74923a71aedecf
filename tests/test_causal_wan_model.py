"""The suite the users asked for. On CPU it runs a tiny config; on CUDA the universal config with
the seed's shapes (x [1,16,3,44,80], 15-frame caches)."""
import copy
import statistics
from pathlib import Path

import pytest
import torch

from helpers import (HAS_CUDA, build_model, make_caches, make_inputs, rel_err, requires_cuda)

DEVICE = "cuda" if HAS_CUDA else "cpu"
PRESET = "universal" if HAS_CUDA else "tiny"
# CPU: float32 against a float64 oracle; CUDA: bf16 against a float32 oracle
LOW, HIGH = (torch.bfloat16, torch.float32) if HAS_CUDA else (torch.float32, torch.float64)
LOW_PRECISION_TOLERANCE = 3e-2 if HAS_CUDA else 1e-4
SEED_CACHE_FRAMES = 15
BASELINE_FILE = Path(__file__).parent / "baseline_performance.txt"


def _pair(preset=PRESET, **overrides):
    """The same random weights in the low precision under test and in the oracle precision."""
    oracle = build_model(preset, HIGH, DEVICE, **overrides)
    return copy.deepcopy(oracle).to(LOW), oracle


def _cast(inputs, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


@torch.no_grad()
def test_forward_correctness():
    """Cache-free forward: right shape, non-trivial output, low precision close to the oracle, and
    block causality (later frames never change earlier blocks' outputs)."""
    model, oracle = _pair()
    frames = 3 if HAS_CUDA else 6
    inputs = make_inputs(oracle, frames=frames, preset=PRESET)
    expected = oracle(**inputs)
    out = model(**_cast(inputs, LOW))
    assert out.shape == inputs["x"].shape
    assert torch.isfinite(out).all() and expected.abs().mean() > 1e-3
    err = rel_err(out, expected)
    print(f"{LOW} vs {HIGH}: relative error {err:.2e}, max abs diff "
          f"{(out.double() - expected.double()).abs().max().item():.3e}")
    assert err <= LOW_PRECISION_TOLERANCE
    if frames > 3:
        changed = dict(inputs, x=inputs["x"].clone())
        changed["x"][:, :, 3:] += 1.0
        out_changed = oracle(**changed)
        assert torch.equal(out_changed[:, :, :3], expected[:, :, :3])
        assert not torch.allclose(out_changed[:, :, 3:], expected[:, :, 3:])


@torch.no_grad()
def test_forward_with_kv_cache():
    """Streaming block by block through the upstream caches equals the cache-free block-causal
    forward over all frames: two independent code paths (masks vs caches, eviction included)."""
    preset = "tiny"
    model = build_model(preset, torch.float64, "cpu")
    blocks, frames = 4, 12
    full = make_inputs(model, frames=frames, preset=preset)
    expected = model(**full)
    caches = make_caches(model, cache_frames=model.local_attn_size, preset=preset)
    tokens_per_frame = full["x"].shape[3] * full["x"].shape[4] // 4
    for b in range(blocks):
        s = 3 * b
        steps = 1 + 4 * (s + 2)
        call = {"x": full["x"][:, :, s:s + 3], "t": full["t"][:, s:s + 3],
                "visual_context": full["visual_context"],
                "cond_concat": full["cond_concat"][:, :, s:s + 3],
                "mouse_cond": full["mouse_cond"][:, :steps],
                "keyboard_cond": full["keyboard_cond"][:, :steps]}
        out = model(**call, **caches, current_start=s * tokens_per_frame)
        err = rel_err(out, expected[:, :, s:s + 3])
        assert err <= 1e-10, (b, err)
    assert caches["crossattn_cache"][0]["is_init"] is True
    assert int(caches["kv_cache"][0]["global_end_index"]) == frames * tokens_per_frame


@requires_cuda
@torch.no_grad()
def test_performance_benchmark():
    """Seed protocol: one streaming forward at current_start=0 with 15-frame caches, bf16,
    3 warm-up calls then 20 timed (CUDA events). Writes tests/baseline_performance.txt."""
    model = build_model("universal", torch.bfloat16, "cuda")
    inputs = make_inputs(model, preset="universal")
    caches = make_caches(model, cache_frames=SEED_CACHE_FRAMES, preset="universal")
    times = []
    for i in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = model(**inputs, **caches, current_start=0)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    assert torch.isfinite(out).all()
    times.sort()
    report = (f"CausalWanModel (reference) universal bf16, {torch.cuda.get_device_name()}, "
              f"torch {torch.__version__}\n"
              f"mean_ms {statistics.mean(times):.2f}\nmedian_ms {statistics.median(times):.2f}\n"
              f"p95_ms {times[int(0.95 * (len(times) - 1))]:.2f}\nruns {len(times)}\n")
    BASELINE_FILE.write_text(report)
    print(report)


@torch.no_grad()
def test_model_comparison():
    """OptimizedCausalWanModel against the reference on the same weights and inputs."""
    try:
        from wan.modules.optimized_causal_model import OptimizedCausalWanModel
    except ImportError:
        pytest.skip("OptimizedCausalWanModel does not exist yet (issue: OptimizedCausalWanModel)")
    reference = build_model(PRESET, HIGH, DEVICE)
    optimized = build_model(PRESET, LOW, DEVICE, cls=OptimizedCausalWanModel)
    inputs = make_inputs(reference, preset=PRESET)
    cache_frames = SEED_CACHE_FRAMES if HAS_CUDA else 6
    expected = reference(**inputs, **make_caches(reference, cache_frames=cache_frames,
                                                 preset=PRESET), current_start=0)
    low_inputs = _cast(inputs, LOW)
    out = optimized(**low_inputs, **make_caches(optimized, cache_frames=cache_frames,
                                                preset=PRESET), current_start=0)
    diff = (out.double() - expected.double()).abs()
    err = rel_err(out, expected)
    print(f"max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}, "
          f"relative error {err:.2e}")
    assert err <= LOW_PRECISION_TOLERANCE
