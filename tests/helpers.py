"""Shared test helpers: models with random weights, random inputs, fresh caches, error metric."""
import pytest
import torch

from wan import CausalWanModel
from wan.modules.rolling_cache import new_stream_caches
from wan.presets import LATENT_SIZE, model_config
from wan.random_init import random_inputs, randomize_weights_

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run on the device)")


def build_model(preset="tiny", dtype=torch.float64, device="cpu", seed=0, cls=CausalWanModel,
                **overrides):
    """A model with realistic random weights, frames-per-block 3 as the pipeline sets it."""
    with torch.device(device):
        model = cls.from_config(model_config(preset), **overrides)
    randomize_weights_(model, seed)
    model.num_frame_per_block = 3
    return model.to(dtype=dtype).eval()


def make_inputs(model, frames=3, start_frame=0, batch=1, preset="tiny", seed=1):
    """Random inputs for a call covering frames [start_frame, start_frame + frames)."""
    return random_inputs(model, LATENT_SIZE[preset], frames, start_frame, batch, seed)


def make_caches(model, batch=1, cache_frames=6, preset="tiny"):
    h, w = LATENT_SIZE[preset]
    return new_stream_caches(model, batch, cache_frames, (h // 2) * (w // 2))


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
