"""`python -m wan.play.client`: scripted players against a running play server (the load
benchmark's clients, benchmarks/play_server.py), a JSON summary per player.

    python -m wan.play.client --url ws://127.0.0.1:8000/ws --clients 3 --seconds 12
    python -m wan.play.client --url ws://127.0.0.1:8000/ws --on-input 20   # press-to-frame

The players are wan/play/client.py's; this is their command line.
"""
import asyncio
import json
from pathlib import Path

from . import cli
from ..play.client import continuous_clients, continuous_with_games, on_input_client

PROG = "python -m wan.play.client"


def parse_args(argv=None):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True,
                   help="the server's WebSocket, ws://HOST:PORT/ws (with ?token=... if it has one)")
    p.add_argument("--clients", type=cli.positive_int, default=1,
                   help="continuous players at once (default 1)")
    p.add_argument("--seconds", type=cli.positive_float, default=12.0,
                   help="how long each plays, warm-up included (default 12)")
    p.add_argument("--warmup", type=cli.non_negative_float, default=4.0,
                   help="seconds not measured at first (default 4)")
    p.add_argument("--on-input", type=cli.non_negative_int, default=0,
                   help="instead: one on-input player making this many presses")
    p.add_argument("--games", action="store_true",
                   help="with the --clients players, one more who keeps starting new games "
                   "(new game and upload, by turns): the time to their first frames")
    p.add_argument("--images", help="with --games: upload these start images (a folder of "
                   "PNG/JPEG files, e.g. a checkout's demo_images/universal; default: generated "
                   "ones)")
    p.add_argument("--out", help="write the summaries here (JSON; default: print them)")
    args = p.parse_args(argv)
    if args.warmup >= args.seconds and not args.on_input:
        p.error(f"--warmup {args.warmup:g} must be less than --seconds {args.seconds:g}")
    return args


def main(argv=None):
    return cli.run(PROG, _main, argv)


def _main(argv=None):
    args = parse_args(argv)
    if args.out:
        cli.output_file(args.out)
    url = args.url + ("&" if "?" in args.url else "?") + "frames=ws"
    if args.on_input:
        report = asyncio.run(on_input_client(url, args.on_input))
    elif args.games:
        images = None
        if args.images:
            files = sorted(f for f in Path(args.images).iterdir()
                           if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
            if not files:
                raise cli.UsageError(f"--images {args.images}: no PNG or JPEG files there")
            images = [f.read_bytes() for f in files]
        report = asyncio.run(continuous_with_games(url, args.clients, args.seconds, args.warmup,
                                                   images))
    else:
        report = asyncio.run(continuous_clients(url, args.clients, args.seconds, args.warmup))
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
