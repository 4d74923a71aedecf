"""A scripted player for the play server (tests and load benchmarks): connects to `/ws` with
`?frames=ws`, sends held keys on a schedule, and records every frame with its header and arrival
time, so press-to-frame latency is measured on the client's clock as a page would.

    result = asyncio.run(play("ws://127.0.0.1:8000/ws", schedule=[(0.5, ["w"]), (1.5, [])],
                              seconds=3))
"""
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

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


@dataclass
class PlayResult:
    hello: Optional[dict] = None
    frames: List[Frame] = field(default_factory=list)
    texts: List[dict] = field(default_factory=list)
    presses: List[Tuple[int, float]] = field(default_factory=list)  # (input id, client time)
    closed: Optional[Tuple[int, str]] = None

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

    def fps(self, skip_blocks: int = 2) -> float:
        """Frames per second received, after the first `skip_blocks` blocks (graph captures)."""
        frames = [f for f in self.frames if f.block >= skip_blocks]
        if len(frames) < 2:
            return 0.0
        # frames arrive a block at a time: count the blocks after the first one received
        first = frames[0].received
        later = [f for f in frames if f.block > frames[0].block]
        last = max(f.received for f in frames)
        return len(later) / (last - first) if last > first else 0.0


async def play(url: str, schedule: Sequence[Tuple[float, Sequence[str]]] = (), seconds: float = 3.0,
               messages: Sequence[Tuple[float, object]] = (), until_frames: Optional[int] = None,
               open_timeout: float = 30.0, **connect_args) -> PlayResult:
    """Play for `seconds` (or until `until_frames` frames): at each (time, keys) of `schedule`
    send the held key set; at each (time, message) of `messages` send it (a dict as JSON, a str
    or bytes as they are). Times count from the hello message."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    result = PlayResult()
    async with connect(url, open_timeout=open_timeout, max_size=2**24, **connect_args) as ws:
        events = sorted([(t, "keys", list(k)) for t, k in schedule] +
                        [(t, "raw", m) for t, m in messages], key=lambda e: e[0])
        input_id = 0
        begin = None
        deadline = None
        try:
            while True:
                now = time.perf_counter()
                if begin is not None:
                    while events and now - begin >= events[0][0]:
                        _, kind, payload = events.pop(0)
                        if kind == "keys":
                            input_id += 1
                            result.presses.append((input_id, time.perf_counter()))
                            await ws.send(json.dumps({"type": "input", "id": input_id,
                                                      "keys": payload}))
                        else:
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
                else:
                    message = json.loads(data)
                    result.texts.append(message)
                    if message.get("type") == "hello":
                        result.hello = message
                        begin = time.perf_counter()
                        deadline = begin + seconds
        except ConnectionClosed as closed:
            result.closed = (closed.rcvd.code if closed.rcvd else 1006,
                             closed.rcvd.reason if closed.rcvd else "")
    return result
