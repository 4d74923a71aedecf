"""Streaming benchmark and demo with random weights.

Runs Matrix-Game-2's call pattern on a model with realistic random weights and reports latency:

* seed protocol: the seed suite's benchmark: one streaming forward at current_start=0 into 15-frame
  caches whose indices and cross-attention cache are reset before every call (a new stream every
  call), perf_counter around the call and a synchronize, after warm-up;
* pipeline protocol: N blocks of 3 latent frames, each `len(denoising steps)` forwards plus one
  cache-update forward at t=0, caches sized by the attention window (6 frames for universal).
  Steady state is every forward of the blocks after the window has filled (evictions under way).

Models (same random weights, same process): `reference` (CausalWanModel), `optimized`
(OptimizedCausalWanModel, eager forward) and `graphs` (OptimizedCausalWanModel replaying CUDA
graphs). All use the pipeline's upstream-style cache dicts, as a drop-in would.

On a GPU it defaults to the universal config in bf16, on a CPU to the tiny config in float32.
Timing uses CUDA events on the GPU (perf_counter on the CPU); medians over all timed calls.
Writes a JSON report (device, torch, date, command, results, speedups), a PNG plot beside it when
matplotlib is installed, and prints a table last.

    python benchmarks/stream.py                     # auto: GPU universal bf16 / CPU tiny fp32
    python benchmarks/stream.py --blocks 8 --out benchmarks/results/h100.json
"""
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (Timer, bar_chart, benchmark_device, finish,  # noqa: E402
                                names_from, progress_bar, run_header, summarize)
from wan.serving import memory  # noqa: E402
from wan.tools import cli  # noqa: E402
from wan import CausalWanModel  # noqa: E402
from wan.kernels.dtypes import DTYPES  # noqa: E402
from wan.modules.optimized_causal_model import OptimizedCausalWanModel  # noqa: E402
from wan.modules.rolling_cache import new_stream_caches  # noqa: E402
from wan.modules.presets import (LATENT_SIZE, UPSTREAM_VARIANTS, model_config,  # noqa: E402
                                 tokens_per_frame)
from wan.modules.random_init import random_inputs, randomize_weights_  # noqa: E402

# name -> (class, constructor extras)
MODEL_CLASSES = {"reference": (CausalWanModel, {}),
                 "optimized": (OptimizedCausalWanModel, {"cuda_graphs": False}),
                 "graphs": (OptimizedCausalWanModel, {"cuda_graphs": True})}
SEED_CACHE_FRAMES = 15
VIDEO_FRAMES_PER_LATENT = 4


PROG = "benchmarks/stream.py"



def _models(text: str):
    return names_from(text, MODEL_CLASSES, "model")


def _steps(text: str):
    try:
        steps = [float(step) for step in text.split(",")]
    except ValueError:
        raise cli.argparse.ArgumentTypeError(f"expected comma-separated timesteps, got "
                                             f"{text!r}") from None
    bad = [step for step in steps if not 0 < step <= 1000]
    if bad:
        raise cli.argparse.ArgumentTypeError(f"timesteps lie in (0, 1000], got {bad}")
    return steps


def parse_args(argv=None):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=benchmark_device, default="auto",
                   help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--preset", default="auto", choices=("auto", "tiny") + UPSTREAM_VARIANTS,
                   help="tiny, universal, gta_drive, templerun or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32", "fp64"],
                   help="the models' dtype (default auto: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--models", type=_models, default=None,
                   help=f"comma list of {list(MODEL_CLASSES)} (default: all; no graphs on a CPU)")
    p.add_argument("--blocks", type=cli.positive_int, default=None,
                   help="pipeline blocks (default 8 GPU, 5 CPU)")
    p.add_argument("--denoising-steps", type=_steps, default="1000,666,333",
                   help="timesteps of a block's denoising forwards (each block adds the t=0 cache "
                        "update); default: the inference YAML's list")
    p.add_argument("--seed-runs", type=cli.positive_int, default=None,
                   help="timed forwards of the seed protocol (default 10, as the seed suite)")
    p.add_argument("--warmup", type=cli.non_negative_int, default=3,
                   help="untimed seed-protocol forwards first (default 3; graphs capture here)")
    p.add_argument("--out", default=None, help="JSON report path (default: print only; the "
                   "folder must exist)")
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda"
    args.preset = args.preset if args.preset != "auto" else ("universal" if on_gpu else "tiny")
    args.dtype = DTYPES[args.dtype if args.dtype != "auto" else ("bf16" if on_gpu else "fp32")]
    args.blocks = args.blocks or (8 if on_gpu else 5)
    args.seed_runs = args.seed_runs or 10
    args.models = args.models or [m for m in MODEL_CLASSES if on_gpu or m != "graphs"]
    window = model_config(args.preset)["local_attn_size"]
    steady_from = math.ceil(window / 3)
    if args.blocks <= steady_from:
        p.error(f"--blocks {args.blocks} never reaches steady state: the {window}-frame window "
                f"fills at block {steady_from}, so give at least {steady_from + 1}")
    return args


