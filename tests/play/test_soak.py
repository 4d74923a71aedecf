"""A soak of the play server: one `python -m wan.play --preset tiny --device cpu` process (3
players, 1 s linger), real WebSocket clients, seeded random misbehaviour, bounded in time.

    WAN_SOAK_SECONDS=600 pytest tests/play/test_soak.py -s     # longer (default 40 s of chaos)
    WAN_SOAK_SEED=7 ...                                   # another sequence (default 0)
    WAN_SOAK_SKIP=reset_flood,big_burst ...               # leave actions out (names: ACTIONS)
    WAN_SOAK_LOG=/tmp/soak.log ...                        # what everyone did, with times

Phases: warm-up (three players do one of everything, uploads at once, so that what is made once,
the upload thread pool, Pillow's decoders, torch's threads, exists), everyone leaves: the
baseline (/proc: RSS, threads, open fds and sockets); calm: the well-behaved player W and two calm
players for CALM_BLOCKS of W's blocks, which gives W's normal longest gap between frames and one
block's time;
chaos: W plays on while two visitor slots see players come and go (clean close, dropped TCP, a
message over the transport's limit), each doing random things (valid input, bad JSON and every
other refused message, floods within and over the rate limit, resets and bursts of them, small,
bad and 4096 x 4096 uploads and bursts of those, MJPEG viewers opened and dropped, stalls that
stop reading), a third client knocking while the server is full, and half-open TCP connections;
then everyone leaves.

What it asserts (each its own test, so a known bug fails only its own check):
* the server is healthy and its counts agree: /health and /metrics say 0 players after everyone
  left, no per-session gauge is left behind, every "server full" a client saw is counted once,
  W saw no error and was never closed;
* memory is flat: RSS after everyone left within the baseline + 200 MB;
* nothing leaks: open fds and sockets back to the baseline, threads too but for the upload
  decoder pool's idle workers (POOL_SLACK); asyncio tasks cannot be counted from outside the
  process: a leaked task shows only through what it holds;
* W's longest gap between frames during the chaos within its normal (calm) longest gap plus one
  block: what others do does not stall a player.
"""
import asyncio
import base64
import io
import json
import os
import random
import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")
if not os.path.isdir("/proc/self/fd"):
    pytest.skip("the soak reads the server's threads and fds from /proc (Linux)",
                allow_module_level=True)

from PIL import Image  # noqa: E402

from proxy_nginx import PlayProcess, metric_values, proc_stats  # noqa: E402

CHAOS_S = float(os.environ.get("WAN_SOAK_SECONDS", "40"))
SEED = int(os.environ.get("WAN_SOAK_SEED", "0"))
SKIP = {a for a in os.environ.get("WAN_SOAK_SKIP", "").split(",") if a}
CALM_BLOCKS = 5                   # W's blocks in the calm phase (its normal gap: the longest
CALM_MAX_S = 60.0                 # of the 4 between them), at most this long
CAPACITY = 3                      # W and two visitor slots
RSS_SLACK = 200 * 2**20
KEYS = [["w"], [], ["w", "l"], ["a"], [], ["d", "i"], ["s"], ["j"]]
OVERSIZE = 13 * 2**20             # over the transport's 12 MiB (wan.play.server.WS_MAX_SIZE)
# threads the server may have more than at the baseline: its asyncio default executor (uploads are
# decoded there) keeps the workers it made, up to min(32, cores + 4); a decode of a connection
# that went away still runs when the next upload comes, so the chaos may need more than the
# warm-up did. A thread per connection would pass this (the chaos has many more connections).
POOL_SLACK = min(32, (os.cpu_count() or 1) + 4) - 1

# what a visitor does, with its weight
ACTIONS = {
    "input": 30, "keyboard": 5, "bad": 15, "flood": 6, "over_limit": 3, "reset": 6,
    "reset_flood": 3, "small_upload": 6, "bad_upload": 4, "big_upload": 3, "big_burst": 2,
    "viewer": 4, "stall": 3, "ping": 4,
}

FORCED = ["reset_flood", "big_burst"]  # each run has these once (one per visitor slot)


def _png(width, height, color, compress_level=6):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG",
                                                  compress_level=compress_level)
    return buffer.getvalue()


