"""A long play session through OptimizedCausalWanModel: does it stay correct, flat and bounded?

Streams `--blocks` blocks of the pipeline's call pattern (3 denoising forwards + the t=0 cache
update, upstream-style cache dicts, CUDA graphs on a GPU) and records per forward the GPU time
(CUDA events) and the host time of the call, and per checkpoint device memory (allocated,
reserved), host RSS and the number of captured graphs.

Accuracy at a checkpoint (every `--check-every` blocks): the optimized model's caches at that point
are copied, oldest frame first, into upstream-layout dicts for the reference model in the same
precision and for a float32 reference (the oracle); all three then run the same block from the same
state, and the relative error of each against the oracle is recorded. A stream long past
upstream's 1024-frame RoPE table is thereby checked where upstream's own model could not go.

    python benchmarks/endless_stream.py --blocks 2500 --check-every 250 --out endless.json
    python benchmarks/endless_stream.py --preset tiny --blocks 400 --check-every 100   # a CPU
"""
import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wan import CausalWanModel  # noqa: E402
from wan.modules.shared.conditioning import attention_window_frames, history_steps  # noqa: E402
from wan.kernels.dtypes import DTYPES  # noqa: E402
from wan.runtime.stream_cache import StreamCache  # noqa: E402
from wan.modules.optimized_causal_model import OptimizedCausalWanModel  # noqa: E402
from wan.modules.rolling_cache import new_stream_caches  # noqa: E402
from wan.modules.presets import LATENT_SIZE, model_config, tokens_per_frame  # noqa: E402
from wan.modules.random_init import randomize_weights_  # noqa: E402

