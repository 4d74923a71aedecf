"""Re-made blocks (reactive play): a stream whose latest block is made again with actions spliced
from one of its frames on is, bitwise, the stream that was fed the spliced actions from the start
(frames, the DiT's caches, the decoder's history, the blocks after); a re-make with unchanged
actions gives the same frames again. Tiny preset, float32, CPU: reference and optimized models."""
import math

import pytest
import torch

from helpers import build_model, play_batches, tiny_play_decoder
from wan.modules.causal_model import CausalWanModel
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.modules.random_init import random_inputs
from wan.modules.vae_decoder import VAEDecoderWrapper
from wan.serving.runner import StreamingBlockRunner
from wan.serving.scheduler import PlayerSession

LATENT = (4, 8)  # small: the decoder dominates a CPU block


def _parts(model_cls, decoder_cls):
    model = build_model(dtype=torch.float32, cls=model_cls)
    inputs = random_inputs(model, LATENT, 3, 0, seed=1)
    return model, tiny_play_decoder(decoder_cls), inputs


@pytest.fixture(scope="module")
def reference_parts():
    return _parts(CausalWanModel, VAEDecoderWrapper)


@pytest.fixture(scope="module")
def parts():  # the optimized models (the reference pair: the splice test's first case)
    return _parts(OptimizedCausalWanModel, OptimizedVAEDecoderWrapper)


def _session(parts, seed=5):
    model, decoder, inputs = parts
    runner = StreamingBlockRunner(model, decoder, latent_hw=LATENT)
    runner.keep_for_remake = True
    return PlayerSession("p", runner, inputs["visual_context"], inputs["cond_concat"], seed=seed,
                         mouse_dim=2, keyboard_dim=4)


def _actions(keys, steps):
    """(mouse, keyboard) histories of `steps` steps: keyboard one-hot of `keys`, a camera turn."""
    keyboard = torch.zeros(1, steps, 4)
    keyboard[:, :, list(keys)] = 1.0
    mouse = torch.tensor([0.0, 0.05 * len(keys)]).expand(1, steps, 2).clone()
    return mouse, keyboard


def _state(session):
    """Copies of everything the stream carries on: the DiT's caches and the decoder history."""
    runner = session.runner
    caches = [t.clone() for name in ("kv_cache", "kv_cache_mouse", "kv_cache_keyboard",
                                     "crossattn_cache")
              for layer in runner.caches[name] for t in layer.values() if torch.is_tensor(t)]
    history = [t.clone() for t in runner.decoder_cache if t is not None]
    return caches, history


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# (models, block, splice): the first block and a later one; block 2 is the first whose window
# evicts frames (6-frame window), splice 0 re-makes a whole block
@pytest.mark.parametrize("models,block,splice", [("reference", 1, 5), ("optimized", 0, 4),
                                                 ("optimized", 2, 7), ("optimized", 1, 0)])
@torch.no_grad()
def test_a_remade_block_is_the_stream_fed_the_spliced_actions(request, models, block, splice):
    parts = request.getfixturevalue("reference_parts" if models == "reference" else "parts")
    _check_splice(parts, block, splice)


def _check_splice(parts, block, splice):
    old, new = (0,), (1, 3)
    # stream A: blocks 0..block with the old actions, the latest re-made from `splice` on
    a = _session(parts)
    end = a.block_steps(block)[1]
    a.receive(*_actions(old, end))
    for _ in range(block + 1):
        shown, _ = a.run_block()
    first = a.block_steps(block)[0]
    remade, _ = a.remake_block(splice, *_actions(new, end - first - splice))
    remade_state = _state(a)
    following_end = a.block_steps(block + 1)[1]
    a.receive(*_actions(new, following_end - end))
    following, _ = a.run_block()

    # stream B: a fresh stream fed the spliced actions from the start
    b = _session(parts)
    mouse_old, keyboard_old = _actions(old, first + splice)
    mouse_new, keyboard_new = _actions(new, following_end - first - splice)
    b.receive(torch.cat([mouse_old, mouse_new], 1), torch.cat([keyboard_old, keyboard_new], 1))
    for _ in range(block + 1):
        expected, _ = b.run_block()
    expected_state = _state(b)
    expected_following, _ = b.run_block()

    assert torch.equal(remade, expected)
    assert _equal(remade_state[0], expected_state[0]), "the DiT's caches after the re-make"
    assert _equal(remade_state[1], expected_state[1]), "the decoder history after the re-make"
    assert torch.equal(following, expected_following)
    # the splice moved the frames from the splice on (the test would prove nothing otherwise)
    assert not torch.equal(remade[:, splice:], shown[:, splice:])