def _image_message(data: bytes, mime="image/png"):
    return json.dumps({"type": "image",
                       "data": f"data:{mime};base64," + base64.b64encode(data).decode()})


SMALL_IMAGE = _image_message(_png(320, 176, (200, 60, 40)))
BIG_IMAGE = _image_message(_png(4096, 4096, (30, 120, 200)))     # the most pixels allowed
BAD_IMAGES = [_image_message(b"not an image at all"),
              _image_message(b"GIF89a" + b"\x00" * 64),
              json.dumps({"type": "image", "data": "data:image/png;base64,@@@@"}),
              _image_message(_png(4100, 4100, (1, 2, 3), compress_level=1))]  # too many pixels
BAD_MESSAGES = [
    "{not json", "[1, 2]", "null", '"text"', json.dumps({"type": 7}),
    json.dumps({"type": "teleport"}), json.dumps({"type": "keyboard", "key": "x"}),
    json.dumps({"type": "keyboard"}), json.dumps({"type": "input", "id": -1, "keys": []}),
    json.dumps({"type": "input", "id": 1, "keys": "w"}),
    json.dumps({"type": "input", "id": 1, "keys": ["w"], "mouse": [1e9, 0]}),
    json.dumps({"type": "input", "id": 1, "keys": ["w"] * 40}),
    json.dumps({"type": "input", "id": 1, "keys": ["w"], "pad": "x" * 5000}),   # over 4 KiB
    json.dumps({"type": "ping", "pad": "y" * 9000}), b"\x00\x01binary", b"",
    "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
]


class Log:
    """What everyone did, with times (for the report of a failed check)."""

    def __init__(self):
        self.start = time.monotonic()
        self.events = []
        self.counts = {}

    def __call__(self, who, what):
        self.events.append((time.monotonic(), who, what))
        self.counts[what] = self.counts.get(what, 0) + 1

    def between(self, begin, end):
        return [f"{t - self.start:7.2f}s {who}: {what}" for t, who, what in self.events
                if begin <= t <= end]


class Client:
    """One WebSocket player: a reader task (pausable: a stall) that records frames and texts."""

    def __init__(self, server, log, name, frames=True, play="continuous", seed=0):
        self.rng = random.Random(seed)
        query = "?frames=ws" if frames else "?"
        if play != "continuous":
            query += f"&play={play}"
        self.url, self.log, self.name = server.ws + query, log, name
        self.frames = []   # arrival times (monotonic) of frames: (t, block, block_ms)
        self.texts = []
        self.hello = None
        self.full = None
        self.closed = None
        self.reader = None
        self.input_id = 0

    async def open(self, timeout=60):
        from websockets.asyncio.client import connect
        self.ws = await connect(self.url, max_size=2**24, open_timeout=timeout, max_queue=64)
        first = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        if first.get("type") == "full":
            self.full = first
            await self.ws.wait_closed()
            return False
        assert first.get("type") == "hello", first
        self.hello = first
        self.reader = asyncio.create_task(self._read())
        return True

    async def _read(self):
        from websockets.exceptions import ConnectionClosed
        from wan.play.client import parse_frame
        try:
            async for message in self.ws:
                now = time.monotonic()
                if isinstance(message, bytes):
                    frame = parse_frame(message)
                    self.frames.append((now, frame.block,
                                        frame.frames_ready_ms - frame.block_start_ms))
                else:
                    self.texts.append(json.loads(message))
        except ConnectionClosed:
            pass
        self.closed = self.ws.close_code

    async def stall(self, seconds):
        """Stop reading for `seconds` (a slow client: the server drops its oldest frames)."""
        if self.reader is not None:
            self.reader.cancel()
            try:
                await self.reader
            except asyncio.CancelledError:
                pass
        await asyncio.sleep(seconds)
        self.reader = asyncio.create_task(self._read())

    async def send(self, message):
        await self.ws.send(message)

    async def keys(self, keys):
        self.input_id += 1
        await self.send(json.dumps({"type": "input", "id": self.input_id, "keys": keys,
                                    "mouse": [self.rng.uniform(-40, 40), 0.0]}))

    def errors(self):
        return [t["reason"] for t in self.texts if t.get("type") == "error"]

    async def close(self, how="close"):
        if how == "abort":   # the TCP connection drops: no close handshake
            self.ws.transport.abort()
        else:
            await self.ws.close()
        if self.reader is not None:
            try:
                await asyncio.wait_for(self.reader, 30)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self.reader.cancel()


