"""The play server (wan/play) on a CPU: the input-to-action mapping per mode, the engine's frames
against the StreamingBlockRunner alone, and the server over a loopback port with real WebSocket
clients (two players at once, the seed server's client flow, server full, caches freed, every bad
input refused with its reason while the other player keeps playing, the token, idle timeout,
on-input play, metrics)."""
import asyncio
import base64
import contextlib
import gc
import http.client
import io
import json
import time
import urllib.error
import urllib.request
import weakref

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")
from PIL import Image  # noqa: E402

from helpers import PlayServerThread, rel_err, wait_until  # noqa: E402
from wan.modules.shared.conditioning import history_steps  # noqa: E402
from wan.serving.runner import StreamingBlockRunner  # noqa: E402
from wan.play.actions import (CAMERA_VALUE, MOUSE_PIXELS_FOR_FULL_TURN, InputState,  # noqa: E402
                              action_space)
from wan.play.client import parse_frame, play  # noqa: E402
from wan.play.engine import EngineConfig, GameConditions, GameEngine, Player  # noqa: E402
from wan.play.server import MAX_UPLOAD_PIXELS, BadMessage, decode_upload  # noqa: E402

FIRST, LATER = 9, 12  # frames of a stream's first block and of every later one


def _sample(mode, keys=(), motion=None, taps=()):
    state = InputState(action_space(mode))
    state.hold(keys, 1, 0.0)
    for tap in taps:
        state.tap(tap, 2, 0.0)
    if motion:
        state.move(*motion, 3, 0.0)
    return state, state.sample()


def test_universal_keys_and_mouse_map_to_upstreams_action_space():
    _, action = _sample("universal", ["w", "a", "l"])
    assert action.keyboard.tolist() == [1, 0, 1, 0]
    assert action.mouse.tolist() == pytest.approx([0.0, CAMERA_VALUE])
    _, action = _sample("universal", ["i", "k"])  # opposite keys cancel
    assert action.mouse.tolist() == [0.0, 0.0]
    px = MOUSE_PIXELS_FOR_FULL_TURN
    _, action = _sample("universal", motion=(px / 2, px / 4))  # right and down
    assert action.mouse.tolist() == pytest.approx([-CAMERA_VALUE / 4, CAMERA_VALUE / 2])
    _, action = _sample("universal", ["l"], motion=(5 * px, 0))  # clamped to the trained range
    assert action.mouse.tolist() == pytest.approx([0.0, CAMERA_VALUE])
    state, _ = _sample("universal", motion=(px, 0))
    assert state.sample().mouse.tolist() == [0.0, 0.0]  # motion is summed per block, then reset


def test_gta_drive_and_templerun_action_spaces():
    _, action = _sample("gta_drive", ["w", "a"], motion=(0, 500))
    assert action.keyboard.tolist() == [1, 0]
    assert action.mouse.tolist() == pytest.approx([0.0, -CAMERA_VALUE])  # mouse y ignored
    _, action = _sample("templerun")
    assert action.keyboard.tolist() == [1, 0, 0, 0, 0, 0, 0] and action.mouse is None  # no move
    _, action = _sample("templerun", ["w"])
    assert action.keyboard.tolist() == [0, 1, 0, 0, 0, 0, 0]


def test_a_tap_acts_for_one_block_and_unknown_keys_are_refused():
    state, action = _sample("universal", taps=["w"])
    assert action.keyboard.tolist() == [1, 0, 0, 0]
    assert state.sample().keyboard.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="unknown key"):
        state.tap("x", 3, 0.0)
    with pytest.raises(ValueError, match="unknown key"):
        state.hold(["w", "i", "z"], 3, 0.0)
    with pytest.raises(ValueError, match="unknown key"):
        InputState(action_space("templerun")).hold(["i"], 1, 0.0)  # no camera in templerun


@pytest.fixture(scope="module")
def engine():
    return GameEngine(EngineConfig(device="cpu", max_players=2))


def _player_frames(engine, keys, blocks, seed=7):
    player = Player(engine.space, "continuous", sink=lambda batch: None, seed=seed)
    player.session = engine._new_session(player, None)
    player.input.hold(keys, 1, 0.0)
    return [player.run_block()[0] for _ in range(blocks)], player