@torch.no_grad()
def test_a_remake_with_the_same_actions_gives_the_same_frames(parts):
    s = _session(parts)
    s.receive(*_actions((2,), s.block_steps(1)[1]))
    s.run_block()
    shown, _ = s.run_block()
    state = _state(s)
    first, end = s.block_steps(1)
    again, _ = s.remake_block(5, *_actions((2,), end - first - 5))
    assert torch.equal(again, shown)
    assert all(_equal(x, y) for x, y in zip(_state(s), state))


@torch.no_grad()
def test_only_the_latest_block_can_be_remade(parts):
    s = _session(parts)
    with pytest.raises(RuntimeError, match="no block to re-make"):
        s.remake_block(0)
    s.receive(*_actions((0,), s.block_steps(0)[1]))
    s.run_block()
    with pytest.raises(ValueError, match="splice frame 9 outside block 0's 9 frames"):
        s.remake_block(9)
    with pytest.raises(ValueError, match="keyboard: 3 steps given, the block has 5 from frame 4"):
        s.remake_block(4, None, torch.zeros(1, 3, 4))
    s.runner.keep_for_remake = False
    s.run_block()
    with pytest.raises(RuntimeError, match="keep_for_remake on"):
        s.remake_block(0)


# the scheduler's grants, on a fake clock ----------------------------------------------------------
from test_serving import FakeClock, FakeSession  # noqa: E402  (players whose blocks take block_s)


@pytest.mark.parametrize("players,block_s", [(1, 0.12), (2, 0.1), (3, 0.1), (4, 0.115)])
@pytest.mark.parametrize("seed", [0, 1])
def test_remakes_are_granted_in_slack_and_never_make_a_block_late(players, block_s, seed):
    """The live scheduler on a simulated clock (wan.serving.schedule_sim), players joining at
    once, every player's keys changing every 0.3 s on average, each change asking for a re-make."""
    from wan.serving.schedule_sim import simulate
    run = simulate(players, block_s, change_every_s=0.3, seconds=12.0, stagger=False, seed=seed)
    blocks = [r for r in run.records if r.remake is None]
    remakes = [r for r in run.records if r.remake is not None]
    without = simulate(players, block_s, change_every_s=math.inf, seconds=12.0, stagger=False,
                       seed=seed)
    late_anyway = {(r.player, r.block) for r in without.records if r.late}
    assert {(r.player, r.block) for r in blocks if r.late} <= late_anyway, "a re-make made a block late"
    assert not late_anyway  # joining at once, the first deadlines are placed where they fit
    assert not [r for r in remakes if r.late], "a re-made block missed its splice frame"
    assert run.granted - 1 <= len(remakes) <= run.granted  # (the last may still wait at the end)
    # a change shows in a re-made frame, or in the next block (it starts within a period and is
    # released at most a period before it shows)
    assert run.press_to_shown_s and all(0 < s <= 2 * 0.48 + 0.05 for s in run.press_to_shown_s)
    if players * block_s <= 0.3:  # a period has room for a re-make per player and change
        assert run.granted > 0
    if players == 4:  # 4 x 115 ms fill the 480 ms period: no slack for re-makes
        assert run.granted == 0 < run.refused