STEPS = (1000.0, 666.0, 333.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--preset", default="universal" if cuda else "tiny")
    p.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--blocks", type=int, default=2500)
    p.add_argument("--check-every", type=int, default=250)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.device = "cuda" if cuda else "cpu"
    return args


def build(cls, config, weights, device, dtype, **options):
    with torch.device(device):
        model = cls.from_config(config, **options)
    model.load_state_dict(weights)
    model.num_frame_per_block = 3
    return model.to(dtype=dtype).eval()


def host_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def upstream_copy(model, dicts, end_frame: int, tokens: int, dtype):
    """Upstream-layout cache dicts (oldest frame first, indices set) holding what the optimized
    model's ring caches `dicts` hold after `end_frame` frames, in `dtype`."""
    ring = StreamCache.from_upstream_dicts(model, dicts["kv_cache"], dicts["kv_cache_mouse"],
                                           dicts["kv_cache_keyboard"], dicts["crossattn_cache"],
                                           tokens, attention_window_frames(model.local_attn_size))
    held = min(end_frame, ring.self_layout.slots)
    frames = torch.arange(end_frame - held, end_frame, device=dicts["kv_cache"][0]["k"].device)
    copies = new_stream_caches(model, 1, ring.self_layout.slots, tokens, dtype=dtype)

    for name, layout, unit in (("kv_cache", ring.self_layout, tokens),
                               ("kv_cache_mouse", ring.action_layout, 1),
                               ("kv_cache_keyboard", ring.action_layout, 1)):
        if copies[name] is None:
            continue
        slots = layout.slot_of(frames)
        for layer, (copy, source) in enumerate(zip(copies[name], dicts[name])):
            for key in ("k", "v"):
                rows = source[key].unflatten(1, (-1, unit))[:, slots].flatten(1, 2)
                copy[key][:, :rows.shape[1]] = rows.to(dtype)
            copy["global_end_index"].fill_(end_frame * unit)
            copy["local_end_index"].fill_(held * unit)
    for copy, source in zip(copies["crossattn_cache"], dicts["crossattn_cache"]):
        copy["k"], copy["v"] = source["k"].to(dtype), source["v"].to(dtype)
        copy["is_init"] = source["is_init"]
    return copies


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Conditions:
    """Every input of a session: the action histories grow by 4 steps a frame (the pipeline passes
    the whole history every call), latents and conditions are drawn per block (in `dtype`; the
    oracle gets the same values widened)."""

    def __init__(self, model, preset, blocks, device, dtype):
        self.h, self.w = LATENT_SIZE[preset]
        self.device, self.dtype = device, dtype
        gen = torch.Generator().manual_seed(0)
        steps = history_steps(3 * blocks)
        self.mouse = (0.1 * torch.randn(1, steps, 2, generator=gen)).to(device, dtype)
        width = next(b.action_model for b in model.blocks
                     if b.action_model is not None).keyboard_embed[0].in_features
        self.keyboard = (torch.randn(1, steps, width, generator=gen) > 0).to(device, dtype)
        self.visual_context = torch.randn(1, 257, 1280, generator=gen).to(device, dtype)

    def block(self, index: int):
        gen = torch.Generator().manual_seed(1000 + index)
        steps = history_steps(3 * index + 2)
        x, cond = (torch.randn(1, c, 3, self.h, self.w, generator=gen) for c in (16, 20))
        return {"x": x.to(self.device, self.dtype), "cond_concat": cond.to(self.device, self.dtype),
                "visual_context": self.visual_context, "mouse_cond": self.mouse[:, :steps],
                "keyboard_cond": self.keyboard[:, :steps]}


def run_block(model, inputs, caches, start: int, timing=None):
    """3 denoising forwards (x fed on as 0.5 x + 0.5 out) and the cache update; returns outputs.
    With `timing` (a list), appends (start event, end event, host ms) per call: CUDA events around
    the call on a GPU (None on a CPU), read after the block's synchronize."""
    call = dict(inputs)
    cuda = inputs["x"].is_cuda
    outputs = []
    for t in (*STEPS, 0.0):
        call["t"] = torch.full((1, 3), t, dtype=inputs["x"].dtype, device=inputs["x"].device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else [None, None]
        begin = time.perf_counter()
        if cuda:
            events[0].record()
        out = model(**call, **caches, current_start=start)
        if cuda:
            events[1].record()
        if timing is not None:
            timing.append((*events, (time.perf_counter() - begin) * 1e3))
        outputs.append(out)
        if t:
            call["x"] = 0.5 * call["x"] + 0.5 * out
    return outputs


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    device, dtype = args.device, DTYPES[args.dtype]
    config = model_config(args.preset)
    tokens = tokens_per_frame(args.preset)
    with torch.device(device):
        seed_model = CausalWanModel.from_config(config)
    randomize_weights_(seed_model, seed=0)
    weights = seed_model.state_dict()
    del seed_model
    optimized = build(OptimizedCausalWanModel, config, weights, device, dtype,
                      cuda_graphs=device == "cuda")
    reference = build(CausalWanModel, config, weights, device, dtype)
    # the oracle: float32 for half precision, float64 for a float32 run
    oracle_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    oracle = build(CausalWanModel, config, weights, device, oracle_dtype)
    inputs = Conditions(optimized, args.preset, args.blocks, device, dtype)
    caches = new_stream_caches(optimized, 1, optimized.local_attn_size, tokens)

    forwards, checkpoints = [], []
    started = time.perf_counter()
    for block in range(args.blocks):
        start = 3 * block * tokens
        if block % args.check_every == 0 or block == args.blocks - 1:
            state = {dt: upstream_copy(optimized, caches, 3 * block, tokens, dt)
                     for dt in (dtype, oracle_dtype)}
            block_inputs = inputs.block(block)
            ref_out = run_block(reference, block_inputs, state[dtype], start)
            oracle_out = run_block(oracle, {k: v.to(oracle_dtype) for k, v in block_inputs.items()},
                                   state[oracle_dtype], start)
        timing = []
        opt_out = run_block(optimized, inputs.block(block), caches, start, timing)
        if device == "cuda":
            torch.cuda.synchronize()
        for start_event, end_event, host_ms in timing:
            gpu_ms = start_event.elapsed_time(end_event) if start_event is not None else None
            forwards.append({"block": block, "ms": gpu_ms, "host_ms": host_ms})
        if block % args.check_every == 0 or block == args.blocks - 1:
            err_opt = max(rel_err(o, r) for o, r in zip(opt_out, oracle_out))
            err_ref = max(rel_err(o, r) for o, r in zip(ref_out, oracle_out))
            point = {"block": block, "frame": 3 * block, "rel_err_optimized": err_opt,
                     "rel_err_reference": err_ref, "ratio": err_opt / err_ref,
                     "graphs": optimized.counters["graphs"],
                     "allocated_mib": torch.cuda.memory_allocated() / 2 ** 20 if device == "cuda" else None,
                     "reserved_mib": torch.cuda.memory_reserved() / 2 ** 20 if device == "cuda" else None,
                     "host_rss_mib": host_rss_mib(),
                     "elapsed_s": time.perf_counter() - started}
            checkpoints.append(point)
            print(f"block {block:5d} (frame {3 * block:5d}): error vs float32 optimized "
                  f"{err_opt:.3e} reference {err_ref:.3e} (ratio {err_opt / err_ref:.3f}); "
                  f"graphs {point['graphs']}; allocated {point['allocated_mib']} MiB; RSS "
                  f"{point['host_rss_mib']:.0f} MiB; {point['elapsed_s']:.0f} s",
                  file=sys.stderr, flush=True)

    def window_stats(key, first, last):
        values = [f[key] for f in forwards if first <= f["block"] < last and f[key] is not None]
        return statistics.median(values) if values else None

    quarter = args.blocks // 4
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "preset": args.preset, "dtype": args.dtype, "blocks": args.blocks,
        "forwards": len(forwards), "last_frame": 3 * args.blocks - 1,
        "checkpoints": checkpoints,
        "median_ms_by_quarter": [window_stats("ms", q * quarter, (q + 1) * quarter) for q in range(4)],
        "median_host_ms_by_quarter": [window_stats("host_ms", q * quarter, (q + 1) * quarter)
                                      for q in range(4)],
        "graph_captures_after_warmup": checkpoints[-1]["graphs"] - checkpoints[1]["graphs"]
        if len(checkpoints) > 1 else None,
        "max_ratio": max(c["ratio"] for c in checkpoints),
        "per_forward_ms": [f["ms"] for f in forwards],
        "per_forward_host_ms": [f["host_ms"] for f in forwards],
    }
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps(report) + "\n")
        report["plot"] = plot(report, out.with_suffix(".png"))
    print(f"\n{report['device']} | {args.preset} {args.dtype} | {len(forwards)} forwards, last "
          f"frame {report['last_frame']}")
    print(f"median ms per forward by quarter: {report['median_ms_by_quarter']}")
    print(f"median host ms per call by quarter: {report['median_host_ms_by_quarter']}")
    print(f"graph captures after warm-up: {report['graph_captures_after_warmup']}; worst error "
          f"ratio (optimized / reference, vs float32): {report['max_ratio']:.3f}")
    for c in checkpoints:
        print(f"  frame {c['frame']:6d}: ratio {c['ratio']:.3f}, allocated {c['allocated_mib']}, "
              f"RSS {c['host_rss_mib']:.0f} MiB")
    return report


def plot(report, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (lat, mem) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    gpu = report["per_forward_ms"]
    x = [i / 4 for i in range(len(gpu))]
    if gpu and gpu[0] is not None:
        lat.plot(x, gpu, lw=0.3, label="GPU ms per forward")
    lat.plot(x, report["per_forward_host_ms"], lw=0.3, label="host ms per call")
    lat.set_yscale("log")  # the first calls capture graphs (seconds); the stream runs in ms
    lat.set_ylabel("ms (log)")
    lat.legend(fontsize=8)
    blocks = [c["block"] for c in report["checkpoints"]]
    if report["checkpoints"][0]["allocated_mib"] is not None:
        mem.plot(blocks, [c["allocated_mib"] for c in report["checkpoints"]], "o-", label="allocated MiB")
        mem.plot(blocks, [c["reserved_mib"] for c in report["checkpoints"]], "s-", label="reserved MiB")
    mem.plot(blocks, [c["host_rss_mib"] for c in report["checkpoints"]], "^-", label="host RSS MiB")
    mem.set_xlabel("block")
    mem.legend(fontsize=8)
    fig.suptitle(f"{report['preset']} {report['dtype']} on {report['device']}: "
                 f"{report['forwards']} forwards", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


if __name__ == "__main__":
    main()
