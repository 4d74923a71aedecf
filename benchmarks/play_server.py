"""The play server under load: 1..N scripted WebSocket players (continuous, held keys changing
every 0.7 s) against one `python -m wan.play` engine in this process, with re-makes on (reactive
play) and off (blocks only), and 1-2 players with the frames sent as soon as they are decoded instead
of after the whole block (`--no-compare-send` leaves that out); with `--send-rounds N`, one
player with each way of sending (after the block, at frames-ready, in parts) N times in turn,
presses pooled per way (the run's drift then falls on each alike); then N - 1 players beside one
who keeps starting new games (time to first frame after a join, a new game, an upload; the
others' late blocks); then one on-input player, its frames sent when decoded and after the
block in turn.

    python benchmarks/play_server.py --players 4 --out play.json       # a GPU: universal, bf16
    python benchmarks/play_server.py --players 2 --seconds 6           # a CPU: tiny (functional)

The clients run in a separate process (`python -m wan.play.client`: its own interpreter, as a
browser would be) and measure on their clock: fps received, press-to-frame as a player sees it
(from sending a key change to the first frame *shown* that reflects it, on a simulated page: 25
fps after a 2-frame buffer, re-made frames replacing the ones not shown yet; the arrival-based
figure beside it), the simulated page's underruns and stall time, and, from the frame headers
(same host), the block, encode+queue and transport parts. The server's side (queue wait, block,
encode per block, late blocks, re-makes granted and refused, device memory) comes from its
metrics. The engine measures its capacity at start-up; the sweep admits up to --players
regardless.
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
            if batch.first_frame and not batch.remake:  # a later part of a block sent in parts
                self.blocks[-1]["encode_ms"] += batch.encode_ms
                original(player, batch)
                return
            self.blocks.append({"player": player.id, "block": batch.block,
                                "block_ms": batch.block_ms, "encode_ms": batch.encode_ms,
                                "wait_ms": batch.wait_ms, "late": batch.late and not batch.remake,
                                "remake": batch.remake, "games": player.games,
                                "time": batch.encoded})
            original(player, batch)
        metrics.block_done = block_done

    def since(self, t0: float):
        return [b for b in self.blocks if b["time"] >= t0]


def _clients(url, args, clients=None, on_input=0, games=False) -> list:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    command = [sys.executable, "-m", "wan.play.client", "--url", url, "--out", out,
               "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    command += ["--on-input", str(on_input)] if on_input else ["--clients", str(clients)]
    command += ["--games"] if games else []
    command += ["--images", args.images] if games and args.images else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(command, check=True, env=env, timeout=args.seconds * 4 + 300)
    with open(out) as f:
        return json.load(f)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _p(values, q):
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def _sweep(engine, running, blocks, args, reactive: bool, counts=None,
           send_at_frames_ready: bool = False, frames_in_parts: bool = False,
           remakes_at_frames_ready: bool = True) -> list:
    """Continuous players 1..--players (or `counts`) with re-makes on or off: a row per player
    count. `send_at_frames_ready`: frames sent as soon as they are decoded instead of after the
    whole block (EngineConfig.send_at_frames_ready); `frames_in_parts`: and decoded one latent
    frame per call, each part sent when decoded (EngineConfig.frames_in_parts);
    `remakes_at_frames_ready` False: re-made blocks' frames after the whole block too."""
    engine.config.reactive = reactive
    engine.config.send_at_frames_ready = send_at_frames_ready
    engine.config.remakes_at_frames_ready = remakes_at_frames_ready
    if args.frames_in_parts:
        engine.set_frames_in_parts(frames_in_parts)
    rows = []
    for n in counts or range(1, args.players + 1):
        t0 = time.perf_counter() + args.warmup
        before = dict(engine.remakes)
        clients = _clients(running.ws, args, clients=n)
        if engine.failure is not None:
            raise RuntimeError("the engine's GPU worker failed") from engine.failure
        served = [b for b in blocks.since(t0) if not b["remake"]]
        latency = [v for c in clients for v in c["press_to_frame_ms"]]
        arrival = [v for c in clients for v in c["press_to_arrival_ms"]]
        row = {"players": n, "reactive": reactive, "send_at_frames_ready": send_at_frames_ready,
               "remakes_at_frames_ready": remakes_at_frames_ready,
               "frames_in_parts": frames_in_parts,
               "encode_in_background": engine.encodes_in_background,
               "realtime": all(c["fps"] >= REALTIME_FPS for c in clients),
               "per_player_fps": [round(c["fps"], 2) for c in clients],
               "per_player_shown_fps": [round(c["shown_fps"], 2) for c in clients],
               "press_to_frame_p50_ms": _median(latency),
               "press_to_frame_p95_ms": _p(latency, 0.95), "presses": len(latency),
               "press_to_frame_ms": [round(v, 1) for v in latency],  # (pooled by --send-rounds)
               "press_to_arrival_p50_ms": _median(arrival),
               "underruns": sum(c["underruns"] for c in clients),
               "stall_ms": sum(c["stall_ms"] for c in clients),
               "frames_replaced": sum(c["frames_replaced"] for c in clients),
               "frames_too_late": sum(c["frames_too_late"] for c in clients),
               "remakes": {k: engine.remakes[k] - before[k] for k in before},
               "server_block_ms_p50": _median([b["block_ms"] for b in served]),  # to frames
               # the whole block (the cache update too): the scheduler's running estimate
               "full_block_ms": round(1e3 * engine.scheduler.block_estimate_s, 1),
               "server_wait_ms_p50": _median([b["wait_ms"] for b in served]),
               "encode_ms_per_block_p50": _median([b["encode_ms"] for b in served]),
               "late_blocks": sum(b["late"] for b in served), "blocks": len(served),
               "client_block_ms_p50": _median([c.get("block_ms_p50") for c in clients]),
               "ready_to_sent_ms_p50": _median([c.get("ready_to_sent_ms_p50") for c in clients]),
               "transport_ms_p50": _median([c.get("transport_ms_p50") for c in clients]),
               # where a press's time goes (wan/play/client.py press_parts), medians of players'
               "press_parts_ms_p50": _press_parts(clients),
               "errors": [e for c in clients for e in c["errors"]]}
        rows.append(row)
        _wait_for_leaving(engine)
        log.info("%d players, reactive %s: fps %s, press-to-frame p50 %s ms, re-makes %s", n,
                 reactive, row["per_player_fps"], row["press_to_frame_p50_ms"], row["remakes"])
    return rows