@pytest.mark.parametrize("players,block_s", [(1, 0.126), (2, 0.126), (1, 0.105), (2, 0.105)])
def test_a_join_makes_no_playing_players_block_late(players, block_s):
    """One more player joins beside `players` every 3 s at a random phase and leaves after
    1.5 s (simulated clock, blocks varying by +-3%): none of the playing players' blocks is
    late, and the joiner's first frame comes within a period of the 0.36 s it would take alone.
    (Before its first deadline was placed where it fits, a join beside one player made 13-15
    of its blocks late in 57 joins: lab notebook step 57.)"""
    from wan.serving.schedule_sim import simulate
    run = simulate(players, block_s, block_s * 0.85, change_every_s=math.inf, seconds=60.0,
                   jitter=0.03, joiner_every_s=3.0, seed=players)
    assert len(run.first_frame_s) >= 18
    assert run.late_blocks_of_others == 0
    assert max(run.first_frame_s) <= 0.36 + 0.48 + 1e-9
    assert min(run.first_frame_s) == pytest.approx(0.36)


def test_a_joiners_first_deadline_moves_off_a_playing_players_block():
    """One player plays with 126 ms blocks; a second joins just when a block of the first would
    have to run where the joiner's first block is due: the joiner's first deadline moves on by
    whole frames until both fit, and neither is late."""
    from wan.serving.scheduler import DeadlineScheduler
    from wan.serving.schedule_sim import SimClock, SimSession
    clock = SimClock()
    scheduler = DeadlineScheduler(clock=clock, sleep=lambda s: None, synchronize=lambda: None)
    scheduler.block_estimate_s = 0.126
    scheduler.start_live()
    first = SimSession(0, clock, 0.126, 0.11)
    scheduler.join(first)  # block 0 due 0.36, then every 0.48 s
    records = []

    def run_until(done_when):  # the scheduler's blocks, idling to each next release
        while not done_when():
            done = scheduler.step(timeout=0.0)
            if done is None:
                clock.now = scheduler.next_release()
            else:
                records.append(done[0])
    run_until(lambda: len(records) == 3)
    # the first player's block 3 is due at 1.80, released at 1.624 (one player's lead: it waits
    # since before the join); a joiner now (1.45) due at 1.81 would finish 76 ms late after it
    clock.now = 1.45
    joiner = SimSession(1, clock, 0.126, 0.11)
    scheduler.join(joiner)
    (entry,) = [n for n in scheduler._queue if n.session is joiner]
    assert entry.due > 1.45 + 0.36 + 1e-9
    assert ((entry.due - 1.81) * 25) == pytest.approx(round((entry.due - 1.81) * 25))
    run_until(lambda: clock.now >= 4.0)
    assert not [r for r in records if r.late]
    alone = DeadlineScheduler(clock=clock, sleep=lambda s: None, synchronize=lambda: None)
    alone.start_live()
    clock.now = 5.0
    alone.join(SimSession(2, clock, 0.126, 0.11))  # nothing else waits: 0.36 s
    assert alone._queue[0].due == pytest.approx(5.0 - alone.begin_time() + 0.36)


def test_a_remake_splices_at_the_first_frame_it_can_be_ready_for():
    from wan.serving.scheduler import DeadlineScheduler
    clock = FakeClock()
    scheduler = DeadlineScheduler(clock=clock, sleep=lambda s: None, synchronize=lambda: None)
    scheduler.block_estimate_s = 0.1
    scheduler.start_live()
    player = FakeSession(0, clock, 0.1)
    scheduler.join(player)
    clock.now = scheduler.next_release()
    record, _ = scheduler.step(timeout=0.0)  # block 0: due 0.36, finished at 0.1 + 0.1 ... shown 0.36
    assert record.block == 0 and not record.late
    clock.now = 0.40  # frame 1 of block 0 (9 frames from 0.36) is on screen
    splice = scheduler.try_remake(player, record.due, 9, 0)
    # ready at 0.40 + 0.1 + 0.02 margin: frame ceil((0.52 - 0.36) * 25) = 4 shows at 0.52
    assert splice == 4
    assert scheduler.try_remake(player, record.due, 9, 0) is None  # one waits already
    remade, _ = scheduler.step(timeout=0.0)
    assert remade.remake == 4 and remade.finish == pytest.approx(0.5) and not remade.late
    clock.now = 0.66  # frame 7 of 9 shows at 0.64: too late to splice into block 0
    assert scheduler.try_remake(player, record.due, 9, 0) is None


