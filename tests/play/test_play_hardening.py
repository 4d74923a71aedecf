"""The play server (wan/play/server.py) against hostile or broken clients (issue 32), over a fake
engine (no model: a thread gives each player a block of small JPEGs every 0.12 s), with a second,
well-behaved player counting its frames: JSON that breaks the parser, input ids beyond the frame
header, a send task that dies, slow request headers, /stream without a game, the token on every
route but /livez and its throttle, an invalid UTF-8 frame, a flood of start images; and the
frame queue of reactive play (a re-made block's frames replace unsent ones)."""
import asyncio
import base64
import http.client
import io
import itertools
import json
import logging
import random
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from helpers import wait_until

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")
from PIL import Image  # noqa: E402

import wan.play.server as play_server  # noqa: E402
from wan.play.actions import InputState, action_space  # noqa: E402
from wan.play.client import Frame, PlayResult, parse_frame, play  # noqa: E402
from wan.play.engine import FrameBatch, ServerFull  # noqa: E402
from wan.play.metrics import PlayMetrics  # noqa: E402
from wan.play.server import (MAX_INPUT_ID, BadMessage,  # noqa: E402
                             Connection, PlayServer, ServerThread, StreamQueue, TokenThrottle,
                             parse_message)

BLOCK_S, BLOCK_FRAMES = 0.12, 3
HEADER_TIMEOUT_S = 1.0


def _jpeg(color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), color).save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = _jpeg()


def _batch(block, jpegs, input_id=0, **extra) -> FrameBatch:
    """A FrameBatch; `extra` (first_frame, remake, game, frames_in_block) set as attributes, so
    this works with FrameBatch before and after it has those fields."""
    now = time.perf_counter()
    batch = FrameBatch(block=block, jpegs=list(jpegs), input_id=input_id, input_received=None,
                       block_start=now, frames_ready=now, encoded=now, encode_ms=0.0,
                       block_ms=1.0, wait_ms=0.0, late=False)
    for name, value in extra.items():
        setattr(batch, name, value)
    return batch


class FakePlayer:
    _ids = itertools.count(1)

    def __init__(self, space, play_mode, sink, on_event):
        self.id, self.play_mode = next(self._ids), play_mode
        self.sink, self.on_event = sink, on_event
        self.input = InputState(space)
        self.last_input = time.perf_counter()
        self.blocks = 0

    def fps(self, now, window_s=5.0):
        return 25.0


class FakeEngine:
    """What PlayServer uses of a GameEngine, without a model: a worker thread hands every player
    a block of BLOCK_FRAMES JPEGs every BLOCK_S; new games are recorded in `games`."""

    def __init__(self, capacity=6):
        self.space = action_space("universal")
        self.capacity, self.demo, self.failure = capacity, True, None
        self.preset, self.device, self.steady_block_ms = "fake", "cpu", 1.0
        self.conditioner, self.encoder = SimpleNamespace(name="fake"), SimpleNamespace(where="cpu")
        self.frame_size, self.default_image = (16, 8), Image.new("RGB", (16, 8))
        self.players, self.games = [], []
        self._lock, self._thread, self._running = threading.Lock(), None, False
        self.config = SimpleNamespace(reactive=False)
        self.remakes = {"granted": 0, "refused": 0, "late": 0}

    def describe(self):
        return "a fake engine"

    def captures_while_serving(self):
        return 0

    def started(self):
        return self._thread is not None

    def input_changed(self, player):
        pass

    def device_memory(self):
        return 0

    def player_count(self):
        with self._lock:
            return len(self.players)

    def add_player(self, play_mode, sink, on_event=lambda event: None, image=None):
        with self._lock:
            if len(self.players) >= self.capacity:
                raise ServerFull(f"server full: {len(self.players)} of {self.capacity} players")
            player = FakePlayer(self.space, play_mode, sink, on_event)
            self.players.append(player)
        return player

    def remove_player(self, player):
        with self._lock:
            if player in self.players:
                self.players.remove(player)

    def new_game(self, player, image=None):
        self.games.append((player.id, image))

    def press(self, player):
        player.last_input = time.perf_counter()

    def start(self):
        self._running = True
        self._thread = threading.Thread(target=self._work, name="fake-engine", daemon=True)
        self._thread.start()

    def stop(self):
        self._running = False
        self._thread.join(timeout=10)

    def _work(self):
        while self._running:
            time.sleep(BLOCK_S)
            with self._lock:
                players = list(self.players)
            for player in players:
                batch = _batch(player.blocks, [JPEG] * BLOCK_FRAMES, player.input.input_id)
                player.blocks += 1
                player.sink(batch)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def at(self, level):
        return [r for r in self.records if r.levelno >= level]