def test_engine_frames_equal_the_runner_alone_and_depend_on_the_keys(engine):
    """A player's frames (before encoding) are the StreamingBlockRunner's for the same image
    conditions, actions and noise; a player holding W differs from one holding nothing."""
    blocks = 3
    played, player = _player_frames(engine, ["w"], blocks)
    conditions = GameConditions.start(engine.conditioner, engine.default_image, engine.device,
                                      engine.dtype)
    visual_context = conditions.visual_context
    runner = StreamingBlockRunner(engine.model, engine.decoder, latent_hw=engine.latent_hw)
    runner.generator = torch.Generator().manual_seed(player.seed * 1000)
    runner.start(visual_context)
    steps = history_steps(3 * blocks - 1)
    keyboard = torch.tensor([1.0, 0, 0, 0]).expand(1, steps, 4)
    mouse = torch.zeros(1, steps, 2)
    for block in range(blocks):
        used = history_steps(3 * (block + 1) - 1)
        frames, _ = runner.block(conditions.block(block, 3), mouse[:, :used],
                                 keyboard[:, :used])
        assert torch.equal(frames, played[block]), f"block {block}"
    idle, _ = _player_frames(engine, [], blocks)
    assert played[0].shape == (1, FIRST, 3, 64, 128)
    assert rel_err(idle[-1], played[-1]) > 1e-2  # the keys reach the picture


@pytest.fixture(scope="module")
def server(engine):
    with PlayServerThread(engine=engine) as running:
        yield running


def _run(coroutine):
    return asyncio.run(coroutine)


def _wait_until(condition, timeout=30.0, what="condition"):
    wait_until(condition, timeout, what, every=0.05)


def _jpeg_size(data: bytes):
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        image.load()
        return image.size


def test_two_players_at_once_get_their_own_frames(server):
    async def both():
        return await asyncio.gather(
            play(server.ws + "?frames=ws", schedule=[(0.0, ["w"])], seconds=60,
                 until_frames=FIRST + LATER),
            play(server.ws + "?frames=ws", seconds=60, until_frames=FIRST + LATER))
    pressing, idle = _run(both())
    for result in (pressing, idle):
        assert result.errors() == []
        assert result.hello["controls"]["mode"] == "universal" and result.hello["demo"] is True
        blocks = [f.block for f in result.frames]
        assert blocks[:FIRST + LATER] == [0] * FIRST + [1] * LATER
        assert [f.index for f in result.frames[:FIRST]] == list(range(FIRST))
        assert all(_jpeg_size(f.jpeg) == (128, 64) for f in result.frames)
        assert all(f.block_start_ms <= f.frames_ready_ms <= f.sent_ms for f in result.frames)
    assert pressing.hello["session"] != idle.hello["session"]
    assert pressing.frames[-1].input_id == 1 and idle.frames[-1].input_id == 0
    assert len(pressing.press_to_frame_ms()) == 1
    _wait_until(lambda: server.engine.player_count() == 0, what="both sessions to end")


def _get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.headers, response.read()


