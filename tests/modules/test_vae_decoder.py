"""The streaming VAE decoders: both reproduce upstream's golden output (float64, CPU), agree with
each other on any block split, trade caches both ways, and refuse bad input clearly without
touching the stream; weights load from a .pth state dict (weights_only) or safetensors."""
import functools

import pytest
import torch
from safetensors.torch import load_file, save_file

from golden_runner import GOLDEN_DIR
from helpers import build_decoder, decoder_weights, rel_err, requires_cuda
from wan.modules.checkpoint import CheckpointMismatchError
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.modules.vae_decoder import (Resample, ResidualBlock, VAEDecoderWrapper, frames_out,
                                     load_decoder_weights)
from wan.modules.random_init import randomize_decoder_weights_

DECODERS = [VAEDecoderWrapper, OptimizedVAEDecoderWrapper]
SMALL = (2, 3)  # latent h, w for the quicker checks (the decoder is fully convolutional)


@functools.lru_cache(maxsize=None)
def _reference_stream(frames):
    """The reference decoder's output for _latents(frames) in 3-frame blocks (computed once)."""
    return _stream(build_decoder(VAEDecoderWrapper), _latents(frames), 3)[0]


def _latents(frames, hw=SMALL, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, 16, *hw, generator=gen, dtype=torch.float64).to(dtype)


@torch.no_grad()
def _stream(decoder, latents, block_frames):
    cache, outs = [None] * 32, []
    for s in range(0, latents.shape[1], block_frames):
        out, cache = decoder(latents[:, s:s + block_frames], *cache)
        outs.append(out)
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("cls", DECODERS, ids=["reference", "optimized"])
def test_reproduces_upstream_golden(cls):
    golden = load_file(str(GOLDEN_DIR / "vae_decoder.safetensors"))
    decoder = randomize_decoder_weights_(cls().double()).eval()  # the recipe itself, once
    latents, cache = golden["input.latents"].double(), [None] * 32
    with torch.no_grad():
        for block in range(3):
            out, cache = decoder(latents[:, 3 * block:3 * block + 3], *cache)
            expected = golden[f"output.block{block}"]
            assert out.shape == expected.shape and out.dtype == torch.float32
            assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("block_frames", [1, 2, 3, 5])
def test_optimized_matches_reference_on_any_block_split(block_frames):
    latents, expected = _latents(7), _reference_stream(7)
    got, _ = _stream(build_decoder(OptimizedVAEDecoderWrapper), latents, block_frames)
    assert got.shape == expected.shape == (1, frames_out(7, first_block=True), 3, 16, 24)
    assert rel_err(got, expected) <= 1e-10


@pytest.mark.parametrize("fold", [True, False], ids=["bias_folded", "bias_in_conv"])
def test_the_resample_bias_fold_changes_nothing_but_rounding(fold):
    """fold_resample_bias (default on) leaves a resample conv's bias to the next residual block
    where its shortcut is the identity; off, the conv adds it as upstream. Both are the
    reference's stream (float64)."""
    latents, expected = _latents(7), _reference_stream(7)
    decoder = build_decoder(OptimizedVAEDecoderWrapper)
    decoder.fold_resample_bias = fold
    layers = [*decoder.decoder.middle, *decoder.decoder.upsamples]
    folds = [isinstance(b, ResidualBlock) and isinstance(b.shortcut, torch.nn.Identity)
             for a, b in zip(layers, layers[1:]) if isinstance(a, Resample)]
    assert any(folds)  # the decoder under test has a resample whose bias folds
    got, _ = _stream(decoder, latents, 3)
    assert rel_err(got, expected) <= 1e-10


@torch.no_grad()
@pytest.mark.parametrize("switch", ["fold_resample_bias", "fold_shortcut_bias",
                                    "fuse_residual_norm"])
def test_a_layout_switch_can_change_mid_stream_and_refuses_non_bools(switch):
    """Each on/off switch of the decode's layout is on by default; switching it between blocks
    keeps the stream the reference's (the graphs captured for the old setting are dropped); a
    non-bool is a clear error."""
    latents, expected = _latents(7), _reference_stream(7)
    decoder = build_decoder(OptimizedVAEDecoderWrapper)
    assert getattr(decoder, switch) is True
    cache, pieces = [None] * 32, []
    for start, on in ((0, True), (3, False), (6, True)):
        setattr(decoder, switch, on)
        out, cache = decoder(latents[:, start:start + 3], *cache)
        pieces.append(out)
    assert rel_err(torch.cat(pieces, dim=1), expected) <= 1e-10
    with pytest.raises(TypeError, match=f"{switch} must be True or False"):
        setattr(decoder, switch, 0)


