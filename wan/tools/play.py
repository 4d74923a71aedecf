"""`python -m wan.play`: play Matrix-Game-2 in a browser (a game server for several players).

    python -m wan.play                                   # this GPU, universal mode, random weights
    python -m wan.play --preset tiny --device cpu        # a CPU: the tiny model (a functional demo)
    python -m wan.play --checkpoint base_distill.safetensors --vae Wan2.1_VAE.pth --mode gta_drive
    python -m wan.play --host 0.0.0.0 --port 8000        # others may connect: needs a token

Then open the printed URL. One process serves one GPU: for several GPUs start one per GPU (its
`--device` and `--port`, or under torchrun each rank takes its local GPU and `--port` + rank)
behind a reverse proxy with sticky sessions (docs/PLAY_SERVER_PROXY.md).

With a token (--token, or generated for a non-loopback --host) every route needs it (the page,
/ws, /stream, /health, /metrics, /start-image, /static/...; ?token=... or the cookie the page
sets) except GET /livez, a bare liveness probe for load balancers: "ok" (200) or "failed" (503),
nothing else. After 10 wrong tokens within 60 s from one address, that address gets 429 for
60 s. A connection that does not send its request headers within --header-timeout seconds is
closed (408). The protocol and the limits on messages: wan/play/server.py.
"""
import argparse
import logging
import os
import secrets
import socket
from pathlib import Path

from . import cli
from ..play.actions import MODES
from ..play.encode import ENCODERS
from ..play.engine import PLAY_MODES, EngineConfig, GameEngine
from ..serving import memory

log = logging.getLogger("wan.play")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PROG = "python -m wan.play"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _device(text: str):
    return text if text == "auto" else str(cli.device(text))


def _port(text: str) -> int:
    port = cli.non_negative_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {port}")
    return port


def _jpeg_quality(text: str) -> int:
    quality = cli.positive_int(text)
    if quality > 100:
        raise argparse.ArgumentTypeError(f"JPEG quality is 1 to 100, got {quality}")
    return quality


def parse_args(argv=None):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; under torchrun "
                   "each rank listens on --port + its local rank)")
    p.add_argument("--token", help="access token clients must give (?token=...) on every route "
                   "but /livez; generated and printed when --host is not loopback and none is "
                   "given")
    p.add_argument("--mode", default="universal", choices=MODES,
                   help="game mode: the action space and, on a GPU, the model config")
    p.add_argument("--preset", choices=("tiny", "universal", "gta_drive", "templerun"),
                   help="model config (default: the mode's on a GPU, tiny on a CPU)")
    p.add_argument("--device", type=_device, default="auto", help="cuda, cuda:N or cpu (default: cuda when "
                   "available; under torchrun the local rank's GPU)")
    p.add_argument("--checkpoint", help="the DiT's .safetensors (default: random weights)")
    p.add_argument("--vae", help="Wan2.1_VAE.pth or a decoder .safetensors (default: random)")
    p.add_argument("--matrix-game-dir",
                   help="a Matrix-Game-2 checkout: its VAE encoder and CLIP (weights beside "
                   "--vae) turn start images into the model's conditions (default: a demo "
                   "conditioning from random projections)")
    p.add_argument("--max-players", type=cli.positive_int,
                   help="players admitted at most (default: measured at start-up: how many "
                   "blocks fit in real time)")
    p.add_argument("--play", default="continuous", choices=PLAY_MODES,
                   help="continuous: 25 fps, the held keys read at each block; on-input: one "
                   "block per key press (the seed server's); a page may ask for either")
    p.add_argument("--reactive", default="on", choices=("on", "off"),
                   help="continuous play: on (default) re-makes the block on screen when the "
                   "keys change, from the first frame it can still replace, where the GPU has "
                   "time for it; off: a block reads the keys when it starts (answers at the "
                   "next block)")
    p.add_argument("--idle-timeout", type=cli.positive_float, default=300.0,
                   help="seconds without input after which a game is closed (default 300)")
    p.add_argument("--linger", type=cli.non_negative_float, default=5.0,
                   help="seconds a game waits for its page to come back after the last "
                   "connection closed (default 5; a reload finds its game)")
    p.add_argument("--header-timeout", type=cli.positive_float, default=10.0,
                   help="seconds a connection has to send its request headers, from opening it "
                   "or from the previous response (default 10; slow clients are closed)")
    p.add_argument("--no-graphs", action="store_true", help="run eagerly (no CUDA graphs)")
    p.add_argument("--jpeg-quality", type=_jpeg_quality, default=85, help="1 to 100 (default 85)")
    p.add_argument("--jpeg", choices=ENCODERS, default="auto",
                   help="the JPEG encoder: cpu (libjpeg-turbo threads, off the GPU), gpu "
                        "(nvJPEG), pillow; auto (default): the first of these that can run")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   metavar="{" + ",".join(LOG_LEVELS) + "}",
                   help="the server's log messages shown, from this level up (default INFO; "
                   "any case)")
    return p.parse_args(argv)


