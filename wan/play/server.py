"""The play server's web side: Starlette routes over a `GameEngine` (wan/play/engine.py).

Starlette (the ASGI toolkit FastAPI is built on) with uvicorn: WebSockets, streaming responses,
static files and a lifespan are all this server needs; FastAPI would add request models and
OpenAPI docs for an API of four routes.

Routes:
* `GET /`: the page (static/index.html); sets the `wan_session` cookie that ties one browser's
  `/ws` and `/stream` together (the seed server's page uses both), and `wan_token` when a valid
  `?token=` came with it.
* `WS /ws`: a player's input, and its frames when asked for (`?frames=ws`; this package's page).
  `?session=<id>` names the session (the page sends one per tab; otherwise the cookie, else a new
  one per connection), `?play=continuous|on-input` its mode of play.
* `GET /stream`: the session's frames as MJPEG (`multipart/x-mixed-replace; boundary=frame`),
  paced at 25 fps: the seed server's viewer.
* `GET /health` (JSON), `GET /metrics` (Prometheus text), `GET /start-image` (the built-in
  start image, PNG).

Messages from the client (JSON text; each refused one gets {"type": "error", "reason": ...} and
changes nothing else):
* `{"type": "keyboard", "key": "w", "timestamp": ms}`: the seed server's: one key press, acting
  for one block (on-input play: that block is made now);
* `{"type": "input", "id": n, "keys": ["w", "l"], "mouse": [dx, dy]}`: the held keys (the whole
  set) and mouse motion in pixels since the last message; `id` grows with every message;
* `{"type": "image", "data": "data:image/png;base64,..."}`: a new start image (a new game);
* `{"type": "reset"}` a new game; `{"type": "ping", "t": ...}` answered with a pong.
To the client: `{"type": "hello", ...}` first (session, mode, keys, players), `{"fps", "latency",
"players", ...}` after each block (the seed's stats message, with more fields), `error` (also
when a block of the game held NaN or inf: the block is not sent, the reason names it, and a
`game` message for the new game follows; wan/play/engine.py), `game` (a game started),
`full` (then the socket closes with 1013), and, with `?frames=ws`, one binary message per frame:
a 40-byte little-endian header `FRAME_HEADER` (magic b"WANF", block, frame index, frames in the
block, id of the newest input the block read, then the block's start, frames-ready and send
times in ms on the server's clock) followed by the JPEG.
"""
import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import math
import re
import secrets
import struct
import time
from collections import deque
from importlib import resources
from typing import Dict, Optional, Set

from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from .conditioning import png_bytes
from .engine import PLAY_MODES, FrameBatch, GameEngine, Player, ServerFull
from .metrics import PlayMetrics

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct("<4sIHHIddd")
FRAME_MAGIC = b"WANF"
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_CONTROL_BYTES = 4096               # any message but an image
MAX_UPLOAD_BYTES = 8 * 2**20           # an image message's decoded bytes
MAX_UPLOAD_PIXELS = 4096 * 4096
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
WS_MAX_SIZE = 12 * 2**20               # the transport's own limit (base64 of the upload + slack)
MAX_KEYS, MAX_MOUSE = 16, 10_000.0
QUEUED_FRAMES = 24                     # per connection; a slow client loses its oldest frames


class RateLimit:
    """A token bucket: `rate` messages a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.last = burst, clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class BadMessage(ValueError):
    """A client message that is refused; its text is the reason sent back."""


def decode_upload(data) -> Image.Image:
    """A data URL (or bare base64) of an image -> an RGB PIL image, within the byte and pixel
    limits, in one of UPLOAD_FORMATS; BadMessage otherwise."""
    if not isinstance(data, str) or not data:
        raise BadMessage("image: 'data' must be a data URL string (data:image/...;base64,...)")
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if not head.startswith("data:image/") or not head.endswith(";base64"):
            raise BadMessage(f"image: not a base64 image data URL ({head[:40]!r})")
    if len(data) > 4 * math.ceil(MAX_UPLOAD_BYTES / 3) + 4:
        raise BadMessage(f"image: larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadMessage("image: the data is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw), formats=UPLOAD_FORMATS) as image:
            if image.width * image.height > MAX_UPLOAD_PIXELS:
                raise BadMessage(f"image: {image.width} x {image.height} pixels is more than "
                                 f"{MAX_UPLOAD_PIXELS} pixels")
            image.load()
            return image.convert("RGB")
    except BadMessage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise BadMessage(f"image: not a readable {'/'.join(UPLOAD_FORMATS)} image "
                         f"({type(error).__name__})") from None


class Session:
    """One player's connections: WebSockets (input; frames with ?frames=ws) and MJPEG streams."""

    def __init__(self, key: str, player: Player):
        self.key, self.player = key, player
        self.sockets: Set["Connection"] = set()
        self.streams: Set[asyncio.Queue] = set()
        self.linger: Optional[asyncio.TimerHandle] = None

    def connections(self) -> int:
        return len(self.sockets) + len(self.streams)


