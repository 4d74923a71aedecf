"""A scripted player for the play server (tests and load benchmarks): connects to `/ws` with
`?frames=ws`, sends held keys on a schedule, and records every frame with its header and arrival
time, so press-to-frame latency is measured on the client's clock as a page would.

Reactive play (wan/play/server.py, the frame header): a frame index of a block may come again (a
re-made block's frame replaces one not yet shown): `PlayResult.frames` keeps every message as it
came; `replaced_frames` counts those that came again, and the block counts below count each
block once.

    result = asyncio.run(play("ws://127.0.0.1:8000/ws", schedule=[(0.5, ["w"]), (1.5, [])],
                              seconds=3))

From a shell, `python -m wan.play.client --url ws://HOST:PORT/ws` (wan/tools/play_client.py).
"""
import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from ..serving.scheduler import percentile
from .server import FRAME_HEADER, FRAME_MAGIC


@dataclass
class Frame:
    block: int
    index: int
    frames_in_block: int
    input_id: int
    block_start_ms: float
    frames_ready_ms: float
    sent_ms: float
    jpeg: bytes
    received: float = 0.0  # client clock (perf_counter)


def parse_frame(data: bytes) -> Frame:
    """A binary frame message -> Frame; ValueError when it is not one."""
    if len(data) < FRAME_HEADER.size:
        raise ValueError(f"a frame message has a {FRAME_HEADER.size}-byte header, got {len(data)} bytes")
    magic, block, index, count, input_id, start, ready, sent = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise ValueError(f"not a frame message (magic {magic!r})")
    return Frame(block, index, count, input_id, start, ready, sent, bytes(data[FRAME_HEADER.size:]))


class Viewer:
    """A simulated page (wan/play/static/play.js): frames shown at 25 fps after a 2-frame jitter
    buffer, a frame of a re-made block replacing the one with the same (block, index) that is
    not shown yet, a frame whose place was shown already dropped. `tick(now)` advances it;
    `shown` lists (time, block, index, input id) of every frame shown; underruns count the times
    the buffer ran dry while playing, `stall_s` the time from each underrun to playing again."""
    FRAME_S, JITTER_FRAMES = 1 / 25, 2

    def __init__(self):
        self.buffer: List[Frame] = []
        self.shown: List[Tuple[float, int, int, int]] = []
        self.playing, self.next_due, self.last_key = False, 0.0, -1
        self.underruns, self.stall_s, self._stalled_at = 0, 0.0, None
        self.replaced, self.too_late = 0, 0

    @staticmethod
    def _key(frame: Frame) -> int:
        return frame.block * 65536 + frame.index

    def add(self, frame: Frame):
        key = self._key(frame)
        if key <= self.last_key:
            self.too_late += 1
            return
        same = next((i for i, f in enumerate(self.buffer) if self._key(f) == key), None)
        if same is not None:
            self.buffer[same] = frame
            self.replaced += 1
            return
        at = len(self.buffer)
        while at and self._key(self.buffer[at - 1]) > key:
            at -= 1
        self.buffer.insert(at, frame)

    def tick(self, now: float):
        if not self.playing and len(self.buffer) >= self.JITTER_FRAMES:
            self.playing, self.next_due = True, now
            if self._stalled_at is not None:
                self.stall_s += now - self._stalled_at
                self._stalled_at = None
        while self.playing and now >= self.next_due:
            if not self.buffer:
                self.playing, self._stalled_at = False, now
                self.underruns += 1
                break
            frame = self.buffer.pop(0)
            self.last_key = self._key(frame)
            self.shown.append((self.next_due, frame.block, frame.index, frame.input_id))
            self.next_due = max(self.next_due + self.FRAME_S, now - self.FRAME_S)

    def on_screen(self, now: float) -> Optional[List[int]]:
        """[block, index, ms since it was shown] of the frame on screen, as the page sends it
        with its input."""
        if not self.shown:
            return None
        when, block, index, _ = self.shown[-1]
        return [block, index, min(1000, max(0, round(1e3 * (now - when))))]

    def press_to_shown_ms(self, presses, since: float = -math.inf) -> List[float]:
        """Per press (input id, time) after `since`: from the press to the first frame shown
        that reflects it."""
        out = []
        for input_id, sent in presses:
            if sent < since:
                continue
            shown = next((t for t, _, _, i in self.shown if i >= input_id and t >= sent), None)
            if shown is not None:
                out.append(1e3 * (shown - sent))
        return out


