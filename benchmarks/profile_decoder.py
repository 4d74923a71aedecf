"""Where the GPU time of one steady 12-frame block of the streaming VAE decoder goes (per kernel
and per category), for the reference or the optimized decoder (eager: the kernels a graph
replays). GPU only, fp16, the real 44 x 80 latent, random weights.

    python benchmarks/profile_decoder.py [--decoder optimized|reference] [--out profile.json]
"""
import argparse
import json
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
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder(latents[3], *cache)
            torch.cuda.synchronize()
    summary = kernel_summary(prof, 1, args.top, f"{args.decoder} decoder, one steady block")
    if args.out:
        Path(args.out).write_text(json.dumps({
            **run_header(torch.device("cuda")), "decoder": args.decoder, "dtype": args.dtype,
            **summary}, indent=2))


if __name__ == "__main__":
    main()
