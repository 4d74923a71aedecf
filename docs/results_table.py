"""The README's headline numbers, from the committed result JSONs in benchmarks/results/.

    python docs/results_table.py                   # print the markdown table
    python docs/results_table.py --write README.md # rewrite the block between the markers
    python docs/results_table.py --check README.md # exit 1 with a diff when the block differs

The block is everything between the lines `<!-- results-table:start -->` and
`<!-- results-table:end -->`. A new measurement: commit its JSON, point SOURCES at it, run --write.
"""

import argparse
import difflib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
START = "<!-- results-table:start -->"
END = "<!-- results-table:end -->"

# The runs the README's numbers come from (one per kind of measurement; the newest on current code).
SOURCES = {
    "stream": "2026-12-02_h200_stream_step34.json",
    # the newest run of the optimized pair
    "end_to_end": "2026-12-02_h200_end_to_end_step42.json",
    "decoder": "2026-12-02_h200_end_to_end_step42.json",
    # FP8 against bf16 in one run
    "end_to_end_fp8": "2026-12-02_h200_end_to_end_fp8.json",
    # the reference pair's newest run (its code did not change since)
    "end_to_end_reference": "2026-12-02_h200_end_to_end_energy.json",
    "upstream_pipeline_full": "2026-12-01_h200_upstream_pipeline_full.json",
    "seed_suite": "2026-12-01_h200_upstream_pipeline_full_suite.json",
    "play": "2026-12-01_h200_play.json",
    "players": "2026-12-02_h200_players_energy.json",
    "fp8": "2026-11-30_h200_fp8.json",
    "players_fp8": "2026-12-02_h200_players_fp8.json",
}


def load(kind, root=ROOT):
    with open(Path(root) / RESULTS / SOURCES[kind]) as f:
        return json.load(f)


# The seed-suite JSON records no device: it ran in the same job, on the same GPU, as this one.
DEVICE_FROM = {"seed_suite": "upstream_pipeline_full"}


def device_and_date(kind, root=ROOT):
    """(device, date) of a result JSON; some runs keep them one level down."""
    run = load(kind, root)
    if "device" not in run and kind in DEVICE_FROM:
        run = dict(run, device=device_and_date(DEVICE_FROM[kind], root)[0])
    inner = run.get("pipeline", {})
    device = run.get("device") or inner.get("device", "?")
    return device, str(run.get("date") or inner.get("date", "?"))[:10]


def seed_suite_median_ms(run):
    """The optimized model's median from the seed suite's printed lines (the last 'Median:' of each
    original/optimized pair is the optimized model's)."""
    medians = [float(line.split()[1]) for line in run["seed_suite"]["lines"]
               if line.startswith("Median:")]
    return medians[-1]


