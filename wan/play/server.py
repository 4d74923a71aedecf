"""The play server's web side: Starlette routes over a `GameEngine` (wan/play/engine.py).

Starlette (the ASGI toolkit FastAPI is built on) with uvicorn: WebSockets, streaming responses,
static files and a lifespan are all this server needs; FastAPI would add request models and
OpenAPI docs for an API of a few routes.

Routes:
* `GET /`: the page (static/index.html); sets the `wan_session` cookie that ties one browser's
  `/ws` and `/stream` together (the seed server's page uses both), and `wan_token` when a valid
  `?token=` came with it.
* `WS /ws`: a player's input, and its frames when asked for (`?frames=ws`; this package's page).
  `?session=<id>` names the session (the page sends one per tab; otherwise the cookie, else a new
  one per connection), `?play=continuous|on-input` its mode of play. A `/ws` connection is what
  starts a game.
* `GET /stream`: the frames of an existing session's game as MJPEG
  (`multipart/x-mixed-replace; boundary=frame`), paced at 25 fps: the seed server's viewer. It
  joins the game of its session (`?session=` or the cookie) and never starts one: without a
  session id 409, without a game for it (after waiting `stream_wait_s`, 5 s, for its page's
  `/ws`) 404, each with a line of text saying so.
* `GET /health` (JSON), `GET /metrics` (Prometheus text), `GET /start-image` (the built-in
  start image, PNG), `/static/...` (the page's files).
* `GET /livez`: a bare liveness probe: `ok` (200) or `failed` (503, the GPU worker stopped),
  nothing else; the one route that needs no token.

Access: when the server has a token (`--token`, or generated for a non-loopback `--host`), every
route but `/livez` needs it: `?token=...` or the `wan_token` cookie that `GET /?token=...` sets
(so the page's own requests carry it). Otherwise 401 (a WebSocket: refused with 401 before the
handshake). Wrong tokens are throttled per client address: after TOKEN_FAILURES (10) wrong ones
within TOKEN_WINDOW_S (60 s) every request from that address gets 429 (with Retry-After) for
TOKEN_LOCKOUT_S (60 s), the right token included. A connection must send its request headers
within `header_timeout_s` (10 s; `--header-timeout`) of opening, or of its previous response:
otherwise 408 and closed (uvicorn itself only times out idle keep-alive connections).

Messages from the client (JSON text; each refused one gets {"type": "error", "reason": ...}
starting with the check that refused it ("json:", "size:", "input:", ...) and changes nothing
else; the connection goes on):
* `{"type": "keyboard", "key": "w", "timestamp": ms}`: the seed server's: one key press, acting
  for one block (on-input play: that block is made now);
* `{"type": "input", "id": n, "keys": ["w", "l"], "mouse": [dx, dy], "shown": [block, frame,
  ms]}`: `shown` (optional) the frame on screen when the input was made and how many ms it had
  been (reactive play splices a re-made block after it); the held keys (the whole
  set) and mouse motion in pixels since the last message; `id` (0 to 2^32 - 1, as the frame
  header carries it) grows with every message;
* `{"type": "image", "data": "data:image/png;base64,..."}`: a new start image (a new game). It
  is decoded off the event loop, one at a time per connection: an image that arrives while
  another is decoded waits, and a newer one replaces it (`{"type": "image", "replaced": true}`
  for the one replaced); a decoded one is answered `{"type": "image", "size": [w, h]}`;
* `{"type": "reset"}` a new game; `{"type": "ping", "t": ...}` answered with a pong.
Limits, checked before a message is parsed: an image message is at most MAX_IMAGE_MESSAGE
characters and any other MAX_CONTROL_BYTES (4096); at most MAX_JSON_CONTAINERS (32) objects and
arrays in a message (so nothing nests deeper); numbers of at most MAX_NUMBER_CHARS (32)
characters, no NaN or Infinity; text frames must be UTF-8 (else closed with 1007, one log line).
More than 120 messages a second are dropped (with one error a second), a sustained flood closes
the connection (1008).
To the client: `{"type": "hello", ...}` first (session, mode, keys, players), `{"fps", "latency",
"players", ...}` after each block (the seed's stats message, with more fields), `error` (also
when a block of the game held NaN or inf: the block is not sent, the reason names it, and a
`game` message for the new game follows; wan/play/engine.py), `game` (a game started),
`full` (then the socket closes with 1013), and, with `?frames=ws`, one binary message per frame.
If sending to a connection fails for any other reason than the client going away, the
connection is closed (1011, with an error message) and its game ended, with a log line.

The frame message: a 40-byte little-endian header `FRAME_HEADER` (magic b"WANF", block, frame
index within the block, frames in the block, id of the newest input the block read, then the
block's start, frames-ready and send times in ms on the server's clock) followed by the JPEG.
Reactive play: the engine may hand over a block's frames in parts (a `FrameBatch` whose
`first_frame` > 0: its JPEGs are the block's frames first_frame, first_frame + 1, ...) and may
make a block again (`remake`): the frames of a batch with first_frame > 0 or remake replace the
frames of the same block of the same game, from index first_frame on, that the connection has
not sent yet (those are dropped; frames already sent stay sent), so a client may receive a frame
index again: the newer one replaces the older on screen. "Frames in the block" is the block's
whole count (the batch's `frames_in_block`). The MJPEG `/stream` queues its frames the same way.
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
from collections import OrderedDict, deque
from importlib import resources
from typing import Deque, Dict, Optional, Set, Tuple

from PIL import Image, UnidentifiedImageError
from starlette import websockets as _starlette_websockets
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, \
    StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from .conditioning import png_bytes
from .engine import PLAY_MODES, FrameBatch, GameEngine, Player, ServerFull
from .metrics import PlayMetrics

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct("<4sIHHIddd")
FRAME_MAGIC = b"WANF"
MAX_INPUT_ID = 2**32 - 1               # the header's input id field (uint32)
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_CONTROL_BYTES = 4096               # any message but an image
MAX_UPLOAD_BYTES = 8 * 2**20           # an image message's decoded bytes
MAX_UPLOAD_PIXELS = 4096 * 4096
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
# an image message: the base64 of MAX_UPLOAD_BYTES and room for its data URL head and JSON
MAX_IMAGE_MESSAGE = 4 * math.ceil(MAX_UPLOAD_BYTES / 3) + 4096
WS_MAX_SIZE = 12 * 2**20               # the transport's own limit (base64 of the upload + slack)
WS_MAX_QUEUE = 8                       # messages the transport holds for a connection
MAX_JSON_CONTAINERS = 32               # objects and arrays in one message (bounds the nesting)
MAX_NUMBER_CHARS = 32                  # characters of one JSON number
MAX_KEYS, MAX_MOUSE = 16, 10_000.0
GRACEFUL_SHUTDOWN_S = 5.0              # on SIGTERM: connections still open after this are closed
QUEUED_FRAMES = 24                     # per connection; a slow client loses its oldest frames
TOKEN_FAILURES, TOKEN_WINDOW_S, TOKEN_LOCKOUT_S = 10, 60.0, 60.0
HEADER_TIMEOUT_S = 10.0                # a connection's request headers, from its opening
STREAM_WAIT_S = 5.0                    # /stream waits this long for its page's /ws to start
_IMAGE_TYPE = re.compile(r'"type"\s*:\s*"image"')
_CLIENT_GONE = (WebSocketDisconnect, OSError,
                getattr(_starlette_websockets, "WebSocketDisconnected", WebSocketDisconnect))


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


def _json_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise BadMessage(f"json: a number has at most {MAX_NUMBER_CHARS} characters "
                         f"({len(text)} given)")
    return int(text)


def _json_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise BadMessage(f"json: a number has at most {MAX_NUMBER_CHARS} characters "
                         f"({len(text)} given)")
    return float(text)


def _json_constant(name: str):
    raise BadMessage(f"json: {name} is not a JSON number")


def parse_message(text) -> dict:
    """A client's text message -> its JSON object with a string 'type', within the limits
    (checked before parsing: its size, its objects and arrays); BadMessage otherwise. Never
    raises anything else for any text."""
    if not isinstance(text, str):
        raise BadMessage("json: messages to the server are JSON text")
    if len(text) > MAX_CONTROL_BYTES:
        if len(text) > MAX_IMAGE_MESSAGE:
            raise BadMessage(f"size: a message is at most {MAX_IMAGE_MESSAGE} bytes (an image "
                             f"of {MAX_UPLOAD_BYTES // 2**20} MiB; {len(text)} given)")
        # only an image is larger: its type, looked for at either end before any parsing
        if not (_IMAGE_TYPE.search(text, 0, 256) or _IMAGE_TYPE.search(text, len(text) - 256)):
            raise BadMessage(f"size: messages other than an image upload are at most "
                             f"{MAX_CONTROL_BYTES} bytes ({len(text)} given)")
    containers = text.count("{") + text.count("[")
    if containers > MAX_JSON_CONTAINERS:
        raise BadMessage(f"json: at most {MAX_JSON_CONTAINERS} objects and arrays in a message "
                         f"({containers} given)")
    try:
        data = json.loads(text, parse_int=_json_int, parse_float=_json_float,
                          parse_constant=_json_constant)
    except BadMessage:
        raise
    except json.JSONDecodeError as error:
        raise BadMessage(f"json: not valid JSON ({error.msg} at {error.pos})") from None
    except (ValueError, RecursionError, MemoryError, OverflowError) as error:
        raise BadMessage(f"json: not valid JSON ({type(error).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise BadMessage("json: a message is an object with a string 'type'")
    if len(text) > MAX_CONTROL_BYTES and data["type"] != "image":
        raise BadMessage(f"size: messages other than an image upload are at most "
                         f"{MAX_CONTROL_BYTES} bytes ({len(text)} given)")
    return data


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


# frames --------------------------------------------------------------------------------------
def batch_layout(batch) -> Tuple[int, bool, int]:
    """(first_frame, remake, frames_in_block) of a FrameBatch; batches without the fields (an
    engine before reactive play) are whole blocks."""
    first = int(getattr(batch, "first_frame", 0) or 0)
    remake = bool(getattr(batch, "remake", False))
    total = getattr(batch, "frames_in_block", None)
    return first, remake, int(total) if total else first + len(batch.jpegs)


def queue_frames(frames: deque, batch, limit: int) -> Tuple[int, int]:
    """Append `batch`'s frames to `frames` as (batch, frame index, jpeg); a batch with
    first_frame > 0 or remake first removes the queued frames of its block (same block, same
    game) from index first_frame on. Then the oldest beyond `limit` go. (replaced, dropped)."""
    first, remake, _ = batch_layout(batch)
    replaced = 0
    if first > 0 or remake:
        game = getattr(batch, "game", None)
        kept = [item for item in frames if not (
            item[0].block == batch.block and getattr(item[0], "game", None) == game
            and item[1] >= first)]
        replaced = len(frames) - len(kept)
        if replaced:
            frames.clear()
            frames.extend(kept)
    for i, jpeg in enumerate(batch.jpegs):
        frames.append((batch, first + i, jpeg))
    dropped = 0
    while len(frames) > limit:
        frames.popleft()
        dropped += 1
    return replaced, dropped


class StreamQueue:
    """The frames waiting for one MJPEG `/stream` response (queued as a connection's are)."""

    def __init__(self, limit: int = QUEUED_FRAMES):
        self.frames: Deque[tuple] = deque()
        self.limit = limit
        self.ready = asyncio.Event()
        self.closed = False

    def put(self, batch) -> int:
        _, dropped = queue_frames(self.frames, batch, self.limit)
        self.ready.set()
        return dropped

    def close(self):
        self.closed = True
        self.ready.set()

    async def get(self, timeout: float) -> Optional[bytes]:
        """The next JPEG; None after `timeout` s without one or once closed."""
        if not self.frames and not self.closed:
            self.ready.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ready.wait(), timeout)
        if self.closed or not self.frames:
            return None
        return self.frames.popleft()[2]


