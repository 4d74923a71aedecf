"""Frames out per latent frame (issue 31, item 2; the runner's `frames_in_parts`): a block decoded
one latent frame per decoder call gives the frames of one call (the reference decoder bitwise,
the optimized one within float32 rounding), its parts in order with their clock marks and
non-finite checks; the scheduler hands the parts out one by one; the play engine sends them as
batches that make up the block (CPU, tiny preset). A CUDA test checks that each part and its
check are ready at its mark, before the block's end."""
import pytest
import torch

from helpers import build_model, play_batches, tiny_play_decoder
from wan.modules.causal_model import CausalWanModel
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.modules.random_init import random_inputs
from wan.modules.vae_decoder import VAEDecoderWrapper
from wan.serving.runner import NonFiniteOutputError, StreamingBlockRunner

LATENT = (4, 8)


def _pair(model_cls, decoder_cls, device="cpu", dtype=torch.float32, decoder_dtype=None):
    model = build_model(dtype=dtype, device=device, cls=model_cls)
    decoder = tiny_play_decoder(decoder_cls, device, decoder_dtype or dtype)
    return model, decoder, random_inputs(model, LATENT, 3, 0, seed=1)


def _session(pair, in_parts: bool, blocks: int = 3):
    """A player session over a runner with `frames_in_parts` (seeded noise), given the actions of
    `blocks` blocks."""
    from wan.modules.shared.conditioning import history_steps
    from wan.serving.scheduler import PlayerSession
    model, decoder, inputs = pair
    runner = StreamingBlockRunner(model, decoder, latent_hw=LATENT)
    runner.frames_in_parts = in_parts
    session = PlayerSession("p", runner, inputs["visual_context"], inputs["cond_concat"], seed=5,
                            mouse_dim=2, keyboard_dim=4)
    steps = history_steps(3 * blocks - 1)
    keyboard = torch.zeros(1, steps, 4)
    keyboard[:, :, 0] = 1.0
    session.receive(torch.full((1, steps, 2), 0.05), keyboard)
    return session


def _blocks(pair, in_parts: bool, blocks: int = 3):
    """`blocks` blocks of one stream: (runner, [(frames, clock)])."""
    session = _session(pair, in_parts, blocks)
    out = [session.run_block() for _ in range(blocks)]
    session.runner.check_finite()
    return session.runner, out


@pytest.mark.parametrize("models", ["reference", "optimized"])
@torch.no_grad()
def test_a_block_in_parts_is_the_block_in_one_call(models):
    """The frames of the parts, in order, are the block's frames (the reference decoder, which
    decodes a latent frame at a time anyway: bitwise; the optimized one: within float32
    rounding, its convolutions see 1 frame instead of 3); each part's `first` is where its
    frames start (block 0: 1 + 4 + 4 frames, later blocks 4 + 4 + 4)."""
    pair = _pair(*((CausalWanModel, VAEDecoderWrapper) if models == "reference"
                   else (OptimizedCausalWanModel, OptimizedVAEDecoderWrapper)))
    _, whole = _blocks(pair, in_parts=False)
    _, parted = _blocks(pair, in_parts=True)
    for index, ((expected, clock_whole), (frames, clock)) in enumerate(zip(whole, parted)):
        assert clock_whole.parts == []
        assert [p.first for p in clock.parts] == ([0, 1, 5] if index == 0 else [0, 4, 8])
        assert [p.mark for p in clock.parts] == ["part0", "part1", "part2"]
        assert all(p.reader_stream() is None for p in clock.parts)  # a CPU: no stream to wait on
        assert all(p.block == index for p in clock.parts)
        assert all(p.frame == 3 * index for p in clock.parts)
        joined = torch.cat([p.frames for p in clock.parts], dim=1)
        assert torch.equal(joined, frames)
        if models == "reference":
            assert torch.equal(frames, expected)
        else:
            torch.testing.assert_close(frames, expected, rtol=0, atol=1e-4)
            assert (frames - expected).norm() <= 1e-5 * expected.norm()