SEND_SETTINGS = {"block": {}, "frames": {"send_at_frames_ready": True},
                 "parts": {"send_at_frames_ready": True, "frames_in_parts": True},
                 # every block's frames after the block, re-made ones too (before step 55)
                 "all-block": {"remakes_at_frames_ready": False}}


def _send_rounds(engine, running, blocks, args) -> dict:
    """One player, re-makes on, the frames sent after the block (re-made blocks' at
    frames-ready: "block"; re-made ones after the block too: "all-block") / at frames-ready / in
    parts (with --frames-in-parts), `--send-rounds` times in turn (block, frames, ...), so
    that the machine's drift over the run falls on every setting alike; each setting's presses are
    pooled over its rounds. {setting: {p50, p95, presses, round_p50s}}."""
    settings = [s for s in SEND_SETTINGS if s != "parts" or args.frames_in_parts]
    presses = {s: [] for s in settings}
    round_p50s = {s: [] for s in settings}
    for _ in range(args.send_rounds):
        for setting in settings:
            row = _sweep(engine, running, blocks, args, reactive=True, counts=[1],
                         **SEND_SETTINGS[setting])[0]
            presses[setting] += row["press_to_frame_ms"]
            round_p50s[setting].append(row["press_to_frame_p50_ms"])
    if args.frames_in_parts:
        engine.set_frames_in_parts(False)
    engine.config.send_at_frames_ready, engine.config.remakes_at_frames_ready = False, True
    return {s: {"p50": _median(presses[s]), "p95": _p(presses[s], 0.95),
                "presses": len(presses[s]), "round_p50s": round_p50s[s]} for s in settings}