LOGGERS = ("uvicorn.error", "wan.play.server")


@pytest.fixture()
def logs():
    """Records of uvicorn's error log and the server's (attached after uvicorn set up its log)."""
    records = Records()
    for name in LOGGERS:
        logging.getLogger(name).addHandler(records)
    yield records
    for name in LOGGERS:
        logging.getLogger(name).removeHandler(records)


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine()
    server = PlayServer(engine, PlayMetrics(), linger_s=0, stream_wait_s=0.3)
    with ServerThread(server, header_timeout_s=HEADER_TIMEOUT_S) as running:
        running.engine = engine
        yield running
    assert engine.failure is None


def _wait_until(condition, timeout=10.0, what="condition"):
    wait_until(condition, timeout, what, every=0.02)


def _no_players(running):
    _wait_until(lambda: running.engine.player_count() == 0, what="the sessions to end")


def _assert_steady(result, seconds):
    """The well-behaved player: no error, its blocks in order without a gap, frames all along."""
    assert result.errors() == [] and result.closed is None, (result.errors(), result.closed)
    blocks = [f.block for f in result.frames]
    assert len(blocks) >= 0.5 * seconds / BLOCK_S * BLOCK_FRAMES, len(blocks)
    assert blocks == sorted(blocks) and set(range(blocks[0], blocks[-1] + 1)) == set(blocks)
    gaps = [b.received - a.received for a, b in zip(result.frames, result.frames[1:])]
    assert max(gaps) < 1.0, max(gaps)


async def _reply(ws, kind="error", timeout=10):
    while True:
        message = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(message, str) and json.loads(message).get("type") == kind:
            return json.loads(message)


# ------------------------------------------------------------------ the parser, alone
def test_parse_message_refuses_what_breaks_json_with_a_reason():
    cases = [
        ("[" * 100000, "size:"),
        ("[" * 2000 + "]" * 2000, "json: at most 32 objects"),
        ('{"type": "ping", "t": ' + "9" * 5000 + "}", "size:"),
        ('{"type": "ping", "t": ' + "9" * 4000 + "}", "json: a number has at most"),
        ('{"type": "ping", "t": 1.' + "5" * 100 + "}", "json: a number has at most"),
        ('{"type": "input", "id": 1, "mouse": [NaN, 0]}', "json: NaN is not"),
        ('{"type": "ping", "t": Infinity}', "json: Infinity is not"),
        ('{"type": "input", "keys": ["w"], "pad": "' + "x" * 5000 + '"}', "size:"),
        ('{"data": "' + "A" * 5000 + '", "type": "reset"}', "size:"),
        ("x" * (play_server.MAX_IMAGE_MESSAGE + 1), "size:"),
        ("{not json", "json: not valid JSON"),
        ("[1, 2]", "json: a message is an object"),
        ('"\\ud800"', "json: a message is an object"),
    ]
    for text, reason in cases:
        with pytest.raises(BadMessage) as refused:
            parse_message(text)
        assert str(refused.value).startswith(reason), (text[:40], str(refused.value))
    image = '{"type": "image", "data": "' + "A" * 100000 + '"}'
    assert parse_message(image)["type"] == "image"
    assert parse_message('{"data": "' + "A" * 100000 + '", "type": "image"}')["type"] == "image"
    assert parse_message('{"type": "input", "id": 4294967295, "mouse": [1.5e2, -3]}')["id"] == \
        MAX_INPUT_ID
    rng = random.Random(0)  # whatever the text, a BadMessage or a message, nothing else
    alphabet = '{}[]":,0123456789eE.-+ tfnaulrsNI\\x'
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        try:
            parse_message(text)
        except BadMessage:
            pass