@torch.no_grad()
def test_a_part_with_non_finite_frames_is_refused_at_that_part():
    """check_part reads one part's counts: a NaN in the second part's frames raises there (the
    first part passes), and the stream stays failed."""
    pair = _pair(OptimizedCausalWanModel, OptimizedVAEDecoderWrapper)
    runner, out = _blocks(pair, in_parts=True, blocks=1)
    _, clock = out[0]
    runner.check_part(clock.parts[0])
    clock.parts[1].frames[0, 0, 0, 0, 0] = float("nan")
    from wan.serving.runner import _finite_check
    latents = torch.zeros(1)
    clock.parts[1].check = _finite_check(latents, clock.parts[1].frames)
    with pytest.raises(NonFiniteOutputError, match="frames hold 1 non-finite"):
        runner.check_part(clock.parts[1])
    with pytest.raises(NonFiniteOutputError):
        runner.check_finite()


def test_the_scheduler_hands_the_parts_out_one_by_one():
    """`step(on_frames=...)` with a block decoded in parts: one call per part, in order, each at
    its part's ready time (fake clock), with the part; the whole block's record after."""
    from types import SimpleNamespace

    from wan.serving.runner import BlockTiming
    from wan.serving.scheduler import DeadlineScheduler

    class FakeClock:
        now = 0.0

        def __call__(self):
            return self.now

    now = FakeClock()
    ready_at = {"part0": 0.05, "part1": 0.06, "part2": 0.07}

    class Player:
        player_id, blocks_done = 0, 0

        def run_block(self):
            self.started, self.blocks_done = now.now, self.blocks_done + 1
            frames = torch.arange(12.0).view(1, 12, 1, 1, 1)
            parts = [SimpleNamespace(first=f, frames=frames[:, f:f + 4], mark=f"part{i}")
                     for i, f in enumerate((0, 4, 8))]
            player = self

            class Clock:
                def wait_frames(self, mark="frames"):
                    now.now = player.started + ready_at.get(mark, 0.07)

                def timing(self):
                    return BlockTiming(70.0, 110.0)
            clock = Clock()
            clock.parts = parts
            return frames, clock

        def finish(self):
            now.now = self.started + 0.11

    player = Player()
    scheduler = DeadlineScheduler(clock=now, sleep=lambda s: None, synchronize=player.finish)
    scheduler.start_live()
    scheduler.join(player)
    handed = []
    now.now = scheduler.next_release()
    record, frames = scheduler.step(timeout=0.0, on_frames=lambda r, f, p: handed.append(
        (now.now, r, f, p)))
    assert [p.first for _, _, _, p in handed] == [0, 4, 8]
    for (at, early, part_frames, part), mark in zip(handed, ("part0", "part1", "part2")):
        assert at == pytest.approx(record.start + ready_at[mark]) == pytest.approx(early.ready)
        assert early.finish is None and early.block == record.block
        assert part_frames is part.frames
    assert torch.equal(torch.cat([f for _, _, f, _ in handed], dim=1), frames)
    assert record.finish == pytest.approx(record.start + 0.11)
    assert scheduler.part_ready_estimates_s == {}  # a stream's first blocks pay captures
    for _ in range(2):  # blocks 1 and 2: the third one's parts make the estimates
        now.now = max(now.now, scheduler.next_release())
        scheduler.step(timeout=0.0, on_frames=lambda r, f, p: None)
    assert scheduler.part_ready_estimates_s == {
        12: {first: pytest.approx(ready_at[f"part{i}"]) for i, first in enumerate((0, 4, 8))}}


def test_the_engine_sends_a_block_in_parts_that_make_up_the_block():
    """The play engine (CPU, tiny preset) with frames sent at frames-ready, in parts: each
    block arrives as 3 batches whose first_frame says where they start (block 0: 0, 1, 5),
    each with the block's whole frame count, together every frame once; the metrics count each
    block once."""
    from wan.play.engine import EngineConfig, GameEngine
    from wan.play.metrics import PlayMetrics
    metrics = PlayMetrics()
    engine = GameEngine(EngineConfig(device="cpu", max_players=1, reactive=False,
                                     send_at_frames_ready=True, frames_in_parts=True),
                        metrics=metrics)
    batches = play_batches(engine, 6)
    assert [(b.block, b.first_frame, len(b.jpegs), b.frames_in_block) for b in batches[:6]] == [
        (0, 0, 1, 9), (0, 1, 4, 9), (0, 5, 4, 9), (1, 0, 4, 12), (1, 4, 4, 12), (1, 8, 4, 12)]
    assert all(not b.remake and b.block_start <= b.frames_ready <= b.encoded for b in batches)
    blocks_counted = metrics.blocks._value.get()
    assert blocks_counted == len({b.block for b in batches if b.first_frame == 0})
    with pytest.raises(ValueError, match="frames_in_parts=True"):
        GameEngine.set_frames_in_parts(
            type("E", (), {"config": EngineConfig(device="cpu")})(), True)