class Connection:
    """One WebSocket: its outgoing messages (bounded for frames) and the task that sends them."""

    def __init__(self, websocket: WebSocket, wants_frames: bool, metrics: PlayMetrics):
        self.websocket, self.wants_frames, self.metrics = websocket, wants_frames, metrics
        self.frames: deque = deque()
        self.texts: deque = deque()
        self.ready = asyncio.Event()
        self.limit = RateLimit(rate=120, burst=240)
        self.last_rate_warning = 0.0
        self.flood = 0

    def text(self, message: dict):
        self.texts.append(json.dumps(message))
        self.ready.set()

    def frames_of(self, batch: FrameBatch):
        if not self.wants_frames:
            return
        for index, jpeg in enumerate(batch.jpegs):
            self.frames.append((batch, index, jpeg))
        dropped = 0
        while len(self.frames) > QUEUED_FRAMES:
            self.frames.popleft()
            dropped += 1
        if dropped:
            self.metrics.frames_dropped.inc(dropped)
        self.ready.set()

    async def close_with(self, code: int, message: dict):
        """Send `message` (ahead of anything queued) and close the socket with `code`."""
        self.frames.clear()
        self.texts.clear()
        try:
            await self.websocket.send_text(json.dumps(message))
            await self.websocket.close(code=code)
        except Exception:  # the client went away first
            pass

    async def send_loop(self, epoch: float):
        ws = self.websocket
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.texts:
                await ws.send_text(self.texts.popleft())
            while self.frames:
                batch, index, jpeg = self.frames.popleft()
                header = FRAME_HEADER.pack(
                    FRAME_MAGIC, batch.block, index, len(batch.jpegs), batch.input_id,
                    1e3 * (batch.block_start - epoch), 1e3 * (batch.frames_ready - epoch),
                    1e3 * (time.perf_counter() - epoch))
                await ws.send_bytes(header + jpeg)
                self.metrics.frames_sent.inc()
                if self.texts:  # control messages do not wait behind a block of frames
                    break
            if self.texts or self.frames:
                self.ready.set()


