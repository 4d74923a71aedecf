"""The play page (wan/play/static) in a real browser: Debian's Chromium driven by Playwright over
the play server, in-process on a loopback port (tiny preset, random weights, on the CPU).

What it checks: the page loads and connects (hello, the universal mode's keys in the controls
list), frames are decoded and drawn (the canvas holds a picture, the fps display counts), a held
W reaches the server (its input state, and the blocks' input ids) and comes back (frames drawn
after the press carry its input id, the latency display shows milliseconds), the players display,
"New game" (a new game on the server, frames keep coming), a second browser context is a second
player (2/2) and a third gets the "Server full" overlay, whose reason names this machine's device
(a CPU here, not "this GPU"). The video area keeps its place and size from the page's first
layout on: its box and the canvas's are the same before the hello, before the first frame and
after it (the size is reserved in style.css; the tiny preset's 2:1 frames are letterboxed). Only
"eventually, within a timeout": no timing is asserted (a CPU block takes about a second).

Screenshots go to a temporary folder the test prints; with WAN_SAVE_SCREENSHOT=1 the page while
playing is also copied to benchmarks/results/2026-12-01_cpu_play_page.png.

Skips when /usr/bin/chromium (`apt-get install chromium`), Playwright or the play server's
dependencies are missing. Playwright's own browser downloads are not used: it launches the
system's Chromium, with background networking off (the closed network refuses it otherwise).
"""
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
WAIT_MS = 60_000          # any one "eventually" (a CPU block is ~0.3-1.5 s; 2 players double it)
START_S = 120             # the server's start (model, decoder) at most
VIEWPORT = {"width": 1300, "height": 640}
UNIVERSAL_KEYS = ["W", "S", "A", "D", "I", "K", "J", "L"]
SAVED_SCREENSHOT = (Path(__file__).resolve().parents[2] / "benchmarks" / "results"
                    / "2026-12-01_cpu_play_page.png")

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): no browser to test the play "
                f"page in", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (pip install playwright)")
uvicorn = pytest.importorskip("uvicorn", reason="the play server's dependencies are missing "
                              "(pip install -e .[play])")
pytest.importorskip("starlette", reason="the play server's dependencies are missing "
                    "(pip install -e .[play])")

# the canvas's pixels: their mean and spread (a drawn picture is neither black nor flat)
CANVAS_STATS = """() => {
  const c = document.getElementById('screen');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let sum = 0, sq = 0, n = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = (d[i] + d[i + 1] + d[i + 2]) / 3; sum += v; sq += v * v; n++;
  }
  const mean = sum / n;
  return {mean, std: Math.sqrt(Math.max(0, sq / n - mean * mean)), width: c.width, height: c.height};
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def play_server():
    """(base URL, PlayServer): the tiny preset on the CPU, 2 players at most, no linger (a closed
    page ends its game at once)."""
    from wan.play.engine import EngineConfig, GameEngine
    from wan.play.metrics import PlayMetrics
    from wan.play.server import WS_MAX_SIZE, PlayServer

    engine = GameEngine(EngineConfig(device="cpu", max_players=2))
    server = PlayServer(engine, PlayMetrics(), linger_s=0)
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port,
                                       ws_max_size=WS_MAX_SIZE, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="play-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_S
    while not uv.started:
        assert thread.is_alive(), "the play server stopped while starting"
        assert time.monotonic() < deadline, f"the play server did not start in {START_S} s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", server
    uv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("play_page")
    print(f"\nplay page screenshots: {folder}")
    return folder


# the video area's boxes (x, y, width, height), as the page lays them out
BOXES = """() => Object.fromEntries(['screen-box', 'screen'].map((id) => {
  const r = document.getElementById(id).getBoundingClientRect();
  return [id, [r.x, r.y, r.width, r.height]];
}))"""
# the boxes at the page's first layout, before any script of the page ran (no hello, no frame)
FIRST_LAYOUT = f"""document.addEventListener('DOMContentLoaded', () => {{
  window.firstLayout = ({BOXES})();
}});"""


def _open(browser, url, problems):
    """A page in a new browser context (its own sessionStorage and cookies: another player)."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.add_init_script(FIRST_LAYOUT)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.goto(url + "/")
    return context, page


def _wait(page, expression, what, arg=None):
    try:
        page.wait_for_function(expression, arg=arg, timeout=WAIT_MS)
    except sync_api.TimeoutError:
        state = page.evaluate("JSON.stringify(window.wanPlay || null)")
        raise AssertionError(f"within {WAIT_MS / 1000:.0f} s: {what}; window.wanPlay = {state}, "
                             f"status {page.inner_text('#status')!r}, "
                             f"overlay {page.inner_text('#overlay')!r}") from None


def _wait_players(server, count):
    deadline = time.monotonic() + WAIT_MS / 1000
    while server.engine.player_count() != count:
        assert time.monotonic() < deadline, (f"the server has {server.engine.player_count()} "
                                             f"players, expected {count}")
        time.sleep(0.05)