class Session:
    """One player's connections: WebSockets (input; frames with ?frames=ws) and MJPEG streams."""

    def __init__(self, key: str, player: Player):
        self.key, self.player = key, player
        self.sockets: Set["Connection"] = set()
        self.streams: Set[StreamQueue] = set()
        self.linger: Optional[asyncio.TimerHandle] = None

    def connections(self) -> int:
        return len(self.sockets) + len(self.streams)


class Connection:
    """One WebSocket: its outgoing messages (bounded for frames), the task that sends them, and
    the start image waiting to be decoded (one at most: a newer one replaces it)."""

    def __init__(self, websocket: WebSocket, wants_frames: bool, metrics: PlayMetrics):
        self.websocket, self.wants_frames, self.metrics = websocket, wants_frames, metrics
        self.frames: deque = deque()
        self.texts: deque = deque()
        self.ready = asyncio.Event()
        self.limit = RateLimit(rate=120, burst=240)
        self.last_rate_warning = 0.0
        self.flood = 0
        self.replaced = 0  # frames replaced by a re-made block's before they were sent
        self.pending_image: Optional[Tuple[object, float]] = None  # (data, time received)
        self.decoder: Optional[asyncio.Task] = None
        self.closed = False
        self.internal_errors = 0

    def text(self, message: dict):
        self.texts.append(json.dumps(message))
        self.ready.set()

    def frames_of(self, batch: FrameBatch):
        if not self.wants_frames:
            return
        replaced, dropped = queue_frames(self.frames, batch, QUEUED_FRAMES)
        self.replaced += replaced
        if dropped:
            self.metrics.frames_dropped.inc(dropped)
        self.ready.set()

    async def close_with(self, code: int, message: dict):
        """Send `message` (ahead of anything queued) and close the socket with `code`."""
        self.frames.clear()
        self.texts.clear()
        self.closed = True
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
                _, _, total = batch_layout(batch)
                header = FRAME_HEADER.pack(
                    FRAME_MAGIC, batch.block, index, total, batch.input_id,
                    1e3 * (batch.block_start - epoch), 1e3 * (batch.frames_ready - epoch),
                    1e3 * (time.perf_counter() - epoch))
                await ws.send_bytes(header + jpeg)
                self.metrics.frames_sent.inc()
                if self.texts:  # control messages do not wait behind a block of frames
                    break
            if self.texts or self.frames:
                self.ready.set()


