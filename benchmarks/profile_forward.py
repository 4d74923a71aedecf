"""Where the GPU time of one steady-state streaming forward goes (per kernel and per category).

Runs the pipeline pattern on the optimized model (eager forward: the same kernels a CUDA graph
replays) until the attention window is full, then profiles a block of forwards with torch.profiler
and prints the CUDA time per forward grouped by category and the top kernels. GPU only.

    python benchmarks/profile_forward.py [--model optimized|reference] [--precision fp8]
                                         [--out profile.json]
"""
import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import run_header  # noqa: E402
from benchmarks.stream import MODEL_CLASSES  # noqa: E402
from wan.modules.rolling_cache import new_stream_caches  # noqa: E402
from wan.modules.presets import LATENT_SIZE, model_config, tokens_per_frame  # noqa: E402
from wan.modules.random_init import random_inputs, randomize_weights_  # noqa: E402

CATEGORIES = [  # first match wins
    ("attention", r"fmha|flash|cudnn|attention|sdpa"),
    ("gemm", r"gemm|nvjet|sm90_xmma|cutlass|cublas|splitK|conv"),
    ("fp8 quantize", r"quantize"),
    ("norm", r"layer_norm|LayerNorm|rms|norm"),
    ("reduce", r"reduce"),
    ("copy/cat", r"copy|cat|index|gather|scatter|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|triton"),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="optimized", choices=list(MODEL_CLASSES))
    p.add_argument("--preset", default="universal")
    p.add_argument("--precision", default=None, choices=("native", "fp8"),
                   help="the optimized model's precision (default: WAN_PRECISION or native)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    cls, extras = MODEL_CLASSES[args.model]
    if args.precision and cls is not MODEL_CLASSES["reference"][0]:
        extras = dict(extras, precision=args.precision)
    with torch.device("cuda"):
        model = cls.from_config(model_config(args.preset), **extras)
    randomize_weights_(model)
    model = model.to(torch.bfloat16).eval()
    model.num_frame_per_block = 3
    forwards = 4
    prof = profile_steady_forwards(model, args.preset, forwards)
    summary = kernel_summary(prof, forwards, args.top, f"{args.model}: per forward")
    if args.out:
        Path(args.out).write_text(json.dumps({
            **run_header(torch.device("cuda")), "model": args.model, **summary}, indent=2))


@torch.no_grad()
def profile_steady_forwards(model, preset: str, forwards: int):
    """torch.profiler over `forwards` forwards of a block whose attention window is full (the
    blocks before it run first, four forwards each, as warm-up)."""
    hw = LATENT_SIZE[preset]
    caches = new_stream_caches(model, 1, model.local_attn_size, tokens_per_frame(preset))
    steady_block = (model.local_attn_size + 2) // 3 + 1
    calls = []
    for block in range(steady_block + 1):
        inputs = random_inputs(model, hw, 3, 3 * block, seed=block)
        calls.append(dict(inputs, current_start=3 * block * tokens_per_frame(preset)))
    for call in calls[:-1]:  # fill the window, warm up
        for _ in range(4):
            model(**call, **caches)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(forwards):
            model(**calls[-1], **caches)
        torch.cuda.synchronize()
    return prof


def kernel_summary(prof, calls: int, top: int, label: str) -> dict:
    """GPU time per call by category and by kernel from a torch.profiler run of `calls` calls;
    prints it and returns {total_ms, launches, per_category_ms, kernels}."""
    per_kernel = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name][0] += event.device_time / 1e3 / calls
            per_kernel[event.name][1] += 1 / calls
    per_category = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        per_category[category(name)] += ms
    total = sum(per_category.values())
    launches = sum(n for _, n in per_kernel.values())
    print(f"{label}: {total:.2f} ms of GPU kernels, {launches:.0f} launches")
    for name, ms in sorted(per_category.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<12}{ms:8.2f} ms  {100 * ms / total:5.1f}%")
    print(f"top {top} kernels (ms, launches):")
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
    for name, (ms, n) in ranked[:top]:
        print(f"  {ms:7.3f} ms {n:5.0f}x  [{category(name)}] {name[:110]}")
    return {"total_ms": total, "launches": launches, "per_category_ms": dict(per_category),
            "kernels": {name: {"ms": ms, "launches": n} for name, (ms, n) in ranked}}

if __name__ == "__main__":
    main()