def _assert_picture(page, where):
    stats = page.evaluate(CANVAS_STATS)
    assert stats["mean"] > 5 and stats["std"] > 5, \
        f"the canvas holds no picture ({where}): {stats}"
    return stats


def test_page_connects_plays_and_answers_a_key(play_server, browser, shots):
    url, server = play_server
    _wait_players(server, 0)
    problems = []
    context, page = _open(browser, url, problems)
    try:
        # connected: hello, the mode's keys in the controls list, the players display
        _wait(page, "window.wanPlay && window.wanPlay.connected && window.wanPlay.hello",
              "the page connects and gets the hello")
        hello = page.evaluate("window.wanPlay.hello")
        assert hello["controls"]["mode"] == "universal" and hello["capacity"] == 2, hello
        keys = page.locator("#controls kbd").all_inner_texts()
        assert keys == UNIVERSAL_KEYS, keys
        assert page.inner_text("#mode") == "(universal)"
        assert page.is_visible("#demo-badge"), "random weights: the DEMO badge shows"
        _wait(page, "document.getElementById('players').textContent === '1/2'",
              "the players display shows 1/2")
        first_layout = page.evaluate("window.firstLayout")
        assert first_layout and first_layout["screen-box"][2] > 0, first_layout
        if page.evaluate("window.wanPlay.framesShown") == 0:  # a CPU block takes seconds
            assert page.evaluate(BOXES) == first_layout, "the hello moved the video area"
            page.screenshot(path=str(shots / "0_before_first_frame.png"))

        # frames: decoded, drawn, counted
        _wait(page, "window.wanPlay.framesShown >= 6", "frames are shown")
        # the video area did not move or change size when the frames came (its size is reserved
        # up front; the overlay covers exactly the canvas)
        boxes = page.evaluate(BOXES)
        assert boxes == first_layout, f"the video area shifted: {first_layout} -> {boxes}"
        assert boxes["screen-box"] == boxes["screen"], boxes
        _wait(page, "parseFloat(document.getElementById('fps').textContent) > 0",
              "the fps display is above 0")
        _wait(page, "document.getElementById('overlay').hidden", "the overlay is gone")
        state = page.evaluate("window.wanPlay")
        assert state["framesBad"] == 0, f"frames the browser could not decode: {state}"
        assert state["lastShownInputId"] == 0, state
        before = _assert_picture(page, "before the press")
        assert before["width"] * hello["frame_size"][0] == before["height"] * hello["frame_size"][1], \
            f"the canvas keeps the frames' shape {hello['frame_size']}: {before}"
        picture_before = page.evaluate("document.getElementById('screen').toDataURL()")
        page.screenshot(path=str(shots / "1_connected.png"))

        # hold W on the focused canvas: the server gets it, frames carry its input id
        page.focus("#screen")
        page.keyboard.down("w")
        try:
            _wait(page, "document.querySelector('kbd[data-key=\"w\"]').classList.contains('down')",
                  "the W key is marked held")
            session = server.sessions[hello["session"]]
            deadline = time.monotonic() + WAIT_MS / 1000
            while "w" not in session.player.input._held or session.player.input.input_id < 1:
                assert time.monotonic() < deadline, "the server did not receive the held W"
                time.sleep(0.02)
            _wait(page, "window.wanPlay.stats && window.wanPlay.stats.input_id >= 1",
                  "a block read the press (stats.input_id >= 1)")
            _wait(page, "window.wanPlay.lastShownInputId >= 1",
                  "a frame that reflects the press is shown (its inputId >= 1)")
            _wait(page, "/^\\d+ ms$/.test(document.getElementById('latency').textContent)",
                  "the latency display shows a number of ms")
            shown = page.evaluate("window.wanPlay.framesShown")
            _wait(page, "(n) => window.wanPlay.framesShown >= n + 6", "frames keep coming "
                  "while W is held", arg=shown)
            state = page.evaluate("window.wanPlay")
            assert state["lastShownInputId"] >= 1 and state["latencies"], state
            assert all(latency > 0 for latency in state["latencies"]), state["latencies"]
            _assert_picture(page, "while W is held")
            picture_after = page.evaluate("document.getElementById('screen').toDataURL()")
            # the picture moves on (random weights: it changes with or without the key)
            assert picture_after != picture_before, "the picture did not change"
            page.screenshot(path=str(shots / "2_holding_w.png"))
            if os.environ.get("WAN_SAVE_SCREENSHOT") == "1":
                SAVED_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shots / "2_holding_w.png", SAVED_SCREENSHOT)
                print(f"saved {SAVED_SCREENSHOT}")
            _tap_a_while_holding_w(page, session)
        finally:
            page.keyboard.up("w")
        _wait(page, "!document.querySelector('kbd[data-key=\"w\"]').classList.contains('down')",
              "the W key is marked released")
        deadline = time.monotonic() + WAIT_MS / 1000
        while session.player.input._held:
            assert time.monotonic() < deadline, "the server did not receive the release of W"
            time.sleep(0.02)

        # New game: a new game on the server, and frames keep coming
        games = session.player.games
        page.click("#new-game")
        deadline = time.monotonic() + WAIT_MS / 1000
        while session.player.games <= games:
            assert time.monotonic() < deadline, "New game did not start a new game"
            time.sleep(0.02)
        shown = page.evaluate("window.wanPlay.framesShown")
        _wait(page, "(n) => window.wanPlay.framesShown >= n + 12",
              "frames keep coming after New game", arg=shown)
        _assert_picture(page, "after New game")
        page.screenshot(path=str(shots / "3_new_game.png"))
        state = page.evaluate("window.wanPlay")
        assert state["lastError"] is None and state["framesBad"] == 0, state
        assert page.evaluate("document.activeElement.id") == "screen", \
            "the canvas has the keyboard focus back after New game"
        assert not problems, problems
    finally:
        context.close()
    _wait_players(server, 0)