# ------------------------------------------------------------------ over the socket
def test_json_that_breaks_the_parser_and_ids_beyond_32_bits_get_errors_the_game_goes_on(
        served, logs):
    from websockets.asyncio.client import connect
    bad = [
        ("[" * 100000, "size"),
        ("[" * 2000 + "]" * 2000, "json"),
        ('{"type": "ping", "t": ' + "9" * 5000 + "}", "size"),
        ('{"type": "ping", "t": ' + "9" * 4000 + "}", "json"),
        (json.dumps({"type": "input", "id": 2**32, "keys": ["w"]}), "input"),
        (json.dumps({"type": "input", "id": 2**40, "keys": []}), "input"),
    ]
    seconds = 3.0

    async def scenario():
        good = asyncio.create_task(play(served.ws + "?frames=ws", seconds=seconds))
        replies = []
        async with connect(served.ws + "?frames=ws") as ws:
            await _reply(ws, "hello")
            for text, _ in bad:
                await ws.send(text)
                replies.append((await _reply(ws))["reason"])
            await ws.send(json.dumps({"type": "input", "id": MAX_INPUT_ID, "keys": ["w"]}))
            await ws.send(json.dumps({"type": "keyboard", "key": "d"}))  # the next id: 2^32
            replies.append((await _reply(ws))["reason"])
            await ws.send(json.dumps({"type": "ping", "t": 7}))
            pong = await _reply(ws, "pong")
            frames = []  # its frames carry the largest id the header holds
            while len(frames) < 2 * BLOCK_FRAMES:
                message = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(message, bytes):
                    frames.append(parse_frame(message))
        return replies, pong, frames, await good

    replies, pong, frames, good = asyncio.run(scenario())
    for (text, prefix), reason in zip(bad, replies):
        assert reason.startswith(prefix + ":"), (text[:40], reason)
    assert "4294967295" in replies[4] and "4294967295" in replies[-1]
    assert replies[-1].startswith("keyboard: input ids reached")
    assert pong["t"] == 7
    assert frames[-1].input_id == MAX_INPUT_ID
    _assert_steady(good, seconds)
    assert logs.at(logging.ERROR) == [], [r.getMessage() for r in logs.at(logging.ERROR)]
    _no_players(served)


