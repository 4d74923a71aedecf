"""Time to screen: per block of 3 latent frames, the denoising forwards, the decode to 12 video
frames and the cache update, for an upstream-equivalent reference (reference DiT + reference
decoder, eager, update before decode, as upstream's pipeline runs them) and the optimized pair
(CUDA graphs, the update beside the decode), in one run, random weights.

Reports per steady block: the decoder alone, the decode within the blocks, the whole block
(throughput) and the action-to-frame latency (block start to its frames ready), plus fps of video
frames. GPU: universal, DiT bf16, decoder fp16 (as upstream's pipeline); CPU: the tiny DiT, fp32,
a small latent (a smoke run: the decoder is full size, so it is most of a block).

"decoder alone" is the decoder by itself on its own stream of blocks, timed before the blocks
(after its first 9- and 12-frame calls: first uses pay allocations and kernel selection);
"decode in block" is the decode's span inside the blocks that the block and action-to-frame
columns time (the runner's clock: the same calls), so it is never above the block time. The two
are separate measurements: on a busy CPU few samples of each can differ by 2x (other processes'
load), which is why the decoder alone can come out above a whole block there; on the optimized
pair (GPU) the decode in a block shares the GPU with the cache update beside it.

    python benchmarks/end_to_end.py [--blocks 8] [--out e2e.json]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import (Timer, bar_chart, benchmark_device, finish,  # noqa: E402
                                names_from, progress_bar, run_header, summarize)
from wan.serving import memory  # noqa: E402
from wan.tools import cli  # noqa: E402
from wan import CausalWanModel  # noqa: E402
from wan.modules.optimized_causal_model import OptimizedCausalWanModel  # noqa: E402
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper  # noqa: E402
from wan.modules.vae_decoder import VAEDecoderWrapper  # noqa: E402
from wan.serving.power import EnergyMeter  # noqa: E402
from wan.serving.runner import StreamingBlockRunner  # noqa: E402
from wan.modules.presets import LATENT_SIZE, model_config  # noqa: E402
from wan.modules.random_init import random_inputs, randomize_decoder_weights_, randomize_weights_  # noqa: E402

# name: (DiT class and options, decoder class and options, the block runner's options)
PAIRS = {
    "reference": ((CausalWanModel, {}), (VAEDecoderWrapper, {}), {"overlap_update": False}),
    "optimized": ((OptimizedCausalWanModel, {"cuda_graphs": True}),
                  (OptimizedVAEDecoderWrapper, {"cuda_graphs": True}), {"overlap_update": True}),
    # the optimized pair in upstream's order (update, then decode): what the overlap buys
    "optimized_serial": ((OptimizedCausalWanModel, {"cuda_graphs": True}),
                         (OptimizedVAEDecoderWrapper, {"cuda_graphs": True}),
                         {"overlap_update": False}),
    # the resample as nearest upsampling + torch's 3x3 conv (the eager twin): what the 2x2
    # sub-pixel conv of upsample_conv2d buys
    "optimized_upsample_eager": ((OptimizedCausalWanModel, {"cuda_graphs": True}),
                                 (OptimizedVAEDecoderWrapper,
                                  {"cuda_graphs": True, "backend": {"upsample_conv2d": "eager"}}),
                                 {"overlap_update": True}),
    # the DiT's block GEMMs in FP8 (precision="fp8", opt-in; the decoder as "optimized")
    "optimized_fp8": ((OptimizedCausalWanModel, {"cuda_graphs": True, "precision": "fp8"}),
                      (OptimizedVAEDecoderWrapper, {"cuda_graphs": True}),
                      {"overlap_update": True}),
    # each residual block's closing add and the next norm as two passes: what
    # bias_residual_add_rms_norm_silu buys
    "optimized_unfused_norm": ((OptimizedCausalWanModel, {"cuda_graphs": True}),
                               (OptimizedVAEDecoderWrapper,
                                {"cuda_graphs": True, "fuse_residual_norm": False}),
                               {"overlap_update": True}),
    # the shortcut convs' biases added by torch's own pass: what fold_shortcut_bias buys
    "optimized_shortcut_bias": ((OptimizedCausalWanModel, {"cuda_graphs": True}),
                                (OptimizedVAEDecoderWrapper,
                                 {"cuda_graphs": True, "fold_shortcut_bias": False}),
                                {"overlap_update": True}),
    # the t=0 update as a full forward (head and last block's tail): what cache_update_only buys
    "optimized_full_update": ((OptimizedCausalWanModel, {"cuda_graphs": True}),
                              (OptimizedVAEDecoderWrapper, {"cuda_graphs": True}),
                              {"overlap_update": True, "cache_update_only": False}),
}


# decoder options that are attributes (on/off switches of the decode's layout), not keywords
DECODER_SWITCHES = ("fold_resample_bias", "fuse_residual_norm", "fold_shortcut_bias")

PROG = "benchmarks/end_to_end.py"


def _pairs(text: str):
    return names_from(text, PAIRS, "pair")



def parse_args(argv=None):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=benchmark_device, default="auto", help="cuda, cpu or auto")
    p.add_argument("--blocks", type=cli.positive_int, default=None,
                   help="blocks per run (default 8 GPU, 3 CPU)")
    p.add_argument("--warmup", type=cli.non_negative_int, default=None,
                   help="blocks left out of the statistics (default 2 on a GPU: the first block "
                   "and the graph captures; 1 on a CPU: the first block, which has 9 frames)")
    p.add_argument("--pairs", type=_pairs, default="reference,optimized",
                   help=f"comma list of {', '.join(PAIRS)}")
    p.add_argument("--out", default=None, help="JSON report path (a .png plot beside it; the "
                   "folder must exist)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.preset = "universal" if gpu else "tiny"
    args.latent = LATENT_SIZE[args.preset] if gpu else (4, 8)
    args.dit_dtype = torch.bfloat16 if gpu else torch.float32
    args.decoder_dtype = torch.float16 if gpu else torch.float32
    args.blocks = args.blocks or (8 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    if args.blocks <= args.warmup:
        p.error(f"--blocks ({args.blocks}) must exceed --warmup ({args.warmup})")
    return args


def preflight(args):
    """Before any model is built: the report's path, and the memory of the pairs' models and
    streams."""
    if args.out:
        cli.output_file(args.out)
    device = torch.device(args.device)
    config = model_config(args.preset)
    parts = {}
    for name in args.pairs:
        parts[f"{name}: DiT, decoder and their streams"] = (
            memory.model_bytes(config, args.dit_dtype)
            + memory.stream_bytes(config, args.latent, args.dit_dtype)
            + memory.decoder_weight_bytes(args.decoder_dtype)
            + 2 * memory.decoder_history_bytes(args.latent, args.decoder_dtype))
    memory.check_memory(parts, device, f"--pairs {','.join(args.pairs)} on {device}")


def build(args):
    """Every pair's DiT and decoder, with the same random weights per kind."""
    built, dit_weights, decoder_weights = {}, None, None
    for name in args.pairs:
        (dit_cls, dit_opts), (dec_cls, dec_opts), runner_opts = PAIRS[name]
        with torch.device(args.device):
            dit = dit_cls.from_config(model_config(args.preset), **dit_opts)
        switches = {k: v for k, v in dec_opts.items() if k in DECODER_SWITCHES}
        decoder = dec_cls(**{k: v for k, v in dec_opts.items() if k not in DECODER_SWITCHES})
        for switch, value in switches.items():
            setattr(decoder, switch, value)
        if dit_weights is None:
            dit_weights = randomize_weights_(dit, seed=0).state_dict()
            decoder_weights = randomize_decoder_weights_(decoder).state_dict()
        dit.load_state_dict(dit_weights)
        decoder.load_state_dict(decoder_weights)
        dit.num_frame_per_block = 3
        built[name] = (dit.to(args.device, args.dit_dtype).eval(),
                       decoder.to(args.device, args.decoder_dtype).eval(), runner_opts)
    return built