class _DecodedFirst:
    """A player whose blocks have their frames `ready_s` after the start and finish (the cache
    update) `block_s` after it, on the fake clock: the scheduler's synchronize ends the block."""

    def __init__(self, clock, ready_s, block_s):
        self.player_id, self.clock, self.blocks_done = 0, clock, 0
        self.ready_s, self.block_s, self.started = ready_s, block_s, None

    def run_block(self):
        from wan.serving.runner import BlockTiming
        self.started, self.blocks_done = self.clock.now, self.blocks_done + 1
        session = self

        class Clock:
            parts = []

            def wait_frames(self, mark="frames"):
                session.clock.now = session.started + session.ready_s

            def timing(self):
                return BlockTiming(1e3 * session.ready_s, 1e3 * session.block_s)
        return torch.full((1, 9, 3, 2, 2), float(self.blocks_done)), Clock()

    def finish(self):
        self.clock.now = self.started + self.block_s


def test_frames_go_out_when_decoded_before_the_block_finishes():
    """`step(on_frames=...)`: the frames are handed out at the runner's frames-ready point (its
    record has `ready` and no `finish` yet), then the block finishes; the full record follows."""
    from wan.serving.scheduler import BlockRecord, DeadlineScheduler
    clock = FakeClock()
    player = _DecodedFirst(clock, ready_s=0.07, block_s=0.11)
    scheduler = DeadlineScheduler(clock=clock, sleep=lambda s: None, synchronize=player.finish)
    scheduler.start_live()
    scheduler.join(player)
    handed = []

    def on_frames(record, frames, part):
        handed.append((clock.now, record, frames))
    for block in range(3):
        clock.now = max(clock.now, scheduler.next_release())
        record, frames = scheduler.step(timeout=0.0, on_frames=on_frames)
        at, early, early_frames = handed[-1]
        assert early.finish is None and early.block == record.block == block
        assert at == pytest.approx(record.start + 0.07) == pytest.approx(early.ready)
        assert record.finish == pytest.approx(record.start + 0.11)
        assert record.finish > at  # sent before the end
        assert record.ready == pytest.approx(early.ready)
        assert early_frames is frames and frames[0, 0, 0, 0, 0] == block + 1
    assert len(handed) == 3
    # lateness as the player sees it: a block not finished yet is late when its frames are
    late = dict(player=0, block=1, frames=12, joined=0.0, due=1.0, release=0.5, start=0.9)
    assert not BlockRecord(**late, finish=None, ready=0.98).late
    assert BlockRecord(**late, finish=None, ready=1.02).late
    assert BlockRecord(**late, finish=1.02, ready=0.98).late  # the whole block: its finish


def test_frames_sent_when_decoded_equal_frames_sent_after_the_block():
    """The play engine (CPU, tiny preset) sends the same frames, bitwise, whether it sends them
    as soon as they are decoded (`send_at_frames_ready`) or after the whole block (the default
    for continuous play)."""
    from wan.play.engine import EngineConfig, GameEngine
    sent = {}
    for early in (True, False):
        engine = GameEngine(EngineConfig(device="cpu", max_players=1, reactive=False,
                                         send_at_frames_ready=early))
        batches = play_batches(engine, 2, seed=11)  # the same noise for both engines
        sent[early] = [(b.block, b.jpegs) for b in batches[:2]]
        for b in batches[:2]:
            assert b.block_start <= b.frames_ready <= b.encoded and not b.remake
    assert [block for block, _ in sent[True]] == [0, 1]
    assert sent[True] == sent[False]


