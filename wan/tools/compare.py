"""`python -m wan.compare`: what a precision mode costs in accuracy, on one's own weights.

A float32 reference `CausalWanModel` (the oracle) streams N blocks as Matrix-Game-2's pipeline does
(per block: 3 denoising calls on upstream's warped flow-matching steps, then the t=0 cache update;
one image context, random latents and actions). `OptimizedCausalWanModel` in the model dtype then
replays exactly those calls in its own caches, once per precision (`native` and the one asked for),
so every call sees the oracle's inputs and only its own caches carry its errors forward. Per block
it prints each precision's error against the oracle over the block's four outputs: relative
(||out - ref|| / ||ref||), max and mean absolute; and writes them as JSON with --out.

    python -m wan.compare --checkpoint Matrix-Game-2.0/base_distilled_model/base_distill.safetensors \\
        --precision fp8 --blocks 10
    python -m wan.compare --precision fp8            # random weights (no checkpoint)

Without a checkpoint the weights are drawn by wan.modules.random_init (seeded). The oracle takes ~6.5 GB
of GPU memory for the real model, the optimized model ~3.1 GB (+1.3 GB of FP8 weights).
--emulate-fp8 runs the FP8 GEMMs as float32 emulation (any device; for tests without FP8 hardware).
Without --precision it compares fp8 where the device has FP8 tensor cores, and emulated fp8
elsewhere (a CPU: saying so); an explicit --precision fp8 there needs --emulate-fp8.
"""
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from . import cli
from ..modules.shared.conditioning import attention_window_frames, frame_tokens
from ..kernels.dtypes import DTYPES, default_dtype_name
from ..kernels.fp8 import PRECISIONS, fp8_gemm_problem
from ..modules.shared.upstream_caches import new_stream_caches
from ..modules.causal_model import CausalWanModel
from ..modules.optimized_causal_model import OptimizedCausalWanModel
from ..serving import memory
from ..serving.runner import FlowMatchSchedule
from ..modules.presets import LATENT_SIZE, UPSTREAM_VARIANTS, model_config
from ..modules.random_init import random_inputs, randomize_weights_


PROG = "python -m wan.compare"


