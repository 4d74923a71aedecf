"""Start-image conditions given block by block (wan/play/conditioning.py, issue 30), on a CPU
without a Matrix-Game-2 checkout: `StartConditions` over stand-in encoders whose reach is known
(settles exactly where it must, and every block equals the stand-in's own full encoding), one
that never settles (bounded by the cap), the device flag read a call late; `DemoConditioner`'s
`start`; the error for a missing weights file, before anything loads; upstream's tile plan; the
1x1x1 convolution run over the reference length. The checkout's own encoder is compared with
upstream's encoding in tests/tools/test_matrix_game_checkout.py (MATRIX_GAME_DIR)."""
import logging

import pytest
import torch
from PIL import Image

from wan.play import conditioning
from wan.play.conditioning import (CLIP_FILE, TOKENIZER_DIR, VAE_FILE, CheckoutConditioner,
                                   DemoConditioner, StartConditions, bitwise_equal_on_device,
                                   check_weights_dir, tile_plan)

H, W, C = 4, 6, 16
CONTEXT = torch.zeros(1, 257, 1280)


class ReachEncoder:
    """Latent frame k = bias + sum over j < reach of coeff[j] * input[k - j]; input 0 is the
    image's, every later input zeros (a causal encoder fed black frames). Its state: the last
    reach - 1 inputs (None before the first ones). Frames from `reach` on are all `bias`."""

    def __init__(self, reach: int, with_state: bool = True, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.reach = reach
        self.image = torch.randn(1, C, 1, H, W, generator=gen)
        self.bias = torch.randn(1, C, 1, H, W, generator=gen)
        self.coeffs = [0.9 ** j + 0.1 for j in range(reach)]
        self.history = [None] * (reach - 1)
        self.steps = 0
        if not with_state:
            self.state = None  # StartConditions compares the frames instead

    def step(self):
        current = self.image if self.steps == 0 else torch.zeros_like(self.image)
        window = self.history + [current]                 # oldest first
        frame = self.bias.clone()
        for coeff, value in zip(self.coeffs, reversed(window)):
            if value is not None:
                frame = frame + coeff * value
        self.history = window[1:]
        self.steps += 1
        return frame

    def state(self):
        return list(self.history)


class CounterEncoder:
    """Never settles: frame k is k everywhere (its state counts)."""

    def __init__(self):
        self.count = torch.zeros(())
        self.steps = 0

    def step(self):
        self.count = self.count + 1
        self.steps += 1
        return self.count.expand(1, C, 1, H, W).clone()

    def state(self):
        return [self.count]


def _full_encoding(encoder, frames):
    return [encoder.step() for _ in range(frames)]


def _expected_block(frames, index, per_block=3):
    latent = torch.cat(frames[index * per_block:(index + 1) * per_block], dim=2)
    mask = torch.zeros(1, 4, per_block, H, W)
    if index == 0:
        mask[:, :, 0] = 1
    return torch.cat([mask, latent], dim=1)


def _advance_all(conditions, limit=1000):
    calls = 0
    while conditions.advance():
        calls += 1
        assert calls < limit, "advance() never finished"
    return calls


@pytest.mark.parametrize("reach", [1, 2, 5, 9])
@pytest.mark.parametrize("with_state", [True, False])
def test_settles_where_the_encoders_reach_ends_and_every_block_is_its_full_encoding(reach,
                                                                                  with_state):
    conditions = StartConditions(CONTEXT, ReachEncoder(reach, with_state), ready_frames=3)
    if reach > 2:  # ready for block 0 only: the rest is advance() work
        assert conditions.frames_encoded == 3 and not conditions.done
        assert conditions.block(0) is not None and conditions.block(1) is None
    _advance_all(conditions)
    assert conditions.done and not conditions.capped
    # frames from `reach` on are equal: the first one equal to the one before is reach + 1
    assert conditions.settled_frame == reach + 1
    # with a state, the unchanged state proves it before frame reach + 1 is encoded
    assert conditions.frames_encoded == (reach + 1 if with_state else reach + 2)
    assert conditions.advance() is False  # nothing more to do
    full = _full_encoding(ReachEncoder(reach, with_state), 45)
    assert not torch.equal(full[reach - 1], full[reach])  # the stand-in does reach that far
    for index in range(15):
        assert torch.equal(conditions.block(index), _expected_block(full, index)), index
    assert conditions.block(14) is conditions.block(20)  # the settled block, made once
    assert torch.equal(conditions.latent_frame(1000), full[reach])


def test_block_zero_is_ready_at_start_and_blocks_come_as_frames_are_encoded():
    conditions = StartConditions(CONTEXT, ReachEncoder(7), ready_frames=3)
    full = _full_encoding(ReachEncoder(7), 12)
    assert torch.equal(conditions.block(0), _expected_block(full, 0))
    assert conditions.block(1) is None and conditions.block(1, frames_per_block=1) is not None
    for _ in range(3):
        conditions.advance()
    assert conditions.frames_encoded == 6
    assert torch.equal(conditions.block(1), _expected_block(full, 1))
    assert conditions.block(2) is None
    assert conditions.visual_context is CONTEXT


def test_an_encoder_that_never_settles_stops_at_the_cap_and_holds_its_last_frame(caplog):
    encoder = CounterEncoder()
    with caplog.at_level(logging.WARNING, logger="wan.play.conditioning"):
        conditions = StartConditions(CONTEXT, encoder, max_frames=10, ready_frames=3)
        calls = _advance_all(conditions)
    assert calls == 6 and encoder.steps == 10  # bounded: max_frames chunks, no more
    assert conditions.done and conditions.capped and conditions.settled_frame is None
    assert conditions.frames_encoded == 10
    assert "did not settle within 10 latent frames" in caplog.text
    assert conditions.block(3)[0, 4:, 0].eq(10).all()  # frames 9, 10, 11: frame 9 (count 10)
    assert conditions.block(2)[0, 4:].amax(dim=(0, 2, 3)).tolist() == [7.0, 8.0, 9.0]
    assert conditions.block(100)[0, 4:].eq(10).all()
    assert not conditions.advance() and encoder.steps == 10


def test_a_settled_flag_the_device_has_not_reached_yet_is_read_later(monkeypatch):
    """On a GPU the comparison is read back without waiting: advance() goes on encoding until
    the flag is there; the settled frame is still the one the flag proved, and the blocks are
    the same."""
    monkeypatch.setattr(conditioning._DeviceFlag, "ready", lambda self: False)
    conditions = StartConditions(CONTEXT, ReachEncoder(5), max_frames=12, ready_frames=3)
    _advance_all(conditions)
    assert conditions.done and not conditions.capped  # the cap waited for the flags
    assert conditions.settled_frame == 6 and conditions.frames_encoded == 12
    full = _full_encoding(ReachEncoder(5), 30)
    for index in range(10):
        assert torch.equal(conditions.block(index), _expected_block(full, index))


def test_outputs_follow_the_device_and_dtype_asked_for():
    conditions = StartConditions(CONTEXT, ReachEncoder(3), dtype=torch.bfloat16)
    _advance_all(conditions)
    full = _full_encoding(ReachEncoder(3), 9)
    assert conditions.block(1).dtype == torch.bfloat16
    assert torch.equal(conditions.block(1), _expected_block(full, 1).bfloat16())
    assert conditions.settled_frame == 4  # compared before the cast


def test_bitwise_comparison():
    a = torch.tensor([0.0, 1.0, float("nan")])
    assert bitwise_equal_on_device([a, None], [a.clone(), None]).item()
    assert not bitwise_equal_on_device([torch.tensor([0.0])], [torch.tensor([-0.0])]).item()
    assert bitwise_equal_on_device([a], [a[:2]]) is None
    assert bitwise_equal_on_device([a], [None]) is None
    assert bitwise_equal_on_device([a], [a.double()]) is None
    assert bitwise_equal_on_device([], []).item()


@pytest.mark.parametrize("bad, error", [
    (dict(max_frames=0), ValueError), (dict(ready_frames=5, max_frames=4), ValueError),
    (dict(encoder=object()), TypeError)])
def test_bad_arguments_are_clear_errors(bad, error):
    kwargs = dict(encoder=ReachEncoder(2))
    kwargs.update(bad)
    encoder = kwargs.pop("encoder")
    with pytest.raises(error):
        StartConditions(CONTEXT, encoder, **kwargs)
    conditions = StartConditions(CONTEXT, ReachEncoder(2))
    with pytest.raises(ValueError, match="block index"):
        conditions.block(-1)
    with pytest.raises(ValueError, match="frames_per_block"):
        conditions.block(0, frames_per_block=0)


def test_demo_conditioner_start_is_settled_and_keeps_the_one_shot_conditions():
    demo = DemoConditioner((8, 16))
    image = Image.new("RGB", (128, 64), (200, 30, 90))
    conditions = demo.start(image, "cpu", torch.float32)
    assert conditions.done and conditions.settled_frame == 7 and conditions.frames_encoded == 7
    assert not conditions.advance()
    visual_context, cond = demo(image, "cpu", torch.float32)
    assert torch.equal(conditions.visual_context, visual_context)
    assert visual_context.shape == (1, 257, 1280) and cond.shape == (1, 20, 6, 8, 16)
    assert torch.equal(conditions.block(0), cond[:, :, :3])
    assert torch.equal(conditions.block(1), cond[:, :, 3:])
    black = conditions.block(2)
    assert black[0, :4].eq(0).all() and torch.equal(black[:, :, 0], black[:, :, 2])
    assert torch.equal(conditions.block(50), black)
    other = demo.start(Image.new("RGB", (128, 64), (10, 200, 90)), "cpu", torch.bfloat16)
    assert other.block(0).dtype == torch.bfloat16
    assert not torch.equal(other.block(0).float(), conditions.block(0))
    assert torch.equal(other.block(3).float(), black.bfloat16().float())  # black is black


def _weights(tmp_path, skip=()):
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in (VAE_FILE, CLIP_FILE):
        if name not in skip:
            (folder / name).write_bytes(b"")
    if TOKENIZER_DIR not in skip:
        (folder / TOKENIZER_DIR).mkdir()
        if "vocabulary" not in skip:
            (folder / TOKENIZER_DIR / "tokenizer.json").write_text("{}")
    return folder


FAKE_CHECKOUT = """
from pathlib import Path
Path({marker!r}).write_text("imported")
def get_wanx_vae_wrapper(model_path, weight_dtype):
    raise RuntimeError("weights loaded from " + model_path)
"""


@pytest.mark.parametrize("missing, named", [
    (CLIP_FILE, CLIP_FILE), (VAE_FILE, VAE_FILE), (TOKENIZER_DIR, TOKENIZER_DIR),
    ("vocabulary", "tokenizer.json or sentencepiece.bpe.model")])
def test_a_missing_weights_file_is_named_before_anything_loads(tmp_path, missing, named):
    marker = tmp_path / "checkout-imported"
    checkout = tmp_path / "checkout"
    (checkout / "wan" / "vae").mkdir(parents=True)
    (checkout / "wan" / "__init__.py").write_text("")
    (checkout / "wan" / "vae" / "__init__.py").write_text("")
    (checkout / "wan" / "vae" / "wanx_vae.py").write_text(FAKE_CHECKOUT.format(marker=str(marker)))
    folder = _weights(tmp_path, skip=(missing,))
    with pytest.raises(FileNotFoundError, match=named) as error:
        CheckoutConditioner(checkout, folder, "cpu", torch.float32)
    assert str(folder) in str(error.value)
    assert not marker.exists()  # the checkout's encoder code was not even imported
    (tmp_path / "full").mkdir()
    with pytest.raises(RuntimeError, match="weights loaded"):  # with every file it goes on
        CheckoutConditioner(checkout, _weights(tmp_path / "full"), "cpu", torch.float32)
    assert marker.exists()


def test_check_weights_dir_names_everything_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        check_weights_dir(tmp_path)
    for name in (VAE_FILE, CLIP_FILE, TOKENIZER_DIR):
        assert name in str(error.value)
    assert check_weights_dir(_weights(tmp_path)) == tmp_path / "weights"


def test_tile_plan_is_upstreams():
    # upstream's tiles (44 x 80, stride 23 x 38 latent units) over a 352 x 640 frame: one tile
    assert tile_plan(352, 640, (352, 640), (184, 304)) == [(0, 352, 0, 640)]
    assert tile_plan(64, 96, (352, 640), (184, 304)) == [(0, 352, 0, 640)]
    # 48 x 96 pixels in tiles of 32 x 64 every 16 x 32: 2 x 2, the last ones reaching the edge
    assert tile_plan(48, 96, (32, 64), (16, 32)) == [
        (0, 32, 0, 64), (0, 32, 32, 96), (16, 48, 0, 64), (16, 48, 32, 96)]
    # a 720-row frame: starts 0, 184, 368 (552 is left out: 368 + 352 reaches 720)
    assert [t[0] for t in tile_plan(720, 640, (352, 640), (184, 304))] == [0, 184, 368]


def test_a_one_by_one_convolution_over_the_reference_length_gives_the_full_sequences_frames():
    """Why CausalTiledEncoder runs upstream's 1x1x1 conv1 over a buffer of all N frames: a
    convolution's rounding may depend on the length it runs over (on a CPU in float32 at
    44 x 80, one frame at a time differs from the whole sequence), but not on the other frames'
    values."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(32, 32, 1)
    frames = 20
    x = torch.randn(1, 32, frames, 44, 80)
    with torch.no_grad():
        whole = conv(x)
        buffer = torch.zeros_like(x)
        for k in range(frames):
            buffer[:, :, k] = x[:, :, k]
            assert torch.equal(conv(buffer)[:, :, k], whole[:, :, k]), k