@dataclass
class PlayResult:
    hello: Optional[dict] = None
    frames: List[Frame] = field(default_factory=list)
    texts: List[dict] = field(default_factory=list)
    presses: List[Tuple[int, float]] = field(default_factory=list)  # (input id, client time)
    closed: Optional[Tuple[int, str]] = None
    begin: float = 0.0  # client clock when the hello arrived (the schedule's time 0)
    viewer: Viewer = field(default_factory=Viewer)
    games: List[Tuple[float, float]] = field(default_factory=list)  # (asked, first frame) times

    def replaced_frames(self) -> int:
        """Frames whose (block, index) came again while that block was the newest: a re-made
        block's frames replacing ones of its first making."""
        seen, block, count = set(), None, 0
        for f in self.frames:
            if f.block != block:
                seen, block = set(), f.block
            if f.index in seen:
                count += 1
            seen.add(f.index)
        return count

    def errors(self) -> List[str]:
        return [t["reason"] for t in self.texts if t.get("type") == "error"]

    def press_to_frame_ms(self) -> List[float]:
        """Per press: client time from sending it to the first frame that reflects it."""
        out = []
        for input_id, sent in self.presses:
            reflected = next((f for f in self.frames if f.input_id >= input_id), None)
            if reflected is not None:
                out.append(1e3 * (reflected.received - sent))
        return out