def progress(label, done, total, text):
    bar = progress_bar(done, total)
    print(f"  {label:<10} [{bar}] {text}", file=sys.stderr, flush=True)


@torch.no_grad()
def time_decoder(decoder, args, label):
    """Milliseconds per block of the decoder alone (3 latent frames; 12 video frames steady):
    as many timed calls as the blocks get, after at least two untimed ones (its first 9-frame
    and first 12-frame call: the first use of each shape pays allocations, kernel selection
    and graph captures, which the blocks timed later no longer see)."""
    h, w = args.latent
    gen = torch.Generator().manual_seed(3)
    skip = max(2, args.warmup)
    calls = skip + args.blocks - args.warmup
    cache, times, timer = [None] * 32, [], Timer(args.device)
    for block in range(calls):
        z = torch.randn(1, 3, 16, h, w, generator=gen).to(args.device, args.decoder_dtype)
        (frames, cache), ms = timer(lambda: decoder(z, *cache))
        times.append(ms)
        progress(label, block + 1, calls, f"decode {frames.shape[1]} frames: {ms:.1f} ms")
    return summarize(times[skip:])


@torch.no_grad()
def time_blocks(dit, decoder, runner_opts, args, label):
    runner = StreamingBlockRunner(dit, decoder, latent_hw=args.latent, **runner_opts)
    first = random_inputs(dit, args.latent, 3, 0, seed=1)
    runner.start(first["visual_context"])
    # every graph the blocks replay, captured before the first (the window-full phase's would
    # otherwise land in a timed block when --warmup is small); 0 for the reference pair
    widths = {k: None if first[k] is None else first[k][:, :1]
              for k in ("mouse_cond", "keyboard_cond")}
    runner.warm_up(first["cond_concat"], **widths)
    blocks, screen, decode = [], [], []
    meter = EnergyMeter(args.device)  # says why where it cannot measure (a CPU, no NVML)
    for block in range(args.blocks):
        if block == args.warmup:  # the timed blocks' energy
            meter.start()
        inputs = random_inputs(dit, args.latent, 3, 3 * block, seed=1 + block)
        frames, clock = runner.block(inputs["cond_concat"], inputs["mouse_cond"],
                                     inputs["keyboard_cond"])
        timing = clock.timing()
        blocks.append(timing.block_ms)
        screen.append(timing.action_to_frame_ms)
        decode.append(timing.decode_ms)
        progress(label, block + 1, args.blocks, f"{frames.shape[1]} frames: block "
                 f"{timing.block_ms:.1f} ms (decode {timing.decode_ms:.1f} ms), action-to-frame "
                 f"{timing.action_to_frame_ms:.1f} ms")
    meter.stop()
    stats = {"block": summarize(blocks[args.warmup:]),
             "block_ms_each": blocks,  # every block, warm-up ones first: outliers show here
             "energy": meter.report(blocks=args.blocks - args.warmup),
             "action_to_frame": summarize(screen[args.warmup:]),
             "decode_in_block": summarize(decode[args.warmup:]), "frames_per_block": 12}
    return stats, runner


