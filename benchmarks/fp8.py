"""precision="fp8" against bf16 on the GPU, in one run: the error of each against float32 over a
stream, the steady-state forward with CUDA graphs, what each FP8 GEMM group costs and saves, and
where an FP8 forward's GPU time goes.

* error: `wan.compare`'s method (a float32 reference streams --error-blocks blocks on upstream's
  warped schedule; the optimized bf16 model replays its calls in its own caches), per variant;
* time: the stream benchmark's pipeline protocol (benchmarks/stream.py), upstream-style cache
  dicts, CUDA graphs, median of every steady-state forward, per variant;
* variants: native (bf16), the default FP8 set, all six GEMM groups in FP8, each group alone
  and any '+'-joined set (WAN_FP8_GEMMS);
* a torch.profiler summary of one steady FP8 forward (the default set) (eager: the kernels a graph replays).

Writes JSON with `device`, `torch`, `date`, `command` and an `fp8` section (`fp8_ms`, `bf16_ms`,
`rel_error_fp8`, `rel_error_bf16`: mean relative error over the stream's blocks) and prints a
table last. GPU with FP8 tensor cores only.

    python benchmarks/fp8.py --out benchmarks/results/2026-11-30_h200_fp8.json
"""
import argparse
import gc
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.profile_forward import kernel_summary, profile_steady_forwards  # noqa: E402
from benchmarks.harness import Timer, finish, run_header  # noqa: E402
from benchmarks.stream import pipeline_protocol  # noqa: E402
from wan import CausalWanModel  # noqa: E402
from wan.tools.compare import oracle_stream, replay, summary  # noqa: E402
from wan.runtime.options import FP8_GEMMS  # noqa: E402
from wan.modules.optimized_causal_model import OptimizedCausalWanModel  # noqa: E402
from wan.modules.presets import LATENT_SIZE, model_config  # noqa: E402
from wan.modules.random_init import randomize_weights_  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="universal")
    p.add_argument("--error-blocks", type=int, default=10)
    p.add_argument("--time-blocks", type=int, default=6)
    p.add_argument("--variants", default="default,all," + ",".join(FP8_GEMMS),
                   help="FP8 variants besides native, comma-separated: 'default' (the model's "
                   "DEFAULT_FP8_GEMMS), 'all', or GEMM names joined by '+' (e.g. qkv+ffn_in)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU with FP8 tensor cores")
    return args


def use_variant(model, variant: str):
    """native, default, all, or the '+'-joined GEMMs in FP8."""
    os.environ["WAN_FP8_GEMMS"] = {"native": "", "default": ""}.get(variant,
                                                                     variant.replace("+", ","))
    model.set_precision("native" if variant == "native" else "fp8")


def profile_fp8_forward(model, preset: str) -> dict:
    """Kernel summary of steady FP8 forwards, eager (the kernels a graph replays)."""
    graphs = model.cuda_graphs
    model.enable_cuda_graphs(False)
    forwards = 4
    prof = profile_steady_forwards(model, preset, forwards)
    model.enable_cuda_graphs(graphs)
    return kernel_summary(prof, forwards, 15, "fp8: per forward")


def main(argv=None):
    args = parse_args(argv)
    variants = ["native"] + [v for v in args.variants.split(",") if v]
    config, latent_hw = model_config(args.preset), LATENT_SIZE[args.preset]
    with torch.device("cuda"):
        oracle = CausalWanModel.from_config(config)
        model = OptimizedCausalWanModel.from_config(config, cuda_graphs=True)
    randomize_weights_(oracle, 0)
    model.load_state_dict(oracle.state_dict())
    model.to(torch.bfloat16).eval()
    for m in (oracle, model):
        m.num_frame_per_block = 3
    print(f"float32 reference stream of {args.error_blocks} blocks", file=sys.stderr, flush=True)
    recorded = oracle_stream(oracle.eval(), args.error_blocks, latent_hw, seed=0)
    del oracle
    gc.collect()
    torch.cuda.empty_cache()

    timing_args = SimpleNamespace(preset=args.preset, blocks=args.time_blocks,
                                  denoising_steps=[1000.0, 666.0, 333.0], device="cuda")
    results = {}
    for variant in variants:
        use_variant(model, variant)
        errors = replay(model, recorded, latent_hw)
        timing = pipeline_protocol(model, timing_args, Timer("cuda"), variant)
        results[variant] = {"fp8_gemms": model.precision_report()["fp8_gemms"],
                            "per_block": errors, "error": summary(errors),
                            "median_ms": timing["median_ms"], "p95_ms": timing["p95_ms"]}
    use_variant(model, "default")
    profiled = profile_fp8_forward(model, args.preset)
    native, fp8 = results["native"], results.get("default", results[variants[-1]])
    report = {
        **run_header("cuda"), "preset": args.preset, "error_blocks": args.error_blocks,
        "fp8": {"fp8_ms": fp8["median_ms"], "bf16_ms": native["median_ms"],
                "rel_error_fp8": fp8["error"]["rel_mean"],
                "rel_error_bf16": native["error"]["rel_mean"],
                "error_ratio": fp8["error"]["rel_mean"] / native["error"]["rel_mean"],
                "target_ms": 15.0},
        "variants": results, "fp8_profile": {k: v for k, v in profiled.items() if k != "kernels"},
        "fp8_top_kernels": dict(list(profiled["kernels"].items())[:15]),
    }
    finish(report, args.out, lambda r, path: None, print_table)


def print_table(report):
    print(f"\n{report['device']} | torch {report['torch']} | {report['preset']}, error over "
          f"{report['error_blocks']} blocks vs float32")
    print(f"{'variant':<10}{'median':>9}{'p95':>9}{'rel err mean':>14}{'worst block':>13}"
          f"{'x bf16':>8}   rel err per call of a block (3 steps, update)")
    base = report["variants"]["native"]["error"]["rel_mean"]
    for name, r in report["variants"].items():
        steps = " ".join(f"{e:.2e}" for e in r["error"]["rel_per_call_mean"])
        print(f"{name:<10}{r['median_ms']:>7.2f}ms{r['p95_ms']:>7.2f}ms"
              f"{r['error']['rel_mean']:>14.3e}{r['error']['rel_max']:>13.3e}"
              f"{r['error']['rel_mean'] / base:>8.2f}   {steps}")
    f = report["fp8"]
    print(f"fp8 (default) {f['fp8_ms']:.2f} ms vs bf16 {f['bf16_ms']:.2f} ms per forward "
          f"(target {f['target_ms']:.0f}); error {f['error_ratio']:.2f}x bf16's (target <= 5x)")


if __name__ == "__main__":
    main()