def preflight(args):
    """Before any model is built: the report's path, and the memory of the models (all
    resident at once), their caches and the longest block's action history."""
    if args.out:
        cli.output_file(args.out)
    config = model_config(args.preset)
    latent = LATENT_SIZE[args.preset]
    itemsize = torch.empty((), dtype=args.dtype).element_size()
    steps = 12 * args.blocks  # the last block's action history (mouse 2 + keyboard <= 7 wide)
    memory.check_memory(
        {f"{len(args.models)} model(s)": len(args.models) * memory.model_bytes(config, args.dtype),
         "caches": memory.stream_bytes(config, latent, args.dtype) * max(1, SEED_CACHE_FRAMES // 6),
         f"{args.blocks} blocks' actions": steps * 9 * itemsize},
        torch.device(args.device), f"{', '.join(args.models)} ({args.preset}) on {args.device}",
        {"actions as drawn": 2 * steps * 9 * 8, "timings": 4 * args.blocks * 64})


def build_models(args):
    """Every requested model class with the same random weights."""
    config = model_config(args.preset)
    models = {}
    for name in args.models:
        cls, extras = MODEL_CLASSES[name]
        with torch.device(args.device):
            model = cls.from_config(config, **extras)
        if not models:
            randomize_weights_(model, seed=0)
            weights = model.state_dict()
        else:
            model.load_state_dict(weights)
        model.num_frame_per_block = 3
        models[name] = model.to(device=args.device, dtype=args.dtype).eval()
    return models


@torch.no_grad()
def seed_protocol(model, args):
    """The seed suite's benchmark (tests/test_causal_wan_model.py::test_performance_benchmark): one
    forward at current_start=0 into 15-frame caches whose indices and cross-attention cache are
    reset before every call, timed with perf_counter around the call and a synchronize."""
    inputs = random_inputs(model, LATENT_SIZE[args.preset])
    caches = new_stream_caches(model, 1, SEED_CACHE_FRAMES, tokens_per_frame(args.preset))
    times = []
    for i in range(args.warmup + args.seed_runs):
        for name in ("kv_cache", "kv_cache_mouse", "kv_cache_keyboard"):
            for cache in caches[name] or ():
                cache["global_end_index"].fill_(0)
                cache["local_end_index"].fill_(0)
        for cache in caches["crossattn_cache"]:
            cache["is_init"] = False
        begin = time.perf_counter()
        out = model(**inputs, **caches, current_start=0)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append((time.perf_counter() - begin) * 1e3)
    if not torch.isfinite(out).all():
        raise RuntimeError("seed forward produced non-finite values")
    return summarize(times)


@torch.no_grad()
def pipeline_protocol(model, args, timer, label):
    nfpb = 3
    window = model.local_attn_size
    steady_from = math.ceil(window / nfpb)  # first block that evicts: the window is full
    caches = new_stream_caches(model, 1, window, tokens_per_frame(args.preset))
    if args.device == "cuda":  # other models stay resident: count what this run adds on top
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    steady, block_ms = [], []
    for block in range(args.blocks):
        s = nfpb * block
        inputs = random_inputs(model, LATENT_SIZE[args.preset], nfpb, s, seed=100 + block)
        call = dict(inputs, **caches, current_start=s * tokens_per_frame(args.preset))
        forward_ms = []
        for t in args.denoising_steps + [0.0]:
            call["t"] = torch.full_like(inputs["t"], t)
            out, ms = timer(lambda: model(**call))
            forward_ms.append(ms)
            if t:
                call["x"] = 0.5 * call["x"] + 0.5 * out
        block_ms.append(sum(forward_ms))
        if block >= steady_from:
            steady.extend(forward_ms)
        done = block + 1
        bar = progress_bar(done, args.blocks)
        print(f"  {label:<10} [{bar}] block {done}/{args.blocks}: {len(forward_ms)} forwards, "
              f"{block_ms[-1]:.1f} ms", file=sys.stderr, flush=True)
    if not steady:
        raise ValueError(f"--blocks {args.blocks} never reaches steady state (block {steady_from})")
    stats = summarize(steady)
    steady_block = statistics.median(block_ms[steady_from:])
    stats.update({
        "steady_state_from_block": steady_from,
        "block_median_ms": steady_block,
        "dit_fps": nfpb * VIDEO_FRAMES_PER_LATENT / (steady_block / 1e3),
        "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30,
        "peak_extra_memory_gib": ((torch.cuda.max_memory_allocated() - resident) / 2 ** 30
                                  if args.device == "cuda" else None),
    })
    return stats


def speedups(per_model):
    """reference vs the fastest optimized variant, on median milliseconds."""
    summary = {"per_model": per_model}
    if "reference" in per_model:
        summary["reference_ms"] = per_model["reference"]["median_ms"]
    others = {n: r for n, r in per_model.items() if n != "reference"}
    if others:
        best = min(others, key=lambda n: others[n]["median_ms"])
        summary["optimized_model"] = best
        summary["optimized_ms"] = others[best]["median_ms"]
        if "reference_ms" in summary:
            summary["speedup"] = summary["reference_ms"] / summary["optimized_ms"]
    return summary


def print_table(report):
    print(f"\n{report['device']} | torch {report['torch']} | {report['preset']} {report['dtype']}")
    header = (f"{'model':<11}{'seed median':>12}{'seed p95':>10}{'pipe median':>12}{'pipe p95':>10}"
              f"{'block':>9}{'DiT fps':>9}{'speedup':>9}")
    print(header)
    print("-" * len(header))
    seed, pipe = report["seed"]["per_model"], report["pipeline"]["per_model"]
    reference = pipe.get("reference", {}).get("median_ms")
    for name in report["models"]:
        speedup = f"{reference / pipe[name]['median_ms']:.2f}x" if reference else "-"
        print(f"{name:<11}{seed[name]['median_ms']:>10.2f}ms{seed[name]['p95_ms']:>8.2f}ms"
              f"{pipe[name]['median_ms']:>10.2f}ms{pipe[name]['p95_ms']:>8.2f}ms"
              f"{pipe[name]['block_median_ms']:>7.1f}ms{pipe[name]['dit_fps']:>9.1f}{speedup:>9}")


def plot(report, path):
    """Bar chart of median per-forward latency (seed and pipeline protocols) per model."""
    names = report["models"]
    groups = {protocol: [report[protocol]["per_model"][n]["median_ms"] for n in names]
              for protocol in ("seed", "pipeline")}
    return bar_chart(groups, names, "median ms per forward",
                     f"{report['preset']} {report['dtype']} on {report['device']}", path)


def main(argv=None):
    return cli.run(PROG, _main, argv)


def _main(argv=None):
    args = parse_args(argv)
    preflight(args)
    torch.manual_seed(0)
    timer = Timer(args.device)
    print(f"building {args.models} ({args.preset}, {args.dtype}, {args.device})", file=sys.stderr)
    models = build_models(args)
    report = {
        **run_header(args.device),
        "preset": args.preset, "dtype": str(args.dtype).replace("torch.", ""),
        "models": list(models), "denoising_steps": args.denoising_steps, "blocks": args.blocks,
        "seed": {}, "pipeline": {},
    }
    for name, model in models.items():
        print(f"seed protocol: {name}", file=sys.stderr, flush=True)
        report["seed"][name] = seed_protocol(model, args)
        print(f"pipeline protocol: {name}", file=sys.stderr, flush=True)
        report["pipeline"][name] = pipeline_protocol(model, args, timer, name)
    report["seed"] = speedups(report["seed"])
    report["pipeline"] = speedups(report["pipeline"])
    finish(report, args.out, plot, print_table)
    return report


if __name__ == "__main__":
    main()