def summary(results):
    """The issue's `end_to_end` section from the per-pair results."""
    out = {}
    for name, r in results.items():  # every pair's: reference, optimized, the variants
        out[f"decoder_{name}_ms"] = r["decoder"]["median_ms"]  # the decoder alone
        out[f"decode_in_block_{name}_ms"] = r["blocks"]["decode_in_block"]["median_ms"]
        out[f"{name}_block_ms"] = r["blocks"]["block"]["median_ms"]
    if "optimized" in results:
        r = results["optimized"]["blocks"]
        out["action_to_frame_ms"] = r["action_to_frame"]["median_ms"]
        out["fps"] = 1e3 * r["frames_per_block"] / r["block"]["median_ms"]
    if "reference" in results:
        out["reference_action_to_frame_ms"] = results["reference"]["blocks"]["action_to_frame"][
            "median_ms"]
    if "reference_block_ms" in out and "optimized_block_ms" in out:
        out["speedup"] = out["reference_block_ms"] / out["optimized_block_ms"]
    return out


def print_table(report):
    print(f"\n{report['device']} | torch {report['torch']} | DiT {report['preset']} "
          f"{report['dit_dtype']}, decoder {report['decoder_dtype']}, latent {report['latent']}")
    width = max(17, 1 + max(len(name) for name in report["pairs"]))
    header = (f"{'pair':<{width}}{'decoder alone':>14}{'decode in block':>16}{'block':>11}"
              f"{'action->frame':>15}{'fps':>7}{'J/block':>9}")
    print(header)
    print("-" * len(header))
    alone_above_block = False
    for name, r in report["pairs"].items():
        block = r["blocks"]["block"]["median_ms"]
        alone = r["decoder"]["median_ms"]
        alone_above_block |= alone > block
        in_block = r["blocks"]["decode_in_block"]["median_ms"]
        print(f"{name:<{width}}{alone:>12.1f}ms{in_block:>14.1f}ms"
              f"{block:>9.1f}ms{r['blocks']['action_to_frame']['median_ms']:>13.1f}ms"
              f"{1e3 * 12 / block:>7.1f}{_joules(r['blocks']['energy']):>9}")
    samples = report["blocks"] - report["warmup_blocks"]
    print(f"medians of {samples} block(s) after {report['warmup_blocks']} warm-up; \"decoder "
          f"alone\": the decoder by itself, timed before the blocks (after its first two calls); "
          f"\"decode in block\": its span inside the timed blocks (part of \"block\")")
    if alone_above_block:
        print("note: the decoder alone took longer than a whole block here. They are separate "
              "runs: on a busy machine (other processes' load) few samples of each vary by up to "
              "2x; the decode in block is the consistent figure (more --blocks: steadier medians)")
    e2e = report["end_to_end"]
    if "speedup" in e2e:
        print(f"speedup per block {e2e['speedup']:.2f}x")