@pytest.mark.parametrize("fold", [True, False], ids=["bias_folded", "bias_in_conv"])
def test_the_shortcut_bias_fold_changes_nothing_but_rounding(fold):
    """fold_shortcut_bias (default on): a 1x1x1 shortcut conv runs without its bias, which the
    block's closing add adds; off, the conv adds it as upstream. Both are the reference's stream
    (float64)."""
    latents, expected = _latents(7), _reference_stream(7)
    decoder = build_decoder(OptimizedVAEDecoderWrapper)
    blocks = [b for b in [*decoder.decoder.middle, *decoder.decoder.upsamples]
              if isinstance(b, ResidualBlock)]
    assert any(not isinstance(b.shortcut, torch.nn.Identity) for b in blocks)  # one to fold
    decoder.fold_shortcut_bias = fold
    got, _ = _stream(decoder, latents, 3)
    assert rel_err(got, expected) <= 1e-10


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_the_residual_norm_fusion_changes_nothing(fuse):
    """fuse_residual_norm: a residual block's closing add writes the next norm of its sum into
    that conv's buffer (the next block's first norm, the head's); off, the norm reads the sum
    back. Both are the reference's stream (float64)."""
    latents, expected = _latents(7), _reference_stream(7)
    decoder = build_decoder(OptimizedVAEDecoderWrapper)
    decoder.fuse_residual_norm = fuse
    got, _ = _stream(decoder, latents, 3)
    assert rel_err(got, expected) <= 1e-10


@pytest.mark.parametrize("first,second", [(VAEDecoderWrapper, OptimizedVAEDecoderWrapper),
                                          (OptimizedVAEDecoderWrapper, VAEDecoderWrapper)])
@torch.no_grad()
def test_cache_moves_between_decoders(first, second):
    latents, expected = _latents(6), _reference_stream(6)
    head, cache = build_decoder(first)(latents[:, :3], *[None] * 32)
    tail, _ = build_decoder(second)(latents[:, 3:], *cache)
    assert rel_err(torch.cat([head, tail], dim=1), expected) <= 1e-10


@pytest.mark.parametrize("cls", DECODERS, ids=["reference", "optimized"])
@torch.no_grad()
def test_new_stream_after_none_cache(cls):
    decoder = build_decoder(cls)
    latents = _latents(3)
    first, _ = decoder(latents, *[None] * 32)
    decoder(_latents(3, seed=5), *[None] * 32)  # another stream in between
    again, _ = decoder(latents, *[None] * 32)
    assert torch.equal(first, again)


BAD_CALLS = {
    "wrong channel count": (lambda z, c: (z[:, :, :8], c), "16"),
    "4-D latents": (lambda z, c: (z[0], c), "latents"),
    "short cache": (lambda z, c: (z, c[:31]), "32 entries"),
    "cache from another resolution": (lambda z, c: (_latents(3, hw=(2, 4)), c), "resolution"),
    "cache from another batch": (lambda z, c: (z.expand(2, -1, -1, -1, -1), c), "resolution"),
    "partly None cache": (lambda z, c: (z, [None] + c[1:]), "partly None"),
    "dtype mismatch": (lambda z, c: (z.float(), c), "float"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
@pytest.mark.parametrize("cls", DECODERS, ids=["reference", "optimized"])
@torch.no_grad()
def test_bad_input_is_a_clear_error_and_leaves_the_stream(cls, case):
    make_bad, message = BAD_CALLS[case]
    decoder = build_decoder(cls)
    latents, expected = _latents(6), _reference_stream(6)
    head, cache = decoder(latents[:, :3], *[None] * 32)
    kept = [entry.clone() for entry in cache]
    z, bad_cache = make_bad(latents[:, 3:], cache)
    with pytest.raises(ValueError, match=message):
        decoder(z, *bad_cache)
    assert all(torch.equal(a, b) for a, b in zip(cache, kept))
    tail, _ = decoder(latents[:, 3:], *cache)
    assert rel_err(torch.cat([head, tail], dim=1), expected) <= 1e-10


def test_weights_load_from_pth_and_safetensors(tmp_path):
    source = build_decoder(VAEDecoderWrapper, torch.float32)
    full = {"encoder.conv1.weight": torch.zeros(2), **source.state_dict()}  # a whole VAE's dict
    torch.save(full, tmp_path / "Wan2.1_VAE.pth")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "decoder.safetensors"))
    for name in ("Wan2.1_VAE.pth", "decoder.safetensors"):
        loaded = load_decoder_weights(OptimizedVAEDecoderWrapper(), tmp_path / name)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    broken = dict(source.state_dict())
    broken.pop("decoder.head.2.bias")
    broken["decoder.conv1.weight"] = broken["decoder.conv1.weight"][:10]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError, match="missing.*\n.*decoder.head.2.bias"):
        load_decoder_weights(VAEDecoderWrapper(), tmp_path / "broken.pth")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@torch.no_grad()