def rows(root=ROOT):
    """(what, number, kind) per headline claim, in the README's order."""
    stream = load("stream", root)["pipeline"]["per_model"]
    seed = load("stream", root)["seed"]["per_model"]
    e2e = load("end_to_end", root)["end_to_end"]
    e2e_ref = load("end_to_end_reference", root)["end_to_end"]
    decoder = load("decoder", root)["end_to_end"]
    both = ("end_to_end", "end_to_end_reference")
    full = load("upstream_pipeline_full", root)["pipeline"]
    play = load("play", root)["play"]
    players = load("players", root)["players"]
    fp8 = load("fp8", root)["fp8"]
    e2e_fp8 = load("end_to_end_fp8", root)["end_to_end"]
    players_fp8 = load("players_fp8", root)["players"]
    return [
        ("DiT forward, `cuda_graphs=True` (steady state, median)",
         f"**{stream['graphs']['median_ms']:.1f} ms**", "stream"),
        ("DiT forward, no graphs / reference (upstream's math, eager)",
         f"{stream['optimized']['median_ms']:.1f} / {stream['reference']['median_ms']:.1f} ms", "stream"),
        ("seed protocol (`test_performance_benchmark`), graphs / reference",
         f"{seed['graphs']['median_ms']:.1f} / {seed['reference']['median_ms']:.1f} ms", "stream"),
        ("decoder per 12-frame block, optimized / reference",
         f"**{decoder['decoder_optimized_ms']:.1f}** / {e2e_ref['decoder_reference_ms']:.1f} ms",
         ("decoder", "end_to_end_reference")),
        ("whole block (3 forwards, decode, update), optimized / reference",
         f"**{e2e['optimized_block_ms']:.1f}** / {e2e_ref['reference_block_ms']:.1f} ms", both),
        ("action to frame, optimized (decode ahead of the update)",
         f"{e2e['action_to_frame_ms']:.1f} ms", "end_to_end"),
        ("upstream's `CausalInferencePipeline`, fully integrated / upstream's own",
         f"**{full['optimized']['block_ms_median']:.1f}** / {full['upstream']['block_ms_median']:.1f} ms"
         f" per block ({full['speedup']:.1f}x)", "upstream_pipeline_full"),
        ("seed suite inside the integrated checkout (no option set), median per call",
         f"{seed_suite_median_ms(load('seed_suite', root)):.1f} ms", "seed_suite"),
        ("real-time players per GPU (`wan.serve`), action-to-frame p50",
         f"**{players['max_realtime_players_per_gpu']}**, {players['latency_p50_ms']:.0f} ms", "players"),
        ("play server: real-time players; press-to-frame p50, one block per press",
         f"{play['max_realtime_players_per_gpu']}; {play['on_input']['press_to_frame_p50_ms']:.0f} ms",
         "play"),
        ("FP8 GEMMs (opt-in): graphed forward, fp8 / bf16; error vs bf16's",
         f"{fp8['fp8_ms']:.2f} / {fp8['bf16_ms']:.2f} ms; {fp8['error_ratio']:.2f}x", "fp8"),
        ("FP8 GEMMs (opt-in): whole block, fp8 / bf16; real-time players with fp8",
         f"{e2e_fp8['optimized_fp8_block_ms']:.1f} / {e2e_fp8['optimized_block_ms']:.1f} ms; "
         f"{players_fp8['max_realtime_players_per_gpu']}", ("end_to_end_fp8", "players_fp8")),
    ]


def table(root=ROOT):
    lines = ["| what | number | device | date | source |", "| --- | --- | --- | --- | --- |"]
    for what, number, kinds in rows(root):
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)  # ours first, then the reference's
        device, date = device_and_date(kinds[0], root)
        sources = ", ".join(dict.fromkeys(f"`{RESULTS}/{SOURCES[kind]}`" for kind in kinds))
        lines.append(f"| {what} | {number} | {device} | {date} | {sources} |")
    return "\n".join(lines) + "\n"


def block(root=ROOT):
    """The text that goes between the markers."""
    note = ("<!-- generated by `python docs/results_table.py --write README.md`"
            " from the JSONs it names; edit those, not this table -->\n")
    return note + table(root)


def replace_block(text, new_block):
    """`text` with the lines between the markers replaced by `new_block`."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START} line followed by one {END} line")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + START + "\n" + new_block + END + tail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="rewrite FILE's block between the markers")
    group.add_argument("--check", metavar="FILE", help="exit 1 (with a diff) if FILE's block differs")
    args = parser.parse_args(argv)
    if not (args.write or args.check):
        print(table(), end="")
        return 0
    path = Path(args.write or args.check)
    old = path.read_text()
    new = replace_block(old, block())
    if args.write:
        if new != old:
            path.write_text(new)
        print(f"{path}: results table {'rewritten' if new != old else 'already current'}")
        return 0
    if new == old:
        return 0
    sys.stdout.writelines(difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True),
        fromfile=f"{path} (committed)", tofile=f"{path} (from the JSONs)"))
    print(f"{path}: the results table differs from the JSONs; run "
          f"`python docs/results_table.py --write {path}`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