def _png(width, height, color=(200, 40, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _mjpeg_frames(port, cookie, count, timeout=60):
    """`count` JPEG parts of GET /stream (the seed's viewer), parsed from the multipart body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    connection.request("GET", "/stream", headers={"Cookie": cookie})
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "multipart/x-mixed-replace; boundary=frame"
    frames = []
    while len(frames) < count:
        assert response.readline() == b"--frame\r\n"
        headers = {}
        while (line := response.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers["content-type"] == "image/jpeg"
        frames.append(response.read(int(headers["content-length"])))
        assert response.read(2) == b"\r\n"
    connection.close()
    return frames


def test_the_seed_servers_client_flow(server):
    """GET / (its cookie), keyboard messages on /ws, MJPEG from /stream, an image upload."""
    status, headers, page = _get(server.http + "/")
    assert status == 200 and b"<canvas" in page
    cookie = headers["Set-Cookie"].split(";")[0]
    assert cookie.startswith("wan_session=")

    async def seed_client():
        from websockets.asyncio.client import connect
        async with connect(server.ws, additional_headers={"Cookie": cookie}) as ws:
            hello = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "keyboard", "key": "w", "timestamp": 1}))
            stream = asyncio.create_task(asyncio.to_thread(
                _mjpeg_frames, server.port, cookie, FIRST + 2))
            stats, binary = None, 0
            while stats is None:
                message = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(message, bytes):
                    binary += 1
                elif json.loads(message).get("type") == "stats":
                    stats = json.loads(message)
            upload = _data_url(_png(300, 200))
            await ws.send(json.dumps({"type": "image", "data": upload}))
            replies = []
            while not any(r.get("type") == "game" and r.get("game") == 1 for r in replies):
                message = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(message, str):
                    replies.append(json.loads(message))
            return hello, stats, binary, replies, await stream

    hello, stats, binary, replies, mjpeg = _run(seed_client())
    assert {"fps", "latency"} <= set(stats) and stats["players"] == 1
    assert binary == 0  # frames go to /stream unless the client asks for them on the socket
    assert {"type": "image", "size": [300, 200]} in replies
    assert all(_jpeg_size(jpeg) == (128, 64) for jpeg in mjpeg)
    assert hello["session"] == cookie.split("=", 1)[1]  # /ws and /stream: one session
    _wait_until(lambda: server.engine.player_count() == 0, what="the session to end")


def test_server_full_refuses_the_next_player_and_a_closed_one_frees_its_game(server):
    async def scenario():
        from websockets.asyncio.client import connect
        first = await connect(server.ws + "?frames=ws")
        second = await connect(server.ws)
        for ws in (first, second):
            assert json.loads(await ws.recv())["type"] == "hello"
        while not isinstance(await asyncio.wait_for(first.recv(), 60), bytes):
            pass  # a block of the first player was made: its caches exist
        players = [p for p in server.engine.players]
        session = weakref.ref(players[0].session)
        runner = weakref.ref(players[0].session.runner)
        third = await connect(server.ws)
        full = json.loads(await third.recv())
        await third.wait_closed()
        code = third.close_code
        await first.close()
        await second.close()
        return full, code, session, runner

    full, code, session, runner = _run(scenario())
    assert full["type"] == "full" and "server full" in full["reason"] and full["capacity"] == 2
    assert code == 1013
    _wait_until(lambda: server.engine.player_count() == 0, what="the sessions to end")

    def freed():  # the session goes; its runner (a player slot) waits for the next player
        gc.collect()
        return session() is None and server.engine.free_slots() == server.engine.slots
    _wait_until(freed, what="the closed session to be freed and its slot to come back")
    # what only that game needed went with it: its decoder history and a re-make's copy
    assert all(entry is None for entry in runner().decoder_cache)
    assert server.engine.captures_while_serving() == 0


BAD_MESSAGES = [
    ("{not json", "json"),
    ("[1, 2]", "json"),
    (json.dumps({"type": "teleport"}), "type"),
    (json.dumps({"type": "keyboard", "key": "x"}), "key"),
    (json.dumps({"type": "keyboard"}), "keyboard"),
    (json.dumps({"type": "input", "id": 1, "keys": ["w"], "mouse": [1e9, 0]}), "input"),
    (json.dumps({"type": "input", "id": -1, "keys": []}), "input"),
    (json.dumps({"type": "input", "id": 2, "keys": "w"}), "input"),
    (json.dumps({"type": "input", "id": 3, "keys": ["w"], "pad": "x" * 5000}), "size"),
    (json.dumps({"type": "image", "data": _data_url(b"hello, not an image")}), "image"),
    (json.dumps({"type": "image", "data": _data_url(b"hello", "text/plain")}), "image"),
    (json.dumps({"type": "image", "data": "data:image/png;base64,@@@@"}), "image"),
    (json.dumps({"type": "image", "data": _data_url(_png(4100, 4100))}), "image"),
    (b"\x00\x01binary", "binary"),
]


def test_bad_input_is_refused_with_a_reason_and_the_other_player_keeps_playing(server):
    async def scenario():
        from websockets.asyncio.client import connect
        good = asyncio.create_task(play(server.ws + "?frames=ws", seconds=120,
                                        until_frames=FIRST + LATER))
        replies = []
        async with connect(server.ws) as bad:
            assert json.loads(await bad.recv())["type"] == "hello"
            for message, _ in BAD_MESSAGES:
                await bad.send(message)
                while True:
                    reply = json.loads(await asyncio.wait_for(bad.recv(), 60))
                    if reply["type"] == "error":
                        replies.append(reply["reason"])
                        break
            for _ in range(300):  # a flood: the rate limit answers
                await bad.send(json.dumps({"type": "ping", "t": 0}))
            flood = []
            while not any("rate limit" in r for r in flood):
                reply = json.loads(await asyncio.wait_for(bad.recv(), 60))
                if reply["type"] == "error":
                    flood.append(reply["reason"])
            await bad.send(json.dumps({"type": "keyboard", "key": "w"}))  # still served
            still_open = bad.close_code is None
        return replies, flood, still_open, await good

    replies, flood, still_open, good = _run(scenario())
    assert len(replies) == len(BAD_MESSAGES)
    for (message, prefix), reason in zip(BAD_MESSAGES, replies):
        assert reason.startswith(prefix + ":"), (message[:60], reason)
    assert "pixels" in replies[-2]
    assert still_open and good.errors() == []
    assert [f.block for f in good.frames[:FIRST + LATER]] == [0] * FIRST + [1] * LATER
    _wait_until(lambda: server.engine.player_count() == 0, what="the sessions to end")


def test_upload_limits():
    image = decode_upload(_data_url(_png(64, 48)))
    assert image.size == (64, 48) and image.mode == "RGB"
    with pytest.raises(BadMessage, match="pixels"):
        decode_upload(_data_url(_png(4097, 4096)))
    assert 4097 * 4096 > MAX_UPLOAD_PIXELS
    with pytest.raises(BadMessage, match="MiB"):
        decode_upload("A" * (12 * 2**20))
    with pytest.raises(BadMessage, match="data URL"):
        decode_upload(None)


def test_on_input_play_makes_one_block_per_key_press(server):
    async def scenario():
        from websockets.asyncio.client import connect
        async with connect(server.ws + "?frames=ws&play=on-input") as ws:
            hello = json.loads(await ws.recv())
            assert hello["play_mode"] == "on-input"
            frames = []

            async def collect(seconds):
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    try:
                        message = await asyncio.wait_for(ws.recv(), end - time.monotonic())
                    except asyncio.TimeoutError:
                        break
                    if isinstance(message, bytes):
                        frames.append(parse_frame(message))
            await collect(1.5)
            before = len(frames)
            await ws.send(json.dumps({"type": "keyboard", "key": "d", "timestamp": 0}))
            while len(frames) < FIRST:
                await collect(1.0)
            await collect(1.5)
            one = len(frames)
            await ws.send(json.dumps({"type": "keyboard", "key": "w", "timestamp": 0}))
            while len(frames) < FIRST + LATER:
                await collect(1.0)
            return before, one, frames
    before, one, frames = _run(scenario())
    assert before == 0 and one == FIRST  # nothing without input, one block per press
    assert [f.block for f in frames] == [0] * FIRST + [1] * LATER
    assert [f.input_id for f in frames] == [1] * FIRST + [2] * LATER
    _wait_until(lambda: server.engine.player_count() == 0, what="the session to end")


def test_health_and_metrics(server):
    _, _, body = _get(server.http + "/health")
    health = json.loads(body)
    assert health["status"] == "ok" and health["capacity"] == 2 and health["demo"] is True
    _, headers, body = _get(server.http + "/metrics")
    text = body.decode()
    assert headers["Content-Type"].startswith("text/plain")
    blocks = next(float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("wan_play_blocks_total"))
    assert blocks >= 2  # the earlier tests' blocks
    for name in ("wan_play_players", "wan_play_block_ms_bucket", "wan_play_press_to_frame_ms",
                 "wan_play_queue_wait_ms", "wan_play_frames_dropped_total",
                 "wan_play_device_memory_bytes", "wan_play_encode_ms"):
        assert name in text
    status, headers, body = _get(server.http + "/start-image")
    assert headers["Content-Type"] == "image/png" and Image.open(io.BytesIO(body)).size == (128, 64)


def test_a_token_is_required_when_set(engine):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus
    with PlayServerThread(engine=engine, token="sekrit-token") as guarded:
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(guarded.http + "/")
        assert refused.value.code == 401
        status, headers, _ = _get(guarded.http + "/?token=sekrit-token")
        assert status == 200 and "wan_token=sekrit-token" in headers.get_all("Set-Cookie")[-1]
        with pytest.raises(urllib.error.HTTPError):
            _get(guarded.http + "/metrics?token=wrong")

        async def sockets():
            with pytest.raises(InvalidStatus):
                async with connect(guarded.ws + "?token=wrong"):
                    pass
            async with connect(guarded.ws + "?token=sekrit-token") as ws:
                return json.loads(await ws.recv())
        assert _run(sockets())["type"] == "hello"
        _wait_until(lambda: engine.player_count() == 0, what="the session to end")


def test_an_idle_player_is_closed(engine):
    with PlayServerThread(engine=engine, idle_timeout_s=1.0) as server:
        result = _run(play(server.ws, seconds=30))
        assert any(t.get("type") == "idle" for t in result.texts), (result.texts, result.closed)
        assert result.closed is not None and result.closed[0] == 1000
        _wait_until(lambda: engine.player_count() == 0, what="the idle session to end")


def test_bad_configurations_are_clear_errors():
    with pytest.raises(ValueError, match="unknown mode"):
        GameEngine(EngineConfig(device="cpu", mode="minecraft"))
    with pytest.raises(ValueError, match="needs keyboard width 7"):
        GameEngine(EngineConfig(device="cpu", mode="templerun", preset="universal"))
    with pytest.raises(ValueError, match="tiny preset"):
        GameEngine(EngineConfig(device="cpu", vae="Wan2.1_VAE.pth"))


@pytest.mark.parametrize("where,device", [("pillow", "cpu"), ("cpu", "cpu"), ("cpu", "cuda"),
                                          ("gpu", "cuda")])
def test_every_jpeg_encoder_gives_the_frames_within_jpegs_error(where, device):
    """libjpeg-turbo threads (simplejpeg; from host or CUDA frames), nvJPEG and Pillow each give
    the frames back within JPEG's error at quality 85, in order, one picture per frame."""
    from wan.play.encode import JpegEncoder, to_uint8
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device)")
    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(12, 3, 22, 40, generator=gen) * 2 - 1,
                                             size=(352, 640), mode="bilinear")
    frames = to_uint8(smooth)
    encoder = JpegEncoder(torch.device(device), where=where)
    assert encoder.kind == where
    encoded = encoder.encode(frames.to(device))
    assert len(encoded) == len(frames)
    for data, frame in zip(encoded, frames):
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.size == (640, 352)
            decoded = torch.frombuffer(bytearray(image.convert("RGB").tobytes()),
                                       dtype=torch.uint8).view(352, 640, 3).permute(2, 0, 1)
        error = (decoded.float() - frame.float()).abs()
        assert error.mean() < 3.0 and error.max() < 64, (error.mean(), error.max())