def _tap_a_while_holding_w(page, session):
    """W held, A tapped (the issue's "holding W and tapping A"): the server holds W+A, then W
    alone; a frame made with A (its input id) is drawn, and the page measured that press's
    latency. With reactive play on (the engine's default) the block on screen may be re-made;
    whether one was granted depends on the CPU's slack, so it is reported, not asserted."""
    latencies = len(page.evaluate("window.wanPlay.latencies"))
    page.keyboard.down("a")
    try:
        deadline = time.monotonic() + WAIT_MS / 1000
        while "a" not in session.player.input._held:
            assert time.monotonic() < deadline, "the server did not receive A held with W"
            time.sleep(0.01)
        assert "w" in session.player.input._held, "W was let go when A was pressed"
        a_id = session.player.input.input_id
    finally:
        page.keyboard.up("a")
    _wait(page, "(id) => window.wanPlay.lastShownInputId >= id",
          "a frame made with A held (its inputId) is shown", arg=a_id)
    _wait(page, "(n) => window.wanPlay.latencies.length > n",
          "the page measured the A press's latency", arg=latencies)
    state = page.evaluate("window.wanPlay")
    assert state["latencies"][-1] > 0, state["latencies"]
    deadline = time.monotonic() + WAIT_MS / 1000
    while session.player.input._held != {"w"}:
        assert time.monotonic() < deadline, \
            f"after A's release the server should hold W alone: {session.player.input._held}"
        time.sleep(0.01)
    print(f"A tapped with W held: shown after {state['latencies'][-1]:.0f} ms in the browser; "
          f"{state['framesReplaced']} frame(s) replaced by re-made blocks so far")


def test_second_player_and_server_full(play_server, browser, shots):
    url, server = play_server
    _wait_players(server, 0)
    problems = []
    contexts = []
    try:
        first_context, first = _open(browser, url, problems)
        contexts.append(first_context)
        _wait(first, "window.wanPlay.framesShown >= 1", "the first player's frames are shown")
        second_context, second = _open(browser, url, problems)
        contexts.append(second_context)
        _wait(second, "window.wanPlay.hello", "the second player gets the hello")
        assert second.evaluate("window.wanPlay.hello.player") != \
            first.evaluate("window.wanPlay.hello.player"), "the second context is another player"
        assert server.engine.player_count() == 2
        for page, who in ((first, "first"), (second, "second")):
            _wait(page, "document.getElementById('players').textContent === '2/2'",
                  f"the {who} player's display shows 2/2 players")
            _wait(page, "window.wanPlay.framesShown >= 6", f"the {who} player's frames are shown")
            _assert_picture(page, f"the {who} player")
        second.screenshot(path=str(shots / "4_second_player.png"))

        third_context, third = _open(browser, url, [])  # its refused socket logs an error
        contexts.append(third_context)
        _wait(third, "window.wanPlay.full", "the third player is told the server is full")
        _wait(third, "document.getElementById('overlay').textContent === 'Server full' && "
              "!document.getElementById('overlay').hidden", "the Server full overlay shows")
        reason = third.inner_text("#status")
        assert "full" in reason.lower()
        here, other = ("GPU", "CPU") if server.engine.device.type == "cuda" else ("CPU", "GPU")
        assert f"from this {here}" in reason and other not in reason, \
            f"the reason names this machine's device ({here}): {reason!r}"
        assert third.inner_text("#players") == "2/2", "the full page shows the players"
        box, screen = (third.locator(f"#{id}").bounding_box() for id in ("screen-box", "screen"))
        assert abs(box["height"] - screen["height"]) < 1, \
            f"the overlay's box is the canvas's: {box} vs {screen}"
        assert third.evaluate("window.wanPlay.framesShown") == 0
        assert not third.evaluate("window.wanPlay.connected"), "the refused socket is closed"
        third.screenshot(path=str(shots / "5_server_full.png"))
        assert server.engine.player_count() == 2, "the refused player was not admitted"

        # the second player leaves: the first sees 1/2 again
        second_context.close()
        _wait(first, "document.getElementById('players').textContent === '1/2'",
              "the first player's display shows 1/2 after the second left")
        assert not problems, problems
    finally:
        for context in contexts:
            context.close()
    _wait_players(server, 0)