def test_an_on_input_players_frames_go_out_when_decoded(monkeypatch):
    """On-input play (nothing plays between presses): the engine sends a block's frames from the
    scheduler's frames-ready call, before the block's cache update is done (`on_input_at_frames_
    ready`, the default), or after the whole block when that is off; the same frames either way,
    and each press still gets its own block."""
    from wan.play.engine import EngineConfig, GameEngine
    sent = {}
    for early in (True, False):
        engine = GameEngine(EngineConfig(device="cpu", max_players=1,
                                         on_input_at_frames_ready=early))
        finished = []  # per frames sent: whether its block had finished (its record's finish)
        send = engine._send
        monkeypatch.setattr(engine, "_send", lambda record, frames, part=None, send=send,
                            finished=finished: (finished.append(record.finish is not None),
                                                send(record, frames, part))[1])
        batches = play_batches(engine, 3, seed=4, play_mode="on-input")
        assert [b.block for b in batches[:3]] == [0, 1, 2]
        assert finished[:3] == [not early] * 3
        assert all(b.block_start <= b.frames_ready <= b.encoded for b in batches[:3])
        sent[early] = [b.jpegs for b in batches[:3]]
    assert sent[True] == sent[False]


def test_which_frames_go_out_when_decoded():
    """The engine's rule for sending at frames-ready (else after the whole block): a re-made
    block's (its splice was planned on that time) and an on-input player's by default, a
    continuous player's regular block only with `send_at_frames_ready`; each switch alone."""
    from wan.play.engine import EngineConfig, GameEngine, Player
    from wan.serving.scheduler import BlockRecord
    engine = GameEngine(EngineConfig(device="cpu", max_players=1))
    continuous = Player(engine.space, "continuous", sink=lambda batch: None)
    on_input = Player(engine.space, "on-input", sink=lambda batch: None)
    block = BlockRecord(1, 3, 12, 0.0, 1.0, 0.7, 0.75, None, None, 0.85)
    remake = BlockRecord(1, 3, 12, 0.0, 1.0, 0.7, 0.75, None, 5, 0.85)

    def rule():
        return [engine.sends_at_frames_ready(continuous, block),
                engine.sends_at_frames_ready(continuous, remake),
                engine.sends_at_frames_ready(on_input, block)]
    assert rule() == [False, True, True]
    engine.config.remakes_at_frames_ready = False
    assert rule() == [False, False, True]
    engine.config.on_input_at_frames_ready = False
    assert rule() == [False, False, False]
    engine.config.send_at_frames_ready = True
    assert rule() == [True, True, True]


def test_frames_encoded_in_the_background_equal_frames_encoded_by_the_worker():
    """`encode_in_background` (the JPEG encoding on a sender thread beside the next block) sends
    the same frames, bitwise and in the same order, as the worker encoding them itself; with it
    the frames go out from the sender thread, without it from the worker."""
    import threading
    from wan.play.engine import EngineConfig, GameEngine

    class Threads:  # the metrics hooks, called where the frames go out: on which thread
        def __init__(self):
            self.names = set()

        def block_done(self, player, batch):
            self.names.add(threading.current_thread().name)

        def first_frame(self, after, ms):
            pass

    sent = {}
    for background in (True, False):
        threads = Threads()
        engine = GameEngine(EngineConfig(device="cpu", max_players=1, reactive=False,
                                         jpeg="pillow", encode_in_background=background),
                            metrics=threads)
        batches = play_batches(engine, 3, seed=6)
        assert all(b.block_start <= b.frames_ready <= b.encoded for b in batches)
        prefix = "wan-play-send" if background else "wan-play-gpu"
        assert threads.names and all(n.startswith(prefix) for n in threads.names), threads.names
        sent[background] = [(b.block, b.jpegs) for b in batches[:3]]
    assert [block for block, _ in sent[True]] == [0, 1, 2]
    assert sent[True] == sent[False]