@pytest.mark.parametrize("where,device", [("cpu", "cpu"), ("pillow", "cpu"), ("cpu", "cuda")])
def test_a_started_encoding_holds_the_frames_as_they_were_when_it_started(where, device):
    """`JpegEncoder.start` (the play engine's sender thread finishes it beside the next block):
    its JPEGs are those of the frames when it was started, although the frames' memory is
    written again afterwards on the same stream, behind work still queued there; equal, byte
    for byte, to the encoding the caller waits for."""
    from wan.play.encode import JpegEncoder, to_uint8
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the device)")
    gen = torch.Generator().manual_seed(1)
    frames = to_uint8(torch.rand(5, 3, 72, 136, generator=gen) * 2 - 1).to(device)
    encoder = JpegEncoder(torch.device(device), where=where)
    expected = encoder.encode(frames)
    stream = torch.cuda.Stream() if device == "cuda" else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if stream is not None:  # work queued ahead of the frames, so the copy cannot be done yet
            a = torch.randn(2048, 2048, device=device)
            for _ in range(20):
                a = a @ a / 2048 ** 0.5
        own = frames.clone()
        job = encoder.start(own)
        own.zero_()  # the frames' memory written again, after the copy on this stream
    assert (job.copied is not None) == (device == "cuda")
    assert job.result() == expected


