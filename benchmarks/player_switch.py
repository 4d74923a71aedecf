"""What alternating players costs a block: one player's blocks back to back against N players'
blocks round-robin, through one model and one decoder (as `wan.serve` runs them), each block
timed two ways: the host's wall time from the block's start to its frames done (what the
scheduler sees: `torch.cuda.synchronize` after each block) and the runner's CUDA events (the
denoising forwards up to the decode's start, the decode's own span, the whole block). Where the
two differ, the GPU waited for the host; where the events grow, the GPU did more or slower work.

    python benchmarks/player_switch.py --players 4 --blocks 12 --out $OUT/player_switch.json
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import finish, run_header  # noqa: E402
from wan.modules.optimized_causal_model import OptimizedCausalWanModel  # noqa: E402
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper  # noqa: E402
from wan.modules.presets import LATENT_SIZE, model_config  # noqa: E402
from wan.modules.random_init import (random_inputs, randomize_decoder_weights_,  # noqa: E402
                                     randomize_weights_)
from wan.serving.runner import StreamingBlockRunner  # noqa: E402


def build(preset):
    with torch.device("cuda"):
        dit = OptimizedCausalWanModel.from_config(model_config(preset), cuda_graphs=True)
    randomize_weights_(dit, 0)
    dit.to(torch.bfloat16).eval()
    dit.num_frame_per_block = 3
    decoder = randomize_decoder_weights_(OptimizedVAEDecoderWrapper(cuda_graphs=True))
    return dit, decoder.to("cuda", torch.float16).eval()


def players(dit, decoder, count, latent):
    """`count` runners over the shared model and decoder, started and warmed up."""
    runners = []
    for player in range(count):
        runner = StreamingBlockRunner(dit, decoder, latent_hw=latent,
                                      generator=torch.Generator("cuda").manual_seed(player))
        first = random_inputs(dit, latent, 3, 0, seed=10 * player)
        runner.start(first["visual_context"])
        runner.warm_up(first["cond_concat"], first["mouse_cond"][:, :1],
                       first["keyboard_cond"][:, :1])
        runners.append(runner)
    return runners


@torch.no_grad()
def rounds(runners, blocks, latent, skip=2):
    """Every runner's blocks round-robin; per block (after `skip` rounds): wall, events."""
    rows = []
    for block in range(blocks):
        for player, runner in enumerate(runners):
            done = runner.blocks_done  # each stream goes on from where it is
            inputs = random_inputs(runner.model, latent, 3, 3 * done, seed=100 * player + done)
            torch.cuda.synchronize()
            start = time.perf_counter()
            _, clock = runner.block(inputs["cond_concat"], inputs["mouse_cond"],
                                    inputs["keyboard_cond"])
            torch.cuda.synchronize()
            wall = 1e3 * (time.perf_counter() - start)
            timing = clock.timing()
            denoise = clock.marks["start"].elapsed_time(clock.marks["decode"])
            if block >= skip:
                rows.append({"wall_ms": wall, "block_ms": timing.block_ms,
                             "denoise_ms": denoise, "decode_ms": timing.decode_ms,
                             "action_to_frame_ms": timing.action_to_frame_ms})
        print(f"  {len(runners)} player(s): round {block + 1}/{blocks}", file=sys.stderr,
              flush=True)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} | {"blocks": len(rows)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="universal")
    p.add_argument("--players", type=int, default=4)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    latent = LATENT_SIZE[args.preset]
    dit, decoder = build(args.preset)
    runners = players(dit, decoder, args.players, latent)
    # player 0 alone, then everyone (player 0's stream goes on; the others' start, warmed up)
    results = {"1": rounds(runners[:1], args.blocks, latent)}
    results[str(args.players)] = rounds(runners, args.blocks, latent)
    report = {**run_header("cuda"), "preset": args.preset, "players": results}
    finish(report, args.out, lambda r, path: None, print_table)


def print_table(report):
    print(f"\n{report['device']} | torch {report['torch']} | medians per block")
    print(f"{'players':>8}{'wall':>9}{'block(ev)':>11}{'denoise':>9}{'decode':>8}{'to frame':>10}")
    for n, r in report["players"].items():
        print(f"{n:>8}{r['wall_ms']:>9.1f}{r['block_ms']:>11.1f}{r['denoise_ms']:>9.1f}"
              f"{r['decode_ms']:>8.1f}{r['action_to_frame_ms']:>10.1f}")


if __name__ == "__main__":
    main()