async def play(url: str, schedule: Sequence[Tuple[float, Sequence[str]]] = (), seconds: float = 3.0,
               messages: Sequence[Tuple[float, object]] = (), until_frames: Optional[int] = None,
               open_timeout: float = 30.0, **connect_args) -> PlayResult:
    """Play for `seconds` (or until `until_frames` frames): at each (time, keys) of `schedule`
    send the held key set; at each (time, message) of `messages` send it (a dict as JSON, a str
    or bytes as they are). Times count from the hello message."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    result = PlayResult()
    viewer = result.viewer
    connecting = time.perf_counter()
    async with connect(url, open_timeout=open_timeout, max_size=2**24, **connect_args) as ws:
        events = sorted([(t, "keys", list(k)) for t, k in schedule] +
                        [(t, "raw", m) for t, m in messages], key=lambda e: e[0])
        input_id = 0
        begin = None
        deadline = None
        game_asked, new_game = connecting, False  # a join, reset or upload: its first frame
        try:
            while True:
                now = time.perf_counter()
                viewer.tick(now)
                if begin is not None:
                    while events and now - begin >= events[0][0]:
                        _, kind, payload = events.pop(0)
                        if kind == "keys":
                            input_id += 1
                            result.presses.append((input_id, time.perf_counter()))
                            message = {"type": "input", "id": input_id, "keys": payload}
                            if viewer.on_screen(now) is not None:  # as the page does
                                message["shown"] = viewer.on_screen(now)
                            await ws.send(json.dumps(message))
                        else:
                            if isinstance(payload, dict) and payload.get("type") in ("reset",
                                                                                      "image"):
                                game_asked = time.perf_counter()
                            await ws.send(payload if isinstance(payload, (str, bytes))
                                          else json.dumps(payload))
                    if now >= deadline or (until_frames and len(result.frames) >= until_frames):
                        break
                wait = 0.01 if begin is not None else open_timeout
                try:
                    data = await asyncio.wait_for(ws.recv(), timeout=wait)
                except asyncio.TimeoutError:
                    continue
                received = time.perf_counter()
                if isinstance(data, bytes):
                    frame = parse_frame(data)
                    frame.received = received
                    result.frames.append(frame)
                    viewer.add(frame)
                    if game_asked is not None and (new_game or len(result.frames) == 1) \
                            and frame.block == 0:
                        result.games.append((game_asked, received))
                        game_asked, new_game = None, False
                else:
                    message = json.loads(data)
                    result.texts.append(message)
                    if message.get("type") == "game" and result.frames:  # as the page: anew
                        viewer.buffer, viewer.playing, viewer.last_key = [], False, -1
                        new_game = True
                    if message.get("type") == "hello":
                        result.hello = message
                        begin = result.begin = time.perf_counter()
                        deadline = begin + seconds
        except ConnectionClosed as closed:
            result.closed = (closed.rcvd.code if closed.rcvd else 1006,
                             closed.rcvd.reason if closed.rcvd else "")
    return result


def _percentile(values, q):
    """`wan.serving.percentile`, None for no values."""
    return percentile(values, q) if values else None


def _block_firsts(frames) -> List[Frame]:
    """The first frame (index 0) of each block, once: a re-made block's frame 0 is not a new
    block."""
    out = []
    for f in frames:
        if f.index == 0 and (not out or out[-1].block != f.block):
            out.append(f)
    return out


def summarize(result: PlayResult, warmup_s: float, seconds: float) -> dict:
    """One continuous client's numbers after `warmup_s`: fps (frames received per second),
    press-to-frame p50/p95 on the client's clock, and from the frame headers (same host: the
    server's clock is this machine's perf_counter) the block, encode+queue and transport parts."""
    begin = result.begin
    window = [f for f in result.frames if warmup_s <= f.received - begin <= seconds]
    presses = [(i, t) for i, t in result.presses if t - begin >= warmup_s]
    latency, reflecting = [], []
    for input_id, sent in presses:
        reflected = next((f for f in result.frames if f.input_id >= input_id), None)
        if reflected is not None:
            latency.append(1e3 * (reflected.received - sent))
            reflecting.append((sent, reflected))
    epoch = (result.hello or {}).get("clock_epoch_s")
    firsts = _block_firsts(window)
    parts = {}
    if firsts:
        parts["block_ms_p50"] = statistics.median(f.frames_ready_ms - f.block_start_ms
                                                  for f in firsts)
        parts["ready_to_sent_ms_p50"] = statistics.median(f.sent_ms - f.frames_ready_ms
                                                          for f in firsts)
        if epoch is not None:
            parts["transport_ms_p50"] = statistics.median(
                1e3 * (f.received - epoch) - f.sent_ms for f in firsts)
    # fps from whole blocks: the frames of the blocks after the first one in the window over
    # the time between the first frames' arrivals (frames come a block at a time)
    fps = 0.0
    if len(firsts) >= 2 and firsts[-1].received > firsts[0].received:
        shown = sum(f.frames_in_block for f in firsts[:-1])
        fps = shown / (firsts[-1].received - firsts[0].received)
    viewer = result.viewer
    shown = viewer.press_to_shown_ms(presses)
    if epoch is not None and reflecting:
        parts["press_parts_ms_p50"] = press_parts(reflecting, epoch, shown, latency)
    on_screen = [t for t, *_ in viewer.shown if warmup_s <= t - begin <= seconds]
    shown_fps = (len(on_screen) - 1) / (on_screen[-1] - on_screen[0]) if len(on_screen) > 2 \
        else 0.0
    return {"fps": fps, "shown_fps": shown_fps, "frames": len(window),
            "presses": len(presses),
            # what a player feels: from the press to the first frame *shown* that reflects it
            # (the simulated page: 25 fps after a 2-frame buffer, re-made frames replacing)
            "press_to_frame_ms": shown,
            "press_to_frame_p50_ms": _percentile(shown, 0.5),
            "press_to_frame_p95_ms": _percentile(shown, 0.95),
            # the frame's arrival instead (earlier than it shows when the page has a buffer)
            "press_to_arrival_ms": latency,
            "press_to_arrival_p50_ms": _percentile(latency, 0.5),
            "underruns": viewer.underruns, "stall_ms": 1e3 * viewer.stall_s,
            "frames_replaced": viewer.replaced, "frames_too_late": viewer.too_late,
            "first_frame_ms": [1e3 * (got - asked) for asked, got in result.games],
            "errors": result.errors(), "closed": result.closed, **parts}


def press_parts(reflecting, epoch: float, shown_ms, arrival_ms) -> dict:
    """Where a press's time to the screen goes (medians over the presses, ms), from the frame
    that first reflected each press (`reflecting`: (press time, Frame) on this machine's
    perf_counter; the server's clock is `epoch` + its ms): `to_block_start` (the press reaching
    the server and waiting for a block that reads it to start: the block running then, others'
    blocks, the scheduler's release), `block` (that block's start to its frames ready),
    `ready_to_sent` (the rest of the block when the frames go after it, the JPEG encode, the
    send queue), `transport` (the WebSocket to this process) and `page` (arrival to shown: the
    page's jitter buffer and frame clock; p50 shown minus p50 arrival). Their sum is about the
    press-to-frame p50."""
    def median_of(part):
        return statistics.median(part(sent, f) for sent, f in reflecting)

    out = {"to_block_start": median_of(lambda sent, f: f.block_start_ms - 1e3 * (sent - epoch)),
           "block": median_of(lambda sent, f: f.frames_ready_ms - f.block_start_ms),
           "ready_to_sent": median_of(lambda sent, f: f.sent_ms - f.frames_ready_ms),
           "transport": median_of(lambda sent, f: 1e3 * (f.received - epoch) - f.sent_ms)}
    if shown_ms and arrival_ms:
        out["page"] = statistics.median(shown_ms) - statistics.median(arrival_ms)
    return out


def key_schedule(keys_cycle, period_s: float, seconds: float, phase_s: float = 0.0):
    """Held-key sets changing every `period_s` (cycling through `keys_cycle`) from `phase_s`."""
    out, t, k = [], phase_s, 0
    while t < seconds:
        out.append((t, keys_cycle[k % len(keys_cycle)]))
        t += period_s
        k += 1
    return out


async def continuous_clients(url: str, clients: int, seconds: float, warmup_s: float) -> list:
    """`clients` players at once, each changing its held keys every 0.7 s (phases spread so that
    presses fall anywhere in a block): their summaries."""
    cycle = [["w"], [], ["w", "l"], ["a"], [], ["d", "i"]]
    runs = [play(url, schedule=key_schedule(cycle, 0.7, seconds, phase_s=0.13 * c + 0.05),
                 seconds=seconds) for c in range(clients)]
    results = await asyncio.gather(*runs)
    return [summarize(r, warmup_s, seconds) for r in results]


def _upload_message(seed: int, images=None) -> dict:
    """An image message: one of `images` (file bytes, PNG or JPEG, by turns), else a 640 x 352
    PNG of smooth random colours (a new start image)."""
    import base64
    import io

    import torch
    from PIL import Image
    if images:
        data = images[seed % len(images)]
        mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
        return {"type": "image", "data": f"data:{mime};base64," + base64.b64encode(data).decode()}
    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(3, 6, 10, generator=gen)
    pixels = torch.nn.functional.interpolate(small[None], size=(352, 640), mode="bilinear")[0]
    data = (pixels * 255).byte().permute(1, 2, 0).contiguous().numpy()
    out = io.BytesIO()
    Image.fromarray(data).save(out, format="PNG")
    return {"type": "image",
            "data": "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()}


async def games_client(url: str, seconds: float, every_s: float = 2.5, images=None) -> dict:
    """A player who joins, then every `every_s` starts a new game, by turns with the same image
    ("reset") and with an uploaded one (`images`: file bytes to upload; default generated):
    the time from each to its game's first frame."""
    messages, t, k = [], every_s, 0
    while t < seconds - every_s / 2:
        messages.append((t, {"type": "reset"} if k % 2 == 0 else _upload_message(k // 2, images)))
        t, k = t + every_s, k + 1
    result = await play(url, schedule=key_schedule([["w"], []], 0.9, seconds), seconds=seconds,
                        messages=messages)
    times = [1e3 * (got - asked) for asked, got in result.games]
    kinds = ["join"] + ["new_game" if k % 2 == 0 else "upload" for k in range(len(messages))]
    out = {}
    for kind in ("join", "new_game", "upload"):
        mine = [ms for ms, kd in zip(times, kinds) if kd == kind]
        out[kind] = {"ms": mine, "p50": _percentile(mine, 0.5),
                     "max": max(mine) if mine else None}
    out["errors"] = result.errors()
    return out


async def continuous_with_games(url: str, clients: int, seconds: float, warmup_s: float,
                                images=None):
    """`clients` continuous players (their summaries) while one more player keeps starting
    new games (`games_client`, uploading `images` if given): what a join, a new game or an
    upload costs the others."""
    continuous = continuous_clients(url, clients, seconds, warmup_s)
    games = games_client(url, seconds, images=images)
    summaries, starts = await asyncio.gather(continuous, games)
    return {"players": summaries, "time_to_first_frame_ms": starts}


async def on_input_client(url: str, presses: int, warmup_presses: int = 3,
                          pause_s: float = 0.4) -> dict:
    """The seed server's play: a key press, its block's frames, a pause, the next press. The
    press-to-frame latency of each press after the first `warmup_presses` (graph captures)."""
    from websockets.asyncio.client import connect
    latency = []
    sep = "&" if "?" in url else "?"
    async with connect(url + sep + "play=on-input", max_size=2**24) as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello", hello
        for press in range(presses + warmup_presses):
            key = "wd"[press % 2]
            sent = time.perf_counter()
            await ws.send(json.dumps({"type": "keyboard", "key": key, "timestamp": 0}))
            first, indices = None, set()
            while True:
                message = await asyncio.wait_for(ws.recv(), 120)
                if isinstance(message, bytes):
                    frame = parse_frame(message)
                    if first is None:
                        first = time.perf_counter()
                    indices.add(frame.index)  # a re-made frame's index counts once
                    if len(indices) >= frame.frames_in_block:
                        break
            if press >= warmup_presses:
                latency.append(1e3 * (first - sent))
            await asyncio.sleep(pause_s)
    return {"presses": len(latency), "press_to_frame_ms": latency,
            "press_to_frame_p50_ms": _percentile(latency, 0.5),
            "press_to_frame_p95_ms": _percentile(latency, 0.95)}


if __name__ == "__main__":  # `python -m wan.play.client`: the command is wan/tools/play_client.py
    from ..tools.play_client import main
    raise SystemExit(main())
