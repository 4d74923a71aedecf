"""What the benchmarks share: timing (CUDA events or perf_counter), summaries of milliseconds, the
report header (device, torch, date, command), writing a report with its plot, bar charts."""
import datetime
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch


class Timer:
    """Milliseconds of one call: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            return result, start.elapsed_time(end)
        begin = time.perf_counter()
        result = fn()
        return result, (time.perf_counter() - begin) * 1e3


def progress_bar(done: int, total: int, width: int = 40) -> str:
    """`[###...]` of `done` out of `total`, at most `width` characters wide."""
    filled = round(width * done / total) if total > width else done
    return "#" * filled + "." * (min(total, width) - filled)


def summarize(ms):
    ordered = sorted(ms)
    return {"n": len(ordered), "mean_ms": statistics.mean(ordered),
            "median_ms": statistics.median(ordered),
            "p95_ms": ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
            "min_ms": ordered[0]}


def device_name(device):
    # (a torch.device is not equal to the string "cuda": compare the type)
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" \
        else platform.processor() or "cpu"


def run_header(device) -> dict:
    """What every benchmark report starts with: device, torch, date and the exact command."""
    return {"device": device_name(device), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv])}


def bar_chart(groups: dict, names, ylabel: str, title: str, path):
    """Grouped bars: {label: one value per name}; saved as a PNG (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (scripts/env.sh installs it; or pip install "
              "'.[plot]')", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(groups)
    for k, (label, values) in enumerate(groups.items()):
        offset = (k - (len(groups) - 1) / 2) * width
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def finish(report: dict, out, plotter, table):
    """Write the report (and its plot beside it) when `out` is given, then print the table."""
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        report["plot"] = plotter(report, out.with_suffix(".png"))
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    table(report)


def benchmark_device(text: str) -> str:
    """--device of a benchmark: 'auto' (cuda when there is one), 'cpu' or the current GPU."""
    from wan.tools import cli
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = cli.device(text)
    if device.index not in (None, 0):
        raise cli.argparse.ArgumentTypeError(f"{text}: the benchmarks run on the current GPU; "
                                             f"pick it with CUDA_VISIBLE_DEVICES={device.index}")
    return device.type


def names_from(text: str, choices, what: str) -> list:
    """A comma list of names, each one of `choices` (an argparse type's body)."""
    from wan.tools import cli
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise cli.argparse.ArgumentTypeError(f"unknown {what}(s) {unknown or text!r}; choose "
                                             f"from {', '.join(choices)}")
    return names