def test_a_send_task_that_dies_closes_the_connection_and_ends_the_game(logs):
    """A frame the header cannot carry (an engine bug): that connection gets an error and 1011,
    its game ends at once (no linger), one ERROR line says why; the other player plays on."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed
    engine = FakeEngine()
    server = PlayServer(engine, PlayMetrics(), linger_s=60)
    with ServerThread(server) as running:
        async def scenario():
            good = asyncio.create_task(play(running.ws + "?frames=ws", seconds=2.5))
            async with connect(running.ws + "?frames=ws") as ws:
                hello = await _reply(ws, "hello")
                while not isinstance(await asyncio.wait_for(ws.recv(), 10), bytes):
                    pass
                player = server.sessions[hello["session"]].player
                player.sink(_batch(0, [JPEG], input_id=2**40))  # from "the worker"
                texts = []
                with pytest.raises(ConnectionClosed):
                    while True:
                        message = await asyncio.wait_for(ws.recv(), 10)
                        if isinstance(message, str):
                            texts.append(json.loads(message))
                players = engine.player_count()
                return ws.close_code, texts, hello, players, await good

        code, texts, hello, players_at_close, good = asyncio.run(scenario())
        assert code == 1011
        assert texts[-1]["type"] == "error" and "sending to this connection failed" in \
            texts[-1]["reason"]
        _wait_until(lambda: hello["session"] not in server.sessions, timeout=5,
                    what="the failed session to end (not after its 60 s linger)")
        assert players_at_close <= 2 and engine.player_count() <= 1
        errors = [r for r in logs.at(logging.ERROR) if r.name == "wan.play.server"]
        assert len(errors) == 1 and "sending to a connection failed" in errors[0].getMessage()
        assert errors[0].exc_info is None
        _assert_steady(good, 2.5)


def _partial(port, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def _read_until_closed(sock, limit_s) -> bytes:
    """What the server sent until it closed the connection; AssertionError if it did not close
    within `limit_s`."""
    received, deadline = b"", time.monotonic() + limit_s
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            raise AssertionError(f"still open after {limit_s} s; got {received[:80]!r}") from None
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def test_slow_request_headers_are_closed_after_the_header_timeout(served):
    """30 connections with a partial request line or headers, one that trickles a byte at a time,
    one that sends a whole request then half of the next: all closed with 408 after the header
    timeout (1 s here), while a player's WebSocket stays open for longer and keeps playing."""
    seconds = 4 * HEADER_TIMEOUT_S

    async def scenario():
        return await play(served.ws + "?frames=ws", seconds=seconds)

    good = threading.Thread(target=lambda: results.append(asyncio.run(scenario())))
    results = []
    good.start()
    slow = [_partial(served.port, b"GET / HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"GET /heal")
            for i in range(30)]
    keep_alive = _partial(served.port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\nGET /livez HT")
    trickle, opened = _partial(served.port, b"G"), time.monotonic()
    while time.monotonic() - opened < 3 * HEADER_TIMEOUT_S:  # a byte every 0.2 s, never a head
        if select.select([trickle], [], [], 0.2)[0]:
            break  # the server answered
        trickle.sendall(b"E")
    assert time.monotonic() - opened < 2.5 * HEADER_TIMEOUT_S  # the bytes did not extend it
    for sock in slow + [trickle]:
        answer = _read_until_closed(sock, 3 * HEADER_TIMEOUT_S)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:60]
        sock.close()
    answer = _read_until_closed(keep_alive, 3 * HEADER_TIMEOUT_S)
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 2
    assert b"HTTP/1.1 408" in answer
    keep_alive.close()
    good.join(timeout=30)
    _assert_steady(results[0], seconds)
    status, _, body = _get(served.http + "/livez")
    assert status == 200 and body == b"ok\n"
    _no_players(served)


def _get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_stream_joins_an_existing_game_only(served):
    status, _, body = _get(served.http + "/stream")
    assert status == 409 and b"no session" in body
    status, _, body = _get(served.http + "/stream", {"Cookie": "wan_session=nobody-plays-here"})
    assert status == 404 and b"never starts one" in body
    assert served.engine.player_count() == 0  # no player without a page

    from websockets.asyncio.client import connect

    async def scenario():
        async with connect(served.ws + "?session=a-page-session") as ws:
            await _reply(ws, "hello")
            connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
            await asyncio.to_thread(connection.request, "GET", "/stream",
                                    headers={"Cookie": "wan_session=a-page-session"})
            response = await asyncio.to_thread(connection.getresponse)
            head = await asyncio.to_thread(response.read, 200)
            players = served.engine.player_count()
            connection.close()
            return response.status, head, players

    status, head, players = asyncio.run(scenario())
    assert status == 200 and head.startswith(b"--frame\r\nContent-Type: image/jpeg")
    assert players == 1  # the page's game, shown: not a second player
    _no_players(served)


def test_the_token_guards_every_route_but_livez_and_wrong_ones_are_throttled():
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus
    clock = [1000.0]
    throttle = TokenThrottle(clock=lambda: clock[0])
    engine = FakeEngine()
    server = PlayServer(engine, PlayMetrics(), token="right-token", linger_s=0, stream_wait_s=0,
                        throttle=throttle)
    routes = ["/", "/health", "/metrics", "/start-image", "/static/play.js", "/static/style.css",
              "/stream"]
    with ServerThread(server) as running:
        for route in routes:
            status, _, body = _get(running.http + route)
            assert status == 401 and b"access token" in body, (route, status)
        status, headers, body = _get(running.http + "/livez")
        assert status == 200 and body == b"ok\n"
        assert int(headers["Content-Length"]) == 3
        status, headers, _ = _get(running.http + "/?token=right-token")
        cookie = headers.get_all("Set-Cookie")
        cookies = "; ".join(c.split(";")[0] for c in cookie)
        for route in routes[1:-1]:
            assert _get(running.http + route, {"Cookie": cookies})[0] == 200, route
            assert _get(running.http + route + "?token=right-token")[0] == 200, route

        async def socket_status(token):
            try:
                async with connect(running.ws + f"?token={token}") as ws:
                    return (await _reply(ws, "hello"))["type"]
            except InvalidStatus as refused:
                return refused.response.status_code
        assert asyncio.run(socket_status("wrong")) == 401
        assert asyncio.run(socket_status("right-token")) == "hello"
        _wait_until(lambda: engine.player_count() == 0, what="the session to end")

        # 100 guesses at once: after 10 wrong ones (1 above) the address is refused, right
        # token and all; /livez still answers
        answers = [_get(running.http + f"/health?token=guess{i}")[0] for i in range(100)]
        assert answers[:9] == [401] * 9 and set(answers[9:]) == {429}
        status, headers, body = _get(running.http + "/health?token=right-token")
        assert status == 429 and b"too many wrong access tokens" in body
        assert 0 < int(headers["Retry-After"]) <= 60
        assert asyncio.run(socket_status("right-token")) == 429
        assert _get(running.http + "/livez")[0] == 200
        clock[0] += 61  # the lockout is over
        assert _get(running.http + "/health?token=right-token")[0] == 200
        assert _get(running.http + "/health?token=wrong-again")[0] == 401


def test_an_invalid_utf8_frame_closes_the_socket_with_one_log_line(served, logs):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async def scenario():
        async with connect(served.ws) as ws:
            await _reply(ws, "hello")
            ws.protocol.send_text(b"\xff\xfe{}")  # a text frame that is not UTF-8
            with pytest.raises(ConnectionClosed):
                await ws.send(json.dumps({"type": "ping"}))  # flushes the frame above
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            return ws.close_code

    assert asyncio.run(scenario()) == 1007
    _no_players(served)
    warnings = [r for r in logs.at(logging.WARNING) if "UTF-8" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert warnings[0].exc_info is None and warnings[0].exc_text is None
    assert logs.at(logging.ERROR) == []


def _png_url(color) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_flood_of_start_images_keeps_one_waiting_per_connection(served, monkeypatch):
    """Images sent faster than they decode: one is decoded at a time and one waits, a newer one
    replacing it (and a decoded one a newer one overtook is not used): only the newest reaches
    the engine, the others are answered 'replaced'; input is handled meanwhile."""
    from websockets.asyncio.client import connect
    decode = play_server.decode_upload

    def slow_decode(data):
        time.sleep(0.4)
        return decode(data)
    monkeypatch.setattr(play_server, "decode_upload", slow_decode)
    colors = [(20 * i, 0, 0) for i in range(10)]

    async def scenario():
        async with connect(served.ws) as ws:
            hello = await _reply(ws, "hello")
            for color in colors:
                await ws.send(json.dumps({"type": "image", "data": _png_url(color)}))
            await ws.send(json.dumps({"type": "ping", "t": 1}))
            replies = []
            while sum(1 for r in replies if r.get("type") == "image") < len(colors):
                message = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(message, str):
                    replies.append(json.loads(message))
            return hello, replies

    hello, replies = asyncio.run(scenario())
    decoded = next(i for i, r in enumerate(replies) if "size" in r)
    assert any(r["type"] == "pong" for r in replies[:decoded])  # not stuck behind a decode
    images = [r for r in replies if r["type"] == "image"]
    assert sum(1 for r in images if r.get("replaced")) == len(colors) - 1
    assert [r["size"] for r in images if "size" in r] == [[8, 8]]
    player = hello["player"]
    games = [image for pid, image in served.engine.games if pid == player]
    assert [image.getpixel((0, 0)) for image in games] == [colors[-1]]  # the newest only
    _no_players(served)


# ------------------------------------------------------------------ reactive play's frame queue
class _Socket:
    def __init__(self):
        self.sent = []

    async def send_bytes(self, data):
        self.sent.append(data)

    async def send_text(self, text):
        pass


def test_a_remade_block_replaces_the_frames_not_sent_yet():
    async def scenario():
        metrics = PlayMetrics()
        connection = Connection(_Socket(), True, metrics)
        old = [_jpeg((i * 20, 0, 0)) for i in range(12)]
        new = [_jpeg((0, 0, i * 20)) for i in range(6)]
        connection.frames_of(_batch(4, old[:6], game=1, frames_in_block=12))
        connection.frames_of(_batch(4, old[6:], first_frame=6, game=1, frames_in_block=12))
        connection.frames_of(_batch(4, new[2:], first_frame=8, remake=True, game=1,
                                    frames_in_block=12))
        connection.frames_of(_batch(4, [JPEG], first_frame=11, remake=True, game=2,
                                    frames_in_block=12))  # another game's block 4: no match
        queued = [(b.block, getattr(b, "game"), i, j) for b, i, j in connection.frames]
        sender = asyncio.create_task(connection.send_loop(0.0))
        await asyncio.sleep(0.05)
        sender.cancel()
        return queued, connection.websocket.sent, connection.replaced, old, new

    queued, sent, replaced, old, new = asyncio.run(scenario())
    assert replaced == 4
    assert [(b, g, i) for b, g, i, _ in queued] == \
        [(4, 1, i) for i in range(12)] + [(4, 2, 11)]
    assert [j for *_, j in queued[:12]] == old[:8] + new[2:]
    frames = [parse_frame(data) for data in sent]
    assert [f.index for f in frames] == list(range(12)) + [11]
    assert {f.frames_in_block for f in frames} == {12}
    assert frames[9].jpeg == new[3]


def test_batches_without_the_new_fields_queue_as_whole_blocks():
    async def scenario():
        connection = Connection(_Socket(), True, PlayMetrics())
        connection.frames_of(_batch(0, [b"a", b"b", b"c"]))
        connection.frames_of(_batch(0, [b"d"]))  # no first_frame: appended, nothing replaced
        sender = asyncio.create_task(connection.send_loop(0.0))
        await asyncio.sleep(0.05)
        sender.cancel()
        return connection.websocket.sent
    frames = [parse_frame(data) for data in asyncio.run(scenario())]
    assert [(f.index, f.frames_in_block, f.jpeg) for f in frames] == \
        [(0, 3, b"a"), (1, 3, b"b"), (2, 3, b"c"), (0, 1, b"d")]


def test_the_mjpeg_queue_replaces_frames_the_same_way():
    async def scenario():
        stream = StreamQueue(limit=24)
        stream.put(_batch(2, [b"0", b"1", b"2", b"3"], game=0, frames_in_block=4))
        stream.put(_batch(2, [b"2'", b"3'"], first_frame=2, remake=True, game=0,
                          frames_in_block=4))
        got = [await stream.get(timeout=0.1) for _ in range(5)]
        stream.close()
        return got, await stream.get(timeout=0.1)
    got, after_close = asyncio.run(scenario())
    assert got == [b"0", b"1", b"2'", b"3'", None] and after_close is None


def test_the_client_counts_replaced_frames_once_per_block():
    def frame(block, index):
        return Frame(block, index, 4, 0, 0.0, 0.0, 0.0, b"")
    result = PlayResult(frames=[frame(0, i) for i in range(4)] + [frame(0, 2), frame(0, 3)]
                        + [frame(1, i) for i in range(4)] + [frame(1, 0)])
    assert result.replaced_frames() == 3
    from wan.play.client import _block_firsts
    assert [f.block for f in _block_firsts(result.frames)] == [0, 1]


def test_press_parts_split_a_press_into_its_waits():
    """press_parts against hand-made timelines: the server's clock is epoch + ms; each part is
    the median over the presses of its span, and the parts add up to the press-to-arrival."""
    from wan.play.client import press_parts
    epoch = 1000.0
    # press at server ms 100 (client 1000.1): block starts at 160, frames at 270, sent at 275,
    # received at 283; a second press at 600: 650 / 760 / 768 / 778
    presses = [(epoch + 0.100, Frame(3, 0, 12, 1, 160.0, 270.0, 275.0, b"", epoch + 0.283)),
               (epoch + 0.600, Frame(4, 5, 12, 2, 650.0, 760.0, 768.0, b"", epoch + 0.778))]
    arrival = [183.0, 178.0]
    shown = [203.0, 210.0]
    parts = press_parts(presses, epoch, shown, arrival)
    expected = {"to_block_start": (60 + 50) / 2, "block": 110.0, "ready_to_sent": (5 + 8) / 2,
                "transport": (8 + 10) / 2, "page": (203 + 210) / 2 - (183 + 178) / 2}
    assert parts.keys() == expected.keys()
    for name, value in expected.items():
        assert abs(parts[name] - value) < 1e-6, (name, parts[name], value)
    # per press the four server-side parts are the arrival latency exactly
    for (sent, f), total in zip(presses, arrival):
        one = press_parts([(sent, f)], epoch, [], [])
        assert abs(sum(one.values()) - total) < 1e-6 and "page" not in one