def parse_args(argv=None):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="the DiT's .safetensors file or folder (default: random "
                   "weights)")
    p.add_argument("--preset", default="universal", choices=("tiny",) + UPSTREAM_VARIANTS,
                   help="model config (default universal); --config overrides it")
    p.add_argument("--config", help="a config.json of the model (as in the checkpoint's folder)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="the precision to compare with native (default fp8; emulated where the "
                   "device has no FP8 tensor cores)")
    p.add_argument("--blocks", type=cli.positive_int, default=10,
                   help="blocks of 3 latent frames (default 10)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="the optimized model's dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", type=cli.device,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="weights (without --checkpoint) and inputs")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the optimized forwards from "
                   "CUDA graphs (outputs are the same as eager)")
    p.add_argument("--emulate-fp8", action="store_true", help="run FP8 GEMMs in float32 emulation "
                   "(any device; slow; for testing without FP8 tensor cores)")
    p.add_argument("--out", help="write the report as JSON here")
    return p.parse_args(argv)


def _config(args):
    """The model's config: --config's JSON (read and checked), else the preset's."""
    return cli.config_file(args.config) if args.config else model_config(args.preset)


def preflight(args, device, dtype, config, latent_hw):
    """Before any model is built: the output path, the checkpoint, the precision this device
    can run (the default fp8 is emulated where it cannot), and the memory of both models and of
    the recorded oracle stream. Sets args.precision and args.emulate_fp8."""
    if args.out:
        cli.output_file(args.out)
    if args.checkpoint:
        cli.weights_file(args.checkpoint, "--checkpoint", directory_ok=True)
    fp8_problem = fp8_gemm_problem(device, dtype)
    note = None
    if args.precision is None:
        args.precision = "fp8"
        if fp8_problem and not args.emulate_fp8:
            args.emulate_fp8 = True
            note = f"no FP8 GEMMs here ({fp8_problem}): comparing emulated fp8 (--emulate-fp8)"
    elif args.precision == "fp8" and fp8_problem and not args.emulate_fp8:
        raise cli.UsageError(f"--precision fp8: {fp8_problem}; add --emulate-fp8 to emulate "
                             f"the FP8 GEMMs in float32 (slow), or leave --precision out")
    h, w = latent_hw
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights = memory.model_bytes(config, torch.float32)
    action = config.get("action_config") or {}
    widths = 2 * bool(action.get("enable_mouse")) + action.get("keyboard_dim_in", 0) * bool(
        action.get("enable_keyboard"))
    blocks = args.blocks
    # per block the oracle's four calls keep their latents and outputs, and the block's
    # conditions; the action histories grow by 12 steps a block (all of them kept)
    per_block = (4 * 2 * 16 + 20) * 3 * h * w * 4
    actions = 12 * widths * 4 * blocks * (blocks + 1) // 2
    parts = {"oracle weights (float32)": weights,
             f"optimized weights ({str(dtype).replace('torch.', '')})": weights // 4 * itemsize,
             "caches": memory.stream_bytes(config, latent_hw, torch.float32)
             + memory.stream_bytes(config, latent_hw, dtype),
             f"{blocks} recorded blocks": blocks * per_block + actions}
    if args.precision == "fp8":
        parts["FP8 weight copies"] = weights // 4
    memory.check_memory(parts, device, f"--blocks {blocks} on {device}")
    if note:  # after the checks: an error stays the one line printed
        _log(note)


def _log(message: str):
    print(message, file=sys.stderr, flush=True)


@torch.no_grad()
def oracle_stream(oracle, blocks: int, latent_hw, seed: int) -> List[dict]:
    """The float32 oracle's stream: per block, the four calls' keyword arguments (without caches)
    and its outputs, on the oracle's device."""
    schedule = FlowMatchSchedule()
    frames = oracle.num_frame_per_block
    tokens = frame_tokens(latent_hw[0], latent_hw[1], oracle.patch_size)
    caches = new_stream_caches(oracle, 1, attention_window_frames(oracle.local_attn_size), tokens)
    context = None
    gen = torch.Generator(device=oracle.patch_embedding.weight.device).manual_seed(seed)
    recorded = []
    for block in range(blocks):
        start = frames * block
        inputs = random_inputs(oracle, latent_hw, frames, start, seed=seed * 100003 + block)
        context = inputs["visual_context"] if context is None else context
        inputs["visual_context"] = context  # one image per stream
        calls = []
        x = inputs["x"]
        sigmas = schedule.sigmas
        for step, (t, sigma) in enumerate(zip(schedule.timesteps + [0.0], sigmas + [0.0])):
            call = dict(inputs, x=x, t=torch.full(inputs["t"].shape, t, dtype=torch.float32,
                                                  device=x.device), current_start=start * tokens)
            out = oracle(**call, **caches)
            calls.append((call, out))
            if step < len(sigmas):  # the next denoising input, or the clean block for the update
                x0 = x - sigma * out
                nxt = sigmas[step + 1] if step + 1 < len(sigmas) else 0.0
                noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
                x = (1 - nxt) * x0 + nxt * noise
        recorded.append(calls)
        _log(f"  oracle block {block + 1}/{blocks}")
    return recorded


@torch.no_grad()
def replay(model, recorded, latent_hw) -> List[Dict[str, float]]:
    """The model's outputs on the oracle's inputs, in its own (owned) stream: per block the
    relative, max and mean absolute error over the block's calls, and each call's relative error
    (`rel_per_call`: the denoising steps, then the cache update)."""
    dtype = model.patch_embedding.weight.dtype
    model.start_stream(batch=1, latent_size=latent_hw)
    rows = []
    for calls in recorded:
        diff_sq = ref_sq = 0.0
        max_abs, abs_sum, count = 0.0, 0.0, 0
        per_call = []
        for call, expected in calls:
            # t stays float32, as upstream's pipeline passes it (bf16 would round 908.84 to 908)
            cast = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                        and k != "t" else v) for k, v in call.items()}
            reference = expected.double()
            diff = model(**cast).double() - reference
            diff_sq += diff.pow(2).sum().item()
            ref_sq += reference.pow(2).sum().item()
            per_call.append((diff.norm() / reference.norm()).item())
            max_abs = max(max_abs, diff.abs().max().item())
            abs_sum += diff.abs().sum().item()
            count += diff.numel()
        rows.append({"rel": (diff_sq / ref_sq) ** 0.5, "max_abs": max_abs,
                     "mean_abs": abs_sum / count, "rel_per_call": per_call})
    model.end_stream()
    return rows


