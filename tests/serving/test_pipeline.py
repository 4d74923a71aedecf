"""The streaming block runner (wan/serving/runner.py): blocks of 9 then 12 frames, the same frames from
the reference pair (reference DiT + decoder, upstream's order) and the optimized pair, clear
errors; the flow-matching schedule against upstream's warped steps."""
import pytest
import torch

from helpers import build_decoder, build_model, rel_err
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.modules.vae_decoder import VAEDecoderWrapper
from wan.serving.runner import FlowMatchSchedule, StreamingBlockRunner
from wan.modules.random_init import random_inputs

LATENT = (8, 16)  # the tiny preset's latent


def test_schedule_warps_the_distilled_steps():
    schedule = FlowMatchSchedule()
    # shift 5 on sigma = 1 - k/1000 for k = 0, 334, 667
    expected = [1.0, 5 * 0.666 / (1 + 4 * 0.666), 5 * 0.333 / (1 + 4 * 0.333)]
    assert schedule.sigmas == pytest.approx(expected, rel=1e-12)
    assert schedule.timesteps == pytest.approx([1000 * s for s in expected], rel=1e-12)
    with pytest.raises(ValueError, match="denoising steps"):
        FlowMatchSchedule(steps=(1000, 0))


@torch.no_grad()
def _frames(dit_cls, decoder_cls, blocks=2):
    dit = build_model(cls=dit_cls)
    runner = StreamingBlockRunner(dit, build_decoder(decoder_cls), latent_hw=LATENT)
    runner.start(random_inputs(dit, LATENT, 3, 0, seed=1)["visual_context"])
    torch.manual_seed(0)
    out = []
    for block in range(blocks):
        inputs = random_inputs(dit, LATENT, 3, 3 * block, seed=1 + block)
        frames, clock = runner.block(inputs["cond_concat"], inputs["mouse_cond"],
                                     inputs["keyboard_cond"])
        timing = clock.timing()
        assert 0 < timing.action_to_frame_ms <= timing.block_ms
        out.append(frames)
    return out


def test_reference_and_optimized_pairs_give_the_same_frames():
    reference = _frames(__import__("wan").CausalWanModel, VAEDecoderWrapper)
    optimized = _frames(OptimizedCausalWanModel, OptimizedVAEDecoderWrapper)
    assert [f.shape[1] for f in reference] == [9, 12]
    assert reference[0].shape[-2:] == (8 * LATENT[0], 8 * LATENT[1])
    for ref, opt in zip(reference, optimized):
        assert rel_err(opt, ref) <= 1e-6


def test_block_before_start_is_an_error():
    dit = build_model()
    runner = StreamingBlockRunner(dit, VAEDecoderWrapper())
    with pytest.raises(RuntimeError, match="start"):
        runner.block(None)


# ------------------------------------------------------------------ NaN/inf: checked per block
class _PoisonedDecoder(VAEDecoderWrapper):
    """A narrow decoder (width 16, random weights) whose output gets a NaN at call `poison_at`."""

    def __init__(self, poison_at=None):
        from wan.modules.random_init import randomize_decoder_weights_
        from wan.modules.vae_decoder import VAEDecoder3d
        super().__init__()
        self.decoder = VAEDecoder3d(dim=16)
        randomize_decoder_weights_(self)
        self.calls, self.poison_at = 0, poison_at
        self.eval()

    def forward(self, z, *cache):
        frames, cache = super().forward(z, *cache)
        if self.calls == self.poison_at:
            frames = frames.clone()
            frames[0, -1, 0, 0, 0] = float("nan")
        self.calls += 1
        return frames, cache


def _nan_runner(poison_at=None):
    from wan.serving.runner import NonFiniteOutputError  # noqa: F401 (imported by the tests)
    dit = build_model(cls=OptimizedCausalWanModel, dtype=torch.float32)
    runner = StreamingBlockRunner(dit, _PoisonedDecoder(poison_at), latent_hw=LATENT)
    runner.start(random_inputs(dit, LATENT, 3, 0, seed=1)["visual_context"])
    return dit, runner


def _block(runner, dit, block, **kwargs):
    inputs = random_inputs(dit, LATENT, 3, 3 * block, seed=1 + block)
    return runner.block(inputs["cond_concat"], inputs["mouse_cond"], inputs["keyboard_cond"],
                        **kwargs)


@torch.no_grad()
def test_nan_latents_stop_the_stream_naming_the_block_until_a_new_one_starts():
    from wan.serving.runner import NonFiniteOutputError
    dit, runner = _nan_runner()
    _, clock = _block(runner, dit, 0)
    clock.timing()
    runner.check_finite()  # a good block: nothing to say
    noise = torch.full((1, 16, 3, *LATENT), float("nan"))
    _, clock = _block(runner, dit, 1, noise=noise)
    with pytest.raises(NonFiniteOutputError, match=r"block 1 \(latent frames 3-5\): the DiT's "
                       r"denoised latents hold \d+ non-finite") as caught:
        clock.timing()
    assert (caught.value.block, caught.value.where) == (1, "latents")
    with pytest.raises(NonFiniteOutputError, match="block 1"):  # the stream stays stopped
        _block(runner, dit, 2)
    runner.start(random_inputs(dit, LATENT, 3, 0, seed=1)["visual_context"])
    frames, clock = _block(runner, dit, 0)  # a new stream plays again
    clock.timing()
    assert torch.isfinite(frames).all()


@torch.no_grad()
def test_nan_frames_from_the_decoder_are_named_at_the_next_block_or_check():
    from wan.serving.runner import NonFiniteOutputError
    dit, runner = _nan_runner(poison_at=1)
    _block(runner, dit, 0)
    frames, _ = _block(runner, dit, 1)  # returns: the check is read later, without a sync
    assert torch.isnan(frames).any()
    with pytest.raises(NonFiniteOutputError, match=r"block 1 .*decoder's frames hold 1 "
                       r"non-finite value\(s\) \(NaN or inf\) from finite latents") as caught:
        _block(runner, dit, 2)  # the next block reads block 1's count first
    assert caught.value.where == "frames"
    with pytest.raises(NonFiniteOutputError):
        runner.check_finite()