def _check_listen(host: str, port: int):
    """Refuse, before the model is built, an address this process cannot listen on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise cli.UsageError(f"--host {host}: cannot be resolved ({error})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            raise cli.UsageError(f"cannot listen on {host}:{port}: {error.strerror or error} "
                                 f"(another server there? try --port)") from None


def preflight(args, config: EngineConfig):
    """What can be checked before the model is built: the server's dependencies, the files,
    the address, and that the weights plus --max-players players fit the device's memory."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise cli.UsageError(f"the play server needs its dependencies ({error}): pip install "
                             f"'.[play]', or run bash scripts/play.sh") from None
    if args.checkpoint:
        cli.weights_file(args.checkpoint, "--checkpoint", directory_ok=True)
    if args.vae:
        cli.weights_file(args.vae, "--vae")
    if args.matrix_game_dir and not Path(args.matrix_game_dir).is_dir():
        raise cli.UsageError(f"--matrix-game-dir {args.matrix_game_dir}: no such folder")
    device = config.resolved_device()
    preset, model_cfg = config.model_config(device)
    from ..modules.presets import LATENT_SIZE
    dtype, decoder_dtype = config.dtypes(device)
    latent = LATENT_SIZE[preset]
    players = args.max_players or 1
    # a re-made block starts again from the decoder history of before it: one more per player
    histories = 2 if config.reactive else 1
    per_player = (memory.stream_bytes(model_cfg, latent, dtype) + histories
                  * memory.decoder_history_bytes(latent, decoder_dtype,
                                                 config.decoder_dim(preset)))
    memory.check_memory({"DiT weights": memory.model_bytes(model_cfg, dtype),
                         "decoder weights": memory.decoder_weight_bytes(
                             decoder_dtype, config.decoder_dim(preset)),
                         f"{players} player(s) at {memory.gib(per_player)} each":
                             players * per_player},
                        device, f"the play server ({preset} on {device})")


def main(argv=None):
    return cli.run(PROG, _main, argv)


def _return_big_buffers_to_the_system():
    """glibc keeps freed heap memory for reuse: a burst of decoded uploads (48 MB each at
    4096 x 4096) would stay in the server's RSS after it was freed. Buffers of 1 MiB and more
    are mapped and unmapped on their own instead (mallopt M_MMAP_THRESHOLD; glibc only)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: its allocator's own behaviour


def _main(argv=None):
    args = parse_args(argv)
    _return_big_buffers_to_the_system()
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    local_rank = os.environ.get("LOCAL_RANK")
    device, port = args.device, args.port
    if local_rank is not None:  # torchrun: one server per GPU
        device = f"cuda:{local_rank}" if device == "auto" else device
        port += int(local_rank)
    config = EngineConfig(
        mode=args.mode, preset=args.preset, device=device, checkpoint=args.checkpoint,
        vae=args.vae, matrix_game_dir=args.matrix_game_dir,
        cuda_graphs=False if args.no_graphs else None, max_players=args.max_players,
        jpeg_quality=args.jpeg_quality, jpeg=args.jpeg, reactive=args.reactive == "on")
    _check_listen(args.host, port)
    preflight(args, config)
    from ..play.metrics import PlayMetrics
    from ..play.server import PlayServer, uvicorn_config
    token = args.token
    if args.host not in LOOPBACK and token is None:
        token = secrets.token_urlsafe(16)
        log.warning("listening on %s: clients need the access token %s", args.host, token)
    try:
        engine = GameEngine(config, metrics=(metrics := PlayMetrics()))
    except ImportError as error:  # a checkout's own imports (--matrix-game-dir)
        raise cli.UsageError(f"{error} (a Matrix-Game-2 checkout needs its Python dependencies)") \
            from None
    if engine.capacity is None:
        engine.warm_up()  # here, not in the server's start-up: its errors are one line
    if engine.demo:
        log.warning("DEMO: %s; the pictures are not Matrix-Game-2's world",
                    "random weights" if args.checkpoint is None else engine.conditioner.name)
    server = PlayServer(engine, metrics, token=token, play_mode=args.play,
                        idle_timeout_s=args.idle_timeout, linger_s=args.linger)
    shown = "localhost" if args.host in LOOPBACK else args.host
    log.info("open http://%s:%d/%s", shown, port, f"?token={token}" if token else "")
    import uvicorn
    served = uvicorn.Server(uvicorn_config(server.app, args.host, port, args.header_timeout,
                                           log_level=args.log_level.lower()))
    fatal = []

    def on_fatal(error):  # the device cannot be trusted: stop, exit non-zero for a supervisor
        fatal.append(error)
        log.error("the GPU worker failed (%r): stopping the server so that a supervisor can "
                  "restart it", error)
        served.should_exit = True
    engine.on_fatal = on_fatal
    served.run()
    if fatal:
        return 3
    return 0 if served.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
