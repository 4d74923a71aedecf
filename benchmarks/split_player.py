"""One player split over two GPUs: the DiT on cuda:0, the decoder on cuda:1, pipelined by the block
runner (the next block's DiT work overlaps this block's decode), against the same player on one
GPU and against each part alone (the slower part bounds the split block). Needs two GPUs.

Block times are host wall time over --blocks steady blocks with both GPUs synchronised at the
ends (the two GPUs share no event clock); the parts alone with CUDA events.

    python benchmarks/split_player.py --out benchmarks/results/2026-11-30_h200x2_split.json
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.stream import Timer, finish, run_header  # noqa: E402
from wan.modules.shared.conditioning import history_steps  # noqa: E402
from wan.modules.optimized_causal_model import OptimizedCausalWanModel  # noqa: E402
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper  # noqa: E402
from wan.serving.runner import StreamingBlockRunner  # noqa: E402
from wan.modules.presets import LATENT_SIZE, model_config  # noqa: E402
from wan.modules.random_init import random_inputs, randomize_decoder_weights_, randomize_weights_  # noqa: E402

LATENT = LATENT_SIZE["universal"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--decoder-graphs", choices=("on", "off"), default="on",
                   help="CUDA graphs for the decoders (off: eager decoders in every variant)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if torch.cuda.device_count() < 2:
        p.error("needs two CUDA GPUs")
    return args


def decoder_on(device, graphs: bool):
    with torch.device(device):
        decoder = OptimizedVAEDecoderWrapper(cuda_graphs=graphs)
    return randomize_decoder_weights_(decoder).to(device, torch.float16).eval()


def synchronize():
    for index in range(2):
        torch.cuda.synchronize(index)


@torch.no_grad()
def block_ms(model, decoder, args) -> float:
    """Steady block time: wall time over args.blocks blocks after the warm-up, per block."""
    runner = StreamingBlockRunner(model, decoder, latent_hw=LATENT)
    inputs = random_inputs(model, LATENT, 3, 3 * (args.warmup + args.blocks), seed=1)
    runner.start(inputs["visual_context"])
    steps = inputs["mouse_cond"].shape[1]

    def block(index):
        end = history_steps(3 * index + 2)
        runner.block(inputs["cond_concat"], inputs["mouse_cond"][:, :min(end, steps)],
                     inputs["keyboard_cond"][:, :min(end, steps)])

    for index in range(args.warmup):
        block(index)
    synchronize()
    begin = time.perf_counter()
    for index in range(args.warmup, args.warmup + args.blocks):
        block(index)
    synchronize()
    return 1e3 * (time.perf_counter() - begin) / args.blocks


@torch.no_grad()
def decode_ms(decoder, args) -> float:
    """The decoder alone: median ms per steady 3-latent-frame block."""
    timer, cache, times = Timer("cuda"), [None] * 32, []
    latents = torch.randn(1, 3, 16, *LATENT, device=decoder.conv2.weight.device,
                          dtype=torch.float16)
    with torch.cuda.device(latents.device):
        for index in range(args.warmup + args.blocks):
            (_, cache), ms = timer(lambda: decoder(latents, *cache))
            if index >= args.warmup:
                times.append(ms)
    return statistics.median(times)


@torch.no_grad()
def block_ms_dit_only(model, args) -> float:
    """The DiT's part of a block alone (3 denoising forwards + the update), wall time per block."""
    class NoDecoder(torch.nn.Module):  # frames are not needed: the runner's decode is skipped
        def __init__(self):
            super().__init__()
            self.conv2 = torch.nn.Conv3d(1, 1, 1, device="cuda:0", dtype=torch.float16)

        def forward(self, z, *cache):
            return z, list(cache)

    return block_ms(model, NoDecoder(), args)


def main(argv=None):
    args = parse_args(argv)
    with torch.device("cuda:0"):
        model = OptimizedCausalWanModel.from_config(model_config("universal"), cuda_graphs=True)
    randomize_weights_(model, 0)
    model.num_frame_per_block = 3
    model = model.to(torch.bfloat16).eval()
    graphs = args.decoder_graphs == "on"
    same, other = decoder_on("cuda:0", graphs), decoder_on("cuda:1", graphs)
    one_gpu = block_ms(model, same, args)
    split = block_ms(model, other, args)
    decode = decode_ms(other, args)
    dit = block_ms_dit_only(model, args)
    slower = max(dit, decode)
    report = {**run_header("cuda"), "devices": [torch.cuda.get_device_name(i) for i in range(2)],
              "players": {"two_gpu_split_block_ms": split, "one_gpu_block_ms": one_gpu,
                          "dit_block_ms": dit, "decode_block_ms": decode,
                          "split_over_slower_part": split / slower,
                          "within_10_percent_of_slower_part": split <= 1.1 * slower}}
    finish(report, args.out, lambda r, path: None, print_table)


def print_table(report):
    p = report["players"]
    print(f"\n{' / '.join(report['devices'])} | torch {report['torch']}")
    print(f"one GPU (DiT + decoder)      {p['one_gpu_block_ms']:7.1f} ms per block")
    print(f"split over two GPUs          {p['two_gpu_split_block_ms']:7.1f} ms per block")
    print(f"  DiT part alone (cuda:0)    {p['dit_block_ms']:7.1f} ms")
    print(f"  decoder alone (cuda:1)     {p['decode_block_ms']:7.1f} ms")
    print(f"split / slower part: {p['split_over_slower_part']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