class TokenThrottle:
    """Wrong access tokens per client address: after `failures` within `window_s`, the address
    is refused for `lockout_s`. Remembers `max_addresses` addresses at most."""

    def __init__(self, failures: int = TOKEN_FAILURES, window_s: float = TOKEN_WINDOW_S,
                 lockout_s: float = TOKEN_LOCKOUT_S, max_addresses: int = 4096,
                 clock=time.monotonic):
        self.failures, self.window_s, self.lockout_s = failures, window_s, lockout_s
        self.max_addresses, self.clock = max_addresses, clock
        self.seen: "OrderedDict[str, Tuple[deque, float]]" = OrderedDict()

    def blocked_for(self, address: str) -> float:
        """Seconds `address` is still refused (0: it is not)."""
        entry = self.seen.get(address)
        return max(0.0, entry[1] - self.clock()) if entry else 0.0

    def fail(self, address: str) -> bool:
        """Count a wrong token from `address`; True when this one blocks it."""
        now = self.clock()
        times, until = self.seen.pop(address, (deque(), 0.0))
        times.append(now)
        while times and now - times[0] > self.window_s:
            times.popleft()
        blocks = len(times) >= self.failures
        if blocks:
            times.clear()
            until = now + self.lockout_s
        self.seen[address] = (times, until)
        while len(self.seen) > self.max_addresses:
            self.seen.popitem(last=False)
        return blocks