def _joules(energy: dict) -> str:
    return f"{energy['joules_per_block']:.1f}" if energy["available"] else "-"


def plot(report, path):
    names = list(report["pairs"])
    pairs = report["pairs"]
    groups = {"decoder alone": [pairs[n]["decoder"]["median_ms"] for n in names],
              "decode in block": [pairs[n]["blocks"]["decode_in_block"]["median_ms"]
                                  for n in names],
              "block": [pairs[n]["blocks"]["block"]["median_ms"] for n in names],
              "action->frame": [pairs[n]["blocks"]["action_to_frame"]["median_ms"] for n in names]}
    return bar_chart(groups, names, "median ms per 12-frame block",
                     f"time to screen, {report['device']}", path)


def main(argv=None):
    return cli.run(PROG, _main, argv)


def _main(argv=None):
    args = parse_args(argv)
    preflight(args)
    torch.manual_seed(0)
    print(f"building {args.pairs} ({args.preset}, {args.device})", file=sys.stderr, flush=True)
    built = build(args)
    report = {
        **run_header(args.device),
        "preset": args.preset, "latent": list(args.latent),
        "dit_dtype": str(args.dit_dtype).replace("torch.", ""),
        "decoder_dtype": str(args.decoder_dtype).replace("torch.", ""),
        "blocks": args.blocks, "warmup_blocks": args.warmup, "pairs": {},
    }
    for name, (dit, decoder, runner_opts) in built.items():
        decoder_stats = time_decoder(decoder, args, name)
        block_stats, runner = time_blocks(dit, decoder, runner_opts, args, name)
        report["pairs"][name] = {"decoder": decoder_stats, "blocks": block_stats,
                                 "update_beside_decode": runner_opts["overlap_update"],
                                 # what the runner did (the reference DiT has no such keyword)
                                 "update_cache_only": bool(runner.update_kwargs)}
    report["end_to_end"] = summary(report["pairs"])
    finish(report, args.out, plot, print_table)
    return report


if __name__ == "__main__":
    main()
