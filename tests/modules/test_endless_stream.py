"""Streams of any length: rotary angles computed for any frame, both models past upstream's
1024-frame table (CPU, float64), and shift invariance where the math implies it."""
import math

import numpy as np
import pytest
import torch

from helpers import build_model, make_caches, rel_err
from wan.modules.presets import tiny_variant_config
from wan.modules.shared.conditioning import VAE_TIME_COMPRESSION, history_steps
from wan.modules.shared.rope_tables import (action_inverse_frequencies, angles, inverse_frequencies,
                                     self_attention_angles, self_attention_axis_dims)
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.rope import ActionRope, rope_params, rope_rotations_3d
from wan.modules.presets import tokens_per_frame

TOKENS = tokens_per_frame("tiny")
CONTEXT_TOKENS = 8  # a short image context keeps 700 reference forwards cheap


def _stream_inputs(model, block: int, seed: int, history=None, batch: int = 1):
    """Inputs of block `block` (frames 3b..3b+2); `history` [1, steps, C] per condition, sliced to
    the length the pipeline passes (1 + 4 * last frame); the players of a batch share it."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    steps = history_steps(3 * block + 2)

    def shared(tensor, steps=None):
        if tensor is None:  # templerun has no mouse
            return None
        tensor = tensor if steps is None else tensor[:, :steps]
        return tensor.expand(batch, *tensor.shape[1:])

    return {"x": randn(batch, 16, 3, 8, 16), "t": torch.full((batch, 3), 0.0, dtype=torch.float64),
            "visual_context": shared(history["visual_context"]),
            "cond_concat": randn(batch, 20, 3, 8, 16),
            "mouse_cond": shared(history["mouse_cond"], steps),
            "keyboard_cond": shared(history["keyboard_cond"], steps)}


def _history(steps: int, seed: int = 0, period: int = None):
    """Random action histories (repeating every `period` steps when given) and image context."""
    gen = torch.Generator().manual_seed(seed)
    length = period or steps
    mouse = 0.1 * torch.randn(1, length, 2, generator=gen, dtype=torch.float64)
    keyboard = (torch.randn(1, length, 4, generator=gen, dtype=torch.float64) > 0).double()
    repeats = math.ceil(steps / length)
    return {"mouse_cond": mouse.repeat(1, repeats, 1)[:, :steps],
            "keyboard_cond": keyboard.repeat(1, repeats, 1)[:, :steps],
            "visual_context": torch.randn(1, CONTEXT_TOKENS, 1280, generator=gen,
                                          dtype=torch.float64)}


# ---------------------------------------------------------------------- rotary angles
def test_self_attention_angles_are_upstreams_table_within_1024_frames():
    head_dim = 128
    frame_part, row_part, _ = (d // 2 for d in self_attention_axis_dims(head_dim))  # 22, 21, 21
    table = torch.cat([rope_params(1024, d) for d in self_attention_axis_dims(head_dim)], dim=1)
    frame_t, row_t, col_t = table.split([frame_part, row_part, row_part], dim=1)
    f, h, w = 3, 4, 5
    for start in (0, 7, 1021):
        expected = torch.cat([frame_t[start:start + f].view(f, 1, 1, -1).expand(f, h, w, -1),
                              row_t[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                              col_t[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1)
        assert torch.equal(rope_rotations_3d((f, h, w), start, head_dim),
                           expected.reshape(f * h * w, 1, -1))


def test_rotary_values_at_frame_a_million_match_float64():
    frame = 10 ** 6
    head_dim = 128
    frame_dim = self_attention_axis_dims(head_dim)[0]
    inv = 1.0 / 10000.0 ** (np.arange(0, frame_dim, 2, dtype=np.float64) / frame_dim)
    got = rope_rotations_3d((1, 1, 1), frame, head_dim)[0, 0, :frame_dim // 2]
    np.testing.assert_allclose(got.real.numpy(), np.cos(frame * inv), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.imag.numpy(), np.sin(frame * inv), rtol=0, atol=1e-12)
    # the action module's float32 cos/sin are float32 roundings of the exact values, also past
    # 2^24 frames, where a float32 position (upstream's table) can no longer tell frames apart
    rope = ActionRope([8, 28, 28], 256)
    inv_time = 256.0 ** (-np.arange(0, 8, 2, dtype=np.float64) / 8)
    for position in (frame, 2 ** 24 + 1):
        cos, sin = rope.table(position, 1, "cpu")
        np.testing.assert_allclose(cos[0, :8:2].double().numpy(), np.cos(position * inv_time),
                                   atol=1e-7)
        np.testing.assert_allclose(sin[0, :8:2].double().numpy(), np.sin(position * inv_time),
                                   atol=1e-7)
        assert torch.equal(cos[0, 8:], torch.ones(56)) and torch.equal(sin[0, 8:], torch.zeros(56))
    as_float32 = torch.tensor(2 ** 24 + 1, dtype=torch.float32).item()
    assert abs(math.cos(as_float32) - math.cos(2 ** 24 + 1)) > 0.1


def test_shared_angles_are_position_times_frequency():
    frames = torch.tensor([0, 1023, 1024, 7500, 10 ** 7])
    got = self_attention_angles(frames, 2, 3, 128)
    inv = inverse_frequencies(self_attention_axis_dims(128)[0])
    assert torch.equal(got.view(5, 2, 3, -1)[:, 1, 2, :22], angles(frames, inv))
    action = angles(frames, action_inverse_frequencies([8, 28, 28], 256))
    assert torch.equal(action[:, 4:], torch.zeros(5, 28)) and action[4, 0].item() == 10 ** 7


# ---------------------------------------------------------------------- long streams
LONG_STREAMS = [  # (variant, sink frames, batch, the model's own stream instead of dicts)
    ("universal", 0, 1, False), ("universal", 0, 1, True), ("gta_drive", 0, 1, False),
    ("universal", 1, 1, True), ("templerun", 1, 1, False), ("universal", 0, 2, True)]


@pytest.mark.parametrize("variant,sink,batch,owned", LONG_STREAMS,
                         ids=[f"{v}-sink{s}-batch{b}-{'owned' if o else 'dicts'}"
                              for v, s, b, o in LONG_STREAMS])
@torch.no_grad()
def test_both_models_stream_past_frame_1024(variant, sink, batch, owned):
    """344 blocks (1032 frames: past upstream's 1024-frame table) of the cache update call: the
    optimized model equals the reference at every block, through the windows' evictions (6 frames,
    4 for gta_drive), with a sink frame, two players in lockstep, the owned stream or the dicts."""
    config = tiny_variant_config(variant)
    reference = build_model(config=config, sink_size=sink)
    optimized = build_model(config=config, cls=OptimizedCausalWanModel, sink_size=sink)
    window = reference.local_attn_size
    blocks = 344
    history = _history(history_steps(3 * blocks))
    keys = reference.blocks[0].action_model.keyboard_embed[0].in_features  # 4, 2 or 7 keys
    history["keyboard_cond"] = torch.cat([history["keyboard_cond"]] * 2, dim=2)[..., :keys]
    if variant == "templerun":
        history["mouse_cond"] = None
    ref_caches = make_caches(reference, batch=batch, cache_frames=window)
    opt_caches = {} if owned else make_caches(optimized, batch=batch, cache_frames=window)
    if owned:
        optimized.start_stream(batch=batch, latent_size=(8, 16))
    worst = 0.0
    for block in range(blocks):
        inputs = _stream_inputs(reference, block, seed=block, history=history, batch=batch)
        expected = reference(**inputs, **ref_caches, current_start=3 * block * TOKENS)
        got = optimized(**inputs, **opt_caches, current_start=3 * block * TOKENS)
        worst = max(worst, rel_err(got, expected))
    assert worst <= 1e-6, worst
    assert int(ref_caches["kv_cache"][0]["global_end_index"]) == 3 * blocks * TOKENS


@torch.no_grad()
def test_shift_invariance_without_a_sink():
    """With sink 0 only relative positions matter: the same inputs streamed from frame P and from
    frame P + 3000 give the same outputs up to rounding (the reference, whose caches can start at
    any position through their end indices)."""
    model = build_model(config=tiny_variant_config())
    start, shift, blocks = 1020, 3000, 4
    history = _history(history_steps(start + shift + 3 * blocks),
                       period=VAE_TIME_COMPRESSION * shift)
    outputs, keys = [], []
    for first in (start, start + shift):
        caches = make_caches(model)
        for name in ("kv_cache", "kv_cache_mouse", "kv_cache_keyboard"):
            for cache in caches[name]:  # an empty window at frame `first` (tokens or frames)
                cache["global_end_index"].fill_(first * (TOKENS if name == "kv_cache" else 1))
        run = []
        for block in range(blocks):
            frame = first + 3 * block
            inputs = _stream_inputs(model, frame // 3, seed=block, history=history)
            run.append(model(**inputs, **caches, current_start=frame * TOKENS))
        outputs.append(run)
        keys.append(caches["kv_cache"][0]["k"].clone())
    worst = max(rel_err(a, b) for a, b in zip(*outputs))
    assert worst <= 1e-6, worst  # the action RoPE rounds its cos/sin to float32, as upstream
    # not trivially so: the cached keys carry their absolute positions and differ
    assert rel_err(keys[1], keys[0]) > 1e-2


@torch.no_grad()
def test_a_cache_that_would_be_written_past_its_end_is_refused_before_any_kernel():
    """The optimized model's ring layout serves every layer: a layer whose buffer is shorter would
    be written out of range on the device (a device-side assert poisons the CUDA context). It is a
    clear error on the host instead, the caches untouched and the stream usable after."""
    model = build_model(config=tiny_variant_config(), cls=OptimizedCausalWanModel)
    history = _history(history_steps(12))
    # layer 1's self-attention buffer; layer 0's mouse buffer (its keyboard one keeps 6 frames)
    for name, layer, unit in (("kv_cache", 1, TOKENS), ("kv_cache_mouse", 0, 1)):
        caches = make_caches(model)
        short = caches[name][layer]
        for key in ("k", "v"):
            short[key] = short[key][:, :5 * unit].clone()  # 5 frames where the others hold 6
        snapshot = [c["k"].clone() for c in caches["kv_cache"]]
        with pytest.raises(ValueError, match="same length"):
            model(**_stream_inputs(model, 0, seed=0, history=history), **caches, current_start=0)
        assert all(torch.equal(a, c["k"]) for a, c in zip(snapshot, caches["kv_cache"]))
    good = make_caches(model)
    out = model(**_stream_inputs(model, 0, seed=0, history=history), **good, current_start=0)
    assert torch.isfinite(out).all()