def _on_input_rounds(engine, running, blocks, args) -> dict:
    """One on-input player with its frames sent as soon as they are decoded (the engine's
    default, `on_input_at_frames_ready`) and after the whole block, --on-input-rounds times in
    turn, presses pooled per setting: {"frames": {...}, "block": {...}}, each with p50, p95,
    presses, round_p50s and the server's block (start to frames ready) p50."""
    pooled = {s: {"presses": [], "round_p50s": [], "server_block_ms": []}
              for s in ("frames", "block")}
    for _ in range(max(1, args.on_input_rounds)):
        for setting in pooled:
            engine.config.on_input_at_frames_ready = setting == "frames"
            t0 = time.perf_counter()
            row = _clients(running.ws, args, on_input=args.on_input_presses)
            if engine.failure is not None:
                raise RuntimeError("the engine's GPU worker failed") from engine.failure
            pooled[setting]["presses"] += row["press_to_frame_ms"]
            pooled[setting]["round_p50s"].append(row["press_to_frame_p50_ms"])
            pooled[setting]["server_block_ms"] += [b["block_ms"] for b in blocks.since(t0)][3:]
            _wait_for_leaving(engine)
    engine.config.on_input_at_frames_ready = True
    return {s: {"press_to_frame_p50_ms": _median(v["presses"]),
                "press_to_frame_p95_ms": _p(v["presses"], 0.95), "presses": len(v["presses"]),
                "press_to_frame_ms": [round(x, 1) for x in v["presses"]],
                "round_p50s": v["round_p50s"],
                "server_block_ms_p50": _median(v["server_block_ms"])}
            for s, v in pooled.items()}


def _sent_at(row) -> str:
    """When a row's frames were sent: after the block, when decoded, or part by part."""
    sent = "parts " if row.get("frames_in_parts") else \
        "frames" if row["send_at_frames_ready"] else \
        "block " if row.get("remakes_at_frames_ready", True) else "block (re-makes too)"
    return sent if row.get("encode_in_background", True) else sent + " (JPEG on the worker)"


def _press_parts(clients) -> dict:
    """The players' press_parts_ms_p50, part by part (the median of the players' medians)."""
    per_player = [c["press_parts_ms_p50"] for c in clients if c.get("press_parts_ms_p50")]
    names = dict.fromkeys(name for parts in per_player for name in parts)
    return {name: _median([parts.get(name) for parts in per_player]) for name in names}