def test_frames_of_a_game_that_ended_meanwhile_are_not_delivered():
    """The sender thread delivers a block's frames after the worker went on: frames of a game
    that a new game (or an error) ended in between are dropped, not shown after it."""
    from wan.play.encode import EncodeJob
    from wan.play.engine import EngineConfig, GameEngine
    from wan.serving.scheduler import BlockRecord
    engine = GameEngine(EngineConfig(device="cpu", max_players=1))
    engine.scheduler.start_live()  # (the clock its records count from; no worker runs)
    got = []
    player = engine.add_player("continuous", got.append)
    player.action = player.input.sample()
    record = BlockRecord(player.id, 0, 9, 0.0, 0.36, 0.0, 0.01, 0.2, None, 0.15)
    job = EncodeJob(lambda: [b"jpeg"] * 9)
    player.games = 2
    engine._deliver(player, job, record, player.action, 1, 0.0, 0)  # made in game 1
    assert got == []
    engine._deliver(player, job, record, player.action, 2, 0.0, 0)
    assert len(got) == 1 and got[0].game == 2 and got[0].jpegs == [b"jpeg"] * 9


@torch.no_grad()
def test_a_rewound_slot_plays_a_new_game_as_a_fresh_runner(parts):
    """A player slot: the runner's own caches rewound in place for the next game (the graphs
    captured over them stay valid) give the frames a fresh runner gives."""
    model, decoder, inputs = parts
    other = random_inputs(model, LATENT, 3, 0, seed=9)

    def play(runner, context, seed):
        runner.generator = torch.Generator().manual_seed(seed)
        return [runner.block(inputs["cond_concat"], *_held_actions(block))[0] for block in range(2)]

    slot = StreamingBlockRunner(model, decoder, latent_hw=LATENT)
    slot.start(inputs["visual_context"])
    play(slot, inputs["visual_context"], 1)
    kept = slot.caches["kv_cache"][0]["k"]
    slot.start(other["visual_context"], reuse_caches=True)
    assert slot.caches["kv_cache"][0]["k"] is kept
    again = play(slot, other["visual_context"], 2)
    fresh = StreamingBlockRunner(model, decoder, latent_hw=LATENT)
    fresh.start(other["visual_context"])
    expected = play(fresh, other["visual_context"], 2)
    assert all(torch.equal(a, e) for a, e in zip(again, expected))


def _held_actions(block):
    from wan.modules.shared.conditioning import history_steps
    return _actions((block % 4,), history_steps(3 * block + 2))


