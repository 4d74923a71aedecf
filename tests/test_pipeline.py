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