def _viewer(server, session, seconds, log, who):
    """GET /stream of `session` for `seconds`, then drop it mid-stream."""
    import http.client
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=seconds + 10)
    try:
        connection.request("GET", "/stream", headers={"Cookie": f"wan_session={session}"})
        response = connection.getresponse()
        log(who, f"viewer {response.status}")  # 503: server full (a viewer that starts a game)
        end = time.monotonic() + seconds
        while time.monotonic() < end and response.status == 200:
            if not response.read(4096):
                break
    except OSError as error:
        log(who, f"viewer error {type(error).__name__}")
    finally:
        connection.close()


async def _visitor_action(client, action, rng, server, log, who):
    if action == "input":
        for _ in range(rng.randint(1, 5)):
            await client.keys(rng.choice(KEYS))
            await asyncio.sleep(rng.uniform(0.05, 0.3))
    elif action == "keyboard":
        await client.send(json.dumps({"type": "keyboard", "key": rng.choice("wasd"),
                                      "timestamp": 1}))
    elif action == "bad":
        await client.send(rng.choice(BAD_MESSAGES))
    elif action == "flood":  # within the rate limit (120/s, bursts of 240): ~100 messages a second
        for _ in range(rng.randint(50, 150)):
            await client.keys(rng.choice(KEYS))
            await asyncio.sleep(0.01)
    elif action == "over_limit":  # 300 at once: the rate limit answers, the socket stays open
        for _ in range(300):
            await client.send(json.dumps({"type": "ping", "t": 0}))
    elif action == "reset":
        await client.send(json.dumps({"type": "reset"}))
    elif action == "reset_flood":  # within the rate limit (120/s): ~100 a second for ~3 s
        for _ in range(rng.randint(250, 350)):
            await client.send(json.dumps({"type": "reset"}))
            await asyncio.sleep(0.01)
    elif action == "small_upload":
        await client.send(SMALL_IMAGE)
    elif action == "bad_upload":
        await client.send(rng.choice(BAD_IMAGES))
    elif action == "big_upload":
        await client.send(BIG_IMAGE)
    elif action == "big_burst":
        for _ in range(rng.randint(4, 8)):
            await client.send(BIG_IMAGE)
    elif action == "viewer":
        session = client.hello["session"]
        asyncio.get_running_loop().run_in_executor(
            None, _viewer, server, session, rng.uniform(0.3, 2.0), log, who)
    elif action == "stall":
        await client.stall(rng.uniform(1.0, 3.0))
    elif action == "ping":
        await client.send(json.dumps({"type": "ping", "t": time.time()}))


async def _visitor_slot(slot, server, log, stats, until, seed, forced=None):
    """Players come and go in one of the server's places until `until`. `forced`: an action
    the player there does once, at a random time in the chaos's first 60% (and stays 4 s more),
    so that every run has it."""
    from websockets.exceptions import ConnectionClosed
    rng = random.Random(seed)
    weights = {a: w for a, w in ACTIONS.items() if a not in SKIP}
    forced_at = None
    if forced is not None and forced not in SKIP:
        forced_at = time.monotonic() + rng.uniform(0.1, 0.6) * (until - time.monotonic())
    number = 0
    while time.monotonic() < until:
        number += 1
        who = f"visitor{slot}.{number}"
        client = Client(server, log, who, frames=rng.random() < 0.6,
                        play="on-input" if rng.random() < 0.15 else "continuous",
                        seed=rng.random())
        stats["clients"].append(client)
        try:
            if not await client.open():
                stats["full"] += 1
                stats["full_codes"].append(client.ws.close_code)
                log(who, f"full ({client.ws.close_code})")
                await asyncio.sleep(rng.uniform(0.5, 1.5))  # the last one's linger, a knocker
                continue
            log(who, "joined")
            stay = min(until, time.monotonic() + rng.uniform(2.0, 8.0))
            while time.monotonic() < stay and client.closed is None:
                action = rng.choices(list(weights), weights=list(weights.values()))[0]
                if forced_at is not None and time.monotonic() >= forced_at:
                    action, forced_at = forced, None
                    stay = max(stay, min(until, time.monotonic() + 6.0))
                log(who, action)
                await _visitor_action(client, action, rng, server, log, who)
                await asyncio.sleep(rng.uniform(0.1, 0.8))
            how = rng.choices(["close", "abort", "oversize"], weights=[60, 35, 5])[0]
            if "oversize" in SKIP:
                how = "close"
            log(who, f"leaves ({how})")
            if how == "oversize":  # over the transport's limit: the server closes (1009)
                try:
                    await client.send("x" * OVERSIZE)
                except ConnectionClosed:
                    pass
                await client.close()
                stats["oversize_codes"].append(client.closed)
            else:
                await client.close(how)
        except (ConnectionClosed, OSError, asyncio.TimeoutError) as error:
            log(who, f"connection error {type(error).__name__}: {error}")
            stats["connection_errors"].append(f"{who}: {type(error).__name__}: {error}")
            try:
                await client.close("abort")
            except Exception:
                pass
        await asyncio.sleep(rng.uniform(0.0, 0.5))


