"""The DiT's off-switchable options against each other, in one process: the steady graphed
forward (denoising steps) and the t=0 cache update, per variant, same random weights and inputs.

A variant is a set of constructor options ('default', or 'name=value' pairs joined by '+', e.g.
`residual_in_gemm=0`, `fused_qkv=0+residual_in_gemm=0`), plus `update_only=0` to make the
update a full forward (the head and the last block's tail included) instead of
`cache_update_only=True`. Each variant gets its own model (same weights), streams the pipeline's
call pattern (benchmarks/stream.py's pipeline protocol: upstream-style cache dicts, 3 denoising
steps + the update per block) and reports medians of the steady calls (window full), CUDA
events. Its outputs are compared with the first variant's on the same inputs (relative norm:
a variant that only changes rounding is ~1e-3 from it in bf16; one that changes nothing is 0).
Writes JSON (`--out`) and prints a table last.

    python benchmarks/dit_options.py --variants default,residual_in_gemm=0,update_only=0 \
        --out $OUT/dit_options.json
"""
import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Timer, finish, run_header, summarize  # noqa: E402
from wan.modules.optimized_causal_model import OptimizedCausalWanModel  # noqa: E402
from wan.modules.presets import LATENT_SIZE, model_config, tokens_per_frame  # noqa: E402
from wan.modules.random_init import random_inputs, randomize_weights_  # noqa: E402
from wan.modules.rolling_cache import new_stream_caches  # noqa: E402

STEPS = (1000.0, 666.0, 333.0)


def parse_variant(text: str) -> dict:
    """'default' -> {}; 'a=0+b=1' -> {'a': False, 'b': True} (update_only kept as given)."""
    if text == "default":
        return {}
    options = {}
    for part in text.split("+"):
        name, _, value = part.partition("=")
        if value not in ("0", "1"):
            raise SystemExit(f"variant {text!r}: write name=0 or name=1")
        options[name.strip()] = value == "1"
    return options


def run_variant(weights, options, args, timer, label):
    update_only = options.pop("update_only", True)
    with torch.device("cuda"):
        model = OptimizedCausalWanModel.from_config(model_config(args.preset), cuda_graphs=True,
                                                    **options)
    model.load_state_dict(weights)
    model.to(torch.bfloat16).eval()
    model.num_frame_per_block = 3
    tokens = tokens_per_frame(args.preset)
    caches = new_stream_caches(model, 1, model.local_attn_size, tokens)
    steady_from = math.ceil(model.local_attn_size / 3)
    denoise, update, outputs = [], [], []
    for block in range(args.blocks):
        inputs = random_inputs(model, LATENT_SIZE[args.preset], 3, 3 * block, seed=100 + block)
        call = dict(inputs, **caches, current_start=3 * block * tokens)
        for t in STEPS:
            call["t"] = torch.full((1, 3), t, device="cuda", dtype=torch.float32)
            out, ms = timer(lambda: model(**call))
            if block >= steady_from:
                denoise.append(ms)
            outputs.append(out.float())
            call["x"] = (0.5 * call["x"] + 0.5 * out).to(call["x"].dtype)
        call["t"] = torch.zeros(1, 3, device="cuda", dtype=torch.float32)
        extra = {"cache_update_only": True} if update_only else {}
        _, ms = timer(lambda: model(**call, **extra))
        if block >= steady_from:
            update.append(ms)
        print(f"  {label:<40} block {block + 1}/{args.blocks}", file=sys.stderr, flush=True)
    del model
    torch.cuda.empty_cache()
    return {"options": options, "update_only": update_only, "denoise": summarize(denoise),
            "update": summarize(update),
            "block_dit_ms": 3 * statistics.median(denoise) + statistics.median(update)}, outputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="universal")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--variants", default="default,residual_in_gemm=0,update_only=0")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/dit_options.py needs a CUDA GPU")
    variants = [v for v in args.variants.split(",") if v]
    with torch.device("cuda"):
        source = OptimizedCausalWanModel.from_config(model_config(args.preset))
    randomize_weights_(source, 0)
    weights = {k: v.detach().clone() for k, v in source.state_dict().items()}
    del source
    timer, results, first = Timer("cuda"), {}, None
    for variant in variants:
        result, outputs = run_variant(weights, parse_variant(variant), args, timer, variant)
        if first is None:
            first = outputs
        result["rel_diff_vs_first"] = max(((o - f).norm() / f.norm()).item()
                                          for o, f in zip(outputs, first))
        results[variant] = result
    report = {**run_header("cuda"), "preset": args.preset, "blocks": args.blocks,
              "variants": results}
    finish(report, args.out, lambda r, path: None, print_table)


def print_table(report):
    print(f"\n{report['device']} | torch {report['torch']} | {report['preset']} bf16, graphs")
    print(f"{'variant':<40}{'denoise ms':>11}{'update ms':>10}{'DiT/block':>10}{'vs first':>10}")
    for name, r in report["variants"].items():
        print(f"{name:<40}{r['denoise']['median_ms']:>11.2f}{r['update']['median_ms']:>10.2f}"
              f"{r['block_dit_ms']:>10.1f}{r['rel_diff_vs_first']:>10.1e}")


if __name__ == "__main__":
    main()
