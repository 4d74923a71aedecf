"""`python -m wan.serve`: several real-time players per GPU, and players across GPUs with torchrun.

One process serves its players from one model and one decoder (weights once; per player: DiT
cache dicts, a decoder stream, its CUDA graphs in the shared pool) with the deadline scheduler of
`wan.serving.scheduler`. Each player's image, conditions, actions and noise are drawn from its own seed, so
a player's frames do not depend on which process serves it or who else is served.

    python -m wan.serve --players 4 --blocks 20                 # one GPU, 4 players
    python -m wan.serve --players 8 --sweep --out players.json  # 1..8 players: how many hold 25 fps
    torchrun --nproc_per_node=2 -m wan.serve --players 8        # 2 GPUs, 4 players each
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m wan.serve --players 64                               # 2 nodes (run on each node)

Under torchrun (torch.distributed: NCCL on GPUs, gloo on CPUs) rank r serves players r, r + W,
r + 2W, ... of the W processes, each on its local GPU, and rank 0 gathers and prints the reports.
Random weights unless --checkpoint (the DiT's .safetensors) and --vae (Wan2.1_VAE.pth or a
decoder .safetensors) are given. On a CPU it runs the tiny config in float32 (a functional check).
The first --warmup blocks of every player are not measured: they capture the CUDA graphs of every
phase; the report counts graphs captured while measuring (0 expected).
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import cli
from ..modules.optimized_causal_model import OptimizedCausalWanModel
from ..modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from ..modules.vae_decoder import load_decoder_weights
from ..serving.runner import NonFiniteOutputError, StreamingBlockRunner, graph_captures
from ..modules.presets import LATENT_SIZE, UPSTREAM_VARIANTS, model_config
from ..kernels.fp8 import fp8_gemm_problem
from ..modules.random_init import random_inputs, randomize_decoder_weights_, randomize_weights_
from ..serving import memory
from ..serving.power import EnergyMeter
from ..serving.scheduler import DeadlineScheduler, PlayerSession, players_report


PROG = "python -m wan.serve"
# host memory per block and player beyond its actions: its BlockRecord and list entries (generous)
RECORD_BYTES = 1024


def parse_args(argv=None):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--players", type=cli.positive_int, default=2,
                   help="players in all (over every process)")
    p.add_argument("--blocks", type=cli.positive_int, default=12,
                   help="measured blocks per player")
    p.add_argument("--warmup", type=cli.non_negative_int, default=None,
                   help="unmeasured blocks per player first (default 3 on CUDA, 0 on CPU)")
    p.add_argument("--sweep", action="store_true",
                   help="serve 1, 2, ... --players players per process, stopping after the "
                   "first count that misses real time")
    p.add_argument("--preset", default=None, choices=("tiny",) + UPSTREAM_VARIANTS,
                   help="default universal on CUDA, tiny on CPU")
    p.add_argument("--checkpoint", help="the DiT's .safetensors (default: random weights)")
    p.add_argument("--vae", help="Wan2.1_VAE.pth or a decoder .safetensors (default: random)")
    p.add_argument("--no-graphs", action="store_true", help="run eagerly (no CUDA graphs)")
    p.add_argument("--precision", choices=("native", "fp8"), default=None,
                   help="the DiT's GEMMs: native (bf16) or fp8 (opt-in, e4m3 with per-channel "
                   "and per-token scales; needs FP8 tensor cores); default: WAN_PRECISION, "
                   "else native")
    p.add_argument("--frames-out", help="save every player's frames here (torch.save; small "
                   "configs: for comparing runs)")
    p.add_argument("--out", help="write the report as JSON here (rank 0)")
    return p.parse_args(argv)


def _settings(args, device):
    """(preset, DiT dtype, decoder dtype, warm-up blocks) on `device`."""
    preset = args.preset or ("universal" if device.type == "cuda" else "tiny")
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 0)
    return (preset, torch.bfloat16 if cuda else torch.float32,
            torch.float16 if cuda else torch.float32, warmup)


def preflight(args, device, world: int, rank: int):
    """Everything that can be refused before the model is built: output paths (rank 0 writes
    them), the weight files, and the memory the run needs on the device and the host."""
    if rank == 0:
        for option, path in (("--out", args.out), ("--frames-out", args.frames_out)):
            if path:
                cli.output_file(path, option)
    if args.checkpoint:
        cli.weights_file(args.checkpoint, "--checkpoint", directory_ok=True)
    if args.vae:
        cli.weights_file(args.vae, "--vae")
    preset, dtype, decoder_dtype, warmup = _settings(args, device)
    if args.precision == "fp8":
        problem = fp8_gemm_problem(device, dtype)
        if problem is not None:
            raise cli.UsageError(f"--precision fp8 cannot run here: {problem}")
    config, (h, w) = model_config(preset), LATENT_SIZE[preset]
    players = math.ceil(args.players / world)  # this process's share (rank 0's is the largest)
    blocks = warmup + args.blocks
    per_player = (memory.stream_bytes(config, (h, w), dtype)
                  + memory.decoder_history_bytes((h, w), decoder_dtype))
    action = config.get("action_config") or {}
    widths = 2 * bool(action.get("enable_mouse")) + action.get("keyboard_dim_in", 0) * bool(
        action.get("enable_keyboard"))
    steps = 4 * 3 * blocks  # every action step of the stream, drawn up front
    itemsize = torch.empty((), dtype=dtype).element_size()
    device_parts = {
        "DiT weights": memory.model_bytes(config, dtype),
        "decoder weights": memory.decoder_weight_bytes(decoder_dtype),
        f"{players} player(s) x {memory.gib(per_player)} of caches": players * per_player,
        f"{players} x {blocks} blocks of actions": players * steps * widths * itemsize}
    host_parts = {  # float64 draws of the actions, and a record per block
        "actions as drawn": 2 * steps * widths * 8,
        f"{players * blocks} block records": players * blocks * RECORD_BYTES}
    if args.frames_out:  # every frame kept in float32 on the host
        host_parts["--frames-out frames"] = players * blocks * 12 * 3 * (8 * h) * (8 * w) * 4
    memory.check_memory(device_parts, device,
                     f"--players {args.players} --blocks {args.blocks} ({preset} on {device}, "
                     f"{players} per process)", host_parts)


def _distributed():
    """(rank, world size, local rank), initialising torch.distributed under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, 0
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