class TokenGate:
    """ASGI middleware: the token on every HTTP and WebSocket request but `open_paths`, and the
    throttle of wrong ones."""

    def __init__(self, app, token: Optional[str], throttle: TokenThrottle,
                 open_paths=("/livez",)):
        self.app, self.token, self.throttle, self.open_paths = app, token, throttle, open_paths

    async def __call__(self, scope, receive, send):
        if (self.token is None or scope["type"] not in ("http", "websocket")
                or scope.get("path") in self.open_paths):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        address = conn.client.host if conn.client else "unknown"
        blocked = self.throttle.blocked_for(address)
        if blocked > 0:
            wait = math.ceil(blocked)
            await self._refuse(scope, receive, send, 429,
                               f"too many wrong access tokens from {address}: try again in "
                               f"{wait} s\n", {"Retry-After": str(wait)})
            return
        given = conn.query_params.get("token") or conn.cookies.get("wan_token") or ""
        if secrets.compare_digest(given.encode(), self.token.encode()):
            await self.app(scope, receive, send)
            return
        if given and self.throttle.fail(address):
            log.warning("%s: %d wrong access tokens within %.0f s: refused for %.0f s", address,
                        self.throttle.failures, self.throttle.window_s, self.throttle.lockout_s)
        text = ("wrong or missing access token: open the URL the server printed (…/?token=…)\n"
                if scope.get("path") == "/" else "wrong or missing access token\n")
        await self._refuse(scope, receive, send, 401, text)

    @staticmethod
    async def _refuse(scope, receive, send, status: int, text: str, headers=None):
        response = PlainTextResponse(text, status_code=status, headers=headers)
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        websocket = WebSocket(scope, receive, send)
        if "websocket.http.response" in scope.get("extensions", {}):
            await websocket.send_denial_response(response)
        else:
            await websocket.close(code=1008, reason=text.strip()[:120])