async def _knocker(server, log, stats, until, seed):
    """Knocks while the server is full (refused: 'full', 1013), and leaves half-open TCP
    connections (a request that never ends) for a while."""
    rng = random.Random(seed)
    number = 0
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(2.0, 5.0))
        number += 1
        who = f"knocker.{number}"
        if rng.random() < 0.7:
            client = Client(server, log, who, frames=False)
            stats["clients"].append(client)
            try:
                if await client.open():
                    log(who, "joined (a place was free): leaves")
                    await client.close()
                else:
                    stats["full"] += 1
                    log(who, f"full ({client.ws.close_code})")
                    stats["full_codes"].append(client.ws.close_code)
            except Exception as error:
                stats["connection_errors"].append(f"{who}: {type(error).__name__}: {error}")
        else:
            log(who, "half-open TCP connection")
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            sock.close()


async def _well_behaved(client, until_event: asyncio.Event, log):
    """W: held keys changing every 0.7 s, reading everything, until the event."""
    k = 0
    while not until_event.is_set():
        await client.keys(KEYS[k % len(KEYS)])
        k += 1
        try:
            await asyncio.wait_for(until_event.wait(), 0.7)
        except asyncio.TimeoutError:
            pass


async def _warm_up(server, log):
    """Three players at once do one of everything (and upload at the same time), then leave."""
    clients = [Client(server, log, f"warm{i}") for i in range(CAPACITY)]
    for client in clients:
        assert await client.open(), "the warm-up players must fit"
    for client in clients:
        await client.keys(["w"])
    deadline = time.monotonic() + 120
    while not all(c.frames for c in clients):  # a block each: the model has run
        assert time.monotonic() < deadline, "no frames in 120 s"
        await asyncio.sleep(0.1)
    await asyncio.gather(*(c.send(BIG_IMAGE) for c in clients))
    await asyncio.gather(*(c.send(SMALL_IMAGE) for c in clients))
    rng = random.Random(SEED + 99)
    for action in ACTIONS:
        if action not in ("reset_flood", "big_burst", "stall"):
            await _visitor_action(clients[0], action, rng, server, log, "warm0")
    await asyncio.sleep(2.0)
    for client in clients:
        await client.close()


def _gaps(times):
    return [b - a for a, b in zip(times, times[1:])]