def build(args, device):
    """The shared model and decoder (random weights seeded alike in every process, or loaded)."""
    preset, dtype, decoder_dtype, _ = _settings(args, device)
    graphs = device.type == "cuda" and not args.no_graphs
    with torch.device(device):
        extra = {} if args.precision is None else {"precision": args.precision}
        model = OptimizedCausalWanModel.from_config(model_config(preset), cuda_graphs=graphs,
                                                    **extra)
        decoder = OptimizedVAEDecoderWrapper(cuda_graphs=graphs)
    if args.checkpoint:
        model.load_checkpoint(args.checkpoint)
    else:
        randomize_weights_(model, 0)
    if args.vae:
        load_decoder_weights(decoder, args.vae)
    else:
        randomize_decoder_weights_(decoder)
    model.num_frame_per_block = 3
    return (model.to(device, dtype).eval(), decoder.to(device, decoder_dtype).eval(),
            LATENT_SIZE[preset])


def new_session(player: int, model, decoder, latent_hw, blocks: int) -> PlayerSession:
    """Player `player`: image, conditions, every action it will send and its noise, all from its
    own seed."""
    inputs = random_inputs(model, latent_hw, 3, 3 * (blocks - 1), seed=10_000 + player)
    runner = StreamingBlockRunner(model, decoder, latent_hw=latent_hw)
    mouse, keyboard = inputs["mouse_cond"], inputs["keyboard_cond"]
    session = PlayerSession(player, runner, inputs["visual_context"], inputs["cond_concat"],
                            seed=player, mouse_dim=None if mouse is None else mouse.shape[2],
                            keyboard_dim=None if keyboard is None else keyboard.shape[2])
    session.receive(mouse, keyboard)
    session.warm_up()  # every graph its blocks replay, before its first block
    return session


def serve(players, model, decoder, latent_hw, args, device, keep_frames: bool) -> dict:
    """Serve `players` (ids) on this process: warm-up blocks, then measured ones; the report."""
    warmup = _settings(args, device)[3]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    sessions = [new_session(p, model, decoder, latent_hw, warmup + args.blocks) for p in players]
    frames = {p: [] for p in players}

    runners = {s.player_id: s.runner for s in sessions}

    def keep(record, block_frames):
        try:  # the scheduler has synchronized: reading the block's NaN/inf check waits for nothing
            runners[record.player].check_finite()
        except NonFiniteOutputError as error:
            raise NonFiniteOutputError(f"player {record.player}: {error}", error.block,
                                       error.where) from None
        if keep_frames:
            frames[record.player].append(block_frames.cpu())

    if warmup:
        DeadlineScheduler(sessions).run(warmup, on_block=keep, stagger=False)
    captures = graph_captures(model, decoder)
    per_player_gib = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        per_player_gib = (torch.cuda.memory_allocated(device) - before) / 2 ** 30 / len(players)
    begin = time.perf_counter()
    with EnergyMeter(device) as meter:  # says why where it cannot measure (a CPU, no NVML)
        records = DeadlineScheduler(sessions).run(warmup + args.blocks, on_block=keep)
    report = players_report([r for r in records if r.block >= warmup])
    report.update({
        # the whole measured stretch (its warm-up blocks too): joules per block of any player
        "energy": meter.report(blocks=len(records)),
        "wall_s": time.perf_counter() - begin,
        "graph_captures_while_measuring": graph_captures(model, decoder) - captures,
        "memory_per_player_gib": per_player_gib})
    if keep_frames:
        report["frames"] = {p: torch.cat(f, dim=1) for p, f in frames.items()}
    return report