def test_gpu_half_precision_error_within_125_percent_of_the_reference(dtype):
    """8 blocks at the real 44 x 80 latent: each block's error against a float32 reference run
    within 1.25x of the reference decoder's own error in the same precision; graphs = eager."""
    latents = _latents(24, hw=(44, 80), dtype=torch.float32).cuda()
    oracle, _ = _stream(build_decoder(VAEDecoderWrapper, torch.float32).cuda(), latents, 3)
    half = latents.to(dtype)
    reference, _ = _stream(build_decoder(VAEDecoderWrapper, dtype).cuda(), half, 3)
    eager_decoder = build_decoder(OptimizedVAEDecoderWrapper, dtype).cuda()
    eager_decoder.cuda_graphs = False  # graphs are the default on CUDA
    optimized, _ = _stream(eager_decoder, half, 3)
    graphed_decoder = build_decoder(OptimizedVAEDecoderWrapper, dtype).cuda()
    graphed_decoder.cuda_graphs = True
    graphed, _ = _stream(graphed_decoder, half, 3)
    bounds = [0, 9] + [9 + 12 * k for k in range(1, 8)]
    for lo, hi in zip(bounds, bounds[1:]):
        ref_err = rel_err(reference[:, lo:hi], oracle[:, lo:hi])
        opt_err = rel_err(optimized[:, lo:hi], oracle[:, lo:hi])
        graph_err = rel_err(graphed[:, lo:hi], oracle[:, lo:hi])
        print(f"{dtype} frames {lo}-{hi}: reference {ref_err:.2e}, optimized {opt_err:.2e}, "
              f"graphed {graph_err:.2e}")
        # (graph replay may pick other cuDNN algorithms than the eager run: not bit-equal)
        assert max(opt_err, graph_err) <= 1.25 * ref_err + 1e-4


def test_optimized_with_the_triton_norm_matches_reference(monkeypatch):
    """backend='triton' (Triton's interpreter on a CPU): the fused norm + SiLU writes into the
    convolutions' buffers in place of the eager twin."""
    pytest.importorskip("triton")
    # float32 convs in full precision: with TF32 two runs may differ by ~1e-3 (cuDNN's choice)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    latents = _latents(4, dtype=torch.float32)
    if torch.cuda.is_available():  # against the eager ops on the same GPU (convs may use TF32)
        latents = latents.cuda()
        twin = OptimizedVAEDecoderWrapper(backend="eager").float()
        twin.load_state_dict(decoder_weights())
        expected, _ = _stream(twin.cuda().eval(), latents, 2)
    else:
        expected = _reference_stream(4)
    decoder = OptimizedVAEDecoderWrapper(backend="triton").float()
    decoder.load_state_dict(decoder_weights())
    got, _ = _stream(decoder.to(latents.device).eval(), latents, 2)
    assert rel_err(got, expected) <= 1e-5


@torch.no_grad()
def test_optimized_decoder_continues_after_to_and_load():
    """A dtype round trip or an assign-load mid-stream gives parameters new storage: the decoder
    drops its graphs and weight layout and continues the stream from the cache it is given."""
    latents, expected = _latents(6), _reference_stream(6)
    decoder = build_decoder(OptimizedVAEDecoderWrapper)
    head, cache = decoder(latents[:, :3], *[None] * 32)
    decoder.float().double()
    decoder.load_state_dict({k: v.clone() for k, v in decoder_weights().items()}, assign=True)
    assert decoder._prepared_for is None and len(decoder._graphs) == 0
    tail, _ = decoder(latents[:, 3:], *cache)
    assert rel_err(torch.cat([head, tail], dim=1), expected) <= 1e-10