def _wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class RssSampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stopping = pid, [], False

    def run(self):
        while not self.stopping:
            try:
                self.samples.append((time.monotonic(), proc_stats(self.pid)["rss"]))
            except (OSError, AttributeError):
                return
            time.sleep(0.5)


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    folder = tmp_path_factory.mktemp("soak")
    server = PlayProcess(folder, "soak", ["--max-players", str(CAPACITY), "--linger", "1"])
    log = Log()
    out = {"log": log, "server_log": server.log}
    with server:
        started = time.monotonic()
        asyncio.run(_warm_up(server, log))
        warmed = time.monotonic()
        assert _wait_until(lambda: server.health()["players"] == 0, 30), \
            "the warm-up players did not leave"
        time.sleep(1.0)
        out["baseline"] = proc_stats(server.pid)
        sampler = RssSampler(server.pid)
        sampler.start()
        stats = {"clients": [], "full": 0, "full_codes": [], "oversize_codes": [],
                 "connection_errors": []}

        async def phases():
            w = Client(server, log, "W")
            assert await w.open()
            done = asyncio.Event()
            player = asyncio.create_task(_well_behaved(w, done, log))
            calm = [Client(server, log, f"calm{i}", frames=False) for i in range(CAPACITY - 1)]
            for client in calm:
                assert await client.open()
                await client.keys(["w"])
            while len({b for _, b, _ in w.frames}) < 2:  # W's first blocks: not measured
                await asyncio.sleep(0.1)
            calm_start = time.monotonic()
            while (len({b for t, b, _ in w.frames if t >= calm_start}) < CALM_BLOCKS
                   and time.monotonic() < calm_start + CALM_MAX_S):
                await asyncio.sleep(0.05)
            calm_end = time.monotonic()
            log("test", "calm phase ends")
            for client in calm:
                await client.close()
            chaos_start = time.monotonic()
            until = chaos_start + CHAOS_S
            await asyncio.gather(
                *(_visitor_slot(slot, server, log, stats, until, SEED * 100 + slot,
                                forced=FORCED[slot % len(FORCED)])
                  for slot in range(CAPACITY - 1)),
                _knocker(server, log, stats, until, SEED * 100 + 50))
            chaos_end = time.monotonic()
            log("test", "chaos ends")
            done.set()
            await player
            await w.close()
            return w, calm_start, calm_end, chaos_start, chaos_end

        w, calm_start, calm_end, chaos_start, chaos_end = asyncio.run(phases())
        out.update(stats)
        out["w"] = w
        out["players_left"] = _wait_until(lambda: server.health()["players"] == 0, 30)
        baseline = out["baseline"]

        def back():
            now = proc_stats(server.pid)
            return (all(now[k] <= baseline[k] for k in ("fds", "sockets"))
                    and now["threads"] <= baseline["threads"] + POOL_SLACK)
        out["back_to_baseline"] = _wait_until(back, 20)
        sampler.stopping = True
        sampler.join()
        out["final"] = proc_stats(server.pid)
        out["rss_peak"] = max(r for _, r in sampler.samples)
        out["health"] = server.health()
        out["metrics"] = server.metrics()
        # W: frames arrive a block at a time; its gaps in the calm and in the chaos
        times = [t for t, _, _ in w.frames]
        calm_times = [t for t in times if calm_start <= t <= calm_end]
        chaos_times = [t for t in times if chaos_start <= t <= chaos_end]
        out["normal_gap"] = max(_gaps(calm_times))
        out["block_s"] = sorted(ms for t, _, ms in w.frames
                                if calm_start <= t <= calm_end)[len(calm_times) // 2] / 1e3
        chaos_gaps = _gaps(chaos_times)
        out["chaos_gap"] = max(chaos_gaps) if chaos_gaps else float("inf")
        if chaos_gaps:
            i = chaos_gaps.index(out["chaos_gap"])
            out["chaos_gap_at"] = (chaos_times[i], chaos_times[i + 1])
        out["phases"] = (warmed - started, calm_end - calm_start, chaos_end - chaos_start)
        out["calm_gaps"] = [round(g, 2) for g in _gaps(calm_times) if g > 0.1]
        out["chaos_gaps"] = [round(g, 2) for g in chaos_gaps if g > 0.1]
        out["w_blocks"] = {"calm": len({b for t, b, _ in w.frames if calm_start <= t <= calm_end}),
                           "chaos": len({b for t, b, _ in w.frames
                                         if chaos_start <= t <= chaos_end})}
    if os.environ.get("WAN_SOAK_LOG"):
        with open(os.environ["WAN_SOAK_LOG"], "w") as f:
            f.write("\n".join(log.between(0, float("inf"))) + "\n")
    print(f"\nsoak: seed {SEED}, {CHAOS_S:.0f} s of chaos; actions: {log.counts}")
    print(f"soak: W's longest gap {out['normal_gap']:.2f} s calm, {out['chaos_gap']:.2f} s in "
          f"the chaos; one block {out['block_s']:.2f} s; W's blocks {out['w_blocks']}; gaps over "
          f"0.1 s: calm {out['calm_gaps']}, chaos {out['chaos_gaps']}")
    print(f"soak: phases: warm-up {out['phases'][0]:.0f} s, calm {out['phases'][1]:.0f} s, "
          f"chaos {out['phases'][2]:.0f} s")
    print(f"soak: RSS {out['baseline']['rss'] / 2**20:.0f} MB at the baseline, peak "
          f"{out['rss_peak'] / 2**20:.0f} MB, {out['final']['rss'] / 2**20:.0f} MB at the end; "
          f"baseline {out['baseline']}, final {out['final']}")
    return out


def _server_log(soak):
    from proxy_nginx import tail
    return tail(soak["server_log"], 15)


def test_soak_server_is_healthy_and_its_counts_agree(soak):
    health, metrics, w = soak["health"], soak["metrics"], soak["w"]
    assert health["status"] == "ok", health
    assert soak["players_left"] and health["players"] == 0, health
    assert metric_values(metrics, "wan_play_players") == [("", 0.0)]
    assert metric_values(metrics, "wan_play_session_fps") == [], \
        "per-session gauges outlived their sessions"
    refused = sum(v for _, v in metric_values(metrics, "wan_play_refused_players_total"))
    seen_full = soak["full"] + soak["log"].counts.get("viewer 503", 0)
    assert refused == seen_full, (refused, seen_full)  # each refusal counted once, each seen
    assert all(code == 1013 for code in soak["full_codes"]), soak["full_codes"]
    assert all(code == 1009 for code in soak["oversize_codes"]), soak["oversize_codes"]
    rejected = sum(v for _, v in metric_values(metrics, "wan_play_rejected_messages_total"))
    seen = sum(len([r for r in c.errors() if not r.startswith(("a new game", "your game"))])
               for c in soak["clients"])
    assert rejected >= seen > 0, (rejected, seen)
    blocks = sum(v for _, v in metric_values(metrics, "wan_play_blocks_total"))
    assert blocks >= soak["w_blocks"]["calm"] + soak["w_blocks"]["chaos"]
    assert soak["connection_errors"] == [], soak["connection_errors"]
    # W: never refused, never closed, no error, frames all along
    assert w.errors() == [] and w.closed == 1000, (w.errors(), w.closed)
    assert soak["w_blocks"]["chaos"] >= 3, soak["w_blocks"]


@pytest.mark.xfail(strict=False, reason=(
    "known (wan/play/server.py, engine.py): bursts of 4096 x 4096 uploads grow the server's RSS: "
    "at 532833f every decoded image (48 MB) waits in the engine's command queue and glibc keeps "
    "the freed buffers: +290 to +620 MB after everyone left; the working tree's one decode at a "
    "time per connection, newest image wins: -144 to +240 MB, over +200 MB in 2 of 6 runs"))
def test_soak_memory_is_flat(soak):
    baseline, final = soak["baseline"]["rss"], soak["final"]["rss"]
    assert final <= baseline + RSS_SLACK, (
        f"RSS {final / 2**20:.0f} MB after everyone left, baseline {baseline / 2**20:.0f} MB "
        f"(+{(final - baseline) / 2**20:.0f} MB; peak {soak['rss_peak'] / 2**20:.0f} MB)")


def test_soak_leaks_no_threads_fds_or_sockets(soak):
    baseline, final = soak["baseline"], soak["final"]
    # enough connections for a leak to show: a thread (or fd) left per connection would exceed
    # the pool's slack (twice the slack was asked before: 38 on a 16-core machine, more than
    # the 40 s chaos makes there, 32 on an H100 host; CI's 2 cores ask 5)
    assert len(soak["clients"]) > POOL_SLACK, (len(soak["clients"]), POOL_SLACK)
    assert soak["back_to_baseline"], (
        f"20 s after everyone left: {final} against the baseline {baseline} (fds and sockets "
        f"at most the baseline's, threads at most {POOL_SLACK} more)\n{_server_log(soak)}")


def test_soak_a_well_behaved_player_is_not_stalled_by_the_others(soak):
    normal, block, gap = soak["normal_gap"], soak["block_s"], soak["chaos_gap"]
    if gap > normal + block:
        begin, end = soak["chaos_gap_at"]
        during = "\n".join(soak["log"].between(begin - block, end)[-40:])
    else:
        during = ""
    assert gap <= normal + block, (
        f"W's longest gap between frames {gap:.2f} s in the chaos, normal {normal:.2f} s + one "
        f"block {block:.2f} s; what happened in it:\n{during}")