class PlayServer:
    """The web app over an engine. `token`: required from every client when set."""

    def __init__(self, engine: GameEngine, metrics: PlayMetrics, token: Optional[str] = None,
                 play_mode: str = "continuous", idle_timeout_s: float = 300.0,
                 linger_s: float = 5.0):
        if play_mode not in PLAY_MODES:
            raise ValueError(f"unknown play mode {play_mode!r}; choose from {', '.join(PLAY_MODES)}")
        self.engine, self.metrics, self.token = engine, metrics, token
        self.play_mode, self.idle_timeout_s, self.linger_s = play_mode, idle_timeout_s, linger_s
        self.sessions: Dict[str, Session] = {}
        self.epoch = time.perf_counter()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        static = resources.files("wan.play") / "static"
        self.app = Starlette(routes=[
            Route("/", self.index),
            Route("/stream", self.stream),
            Route("/health", self.health),
            Route("/metrics", self.metrics_page),
            Route("/start-image", self.start_image),
            WebSocketRoute("/ws", self.websocket),
            Mount("/static", app=StaticFiles(directory=str(static)), name="static"),
        ], lifespan=self.lifespan)

    # lifespan --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.loop = asyncio.get_running_loop()
        started_here = self.engine._thread is None  # an engine may outlive its server (tests)
        if started_here:
            await asyncio.to_thread(self.engine.start)
        log.info("serving: %s", self.engine.describe())
        watchdog = asyncio.create_task(self._watch_idle())
        try:
            yield
        finally:
            watchdog.cancel()
            for session in list(self.sessions.values()):
                self._end(session)
            if started_here:
                self.engine.stop()

    async def _watch_idle(self):
        while True:
            await asyncio.sleep(min(1.0, self.idle_timeout_s / 4))
            now = time.perf_counter()
            for session in list(self.sessions.values()):
                if now - session.player.last_input > self.idle_timeout_s:
                    log.info("session %s idle for %.0f s: closed", session.key, self.idle_timeout_s)
                    for connection in list(session.sockets):
                        await connection.close_with(1000, {
                            "type": "idle",
                            "reason": f"no input for {self.idle_timeout_s:.0f} s: the game was closed"})
                    self._end(session)

    # access ----------------------------------------------------------------------------------
    def _authorized(self, conn) -> bool:
        if self.token is None:
            return True
        given = conn.query_params.get("token") or conn.cookies.get("wan_token") or ""
        return secrets.compare_digest(given.encode(), self.token.encode())

    def _session_key(self, conn) -> str:
        for key in (conn.query_params.get("session"), conn.cookies.get("wan_session")):
            if key and SESSION_ID.match(key):
                return key
        return secrets.token_urlsafe(12)

    def _session(self, key: str, play_mode: str) -> Session:
        """The session of `key`, made (a new player) if there is none; ServerFull at capacity."""
        session = self.sessions.get(key)
        if session is None:
            player = self.engine.add_player(
                play_mode, sink=lambda batch, key=key: self._from_worker(self._frames, key, batch),
                on_event=lambda event, key=key: self._from_worker(self._event, key, event))
            session = self.sessions[key] = Session(key, player)
            log.info("session %s joined (%s): %d of %s players", key, play_mode,
                     self.engine.player_count(), self.engine.capacity)
        if session.linger is not None:
            session.linger.cancel()
            session.linger = None
        return session

    def _release(self, session: Session):
        """A connection of `session` closed: when it was the last, end the game after the linger
        time (a reloaded page finds its game)."""
        if session.connections() == 0 and session.key in self.sessions:
            if self.linger_s <= 0:
                self._end(session)
            else:
                session.linger = self.loop.call_later(self.linger_s, self._end_if_unused, session)

    def _end_if_unused(self, session: Session):
        if session.connections() == 0:
            self._end(session)

    def _end(self, session: Session):
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            self.engine.remove_player(session.player)
            self.metrics.forget(session.player)
            log.info("session %s ended: %d players", session.key, self.engine.player_count())

    # from the worker thread ------------------------------------------------------------------
    def _from_worker(self, handler, key, item):
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(handler, key, item)

    def _frames(self, key: str, batch: FrameBatch):
        session = self.sessions.get(key)
        if session is None:
            return
        player = session.player
        stats = {"type": "stats", "fps": round(player.fps(time.perf_counter()), 2),
                 "latency": round(batch.block_ms, 1), "players": self.engine.player_count(),
                 "capacity": self.engine.capacity, "block": batch.block,
                 "block_ms": round(batch.block_ms, 1), "encode_ms": round(batch.encode_ms, 2),
                 "wait_ms": round(batch.wait_ms, 1), "input_id": batch.input_id}
        for connection in session.sockets:
            connection.frames_of(batch)
            connection.text(stats)
        for stream in session.streams:
            for jpeg in batch.jpegs:
                if stream.full():
                    stream.get_nowait()
                    self.metrics.frames_dropped.inc()
                stream.put_nowait(jpeg)

    def _event(self, key: str, event: dict):
        session = self.sessions.get(key)
        for connection in (session.sockets if session else ()):
            connection.text(event)

    # routes ----------------------------------------------------------------------------------
    async def index(self, request: Request):
        if not self._authorized(request):
            return Response("wrong or missing access token: open the URL the server printed "
                            "(…/?token=…)\n", status_code=401, media_type="text/plain")
        page = (resources.files("wan.play") / "static" / "index.html").read_text()
        response = HTMLResponse(page)
        if not SESSION_ID.match(request.cookies.get("wan_session", "")):
            response.set_cookie("wan_session", secrets.token_urlsafe(12), samesite="strict",
                                httponly=True)
        if self.token is not None and request.query_params.get("token"):
            response.set_cookie("wan_token", self.token, samesite="strict", httponly=True)
        return response

    async def health(self, request: Request):
        engine = self.engine
        failed = engine.failure is not None
        return JSONResponse({
            "status": "failed" if failed else "ok",
            "error": repr(engine.failure) if failed else None,
            "players": engine.player_count(), "capacity": engine.capacity,
            "mode": engine.space.mode, "preset": engine.preset, "device": str(engine.device),
            "demo": engine.demo, "conditioning": engine.conditioner.name,
            "jpeg": engine.encoder.where, "steady_block_ms": engine.steady_block_ms,
            "play_mode": self.play_mode}, status_code=503 if failed else 200)

    async def metrics_page(self, request: Request):
        if not self._authorized(request):
            return Response("wrong or missing access token\n", status_code=401)
        return Response(self.metrics.render(self.engine),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def start_image(self, request: Request):
        return Response(png_bytes(self.engine.default_image), media_type="image/png")

    async def stream(self, request: Request):
        if not self._authorized(request):
            return Response("wrong or missing access token\n", status_code=401)
        play_mode = request.query_params.get("play", self.play_mode)
        if play_mode not in PLAY_MODES:
            return Response(f"unknown play mode {play_mode!r}\n", status_code=400)
        try:
            session = self._session(self._session_key(request), play_mode)
        except ServerFull as full:
            self.metrics.refused_players.inc()
            return Response(f"{full}\n", status_code=503, media_type="text/plain")
        frames: asyncio.Queue = asyncio.Queue(maxsize=QUEUED_FRAMES)
        session.streams.add(frames)

        async def parts():
            period = 1.0 / 25
            next_time = time.perf_counter()
            last = None
            try:
                while True:
                    try:
                        jpeg = await asyncio.wait_for(frames.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if last is None:
                            continue
                        jpeg = last  # keep the connection alive with the last picture
                    last = jpeg
                    delay = next_time - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_time = max(next_time + period, time.perf_counter() - 2 * period)
                    yield (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                           + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
            finally:
                session.streams.discard(frames)
                self._release(session)

        return StreamingResponse(parts(), media_type="multipart/x-mixed-replace; boundary=frame")

    async def websocket(self, websocket: WebSocket):
        if not self._authorized(websocket):
            await websocket.close(code=1008, reason="wrong or missing access token")
            return
        play_mode = websocket.query_params.get("play", self.play_mode)
        await websocket.accept()
        if play_mode not in PLAY_MODES:
            await websocket.send_json({"type": "error", "reason": f"unknown play mode "
                                       f"{play_mode!r}; choose from {', '.join(PLAY_MODES)}"})
            await websocket.close(code=1008)
            return
        try:
            session = self._session(self._session_key(websocket), play_mode)
        except ServerFull as full:
            self.metrics.refused_players.inc()
            await websocket.send_json({"type": "full", "reason": str(full),
                                       "players": self.engine.player_count(),
                                       "capacity": self.engine.capacity})
            await websocket.close(code=1013, reason="server full")
            return
        connection = Connection(websocket, websocket.query_params.get("frames") == "ws",
                                self.metrics)
        session.sockets.add(connection)
        engine = self.engine
        connection.text({
            "type": "hello", "session": session.key, "player": session.player.id,
            "play_mode": session.player.play_mode, "controls": engine.space.describe(),
            "players": engine.player_count(), "capacity": engine.capacity, "demo": engine.demo,
            "conditioning": engine.conditioner.name, "frame_size": list(engine.frame_size),
            "fps": 25, "clock_epoch_s": self.epoch})  # perf_counter of the frames' time 0
        sender = asyncio.create_task(connection.send_loop(self.epoch))
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    await self._handle(session, connection, message)
                except BadMessage as bad:
                    self.metrics.rejected.labels(str(bad).split(":")[0][:24]).inc()
                    connection.text({"type": "error", "reason": str(bad)})
                if connection.flood > 1000:
                    await connection.close_with(1008, {"type": "error",
                                                       "reason": "too many messages: closed"})
                    break
        except WebSocketDisconnect:
            pass
        finally:
            sender.cancel()
            session.sockets.discard(connection)
            self._release(session)

    async def _handle(self, session: Session, connection: Connection, message: dict):
        if message.get("bytes") is not None:
            raise BadMessage("binary: messages to the server are JSON text")
        text = message.get("text") or ""
        if not connection.limit.allow():
            connection.flood += 1
            now = time.monotonic()
            if now - connection.last_rate_warning > 1.0:
                connection.last_rate_warning = now
                raise BadMessage(f"rate limit: at most {connection.limit.rate:.0f} messages a "
                                 f"second; messages dropped")
            return
        connection.flood = 0
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise BadMessage(f"json: not valid JSON ({error.msg} at {error.pos})") from None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise BadMessage("json: a message is an object with a string 'type'")
        if len(text) > MAX_CONTROL_BYTES and data["type"] != "image":
            raise BadMessage(f"size: messages other than an image upload are at most "
                             f"{MAX_CONTROL_BYTES} bytes ({len(text)} given)")
        kind = data["type"]
        player, engine = session.player, self.engine
        received = time.perf_counter()
        if kind == "keyboard":
            key = data.get("key")
            if not isinstance(key, str) or not key:
                raise BadMessage("keyboard: 'key' must be a key name such as \"w\"")
            try:
                player.input.tap(key, player.input.input_id + 1, received)
            except ValueError as error:
                raise BadMessage(f"key: {error}") from None
            engine.press(player)
        elif kind == "input":
            keys, mouse, input_id = data.get("keys", []), data.get("mouse"), data.get("id")
            if not isinstance(input_id, int) or isinstance(input_id, bool) or input_id < 0:
                raise BadMessage("input: 'id' must be a non-negative integer")
            if not isinstance(keys, list) or len(keys) > MAX_KEYS or \
                    not all(isinstance(k, str) for k in keys):
                raise BadMessage(f"input: 'keys' must be a list of at most {MAX_KEYS} key names")
            if mouse is not None and not (
                    isinstance(mouse, list) and len(mouse) == 2 and all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        and abs(v) <= MAX_MOUSE for v in mouse)):
                raise BadMessage(f"input: 'mouse' must be [dx, dy], finite, |value| <= "
                                 f"{MAX_MOUSE:.0f} pixels")
            try:
                pressed = player.input.hold(keys, input_id, received)
            except ValueError as error:
                raise BadMessage(f"key: {error}") from None
            if mouse is not None:
                player.input.move(float(mouse[0]), float(mouse[1]), input_id, received)
            if pressed:  # a key went down
                engine.press(player)
            else:
                player.last_input = received
        elif kind == "image":
            image = await asyncio.to_thread(decode_upload, data.get("data"))
            player.last_input = received
            engine.new_game(player, image)
            connection.text({"type": "image", "size": [image.width, image.height]})
        elif kind == "reset":
            player.last_input = received
            engine.new_game(player)
        elif kind == "ping":
            connection.text({"type": "pong", "t": data.get("t"),
                             "server_ms": 1e3 * (received - self.epoch)})
        else:
            raise BadMessage(f"type: unknown message type {kind[:32]!r}; known: keyboard, input, "
                             f"image, reset, ping")


class ServerThread:
    """A PlayServer served by uvicorn in a background thread on `host:port` (0: a free port):
    for tests and benchmarks that drive the server from the same process.

        with ServerThread(server) as running:
            running.http, running.ws   # http://127.0.0.1:PORT, ws://127.0.0.1:PORT/ws
    """

    def __init__(self, server: "PlayServer", host: str = "127.0.0.1", port: int = 0,
                 start_timeout_s: float = 600.0):
        self.server, self.host, self.port = server, host, port
        self.start_timeout_s = start_timeout_s

    def __enter__(self):
        import socket
        import threading
        import uvicorn
        if self.port == 0:
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            self.server.app, host=self.host, port=self.port, ws_max_size=WS_MAX_SIZE,
            log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, name="wan-play-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the play server did not start (see the log above)")
            time.sleep(0.05)
        self.http = f"http://{self.host}:{self.port}"
        self.ws = f"ws://{self.host}:{self.port}/ws"
        return self

    def __exit__(self, *exc):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=60)