def compare(oracle, model, precisions, blocks: int, latent_hw, seed: int = 0) -> dict:
    """{precision: per-block errors} of `model` (OptimizedCausalWanModel, any dtype) in each
    precision against the float32 `oracle` (CausalWanModel with the same weights)."""
    recorded = oracle_stream(oracle, blocks, latent_hw, seed)
    report = {}
    for precision in precisions:
        model.set_precision(precision)
        begin = time.perf_counter()
        report[precision] = replay(model, recorded, latent_hw)
        _log(f"  {precision}: {blocks} blocks replayed in {time.perf_counter() - begin:.1f} s")
    return report


def summary(per_block: List[Dict[str, float]]) -> Dict[str, float]:
    """The stream's worst block and its mean, per metric; and the mean relative error of each call
    of a block (denoising steps, then the cache update) over the blocks."""
    calls = len(per_block[0]["rel_per_call"])
    return {"rel_max": max(r["rel"] for r in per_block),
            "rel_mean": sum(r["rel"] for r in per_block) / len(per_block),
            "max_abs": max(r["max_abs"] for r in per_block),
            "mean_abs": sum(r["mean_abs"] for r in per_block) / len(per_block),
            "rel_per_call_mean": [sum(r["rel_per_call"][i] for r in per_block) / len(per_block)
                                  for i in range(calls)]}


def print_table(report: dict):
    names = list(report)
    header = "block  " + "  ".join(f"{n + ' rel':>12} {n + ' max':>10} {n + ' mean':>10}"
                                   for n in names)
    print(header)
    for block in range(len(report[names[0]])):
        cells = [f"{report[n][block]['rel']:12.3e} {report[n][block]['max_abs']:10.3e} "
                 f"{report[n][block]['mean_abs']:10.3e}" for n in names]
        print(f"{block:5d}  " + "  ".join(cells))
    base = summary(report[names[0]])
    for name in names:
        s = summary(report[name])
        steps = ", ".join(f"{e:.2e}" for e in s["rel_per_call_mean"])
        print(f"{name}: relative error vs float32 mean {s['rel_mean']:.3e}, worst block "
              f"{s['rel_max']:.3e} ({s['rel_mean'] / base['rel_mean']:.2f}x {names[0]}'s mean); "
              f"per call of a block (steps, update): {steps}")


def main(argv=None):
    return cli.run(PROG, _main, argv)


def _main(argv=None):
    args = parse_args(argv)
    device = args.device
    dtype = DTYPES[args.dtype or default_dtype_name(device)]
    config = _config(args)
    latent_hw = LATENT_SIZE.get(args.preset, (44, 80)) if not args.config else (44, 80)
    preflight(args, device, dtype, config, latent_hw)
    _log(f"building the float32 oracle and the {dtype} optimized model on {device}")
    with torch.device(device):
        oracle = CausalWanModel.from_config(config)
        backend = {"linear_fp8": "eager"} if args.emulate_fp8 else None
        model = OptimizedCausalWanModel.from_config(config, backend=backend,
                                                    cuda_graphs=args.cuda_graphs or None)
    if args.checkpoint:
        oracle.load_checkpoint(args.checkpoint)
    else:
        randomize_weights_(oracle, args.seed)
    oracle.eval()
    model.load_state_dict(oracle.state_dict())
    model.to(dtype).eval()
    for m in (oracle, model):
        m.num_frame_per_block = 3
    precisions = ["native"] + ([args.precision] if args.precision != "native" else [])
    report = compare(oracle, model, precisions, args.blocks, latent_hw, args.seed)
    print_table(report)
    if args.out:
        out = {"command": " ".join(["python -m wan.compare"] + (argv or sys.argv[1:])),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "checkpoint": args.checkpoint or f"random (seed {args.seed})",
               "dtype": str(dtype), "blocks": args.blocks,
               "per_block": report, "summary": {k: summary(v) for k, v in report.items()}}
        Path(args.out).write_text(json.dumps(out, indent=2))
        _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
