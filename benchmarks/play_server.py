"""The play server under load: 1..N scripted WebSocket players (continuous, held keys changing
every 0.7 s) against one `python -m wan.play` engine in this process, then one on-input player.

    python benchmarks/play_server.py --players 4 --out play.json       # a GPU: universal, bf16
    python benchmarks/play_server.py --players 2 --seconds 6           # a CPU: tiny (functional)

The clients run in a separate process (`python -m wan.play.client`: its own interpreter, as a
browser would be) and measure on their clock: fps received, press-to-frame (from sending a key
change to the first frame that reflects it, arrival; a page adds its jitter buffer, <= 2 frames)
and, from the frame headers (same host), the block, encode+queue and transport parts. The server's
side (queue wait, block, encode per block, late blocks, device memory) comes from its metrics.
The engine measures its capacity at start-up; the sweep admits up to --players regardless.
"""
import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wan.play.engine import EngineConfig, GameEngine  # noqa: E402
from wan.play.metrics import PlayMetrics  # noqa: E402
from wan.play.server import PlayServer, ServerThread  # noqa: E402
from wan.serving.scheduler import REALTIME_FPS  # noqa: E402

log = logging.getLogger("play_server")


class BlockLog:
    """Every block the engine delivers: its server-side numbers (wrapping the metrics hook)."""

    def __init__(self, metrics: PlayMetrics):
        self.blocks = []
        original = metrics.block_done

        def block_done(player, batch):
            self.blocks.append({"player": player.id, "block": batch.block,
                                "block_ms": batch.block_ms, "encode_ms": batch.encode_ms,
                                "wait_ms": batch.wait_ms, "late": batch.late,
                                "time": batch.encoded})
            original(player, batch)
        metrics.block_done = block_done

    def since(self, t0: float):
        return [b for b in self.blocks if b["time"] >= t0]


def _clients(url, args, clients=None, on_input=0) -> list:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    command = [sys.executable, "-m", "wan.play.client", "--url", url, "--out", out,
               "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    command += ["--on-input", str(on_input)] if on_input else ["--clients", str(clients)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(command, check=True, env=env, timeout=args.seconds * 4 + 300)
    with open(out) as f:
        return json.load(f)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--players", type=int, default=4, help="largest number of players at once")
    p.add_argument("--seconds", type=float, default=14.0, help="seconds per player count")
    p.add_argument("--warmup", type=float, default=4.0,
                   help="first seconds of each count not measured (new players capture graphs)")
    p.add_argument("--on-input-presses", type=int, default=10)
    p.add_argument("--mode", default="universal")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    metrics = PlayMetrics()
    engine = GameEngine(EngineConfig(mode=args.mode, device=args.device), metrics=metrics)
    engine.warm_up()
    measured_capacity = engine.capacity
    engine.capacity = max(args.players, measured_capacity)  # the sweep admits them all
    blocks = BlockLog(metrics)
    server = PlayServer(engine, metrics, linger_s=0.0)
    sweep, memory = [], []
    with ServerThread(server) as running:
        for n in range(1, args.players + 1):
            t0 = time.perf_counter() + args.warmup
            clients = _clients(running.ws, args, clients=n)
            if engine.failure is not None:
                raise RuntimeError("the engine's GPU worker failed") from engine.failure
            served = blocks.since(t0)
            realtime = all(c["fps"] >= REALTIME_FPS for c in clients)
            latency = [v for c in clients for v in c["press_to_frame_ms"]]
            row = {"players": n, "realtime": realtime,
                   "per_player_fps": [round(c["fps"], 2) for c in clients],
                   "press_to_frame_p50_ms": _median(latency),
                   "press_to_frame_p95_ms": (sorted(latency)[int(0.95 * (len(latency) - 1))]
                                             if latency else None),
                   "presses": len(latency),
                   "server_block_ms_p50": _median([b["block_ms"] for b in served]),
                   "server_wait_ms_p50": _median([b["wait_ms"] for b in served]),
                   "encode_ms_per_block_p50": _median([b["encode_ms"] for b in served]),
                   "late_blocks": sum(b["late"] for b in served), "blocks": len(served),
                   "client_block_ms_p50": _median([c.get("block_ms_p50") for c in clients]),
                   "ready_to_sent_ms_p50": _median([c.get("ready_to_sent_ms_p50") for c in clients]),
                   "transport_ms_p50": _median([c.get("transport_ms_p50") for c in clients]),
                   "errors": [e for c in clients for e in c["errors"]]}
            sweep.append(row)
            deadline = time.monotonic() + 30
            while engine.player_count() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # the worker drops the sessions
            memory.append({"players": n, "after_leaving_bytes": engine.device_memory()})
            log.info("%d players: fps %s, press-to-frame p50 %s ms", n, row["per_player_fps"],
                     row["press_to_frame_p50_ms"])
        t0 = time.perf_counter()
        on_input = _clients(running.ws, args, on_input=args.on_input_presses)
        on_input["server_block_ms_p50"] = _median([b["block_ms"] for b in blocks.since(t0)][3:])
    held = [r["players"] for r in sweep if r["realtime"]]
    report = {
        "device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda"
        else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "engine": engine.describe(), "steady_block_ms_at_start": engine.steady_block_ms,
        "measured_capacity": measured_capacity,
        "memory_before_players_bytes": engine.memory_before_players, "memory": memory,
        "play": {
            "max_realtime_players_per_gpu": max(held) if held else 0,
            "per_player_fps": {str(r["players"]): r["per_player_fps"] for r in sweep},
            "press_to_frame_p50_ms": {str(r["players"]): r["press_to_frame_p50_ms"] for r in sweep},
            "press_to_frame_p95_ms": {str(r["players"]): r["press_to_frame_p95_ms"] for r in sweep},
            "encode_ms_per_block": _median([r["encode_ms_per_block_p50"] for r in sweep]),
            "on_input": on_input, "sweep": sweep}}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print("\nplayers | fps per player | press->frame p50/p95 ms | block ms | wait ms | "
          "encode ms | ready->sent ms | late")
    for r in sweep:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"{r['players']:7d} | {', '.join(f'{f:.1f}' for f in r['per_player_fps']):14s} | "
              f"{fmt(r['press_to_frame_p50_ms'])}/{fmt(r['press_to_frame_p95_ms'])} | "
              f"{fmt(r['server_block_ms_p50'])} | {fmt(r['server_wait_ms_p50'])} | "
              f"{fmt(r['encode_ms_per_block_p50'])} | {fmt(r['ready_to_sent_ms_p50'])} | "
              f"{r['late_blocks']}/{r['blocks']}")
    print(f"on-input, one player: press->frame p50 {on_input['press_to_frame_p50_ms']:.1f} ms, "
          f"p95 {on_input['press_to_frame_p95_ms']:.1f} ms (server block "
          f"{on_input['server_block_ms_p50']})")
    print(f"real-time players: {report['play']['max_realtime_players_per_gpu']} "
          f"(capacity measured at start-up: {measured_capacity})")


if __name__ == "__main__":
    main()