class _ClientFrameLog(logging.Filter):
    """uvicorn logs a client's text frame that is not UTF-8 with a traceback at ERROR: one
    WARNING line instead (the connection is closed with 1007 all the same)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UnicodeDecodeError):
            error = record.exc_info[1]
            record.msg = "a client's text frame is not UTF-8 (%s): connection closed (1007)"
            record.args = (error.reason,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_client_frame_errors():
    """Install the filter on uvicorn's error log (once)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _ClientFrameLog) for f in logger.filters):
        logger.addFilter(_ClientFrameLog())


def http_protocol(header_timeout_s: float = HEADER_TIMEOUT_S):
    """uvicorn's h11 protocol with a header timeout: a connection that has not sent a whole
    request head within `header_timeout_s` of opening (or of its previous response) while no
    request of it is being answered gets 408 and is closed. uvicorn (0.55) has no such timeout:
    its `timeout_keep_alive` starts after a response and any byte received cancels it, so a
    client that opens connections and trickles partial headers holds them forever. Pass it as
    `uvicorn.Config(http=...)`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc):
            self._cancel_header_timer()
            super().connection_lost(exc)

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None
                                                    or self.cycle.response_complete):
                self._arm_header_timer()

        def handle_websocket_upgrade(self, event):
            self._cancel_header_timer()  # the WebSocket protocol takes the connection
            super().handle_websocket_upgrade(event)

        def _arm_header_timer(self):
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self):
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered (a stream): its head came in time
            log.info("%s: no request headers within %.0f s: closed (408)",
                     "%s:%d" % self.client if self.client else "a client", header_timeout_s)
            body = f"no request headers within {header_timeout_s:g} s: closed\n".encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                                 b"Content-Type: text/plain\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
            self.transport.close()

    HeaderTimeoutProtocol.header_timeout_s = header_timeout_s
    return HeaderTimeoutProtocol


def uvicorn_config(app, host: str, port: int, header_timeout_s: float = HEADER_TIMEOUT_S,
                   **options):
    """The uvicorn.Config the play server runs under (the header timeout, the WebSocket limits)."""
    import uvicorn
    # on SIGTERM, open MJPEG responses (endless by design) are cut after this many seconds
    # instead of holding the process up forever (a rolling restart behind a proxy)
    options.setdefault("timeout_graceful_shutdown", GRACEFUL_SHUTDOWN_S)
    return uvicorn.Config(app, host=host, port=port, http=http_protocol(header_timeout_s),
                          ws_max_size=WS_MAX_SIZE, ws_max_queue=WS_MAX_QUEUE, **options)


class PlayServer:
    """The web app over an engine. `token`: required from every client when set (all routes but
    /livez). `stream_wait_s`: how long /stream waits for its session's game to start."""

    def __init__(self, engine: GameEngine, metrics: PlayMetrics, token: Optional[str] = None,
                 play_mode: str = "continuous", idle_timeout_s: float = 300.0,
                 linger_s: float = 5.0, stream_wait_s: float = STREAM_WAIT_S,
                 throttle: Optional[TokenThrottle] = None):
        if play_mode not in PLAY_MODES:
            raise ValueError(f"unknown play mode {play_mode!r}; choose from {', '.join(PLAY_MODES)}")
        self.engine, self.metrics, self.token = engine, metrics, token
        self.play_mode, self.idle_timeout_s, self.linger_s = play_mode, idle_timeout_s, linger_s
        self.stream_wait_s = stream_wait_s
        self.sessions: Dict[str, Session] = {}
        self.epoch = time.perf_counter()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._tasks: Set[asyncio.Task] = set()
        static = resources.files("wan.play") / "static"
        self.routes = Starlette(routes=[
            Route("/", self.index),
            Route("/livez", self.livez),
            Route("/stream", self.stream),
            Route("/health", self.health),
            Route("/metrics", self.metrics_page),
            Route("/start-image", self.start_image),
            WebSocketRoute("/ws", self.websocket),
            Mount("/static", app=StaticFiles(directory=str(static)), name="static"),
        ], lifespan=self.lifespan)
        self.throttle = throttle or TokenThrottle()
        self.app = TokenGate(self.routes, token, self.throttle)
        quiet_client_frame_errors()

    # lifespan --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.loop = asyncio.get_running_loop()
        # an engine may outlive its server (tests): stop it only if started here
        started_here = not self.engine.started()
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
                    await self._shut(session, 1000, {
                        "type": "idle",
                        "reason": f"no input for {self.idle_timeout_s:.0f} s: the game was closed"})

    # access ----------------------------------------------------------------------------------
    def _session_key(self, conn) -> Optional[str]:
        """The session id the request names (`?session=`, else the cookie), None if none."""
        for key in (conn.query_params.get("session"), conn.cookies.get("wan_session")):
            if key and SESSION_ID.match(key):
                return key
        return None

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
        self._keep(session)
        return session

    @staticmethod
    def _keep(session: Session):
        if session.linger is not None:
            session.linger.cancel()
            session.linger = None

    def _release(self, session: Session):
        """A connection of `session` closed: when it was the last, end the game after the linger
        time (a reloaded page finds its game)."""
        if session.connections() == 0 and self.sessions.get(session.key) is session:
            if self.linger_s <= 0:
                self._end(session)
            else:
                session.linger = self.loop.call_later(self.linger_s, self._end_if_unused, session)

    def _end_if_unused(self, session: Session):
        if session.connections() == 0:
            self._end(session)

    def _end(self, session: Session):
        """The session's game ends: its player leaves the engine, its MJPEG streams finish."""
        self._keep(session)
        for stream in session.streams:
            stream.close()
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            self.engine.remove_player(session.player)
            self.metrics.forget(session.player)
            log.info("session %s ended: %d players", session.key, self.engine.player_count())

    async def _shut(self, session: Session, code: int, message: dict):
        """Close every connection of `session` with `message` and end its game."""
        for connection in list(session.sockets):
            await connection.close_with(code, message)
        self._end(session)

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
            dropped = stream.put(batch)
            if dropped:
                self.metrics.frames_dropped.inc(dropped)

    def _event(self, key: str, event: dict):
        session = self.sessions.get(key)
        for connection in (session.sockets if session else ()):
            connection.text(event)

    # routes ----------------------------------------------------------------------------------
    async def index(self, request: Request):
        page = (resources.files("wan.play") / "static" / "index.html").read_text()
        response = HTMLResponse(page)
        if not SESSION_ID.match(request.cookies.get("wan_session", "")):
            response.set_cookie("wan_session", secrets.token_urlsafe(12), samesite="strict",
                                httponly=True)
        if self.token is not None and request.query_params.get("token"):  # the gate checked it
            response.set_cookie("wan_token", self.token, samesite="strict", httponly=True)
        return response

    async def livez(self, request: Request):
        """Liveness only: says nothing about the server but whether its worker runs."""
        if getattr(self.engine, "failure", None) is not None:
            return PlainTextResponse("failed\n", status_code=503)
        return PlainTextResponse("ok\n")

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
            "play_mode": self.play_mode, "reactive": engine.config.reactive,
            "remakes": dict(engine.remakes)}, status_code=503 if failed else 200)

    async def metrics_page(self, request: Request):
        return Response(self.metrics.render(self.engine),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def start_image(self, request: Request):
        return Response(png_bytes(self.engine.default_image), media_type="image/png")

    async def stream(self, request: Request):
        key = self._session_key(request)
        if key is None:
            return PlainTextResponse(
                "no session: /stream shows the game of a page's session (?session=<id> or the "
                "wan_session cookie that GET / sets); open the page first\n", status_code=409)
        session = self.sessions.get(key)
        deadline = time.monotonic() + self.stream_wait_s
        while session is None and time.monotonic() < deadline:  # the page's /ws may be opening
            await asyncio.sleep(0.05)
            session = self.sessions.get(key)
        if session is None:
            return PlainTextResponse(
                "no game for this session: /stream joins the game its page started on /ws "
                "and never starts one; open the page (GET /) and play, then load /stream\n",
                status_code=404)
        self._keep(session)
        frames = StreamQueue()
        session.streams.add(frames)

        async def parts():
            period = 1.0 / 25
            next_time = time.perf_counter()
            last = None
            try:
                while not frames.closed:
                    jpeg = await frames.get(timeout=1.0)
                    if jpeg is None:
                        if frames.closed or last is None:
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
        play_mode = websocket.query_params.get("play", self.play_mode)
        await websocket.accept()
        if play_mode not in PLAY_MODES:
            await websocket.send_json({"type": "error", "reason": f"unknown play mode "
                                       f"{play_mode!r}; choose from {', '.join(PLAY_MODES)}"})
            await websocket.close(code=1008)
            return
        try:
            session = self._session(self._session_key(websocket) or secrets.token_urlsafe(12),
                                    play_mode)
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
            "fps": 25, "clock_epoch_s": self.epoch,  # perf_counter of the frames' time 0
            "reactive": engine.config.reactive})
        sender = asyncio.create_task(connection.send_loop(self.epoch))
        sender.add_done_callback(
            lambda task: self._sender_done(session, connection, task))
        try:
            while not connection.closed:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    await self._handle(session, connection, message)
                except BadMessage as bad:
                    self._refused(connection, bad)
                except Exception as error:  # a bug: logged; this message is ignored, play goes on
                    connection.internal_errors += 1
                    log.error("session %s: a message could not be handled: %r", session.key,
                              error, exc_info=connection.internal_errors == 1)
                    connection.text({"type": "error", "reason": f"server: this message could "
                                     f"not be handled ({type(error).__name__}); it was ignored"})
                if connection.flood > 1000:
                    await connection.close_with(1008, {"type": "error",
                                                       "reason": "too many messages: closed"})
                    break
        except _CLIENT_GONE:
            pass
        finally:
            connection.closed = True
            sender.cancel()
            if connection.decoder is not None:
                connection.decoder.cancel()
            session.sockets.discard(connection)
            self._release(session)

    def _refused(self, connection: Connection, bad: BadMessage):
        self.metrics.rejected.labels(str(bad).split(":")[0][:24]).inc()
        connection.text({"type": "error", "reason": str(bad)})

    def _sender_done(self, session: Session, connection: Connection, task: asyncio.Task):
        """The send task of `connection` ended: quietly if the client went away (its receive
        loop ends too); for any other reason the connection is closed and the game ended."""
        if task.cancelled():
            return
        error = task.exception()
        if error is None or connection.closed or isinstance(error, _CLIENT_GONE):
            return
        log.error("session %s: sending to a connection failed (%s: %s): the connection is "
                  "closed and its game ended", session.key, type(error).__name__, error)
        shutting = asyncio.ensure_future(self._shut(session, 1011, {
            "type": "error", "reason": f"server: sending to this connection failed "
            f"({type(error).__name__}); the game was ended, reload to play again"}))
        self._tasks.add(shutting)  # held until done (the loop keeps only a weak reference)
        shutting.add_done_callback(self._tasks.discard)

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
        data = parse_message(text)
        kind = data["type"]
        player, engine = session.player, self.engine
        received = time.perf_counter()
        if kind == "keyboard":
            key = data.get("key")
            if not isinstance(key, str) or not key:
                raise BadMessage("keyboard: 'key' must be a key name such as \"w\"")
            if player.input.input_id >= MAX_INPUT_ID:
                raise BadMessage(f"keyboard: input ids reached {MAX_INPUT_ID}, the most a frame "
                                 f"header carries; reload the page")
            try:
                player.input.tap(key, player.input.input_id + 1, received)
            except ValueError as error:
                raise BadMessage(f"key: {error}") from None
            engine.press(player)
        elif kind == "input":
            keys, mouse, input_id = data.get("keys", []), data.get("mouse"), data.get("id")
            if not isinstance(input_id, int) or isinstance(input_id, bool) or \
                    not 0 <= input_id <= MAX_INPUT_ID:
                raise BadMessage(f"input: 'id' must be an integer from 0 to {MAX_INPUT_ID}")
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
            shown = data.get("shown")
            if shown is not None:
                if not (isinstance(shown, list) and len(shown) in (2, 3) and all(
                        isinstance(v, int) and not isinstance(v, bool) for v in shown)
                        and 0 <= shown[0] <= MAX_INPUT_ID and 0 <= shown[1] < 2**16
                        and (len(shown) == 2 or 0 <= shown[2] <= 1000)):
                    raise BadMessage("input: 'shown' must be [block, frame] of the frame on "
                                     "screen (integers from a frame header), optionally with "
                                     "the milliseconds since it was shown (0 to 1000)")
            if mouse is not None:
                player.input.move(float(mouse[0]), float(mouse[1]), input_id, received)
            if shown is not None:
                since = shown[2] / 1e3 if len(shown) == 3 else 0.0
                player.input.on_screen(shown[0], shown[1], received - since)
            if pressed:  # a key went down
                engine.press(player)
            else:
                player.last_input = received
            engine.input_changed(player)
        elif kind == "image":
            if connection.pending_image is not None:  # not decoded yet: this one replaces it
                connection.text({"type": "image", "replaced": True})
            connection.pending_image = (data.get("data"), received)
            if connection.decoder is None:
                connection.decoder = asyncio.create_task(self._decode_images(session, connection))
        elif kind == "reset":
            player.last_input = received
            engine.new_game(player)
        elif kind == "ping":
            connection.text({"type": "pong", "t": data.get("t"),
                             "server_ms": 1e3 * (received - self.epoch)})
        else:
            raise BadMessage(f"type: unknown message type {kind[:32]!r}; known: keyboard, input, "
                             f"image, reset, ping")

    async def _decode_images(self, session: Session, connection: Connection):
        """Decode the connection's start images, one at a time off the event loop; an image that
        a newer one replaced while it was decoded is not used."""
        try:
            while connection.pending_image is not None and not connection.closed:
                data, received = connection.pending_image
                connection.pending_image = None
                try:
                    image = await asyncio.to_thread(decode_upload, data)
                except BadMessage as bad:
                    self._refused(connection, bad)
                    continue
                if connection.closed or self.sessions.get(session.key) is not session:
                    return
                if connection.pending_image is not None:
                    connection.text({"type": "image", "replaced": True})
                    continue
                session.player.last_input = received
                self.engine.new_game(session.player, image)
                connection.text({"type": "image", "size": [image.width, image.height]})
        finally:
            connection.decoder = None


class ServerThread:
    """A PlayServer served by uvicorn in a background thread on `host:port` (0: a free port):
    for tests and benchmarks that drive the server from the same process.

        with ServerThread(server) as running:
            running.http, running.ws   # http://127.0.0.1:PORT, ws://127.0.0.1:PORT/ws
    """

    def __init__(self, server: "PlayServer", host: str = "127.0.0.1", port: int = 0,
                 start_timeout_s: float = 600.0, header_timeout_s: float = HEADER_TIMEOUT_S):
        self.server, self.host, self.port = server, host, port
        self.start_timeout_s, self.header_timeout_s = start_timeout_s, header_timeout_s

    def __enter__(self):
        import socket
        import threading
        import uvicorn
        if self.port == 0:
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn_config(
            self.server.app, self.host, self.port, self.header_timeout_s, log_level="warning"))
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