def _log(rank, message):
    print(f"[rank {rank}] {message}", file=sys.stderr, flush=True)


def main(argv=None):
    return cli.run(PROG, _main, argv)


def _main(argv=None):
    args = parse_args(argv)
    rank, world, local = _distributed()
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    preflight(args, device, world, rank)
    model, decoder, latent_hw = build(args, device)
    mine = list(range(rank, args.players, world))
    counts = range(1, len(mine) + 1) if args.sweep else [len(mine)]
    runs = []
    for count in counts:
        _log(rank, f"serving {count} player(s) on {device}")
        report = serve(mine[:count], model, decoder, latent_hw, args, device,
                       keep_frames=bool(args.frames_out))
        _log(rank, f"{count} player(s): min fps {report['min_fps']:.1f}, latency p50 "
                   f"{report['latency_p50_ms']:.0f} ms, p95 {report['latency_p95_ms']:.0f} ms")
        runs.append(report)
        model.release_caches()
        if not report["realtime"]:
            break
    gathered = [runs]
    if world > 1:
        import torch.distributed as dist
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(runs, gathered, dst=0)
        dist.destroy_process_group()
    if rank == 0:
        _finish(args, gathered, world, device)
    return 0


def _command(world: int) -> str:
    """The command line as typed (under torchrun: its launcher and its process counts)."""
    serve = " ".join(["-m wan.serve"] + sys.argv[1:])
    if world == 1:
        return "python " + serve
    nodes = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return (f"torchrun --nnodes={nodes} --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE')} "
            + serve)


def _finish(args, gathered, world, device):
    """Rank 0: the merged report (JSON, frames) and a table."""
    frames = {}
    for runs in gathered:
        for run in runs:
            frames.update(run.pop("frames", {}))
    best = [max([r for r in runs if r["realtime"]], key=lambda r: r["players"], default=None)
            for runs in gathered]  # per process: its largest real-time run
    counts = [0 if run is None else run["players"] for run in best]
    held = [run for run in best if run is not None]
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "command": _command(world), "processes": world,
        "players": {
            "max_realtime_players_per_gpu": min(counts),  # what every process held
            "max_realtime_players": sum(counts),
            "per_player_fps": {p: v["fps"] for run in held for p, v in run["per_player"].items()},
            "latency_p50_ms": max((run["latency_p50_ms"] for run in held), default=None),
            "latency_p95_ms": max((run["latency_p95_ms"] for run in held), default=None),
            "memory_per_player_gib": max((run["memory_per_player_gib"] or 0 for run in held),
                                         default=None),
            "graph_captures_while_measuring": sum(r["graph_captures_while_measuring"]
                                                  for runs in gathered for r in runs),
            "two_gpu_split_block_ms": None},  # benchmarks/split_player.py measures it
        "runs_per_rank": gathered}
    if args.frames_out:
        torch.save(frames, args.frames_out)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"{'rank':>4} {'players':>7} {'min fps':>8} {'lat p50':>8} {'lat p95':>8} "
          f"{'captures':>8} {'GiB/player':>10} {'J/block':>8} {'SM MHz':>7} {'capped':>6}")
    for rank, runs in enumerate(gathered):
        for r in runs:
            gib, energy = r["memory_per_player_gib"], r["energy"]
            power = (f"{energy['joules_per_block']:>8.1f} {energy['median_sm_mhz'] or 0:>7.0f} "
                     f"{energy['power_capped_share'] or 0:>6.0%}") if energy["available"] else \
                f"{'-':>8} {'-':>7} {'-':>6}"
            print(f"{rank:>4} {r['players']:>7} {r['min_fps']:>8.2f} {r['latency_p50_ms']:>6.0f}ms "
                  f"{r['latency_p95_ms']:>6.0f}ms {r['graph_captures_while_measuring']:>8} "
                  f"{'-' if gib is None else f'{gib:.2f}':>10} {power}")
    print(f"real-time players: {summary['players']['max_realtime_players']} over {world} "
          f"process(es) ({summary['players']['max_realtime_players_per_gpu']} on each)")


if __name__ == "__main__":
    raise SystemExit(main())
