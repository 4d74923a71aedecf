"""Where the GPU time of one steady 12-frame block of the streaming VAE decoder goes (per kernel
and per category), for the reference or the optimized decoder (eager: the kernels a graph
replays). GPU only, fp16, the real 44 x 80 latent, random weights.

    python benchmarks/profile_decoder.py [--decoder optimized|reference] [--out profile.json]
    python benchmarks/profile_decoder.py --per-latent-frame   # a block at once vs frame by frame

`--per-latent-frame` (issue 31, "frames out per latent frame") times, instead of profiling, a
steady block decoded in one call against the same block decoded one latent frame per call (3
calls, 4 video frames each): each way's whole time and how soon its first 4 frames are ready
(CUDA events, graphs as the decoder captures them, medians).
"""
import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import run_header  # noqa: E402
from benchmarks.profile_forward import kernel_summary  # noqa: E402
from wan.kernels.dtypes import DTYPES  # noqa: E402
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper  # noqa: E402
from wan.modules.vae_decoder import VAEDecoderWrapper  # noqa: E402
from wan.modules.random_init import randomize_decoder_weights_  # noqa: E402

DECODERS = {"reference": VAEDecoderWrapper, "optimized": OptimizedVAEDecoderWrapper}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder", default="optimized", choices=list(DECODERS))
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--per-latent-frame", action="store_true",
                   help="time a block decoded at once against latent frame by latent frame "
                   "instead of profiling")
    p.add_argument("--repeats", type=int, default=30, help="with --per-latent-frame: blocks timed "
                   "each way (default 30)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dtype = DTYPES[args.dtype]
    decoder = randomize_decoder_weights_(DECODERS[args.decoder]()).to("cuda", dtype).eval()
    latents = [torch.randn(1, 3, 16, 44, 80, device="cuda", dtype=dtype) for _ in range(4)]
    cache = [None] * 32
    with torch.no_grad():
        for z in latents[:3]:  # the first block, then steady ones
            _, cache = decoder(z, *cache)
        torch.cuda.synchronize()
        if args.per_latent_frame:
            report = time_per_latent_frame(decoder, latents[3], cache, args.repeats)
            logging.info("%s", json.dumps(report, indent=1))
            if args.out:
                Path(args.out).write_text(json.dumps({
                    **run_header(torch.device("cuda")), "decoder": args.decoder,
                    "dtype": args.dtype, "per_latent_frame": report}, indent=2))
            return
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder(latents[3], *cache)
            torch.cuda.synchronize()
    summary = kernel_summary(prof, 1, args.top, f"{args.decoder} decoder, one steady block")
    if args.out:
        Path(args.out).write_text(json.dumps({
            **run_header(torch.device("cuda")), "decoder": args.decoder, "dtype": args.dtype,
            **summary}, indent=2))


def time_per_latent_frame(decoder, z, cache, repeats: int) -> dict:
    """A steady block `z` [1, 3, 16, h, w] decoded in one call and in one call per latent frame,
    `repeats` blocks each way, alternating, continuing one stream (the decoder history carries
    on, as in play). Medians of each way's whole span and of the span to its first frames."""
    def at_once(cache):
        return decoder(z, *cache)[1]

    def per_frame(cache, first_ready):
        for i in range(z.shape[1]):
            _, cache = decoder(z[:, i:i + 1], *cache)
            if i == 0:
                first_ready.record()
        return cache

    spans = {"at_once": [], "per_latent_frame": [], "per_latent_frame_first": []}
    for _ in range(2):  # warm-up: the one-frame shape's capture and engine search happen here
        cache = per_frame(cache, torch.cuda.Event())
        cache = at_once(cache)
    captures_before = decoder.counters["captures"] if hasattr(decoder, "counters") else 0
    for _ in range(repeats):
        start, first, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        cache = per_frame(cache, first)
        end.record()
        torch.cuda.synchronize()
        spans["per_latent_frame"].append(start.elapsed_time(end))
        spans["per_latent_frame_first"].append(start.elapsed_time(first))
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        cache = at_once(cache)
        end.record()
        torch.cuda.synchronize()
        spans["at_once"].append(start.elapsed_time(end))
    captured = (decoder.counters["captures"] if hasattr(decoder, "counters") else 0) - captures_before
    return ({name + "_ms": statistics.median(ms) for name, ms in spans.items()}
            | {"repeats": repeats, "captures_while_timed": captured})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main()
