"""Several play servers behind the nginx configuration of docs/PLAY_SERVER_PROXY.md, with real
clients over TLS.

Two `python -m wan.play --preset tiny --device cpu` processes (3 players each, no linger, one
token for both, as servers off loopback need) behind nginx running that guide's ```nginx block as
written (only its ports, certificate paths and the folders nginx writes to are replaced;
tests/proxy_nginx.py), with a self-signed certificate that the clients verify. What it checks:

* the README's block is a configuration nginx accepts (`nginx -t`);
* sticky sessions: one page (its `wan_session` cookie from GET /) has its `/ws` and `/stream`
  on the same server, pages land on both servers, and every request of a page goes to one
  upstream (nginx's access log);
* WebSockets pass the proxy over TLS: the hello, frames (binary) and stats arrive through it;
* a killed server (SIGKILL, a crash): its players' WebSockets and MJPEG streams are closed at
  once (not left hanging until a timeout), the other server's players keep getting blocks, and
  pages that come (or come back: the page reconnects with its cookie) land on the live server;
* a stopped server (SIGTERM, as a rolling restart does): its WebSockets are closed with 1012
  (service restart) through the proxy and the process exits; with an MJPEG viewer connected too;
* the servers see each client's own address through the proxy: a client guessing tokens is
  locked out (429), a client from another address is not (last: a lockout lasts a minute).

Skips when nginx (Debian: `apt-get install nginx`; `.ci/run` installs it) or openssl is missing.
Nothing runs as root: as root nginx is started as `nobody`.
"""
import asyncio
import http.client
import io
import json
import os
import pwd
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

from proxy_nginx import (Nginx, PlayProcess, client_tls, nginx_binary,  # noqa: E402
                         readme_nginx_block, runnable_config)

if nginx_binary() is None:
    pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it): the "
                "README's proxy configuration is not tested", allow_module_level=True)
if shutil.which("openssl") is None:
    pytest.skip("openssl is missing: no certificate for the proxy's TLS", allow_module_level=True)
if os.geteuid() == 0:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root with no 'nobody' user to run nginx as",
                    allow_module_level=True)

SERVER_ARGS = ["--max-players", "3", "--linger", "0", "--idle-timeout", "600"]
TOKEN = "proxy-test-token-5e1f"  # the servers need it (as they do off loopback): one for all
WAIT_S = 60            # any one "eventually" (a CPU block is ~0.3-1.5 s, slower on a busy machine)
CLOSED_WITHIN_S = 5.0  # a dead server's players know it within this