def test_a_jpeg_encoder_that_cannot_run_here_is_a_clear_error():
    from wan.play.encode import JpegEncoder
    with pytest.raises(ValueError, match="unknown JPEG encoder 'png'"):
        JpegEncoder(torch.device("cpu"), where="png")
    with pytest.raises(ValueError, match="'gpu' needs a CUDA device"):
        JpegEncoder(torch.device("cpu"), where="gpu")
    with pytest.raises(ValueError, match="quality must be in 1..100"):
        JpegEncoder(torch.device("cpu"), quality=0)


def test_a_checkout_conditioner_without_its_weight_files_says_which_before_loading(tmp_path):
    """With --matrix-game-dir the checkout's own encoders condition the game (bitwise upstream's:
    tests/play/test_conditioning.py, tests/tools/test_matrix_game_checkout.py); without the VAE, the CLIP
    checkpoint or the tokenizer folder beside the VAE, a clear error names each, before the
    checkout is imported (this library's `wan` untouched)."""
    import sys
    import wan
    from wan.play.conditioning import CheckoutConditioner
    (tmp_path / "wan" / "vae").mkdir(parents=True)
    (tmp_path / "wan" / "__init__.py").write_text("raise ImportError('imported')")
    (tmp_path / "weights").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        CheckoutConditioner(tmp_path, tmp_path / "weights", "cpu", torch.float32,
                            latent_hw=(8, 16))
    for name in ("Wan2.1_VAE.pth", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                 "xlm-roberta-large"):
        assert name in str(error.value)
    assert sys.modules["wan"] is wan and "wan.vae" not in sys.modules