def _wait_for_leaving(engine):
    deadline = time.monotonic() + 30
    while engine.player_count() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the worker drops the sessions


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--players", type=int, default=4, help="largest number of players at once")
    p.add_argument("--seconds", type=float, default=14.0, help="seconds per player count")
    p.add_argument("--warmup", type=float, default=4.0,
                   help="first seconds of each count not measured (new players' first blocks)")
    p.add_argument("--on-input-presses", type=int, default=10)
    p.add_argument("--on-input-rounds", type=int, default=2,
                   help="the on-input player's rounds: its frames sent when decoded and after "
                        "the block, taken in turn this many times, presses pooled per way")
    p.add_argument("--mode", default="universal")
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint", help="the DiT's weights (default: random)")
    p.add_argument("--vae", help="Wan2.1_VAE.pth (default: random decoder weights)")
    p.add_argument("--matrix-game-dir", help="a Matrix-Game-2 checkout: its encoders condition "
                   "the start images (the weights beside --vae)")
    p.add_argument("--jpeg", default="auto", choices=("auto", "cpu", "gpu", "pillow"),
                   help="the play engine's JPEG encoder (default auto: cpu where simplejpeg is "
                        "installed)")
    p.add_argument("--images", help="the start images the new-games player uploads (a folder, "
                   "e.g. a checkout's demo_images/universal; default: generated ones)")
    p.add_argument("--skip-blocks-only", action="store_true",
                   help="only the sweep with re-makes on")
    p.add_argument("--compare-send", action=argparse.BooleanOptionalAction, default=True,
                   help="also 1-2 players with the frames sent as soon as they are decoded "
                        "instead of after the whole block")
    p.add_argument("--frames-in-parts", action="store_true",
                   help="also 1-2 players with each latent frame's frames decoded and sent on "
                        "their own, as soon as they are ready (the other rows decode whole "
                        "blocks)")
    p.add_argument("--send-rounds", type=int, default=0,
                   help="also one player with the frames sent after the block, at frames-ready "
                        "and (with --frames-in-parts) in parts, N rounds taken in turn, presses "
                        "pooled per setting (the rows above take each once, one after another)")
    p.add_argument("--compare-encode", action=argparse.BooleanOptionalAction, default=True,
                   help="also the most players with the JPEG encoding on the GPU's worker thread "
                        "instead of the sender thread beside the next block (host encoders)")
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    metrics = PlayMetrics()
    engine = GameEngine(EngineConfig(mode=args.mode, device=args.device, checkpoint=args.checkpoint,
                                     vae=args.vae, matrix_game_dir=args.matrix_game_dir,
                                     jpeg=args.jpeg, frames_in_parts=args.frames_in_parts),
                        metrics=metrics)
    engine.warm_up()
    measured_capacity = engine.capacity
    engine.capacity = max(args.players, measured_capacity)  # the sweep admits them all
    blocks = BlockLog(metrics)
    server = PlayServer(engine, metrics, linger_s=0.0)
    memory = []
    with ServerThread(server) as running:
        captures_at_start = engine.captures_at_start
        reactive = _sweep(engine, running, blocks, args, reactive=True)
        memory.append({"after_leaving_bytes": engine.device_memory()})
        blocks_only = [] if args.skip_blocks_only else _sweep(engine, running, blocks, args,
                                                              reactive=False)
        # the same with the frames sent as soon as they are decoded (what that saves or costs)
        at_ready = _sweep(engine, running, blocks, args, reactive=True,
                          counts=range(1, min(args.players, 2) + 1),
                          send_at_frames_ready=True) if args.compare_send else []
        in_parts = _sweep(engine, running, blocks, args, reactive=True,
                          counts=range(1, min(args.players, 2) + 1), send_at_frames_ready=True,
                          frames_in_parts=True) if args.frames_in_parts else []
        if args.frames_in_parts:
            engine.set_frames_in_parts(False)
        rounds = _send_rounds(engine, running, blocks, args) if args.send_rounds > 0 else {}
        # the most players with the JPEG encoding on the worker (what the sender thread saves)
        on_worker = []
        if args.compare_encode and engine.encoder.encodes_on_host:
            engine.set_encode_in_background(False)
            on_worker = _sweep(engine, running, blocks, args, reactive=True,
                               counts=[args.players])
            engine.set_encode_in_background(True)
        engine.config.reactive, engine.config.send_at_frames_ready = True, False
        # N - 1 players while one more keeps starting games: joins, new games, uploads
        t0 = time.perf_counter()
        others = max(1, min(args.players, measured_capacity) - 1)  # within the capacity
        games = _clients(running.ws, args, clients=others, games=True)
        during = [b for b in blocks.since(t0) if not b["remake"]]
        starter = {b["player"] for b in during if b["games"] > 0}
        late_of_others = sum(b["late"] for b in during if b["player"] not in starter)
        _wait_for_leaving(engine)
        on_input_ways = _on_input_rounds(engine, running, blocks, args)
        on_input = on_input_ways["frames"]  # the engine's default
        captures_while_serving = engine.captures_while_serving()
    held = [r["players"] for r in reactive if r["realtime"]]
    starts = games["time_to_first_frame_ms"]
    by_count = lambda rows, key: {str(r["players"]): r[key] for r in rows}  # noqa: E731
    report = {
        "device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda"
        else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "engine": engine.describe(), "steady_block_ms_at_start": engine.steady_block_ms,
        "measured_capacity": measured_capacity, "graph_captures_at_start": captures_at_start,
        "graph_captures_while_serving": captures_while_serving,
        "memory_before_players_bytes": engine.memory_before_players, "memory": memory,
        "play": {
            "max_realtime_players_per_gpu": max(held) if held else 0,
            "reactive": {"press_to_frame_p50_ms": by_count(reactive, "press_to_frame_p50_ms"),
                         "press_to_frame_p95_ms": by_count(reactive, "press_to_frame_p95_ms"),
                         "per_player_fps": by_count(reactive, "per_player_fps")},
            "blocks_only": {"press_to_frame_p50_ms": by_count(blocks_only, "press_to_frame_p50_ms"),
                            "press_to_frame_p95_ms": by_count(blocks_only, "press_to_frame_p95_ms"),
                            "per_player_fps": by_count(blocks_only, "per_player_fps")},
            "time_to_first_frame_ms": {k: {"p50": starts[k]["p50"], "max": starts[k]["max"]}
                                       for k in ("join", "new_game", "upload")},
            "late_blocks_of_others_during_games": late_of_others,
            "underruns": {"reactive": by_count(reactive, "underruns"),
                          "blocks_only": by_count(blocks_only, "underruns")},
            "remakes": {k: sum(r["remakes"][k] for r in reactive)
                        for k in ("granted", "refused", "late")},
            "encode_ms_per_block": _median([r["encode_ms_per_block_p50"] for r in reactive]),
            "sent_at_frames_ready": {
                "press_to_frame_p50_ms": by_count(at_ready, "press_to_frame_p50_ms"),
                "press_to_frame_p95_ms": by_count(at_ready, "press_to_frame_p95_ms")},
            "sent_in_parts": {
                "press_to_frame_p50_ms": by_count(in_parts, "press_to_frame_p50_ms"),
                "press_to_frame_p95_ms": by_count(in_parts, "press_to_frame_p95_ms")},
            # one player, the send settings taken in turn (--send-rounds), presses pooled
            "send_rounds": rounds,
            # the most players, the JPEG encoding on the worker instead of the sender thread
            "encode_on_worker": on_worker,
            "on_input": on_input, "on_input_sent_after_block": on_input_ways["block"],
            "sweep": reactive + blocks_only + at_ready + in_parts,
            "games": games}}
    if args.matrix_game_dir:
        report["start_image"] = {
            # the conditions' own demo flag (the engine's also says DEMO for random DiT weights)
            "demo": engine.conditioner.demo,
            "upload_to_first_frame_ms": starts["upload"],
            "late_blocks_of_others": late_of_others,
            "settled_latent_frame": getattr(engine, "settled_latent_frame", None),
            "images": args.images or "generated"}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print("\nplayers | re-makes | sent at | fps per player | press->shown p50/p95 ms | press->arrival p50 | "
          "to frames / block ms | encode ms | late | underruns | re-makes granted/refused/late")
    for r in reactive + blocks_only + at_ready + in_parts + on_worker:
        print(f"{r['players']:7d} | {'on ' if r['reactive'] else 'off'} | "
              f"{_sent_at(r)} | "
              f"{', '.join(f'{f:.1f}' for f in r['per_player_fps']):14s} | "
              f"{fmt(r['press_to_frame_p50_ms'])}/{fmt(r['press_to_frame_p95_ms'])} | "
              f"{fmt(r['press_to_arrival_p50_ms'])} | {fmt(r['server_block_ms_p50'])}/{fmt(r['full_block_ms'])} | "
              f"{fmt(r['encode_ms_per_block_p50'])} | {r['late_blocks']}/{r['blocks']} | "
              f"{r['underruns']} | {r['remakes']['granted']}/{r['remakes']['refused']}/"
              f"{r['remakes']['late']}")
    print("\nwhere a press's time goes, p50 ms: to the start of the block that reads it | that "
          "block to its frames | frames ready to sent | transport | page (arrival to shown)")
    for r in reactive + blocks_only + at_ready + in_parts + on_worker:
        parts = r["press_parts_ms_p50"]
        print(f"{r['players']} player(s), re-makes {'on ' if r['reactive'] else 'off'}, sent at "
              f"{_sent_at(r)}: " + " | ".join(
                  fmt(parts.get(k)) for k in ("to_block_start", "block", "ready_to_sent",
                                              "transport", "page")))
    for setting, pooled in rounds.items():
        print(f"one player, sent at {setting:6s} over {len(pooled['round_p50s'])} rounds in turn: "
              f"press->shown p50/p95 {fmt(pooled['p50'])}/{fmt(pooled['p95'])} ms of "
              f"{pooled['presses']} presses (each round's p50: "
              f"{', '.join(fmt(v) for v in pooled['round_p50s'])})")
    print("time to first frame ms (p50/max): " + ", ".join(
        f"{k} {fmt(starts[k]['p50'])}/{fmt(starts[k]['max'])}" for k in ("join", "new_game",
                                                                          "upload"))
          + f"; late blocks of the {others} other player(s) meanwhile: {late_of_others}")
    for setting, row in on_input_ways.items():
        print(f"on-input, one player, sent at {setting:6s}: press->frame p50 "
              f"{fmt(row['press_to_frame_p50_ms'])} ms, p95 {fmt(row['press_to_frame_p95_ms'])} "
              f"ms of {row['presses']} presses (each round's p50: "
              f"{', '.join(fmt(v) for v in row['round_p50s'])}; server block to frames "
              f"{fmt(row['server_block_ms_p50'])} ms)")
    print(f"real-time players (re-makes on): {report['play']['max_realtime_players_per_gpu']} "
          f"(capacity measured at start-up: {measured_capacity}); graphs captured while "
          f"serving: {captures_while_serving}")


if __name__ == "__main__":
    main()