class Cluster:
    """Two play servers and nginx in front of them."""

    def __init__(self, folder):
        self.servers = [PlayProcess(folder, name, SERVER_ARGS, threads=1, token=TOKEN)
                        for name in "ab"]

    def start(self):
        for server in self.servers:
            server.start()
        self.proxy = Nginx([s.port for s in self.servers]).__enter__()
        self.tls = client_tls(self.proxy.cert)
        self.wss = f"wss://127.0.0.1:{self.proxy.port}/ws"
        return self

    def revive(self):
        """Start again the servers a test killed or stopped (same ports). nginx sends them
        nothing until the `fail_timeout` (10 s by default) of their last refused connection has
        passed: `pages_on_each` waits for that."""
        for server in self.servers:
            if not server.alive():
                server.start()

    def stop(self):
        self.proxy.__exit__()
        for server in self.servers:
            server.stop(timeout=10)

    def by_port(self, port: int) -> PlayProcess:
        return next(s for s in self.servers if s.port == port)

    # HTTPS through the proxy ---------------------------------------------------------------
    def get(self, path: str, session: str = None, source: str = None, cookies: bool = True):
        """(status, headers, body) of GET `path` through the proxy, with the page's cookies
        (its session, the token), from the address `source` (any of 127.0.0.0/8)."""
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.proxy.port, context=self.tls, timeout=WAIT_S,
            source_address=(source, 0) if source else None)
        try:
            connection.request("GET", path, headers=cookie_header(session) if cookies else {})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def new_page(self) -> str:
        """GET /?token=... through the proxy as a new browser: the session cookie it sets."""
        status, headers, body = self.get(f"/?token={TOKEN}", cookies=False)
        assert status == 200 and b"<canvas" in body
        cookies = dict(c.split(";")[0].split("=", 1) for c in headers.get_all("Set-Cookie"))
        assert cookies.get("wan_token", TOKEN) == TOKEN, cookies
        return cookies["wan_session"]

    def upstream_of(self, session: str) -> PlayProcess:
        """The server nginx sends `session`'s requests to: a GET /health with its cookie, and
        the upstream nginx's access log names for it (the last one tried)."""
        def lines():
            return [u for u, request, cookie in self.proxy.upstreams()
                    if cookie == session and request.startswith("GET /health")]
        before = len(lines())
        status, _, _ = self.get("/health", session)
        assert status == 200
        _wait_until(lambda: len(lines()) > before,  # the log line is written as the request ends
                    f"nginx's access log line for {session}", timeout=10)
        upstream = lines()[-1]
        return self.by_port(int(upstream.split(",")[-1].strip().rsplit(":", 1)[1]))

    def pages_on_each(self, count: int):
        """{server: [sessions]}: new pages until each server has `count` (the hash decides;
        a server nginx took out after a refused connection gets pages again after 10 s)."""
        placed = {server.name: [] for server in self.servers}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(len(v) >= count for v in placed.values()):
                return {s: placed[s.name][:count] for s in self.servers}
            session = self.new_page()
            placed[self.upstream_of(session).name].append(session)
            if sum(map(len, placed.values())) > 8:
                time.sleep(0.3)
        raise AssertionError(f"new pages did not reach both servers {count} times each in 30 s: "
                             f"{ {k: len(v) for k, v in placed.items()} } (is the hash sticky "
                             f"on the cookie at all?)")


def cookie_header(session):
    """A page's cookies: its session (if it has one) and the token (`GET /?token=` sets it)."""
    return {"Cookie": (f"wan_session={session}; " if session else "") + f"wan_token={TOKEN}"}