def test_a_slow_client_loses_its_own_oldest_frames_only():
    """A connection that has not sent its frames yet keeps the newest QUEUED_FRAMES; the rest are
    dropped (and counted) for it alone."""
    from wan.play.engine import FrameBatch
    from wan.play.metrics import PlayMetrics
    from wan.play.server import QUEUED_FRAMES, Connection

    def batch(block):
        return FrameBatch(block=block, jpegs=[bytes([block, i]) for i in range(LATER)], input_id=0,
                          input_received=None, block_start=0.0, frames_ready=0.0, encoded=0.0,
                          encode_ms=0.0, block_ms=0.0, wait_ms=0.0, late=False)

    async def scenario():
        metrics = PlayMetrics()
        slow, fast = Connection(None, True, metrics), Connection(None, True, metrics)
        for block in range(3):
            slow.frames_of(batch(block))
        fast.frames_of(batch(0))
        return slow, fast, metrics
    slow, fast, metrics = _run(scenario())
    assert len(slow.frames) == QUEUED_FRAMES == 2 * LATER
    assert [(b.block, i) for b, i, _ in slow.frames][0] == (1, 0)  # block 0 went, 1 and 2 stay
    assert len(fast.frames) == LATER
    dropped = metrics.frames_dropped.collect()[0].samples[0].value
    assert dropped == LATER


def test_a_player_whose_blocks_hold_nan_is_told_and_restarted_the_other_plays_on(monkeypatch):
    """NaN in one player's block: that player gets an error message and a new game (after
    MAX_NONFINITE_RESTARTS in a row its game stops, until it asks for a new one); the other
    player's frames keep coming and it hears nothing."""
    import functools
    from wan.play.engine import MAX_NONFINITE_RESTARTS
    engine = GameEngine(EngineConfig(device="cpu", max_players=2))
    seen = {"a": [], "b": []}
    poison = {"on": True}

    def sink_a(batch):
        seen["a"].append(("frames", batch.block))

    def sink_b(batch):
        seen["b"].append(("frames", batch.block))

    original = engine._new_session

    def new_session(player, image):  # player A's games: NaN latents while poison is on
        session = original(player, image)
        session.runner.__dict__.pop("block", None)  # a slot's runner: unpoisoned for a new game
        if player.sink is sink_a and poison["on"]:
            nan = torch.full((1, 16, 3, *engine.latent_hw), float("nan"))
            session.runner.block = functools.partial(StreamingBlockRunner.block, session.runner,
                                                     noise=nan)
        return session

    monkeypatch.setattr(engine, "_new_session", new_session)
    engine.start()
    try:
        a = engine.add_player("continuous", sink_a, lambda event: seen["a"].append(event))
        engine.add_player("continuous", sink_b, lambda event: seen["b"].append(event))
        errors = lambda: [e for e in seen["a"] if isinstance(e, dict) and e["type"] == "error"]
        _wait_until(lambda: len(errors()) == MAX_NONFINITE_RESTARTS + 1, timeout=300,
                    what="player A's games to fail and stop")
        restarted, stopped = errors()[:-1], errors()[-1]
        assert all(e["reason"].startswith("a new game was started: block 0 (latent frames 0-2): "
                                          "the DiT's denoised latents hold") for e in restarted)
        assert stopped["reason"].startswith("your game stopped: block 0") and \
            "New game" in stopped["reason"]
        assert a.session is None and not any(e[0] == "frames" for e in seen["a"]
                                             if isinstance(e, tuple))
        poison["on"] = False
        engine.new_game(a)  # the player asks again: a good game
        _wait_until(lambda: ("frames", 0) in seen["a"], timeout=120, what="A's new game")
        b_frames = [e for e in seen["b"] if isinstance(e, tuple)]
        assert len(b_frames) >= 2 and [e[1] for e in b_frames] == list(range(len(b_frames)))
        assert not any(isinstance(e, dict) and e["type"] == "error" for e in seen["b"])
        assert engine.failure is None
    finally:
        engine.stop()
