"""The live scheduler on a simulated clock (`wan.serving.schedule_sim`): what the schedule alone
gives a player, per player count and block time, before any GPU run. Two tables:

* steady play: every player's keys change at random (mean gap `--change-every`), re-makes on:
  press-to-shown p50/p95 (no encode, transport or page: a real run adds ~30-60 ms), re-makes
  granted/refused, late blocks and late re-makes;
* joins: one more player joins beside N playing ones every 3 s (random phase) and leaves after
  1.5 s: the joiner's first frame (p50/max) and the playing players' late blocks.

Block times are a GPU's (`--blocks name=block_ms/ready_ms`, ready = the frames, before the
cache update). Each row pools `--seeds` runs; blocks vary by +-`--jitter` (uniform).

    python benchmarks/schedule_sim.py --out $OUT/schedule_sim.json
"""
import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wan.serving.scheduler import percentile  # noqa: E402
from wan.serving.schedule_sim import simulate  # noqa: E402

log = logging.getLogger("schedule_sim")


def _block_times(text: str):
    """"H100=126/107" -> ("H100", 0.126, 0.107)."""
    name, _, times = text.partition("=")
    block, _, ready = times.partition("/")
    try:
        return name, float(block) / 1e3, float(ready or block) / 1e3
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected name=block_ms/ready_ms") from None


def _pooled(runs, players: int, name: str, kind: str) -> dict:
    presses = sorted(1e3 * s for r in runs for s in r.press_to_shown_s)
    firsts = [1e3 * s for r in runs for s in r.first_frame_s]
    row = {"gpu": name, "players": players, "kind": kind,
           "granted": sum(r.granted for r in runs), "refused": sum(r.refused for r in runs),
           "late_blocks": sum(r.late_blocks for r in runs),
           "late_remakes": sum(r.late_remakes for r in runs)}
    if presses:
        row.update(press_to_shown_p50_ms=round(statistics.median(presses), 1),
                   press_to_shown_p95_ms=round(percentile(presses, 0.95), 1),
                   presses=len(presses))
    if kind == "joins":
        row.update(joins=len(firsts), first_frame_p50_ms=round(statistics.median(firsts), 1),
                   first_frame_max_ms=round(max(firsts), 1),
                   late_blocks_of_others=sum(r.late_blocks_of_others for r in runs))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=_block_times, nargs="+",
                   default=[_block_times("H100=126/107"), _block_times("fast=105/90")],
                   help="name=block_ms/ready_ms per GPU (default: an H100's, measured in "
                        "2026-12-07_h100_play_encode_background.json, and a faster guess)")
    p.add_argument("--players", type=int, default=3, help="players 1..N")
    p.add_argument("--seconds", type=float, default=60.0, help="simulated seconds per run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--change-every", type=float, default=0.7, help="mean seconds between changes")
    p.add_argument("--jitter", type=float, default=0.03, help="block time varies by +- this share")
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    rows = []
    for name, block_s, ready_s in args.blocks:
        for players in range(1, args.players + 1):
            common = dict(block_s=block_s, ready_s=ready_s, seconds=args.seconds,
                          jitter=args.jitter)
            steady = [simulate(players, change_every_s=args.change_every, seed=seed, **common)
                      for seed in range(args.seeds)]
            joins = [simulate(players, change_every_s=float("inf"), seed=seed,
                              joiner_every_s=3.0, **common) for seed in range(args.seeds)]
            rows += [_pooled(steady, players, name, "steady"),
                     _pooled(joins, players, name, "joins")]
            log.info("%s, %d player(s) done", name, players)
    report = {"what": "the live scheduler on a simulated clock (no GPU)",
              "date": time.strftime("%Y-%m-%d"),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    print("\nsteady play | players | press->shown p50/p95 ms | re-makes granted/refused | "
          "late blocks | late re-makes")
    for r in rows:
        if r["kind"] == "steady":
            print(f"{r['gpu']:11s} | {r['players']:7d} | {fmt(r.get('press_to_shown_p50_ms'))}/"
                  f"{fmt(r.get('press_to_shown_p95_ms'))} | {r['granted']}/{r['refused']} | "
                  f"{r['late_blocks']} | {r['late_remakes']}")
    print("\njoins beside | players | joins | first frame p50/max ms | late blocks of the others")
    for r in rows:
        if r["kind"] == "joins":
            print(f"{r['gpu']:12s} | {r['players']:7d} | {r['joins']:5d} | "
                  f"{fmt(r['first_frame_p50_ms'])}/{fmt(r['first_frame_max_ms'])} | "
                  f"{r['late_blocks_of_others']}")


if __name__ == "__main__":
    main()