# through the real server ---------------------------------------------------------------------------
def test_a_key_change_reaches_the_page_in_frames_of_the_remade_block(monkeypatch):
    """Loopback WebSocket, tiny preset on a CPU: after a key change that says which frame was on
    screen, the block on screen is re-made and its frames from the splice on arrive again,
    carrying the new input's id; the frames before the splice are not sent again. (The grant
    is forced here with a zero block estimate: a CPU block takes longer than the 0.48 s period,
    so it leaves no slack; the grants themselves are tested on the fake clock above.)"""
    import asyncio
    import json

    from helpers import PlayServerThread
    from wan.play.client import parse_frame

    import wan.serving.scheduler as scheduler_module
    following = scheduler_module._following

    def blocks_0_and_1_only(chosen, finish, lead):  # block 2 waits: it cannot read the new keys
        entry = following(chosen, finish, lead)     # before the re-make does
        if chosen.session.blocks_done >= 2:
            entry.release += 3600.0
        return entry
    monkeypatch.setattr(scheduler_module, "_following", blocks_0_and_1_only)

    with PlayServerThread(max_players=1) as running:
        engine = running.engine
        assert engine.config.reactive
        original = engine.scheduler.try_remake

        def quick(*args):
            saved = engine.scheduler.block_estimate_s
            engine.scheduler.block_estimate_s = 0.0  # as if a block took no time
            try:
                return original(*args)
            finally:
                engine.scheduler.block_estimate_s = saved
        engine.scheduler.try_remake = quick

        async def scenario():
            from websockets.asyncio.client import connect
            frames = []
            async with connect(running.ws + "?frames=ws", max_size=2**24) as ws:
                hello = json.loads(await ws.recv())
                assert hello["type"] == "hello" and hello["reactive"] is True
                while not frames or frames[-1].block < 1:  # block 1's frames have come
                    message = await asyncio.wait_for(ws.recv(), 120)
                    if isinstance(message, bytes):
                        frames.append(parse_frame(message))
                await ws.send(json.dumps({"type": "input", "id": 1, "keys": ["w"],
                                          "shown": [1, 0]}))
                while not any(f.input_id == 1 and f.index == 11 for f in frames):
                    message = await asyncio.wait_for(ws.recv(), 120)
                    if isinstance(message, bytes):
                        frames.append(parse_frame(message))
            return frames

        frames = asyncio.run(scenario())
        health = engine.remakes
    first_new = next(f for f in frames if f.input_id == 1)
    assert health["granted"] >= 1
    # the first frames that show the press are block 1's, re-made from its splice frame on
    assert first_new.block == 1 and 1 <= first_new.index < 12 and first_new.frames_in_block == 12
    remade = [f for f in frames if f.block == 1 and f.input_id == 1]
    assert [f.index for f in remade] == list(range(first_new.index, 12))
    old = [f.index for f in frames if f.block == 1 and f.input_id == 0]
    assert old[:12] == list(range(12))  # the block as first made, each frame once


@pytest.fixture(scope="module")
def cuda_parts():
    from helpers import HAS_CUDA
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU (run on the device)")
    model = build_model(dtype=torch.bfloat16, device="cuda", cls=OptimizedCausalWanModel,
                        cuda_graphs=True)
    decoder = tiny_play_decoder(OptimizedVAEDecoderWrapper, "cuda", torch.float16)
    decoder.cuda_graphs = True
    inputs = random_inputs(model, LATENT, 3, 0, seed=1)
    return model, decoder, inputs


@pytest.mark.parametrize("block,splice", [(0, 4), (3, 7)])
@torch.no_grad()
def test_on_cuda_with_graphs_a_remade_block_is_the_stream_fed_the_spliced_actions(
        cuda_parts, block, splice):
    """The same on the GPU (bf16 DiT, fp16 decoder, CUDA graphs replayed): bitwise."""
    _check_splice(cuda_parts, block, splice)


@torch.no_grad()
def test_on_cuda_the_frames_and_their_check_are_ready_before_the_block_ends(cuda_parts):
    """What sending at frames-ready relies on (CUDA, the decode on its own stream): once
    `wait_frames()` returns, the block's non-finite check has arrived (reading it waits for
    nothing) and the frames are final: equal to themselves after the whole block is done."""
    from wan.modules.shared.conditioning import history_steps
    session = _session(cuda_parts)
    session.receive(*_actions((0,), history_steps(3 * 3 - 1)))  # three blocks' actions
    for _ in range(3):
        frames, clock = session.run_block()
        clock.wait_frames()
        assert session.runner._checks[-1].done()
        session.runner.check_finite(wait=False)
        side = session.runner.side
        with torch.cuda.stream(side):  # read where the sender reads: the decode's stream
            early = frames.clone()
        side.synchronize()
        torch.cuda.synchronize()
        assert torch.equal(early, frames)
        timing = clock.timing()
        assert timing.action_to_frame_ms <= timing.block_ms
