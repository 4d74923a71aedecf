"""Shared test helpers: models with random weights, random inputs, fresh caches, error metric."""
import pytest
import torch

from wan import CausalWanModel
from wan.modules.rolling_cache import new_stream_caches
from wan.presets import LATENT_SIZE, model_config
from wan.random_init import randomize_weights_

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run on the device)")


def build_model(preset="tiny", dtype=torch.float64, device="cpu", seed=0, cls=CausalWanModel,
                **overrides):
    """A model with realistic random weights, frames-per-block 3 as the pipeline sets it."""
    model = cls.from_config(model_config(preset), **overrides)
    randomize_weights_(model, seed)
    model.num_frame_per_block = 3
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(model, frames=3, start_frame=0, batch=1, preset="tiny", seed=1):
    """Random inputs for a call covering frames [start_frame, start_frame + frames)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = LATENT_SIZE[preset]
    dtype, device = model.dtype, model.device

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    steps = 1 + 4 * (start_frame + frames - 1)
    inputs = {"x": rand(batch, 16, frames, h, w),
              "t": torch.full((batch, frames), 500.0, dtype=dtype, device=device),
              "visual_context": rand(batch, 257, 1280),
              "cond_concat": rand(batch, 20, frames, h, w),
              "mouse_cond": None, "keyboard_cond": None}
    action = next((b.action_model for b in model.blocks if b.action_model is not None), None)
    if action is not None and action.enable_mouse:
        inputs["mouse_cond"] = 0.1 * rand(batch, steps, 2)
    if action is not None and action.enable_keyboard:
        width = action.keyboard_embed[0].in_features
        inputs["keyboard_cond"] = (rand(batch, steps, width) > 0).to(dtype)
    return inputs


def make_caches(model, batch=1, cache_frames=6, preset="tiny"):
    h, w = LATENT_SIZE[preset]
    return new_stream_caches(model, batch, cache_frames, (h // 2) * (w // 2))


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