@pytest.fixture(scope="module")
def cluster_once(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("proxy"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def cluster(cluster_once):
    cluster_once.revive()
    for server in cluster_once.servers:  # each test starts with nobody playing
        _wait_until(lambda: server.health()["players"] == 0, f"{server.name} to have no players")
    return cluster_once


def _wait_until(condition, what, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out ({timeout:.0f} s) waiting for {what}")
        time.sleep(0.1)


# clients -------------------------------------------------------------------------------------
class PageSocket:
    """A page's WebSocket through the proxy (`/ws?frames=ws`, its cookie): reads everything in a
    task, recording the hello, frames (block numbers, arrival times), texts and how it closed."""

    def __init__(self, cluster: Cluster, session: str, query: str = "?frames=ws"):
        self.url, self.tls, self.session = cluster.wss + query, cluster.tls, session
        self.hello = None
        self.frames = []      # (arrival time, block, frame index)
        self.texts = []
        self.closed = None    # (time, code)

    async def open(self):
        from websockets.asyncio.client import connect
        self.ws = await connect(self.url, ssl=self.tls, additional_headers=cookie_header(
            self.session), max_size=2**24, open_timeout=WAIT_S)
        self.task = asyncio.create_task(self._read())
        await self.until(lambda: self.hello is not None or self.closed, "the hello")
        return self

    async def _read(self):
        from websockets.exceptions import ConnectionClosed
        from wan.play.client import parse_frame
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    frame = parse_frame(message)
                    self.frames.append((time.monotonic(), frame.block, frame.index, frame.jpeg))
                else:
                    data = json.loads(message)
                    self.texts.append(data)
                    if data.get("type") == "hello":
                        self.hello = data
        except ConnectionClosed:
            pass
        self.closed = (time.monotonic(), self.ws.close_code)

    def blocks(self, since: float = 0.0):
        return sorted({block for t, block, _, _ in self.frames if t >= since})

    def errors(self):
        return [t["reason"] for t in self.texts if t.get("type") == "error"]

    async def until(self, condition, what, timeout=WAIT_S):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.session}: timed out ({timeout:.0f} s) waiting for "
                                     f"{what}; closed: {self.closed}, texts: {self.texts[-3:]}")
            await asyncio.sleep(0.05)

    async def close(self):
        await self.ws.close()
        await self.task


class Viewer(threading.Thread):
    """GET /stream (MJPEG) through the proxy in a thread: counts JPEG parts, and notes when
    and how the stream ended."""

    def __init__(self, cluster: Cluster, session: str):
        super().__init__(daemon=True)
        self.cluster, self.session = cluster, session
        self.status = None
        self.jpegs = []
        self.ended = None  # (time, what)
        self.stopping = False

    def run(self):
        connection = http.client.HTTPSConnection("127.0.0.1", self.cluster.proxy.port,
                                                 context=self.cluster.tls, timeout=WAIT_S)
        try:
            connection.request("GET", "/stream", headers=cookie_header(self.session))
            response = connection.getresponse()
            self.status = response.status
            self.content_type = response.getheader("Content-Type")
            while not self.stopping:
                line = response.readline()
                if not line:
                    raise EOFError("the stream ended")
                if line != b"--frame\r\n":
                    continue
                headers = {}
                while (line := response.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                self.jpegs.append(response.read(int(headers["content-length"])))
            self.ended = (time.monotonic(), "closed by the test")
        except Exception as error:  # EOF, an incomplete chunked body, a reset: the stream ended
            self.ended = (time.monotonic(), f"{type(error).__name__}: {error}")
        finally:
            connection.close()

    def stop(self):
        self.stopping = True
        self.join(timeout=WAIT_S)


def _jpeg_size(data: bytes):
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return image.size


# tests ---------------------------------------------------------------------------------------
def test_the_readmes_nginx_block_is_a_configuration_nginx_accepts():
    proxy = Nginx([18000, 18001])
    try:
        proxy.write()
        checked = proxy.check()
        assert checked.returncode == 0, checked.stderr + "\n" + proxy.conf.read_text()
    finally:
        shutil.rmtree(proxy.folder, ignore_errors=True)
    block = readme_nginx_block()
    assert "hash $cookie_wan_session" in block  # sticky on the cookie GET / sets
    assert "Upgrade" in block and "proxy_buffering off" in block
    # the rendering keeps everything but the ports and certificate paths
    conf = runnable_config(block, [1, 2], 3, "C", "K", "/F")
    assert "server 127.0.0.1:1; server 127.0.0.1:2;" in conf and "127.0.0.1:8000" not in conf


def test_one_pages_ws_and_stream_reach_the_same_server_over_tls(cluster):
    placed = cluster.pages_on_each(2)   # 2 pages on each server (cookies the servers set)
    sessions = [s for pages in placed.values() for s in pages]

    async def scenario():
        sockets = [await PageSocket(cluster, s).open() for s in sessions]
        viewers = [Viewer(cluster, s) for s in sessions]
        for viewer in viewers:
            viewer.start()
        for socket_ in sockets:
            await socket_.until(lambda s=socket_: len(s.blocks()) >= 1, "a block of frames")
        for viewer in viewers:
            await asyncio.to_thread(_wait_until, lambda v=viewer: v.jpegs or v.ended,
                                    f"{viewer.session}'s MJPEG frames")
        players = {server.name: server.health()["players"] for server in cluster.servers}
        for viewer in viewers:
            viewer.stop()
        for socket_ in sockets:
            await socket_.close()
        return sockets, viewers, players

    sockets, viewers, players = asyncio.run(scenario())
    for socket_ in sockets:  # the WebSocket over TLS: hello, frames, stats
        assert socket_.hello["session"] == socket_.session  # the cookie named the session
        assert socket_.hello["capacity"] == 3
        assert socket_.errors() == []
        assert _jpeg_size(socket_.frames[0][3]) == (128, 64)
        assert any(t.get("type") == "stats" for t in socket_.texts)
    for viewer in viewers:
        assert viewer.status == 200 and viewer.ended[1] == "closed by the test", viewer.ended
        assert viewer.content_type == "multipart/x-mixed-replace; boundary=frame"
        assert _jpeg_size(viewer.jpegs[0]) == (128, 64)
    # each server has exactly its two pages: a /stream that went to the other server would have
    # made a player there
    assert players == {"a": 2, "b": 2}, players
    # every request of a page (GET /health, /ws, /stream) went to one upstream, its own
    _wait_until(lambda: sum(1 for _, r, _ in cluster.proxy.upstreams()
                            if r.startswith(("GET /ws", "GET /stream"))) >= 2 * len(sessions),
                "nginx to log the closed requests", timeout=10)
    routes = {}
    for upstream, request, cookie in cluster.proxy.upstreams():
        if cookie in sessions:
            routes.setdefault(cookie, set()).add(upstream)
            assert request.startswith(("GET /health", "GET /ws", "GET /stream")), request
    for server, pages in placed.items():
        for session in pages:
            assert routes[session] == {f"127.0.0.1:{server.port}"}, (session, routes[session])
    for server in cluster.servers:
        _wait_until(lambda: server.health()["players"] == 0, "the pages' games to end")


def test_a_killed_server_closes_its_players_the_other_plays_on_new_pages_land_on_it(cluster):
    placed = cluster.pages_on_each(1)
    victim, survivor = cluster.servers
    lost, kept = placed[victim][0], placed[survivor][0]

    async def scenario():
        doomed = await PageSocket(cluster, lost).open()
        playing = await PageSocket(cluster, kept).open()
        viewer = Viewer(cluster, lost)
        viewer.start()
        for socket_ in (doomed, playing):
            await socket_.until(lambda s=socket_: len(s.blocks()) >= 1, "a block of frames")
        await asyncio.to_thread(_wait_until, lambda: viewer.jpegs or viewer.ended,
                                "the MJPEG frames")
        killed = time.monotonic()
        victim.kill()
        await doomed.until(lambda: doomed.closed, "the killed server's page to be closed",
                           timeout=WAIT_S)
        await asyncio.to_thread(_wait_until, lambda: viewer.ended, "the stream to end")
        # the survivor's page plays on: two more blocks after the kill
        await playing.until(lambda: len(playing.blocks(since=killed)) >= 2,
                            "two blocks on the other server after the kill")
        # new pages land on the live server, and so does the lost page coming back (the page
        # reconnects with its cookie): a new game there
        fresh = [cluster.new_page() for _ in range(4)]
        routes = [cluster.upstream_of(s).name for s in fresh + [lost]]
        back = await PageSocket(cluster, lost).open()
        newcomer = await PageSocket(cluster, fresh[0]).open()
        for socket_ in (back, newcomer):
            await socket_.until(lambda s=socket_: len(s.blocks()) >= 1, "a block of frames")
        players = survivor.health()["players"]
        for socket_ in (playing, back, newcomer):
            await socket_.close()
        return doomed, playing, viewer, killed, routes, back, newcomer, players

    doomed, playing, viewer, killed, routes, back, newcomer, players = asyncio.run(scenario())
    closed_after = doomed.closed[0] - killed
    assert closed_after < CLOSED_WITHIN_S, \
        f"the page learnt of the crash after {closed_after:.1f} s"
    # nginx cannot send a close frame for a dead server: the connection just ends (1006)
    assert doomed.closed[1] in (1006, 1011, 1012, 1001), doomed.closed
    stream_after = viewer.ended[0] - killed
    assert stream_after < CLOSED_WITHIN_S and viewer.ended[1] != "closed by the test", viewer.ended
    assert playing.closed[1] == 1000 and playing.errors() == []  # closed by the test, no error
    assert routes == [survivor.name] * 5, routes
    assert back.hello["session"] == lost and newcomer.errors() == [] and back.errors() == []
    assert players == 3  # the page it kept, the lost page back, the new page


def test_a_stopped_server_closes_its_websockets_with_1012_and_exits(cluster):
    """SIGTERM (a rolling restart): uvicorn closes the WebSockets with 1012 ("service restart";
    the page reconnects, through the proxy to the other server) and the process exits."""
    session = cluster.new_page()
    stopping = cluster.upstream_of(session)

    async def scenario():
        page = await PageSocket(cluster, session).open()
        await page.until(lambda: len(page.blocks()) >= 1, "a block of frames")
        began = time.monotonic()
        took = asyncio.create_task(asyncio.to_thread(stopping.stop, 30))
        await page.until(lambda: page.closed, "the close", timeout=WAIT_S)
        return page, began, await took

    page, began, took = asyncio.run(scenario())
    assert page.closed[1] == 1012 and page.closed[0] - began < CLOSED_WITHIN_S, page.closed
    assert took is not None and took < 15, f"the server took {took} s to exit (None: killed)"


def test_a_stopped_server_exits_with_an_mjpeg_viewer_connected(cluster):
    session = cluster.new_page()
    stopping = cluster.upstream_of(session)

    async def scenario():
        page = await PageSocket(cluster, session).open()
        viewer = Viewer(cluster, session)
        viewer.start()
        await page.until(lambda: len(page.blocks()) >= 1, "a block of frames")
        await asyncio.to_thread(_wait_until, lambda: viewer.jpegs or viewer.ended,
                                "the MJPEG frames")
        took = await asyncio.to_thread(stopping.stop, 8)
        await page.until(lambda: page.closed, "the close", timeout=5)
        viewer.stop()
        return page, viewer, took

    page, viewer, took = asyncio.run(scenario())
    assert page.closed[1] == 1012, page.closed
    assert took is not None, "the server did not exit in 8 s after SIGTERM (it was killed)"
    assert viewer.ended is not None and viewer.ended[1] != "closed by the test"


def test_a_wrong_token_flood_through_the_proxy_locks_out_its_own_address_only(cluster):
    """The servers throttle wrong tokens per client address. Behind the proxy the address they
    see is the proxy's unless it forwards the client's (X-Forwarded-For, which uvicorn reads
    from a proxy on 127.0.0.1): otherwise one client guessing tokens locks everyone out.
    Clients here come from 127.0.0.2 (guessing) and 127.0.0.3 (with the token). Last in the
    module: a lockout lasts a minute."""
    for source in ("127.0.0.2", "127.0.0.3"):
        try:
            with socket.socket() as probe:
                probe.bind((source, 0))
        except OSError as error:
            pytest.skip(f"cannot send from {source} on this machine's loopback: {error}")
    guesses = [cluster.get("/health?token=wrong", cookies=False, source="127.0.0.2")[0]
               for _ in range(30)]  # no cookie: nginx spreads them over both servers
    if 429 not in guesses:
        pytest.skip(f"the servers do not throttle wrong tokens (answers: {sorted(set(guesses))})")
    assert set(guesses) <= {401, 429}, guesses
    assert guesses[-4:] == [429] * 4, guesses  # both servers refuse the guesser now
    others = [cluster.get(f"/?token={TOKEN}", cookies=False, source="127.0.0.3")[0]
              for _ in range(6)]
    assert others == [200] * 6, (
        f"a client with the token, from another address, got {others} after another address "
        f"guessed: the servers see the proxy's address for everyone (no X-Forwarded-For)")