@torch.no_grad()
def test_on_cuda_each_part_and_its_check_are_ready_at_its_mark():
    """CUDA (decode on its own stream, graphs): once `wait_frames(part.mark)` returns, that
    part's check has arrived and its frames, read on `reader_stream()` (which waits for that
    part's mark only, not on the decode stream), are final; the parts make up the frames of a whole
    decode within fp16 rounding; the one-latent-frame graphs were captured by warm-up."""
    from helpers import HAS_CUDA
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU (run on the device)")
    model, decoder, inputs = _pair(OptimizedCausalWanModel, OptimizedVAEDecoderWrapper, "cuda",
                                   torch.bfloat16, torch.float16)
    session = _session((model, decoder, inputs), in_parts=True)
    runner = session.runner
    session.warm_up()
    captures = decoder.counters["captures"]
    for _ in range(3):
        frames, clock = session.run_block()
        early = []
        for part in clock.parts:
            clock.wait_frames(part.mark)
            _, event = part.check[0], part.check[1]
            assert event.query(), "the part's check had not arrived at its mark"
            runner.check_part(part)
            # where the engine reads a part: a stream that waits for this part's mark only
            reader = part.reader_stream()
            assert reader is not None and reader != runner.side
            with torch.cuda.stream(reader):
                early.append(part.frames.clone())
        reader.synchronize()
        torch.cuda.synchronize()
        assert torch.equal(torch.cat(early, dim=1), frames)
    assert decoder.counters["captures"] == captures, "a part's graph was captured while playing"


def test_a_remake_of_a_block_in_parts_splices_at_the_part_ready_first():
    """With part estimates (blocks decoded in parts), a re-made block splices at the first frame
    whose own part can be ready before it shows: the early part's frames are ready sooner than
    the whole block's, so the splice comes earlier than without parts; a frame of a late part
    is planned with that part's time. The part estimates come from the parts handed out (blocks
    from the third on), and a re-make planned so is not late."""
    from wan.serving.scheduler import DeadlineScheduler

    class FakeClock:
        now = 0.0

        def __call__(self):
            return self.now

    def scheduler_with(parts):
        clock = FakeClock()
        scheduler = DeadlineScheduler(clock=clock, sleep=lambda s: None,
                                      synchronize=lambda: None)
        scheduler.block_estimate_s, scheduler.ready_estimate_s = 0.12, 0.10
        if parts:
            for first, seconds in ((0, 0.05), (4, 0.075), (8, 0.10)):
                scheduler._note_part_ready(12, first, seconds)
        scheduler.start_live()
        return scheduler, clock

    class Session:
        player_id, blocks_done = 0, 5

    shown_at = 1.0  # frame 0 of the latest (12-frame) block shows at 1.0
    whole, clock = scheduler_with(parts=False)
    clock.now = 0.95
    # the whole block's frames at 0.95 + 0.10 + 0.02 margin = 1.07: frame ceil(0.07 * 25) = 2
    assert whole.try_remake(Session(), shown_at, 12, 5) == 2
    in_parts, clock = scheduler_with(parts=True)
    clock.now = 0.95
    # the first part's frames at 0.95 + 0.05 + 0.02 = 1.02: frame 1 (1.04) is the first after
    assert in_parts.try_remake(Session(), shown_at, 12, 5) == 1
    late, clock = scheduler_with(parts=True)
    clock.now = 1.10  # frame 3 shows at 1.12; a frame of part 1 (4-7) needs 1.10 + 0.075 + 0.02
    assert late.try_remake(Session(), shown_at, 12, 5) == 5  # 1.20 <= frame 5's 1.20
    # the estimates: an exponential average per (frames, first)
    estimates = DeadlineScheduler(clock=FakeClock(), sleep=lambda s: None,
                                  synchronize=lambda: None)
    estimates._note_part_ready(12, 4, 0.1)
    estimates._note_part_ready(12, 4, 0.2)
    assert estimates.part_ready_estimates_s == {12: {4: pytest.approx(0.12)}}
