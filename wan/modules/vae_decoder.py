"""The reference streaming VAE decoder of Matrix-Game-2 (upstream `demo_utils/vae_block3.py`,
`VAEDecoderWrapper`, built on Wan2.1's VAE): latents in, video frames out, one block at a time.

Call: `frames, cache = decoder(z, *cache)` with `z` [B, T, 16, h, w] (the pipeline's layout) and
`cache` a list of 32 entries, all None for a new stream; returns float32 frames in [-1, 1],
[B, T', 3, 8h, 8w], and the cache for the next call. The first latent frame of a stream gives one
video frame, every later one four (a 3-frame block: 9 frames first, then 12).

How it streams. The decoder runs latent frame by latent frame. Each of its 32 causal 3-D
convolutions looks at its input's two previous frames (zeros before the stream starts); entry i of
the cache holds those frames for the i-th such convolution (the last two frames it was given).
Two of the convolutions are temporal upsamplers (a (3, 1, 1) conv that doubles the channels, then
split into two frames): at a stream's first latent frame they do nothing, so the first frame is not
doubled, and their history starts empty. Their cache entry is then a tensor with 0 frames (upstream
marks it with the string 'Rep').

State-dict names, constructor defaults and the call are upstream's; the code is this library's.
Eager and readable; the fast one is OptimizedVAEDecoderWrapper (optimized_vae_decoder.py).
"""
import os
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (CheckpointMismatchError, check_state_tensors, describe_mismatch,
                         read_state_dict, read_torch_state_dict)

# the latent normalisation of Wan2.1's VAE (per channel); decoding starts by undoing it
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
HISTORY_FRAMES = 2  # every cached convolution sees its input's two previous frames


class CausalConv3d(nn.Conv3d):
    """A Conv3d padded causally in time: `2 * padding[0]` frames before, none after. The frames
    before are the given history (its last ones), then zeros. Spatial padding as usual (zeros)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self.history_frames = 2 * pt
        self.spatial_padding = (pw, pw, ph, ph)
        self.padding = (0, 0, 0)

    def forward(self, x, history: Optional[torch.Tensor] = None):
        given = 0
        if self.history_frames and history is not None and history.shape[2]:
            past = history[:, :, -self.history_frames:]
            x = torch.cat([past, x], dim=2)
            given = past.shape[2]
        return super().forward(F.pad(x, (*self.spatial_padding, self.history_frames - given, 0)))


class RMS_norm(nn.Module):
    """Normalises over channels (dim 1) to unit RMS, times `gamma`: x / ||x|| * sqrt(C) * gamma."""

    def __init__(self, dim: int, channel_first: bool = True, images: bool = True,
                 bias: bool = False):
        super().__init__()
        if not channel_first or bias:
            raise ValueError("the decoder's RMS norms are channel-first and bias-free")
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _with_history(conv: CausalConv3d, x, cache: list, index: int):
    """conv(x) after the frames cache[index] holds; cache[index] becomes x's last two frames (with
    the older ones it held where x has fewer)."""
    history = cache[index]
    seen = x if history is None else torch.cat([history, x], dim=2)
    cache[index] = seen[:, :, -HISTORY_FRAMES:].clone()
    return conv(x, history)


class ResidualBlock(nn.Module):
    """x + convs(x): RMS norm, SiLU, 3x3x3 causal conv, twice (a 1x1x1 conv on the shortcut when
    the channel count changes). Its two convs take cache entries `first_index`, +1."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        self.first_index = None  # set by the decoder

    def forward(self, x, cache: list):
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = _with_history(conv1, F.silu(norm1(x)), cache, self.first_index)
        h = _with_history(conv2, F.silu(norm2(h)), cache, self.first_index + 1)
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no cache), with a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, cache=None):
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # [bt, hw, 3c]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [bt, hw, c]
        y = self.proj(y.transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


class Upsample(nn.Upsample):
    """Nearest-neighbour upsampling (upstream's name; its float32 round trip changes no value)."""


class Resample(nn.Module):
    """2x spatial upsampling (nearest, then a 3x3 conv halving the channels); 'upsample3d' first
    doubles the frames with a causal (3, 1, 1) conv (cache entry `index`), except at a stream's
    first latent frame."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d"):
            raise ValueError(f"the decoder resamples with 'upsample2d' or 'upsample3d', not {mode!r}")
        self.dim, self.mode = dim, mode
        self.resample = nn.Sequential(Upsample(scale_factor=(2.0, 2.0), mode="nearest"),
                                      nn.Conv2d(dim, dim // 2, 3, padding=1))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        self.index = None  # set by the decoder (upsample3d only)

    def forward(self, x, cache: list):
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        b, c, t, h, w = x.shape
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)

    def _double_frames(self, x, cache: list):
        if cache[self.index] is None:  # the stream's first latent frame: not doubled, no history
            cache[self.index] = x[:, :, :0].clone()
            return x
        b, c, t, h, w = x.shape
        y = _with_history(self.time_conv, x, cache, self.index)  # [b, 2c, t, h, w]
        # channel half 0 -> even frames, half 1 -> odd frames
        return y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)


class VAEDecoder3d(nn.Module):
    """Wan2.1's causal video decoder: latent frame -> 1 (first of a stream) or 4 video frames,
    8x the latent's height and width."""

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_scales=(), temperal_upsample=(True, True, False), dropout: float = 0.0):
        super().__init__()
        if attn_scales:
            raise ValueError("attention blocks between the upsampling stages are not supported "
                             "(upstream's decoder has none)")
        self.dim, self.z_dim = dim, z_dim
        self.dim_mult, self.num_res_blocks = list(dim_mult), num_res_blocks
        self.temperal_upsample = list(temperal_upsample)
        # channels per stage, widest first: [384, 384, 384, 192, 96] for the defaults
        dims = [dim * m for m in [dim_mult[-1]] + list(dim_mult)[::-1]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout),
                                    AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], dropout))
        upsamples = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if stage > 0:  # the previous stage's resample halved the channels
                in_dim //= 2
            for _ in range(num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if stage < len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[stage] else "upsample2d"
                upsamples.append(Resample(out_dim, mode))
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))
        self.cached_layers = self._number_cache_entries()

    def _number_cache_entries(self) -> List[tuple]:
        """Give every cached convolution its cache index, in the order they run. Returns, by
        index, (conv, spatial scale, temporal scale): how much larger than the latent its input is
        (the temporal scale holds after a stream's first latent frame, which is never doubled)."""
        entries = [(self.conv1, 1, 1)]
        scale = frames = 1
        for layer in [*self.middle, *self.upsamples]:
            if isinstance(layer, ResidualBlock):
                layer.first_index = len(entries)
                entries += [(layer.residual[2], scale, frames), (layer.residual[6], scale, frames)]
            elif isinstance(layer, Resample):
                if layer.mode == "upsample3d":
                    layer.index = len(entries)
                    entries.append((layer.time_conv, scale, frames))
                    frames *= 2
                scale *= 2
        entries.append((self.head[2], scale, frames))
        return entries

    @property
    def cache_entries(self) -> int:
        return len(self.cached_layers)

    def forward(self, x, cache: list):
        """One latent frame x [B, C, 1, h, w] (after conv2) -> its video frames; updates cache."""
        x = _with_history(self.conv1, x, cache, 0)
        for layer in self.middle:
            x = layer(x, cache)
        for layer in self.upsamples:
            x = layer(x, cache)
        norm, _, conv = self.head
        return _with_history(conv, F.silu(norm(x)), cache, len(cache) - 1)


class VAEDecoderWrapper(nn.Module):
    """Latents [B, T, 16, h, w] -> frames [B, T', 3, 8h, 8w] (float32, [-1, 1]), streamed."""

    def __init__(self):
        super().__init__()
        self.decoder = VAEDecoder3d()
        self.z_dim = 16
        self.conv2 = CausalConv3d(self.z_dim, self.z_dim, 1)
        # plain attributes, as upstream (not in the state dict); moved to z's device per call
        self.mean = torch.tensor(LATENT_MEAN, dtype=torch.float32)
        self.std = torch.tensor(LATENT_STD, dtype=torch.float32)

    def forward(self, z: torch.Tensor, *feat_cache):
        check_decoder_inputs(self, z, feat_cache)
        cache = list(feat_cache)  # the caller's list is left as it was
        x = self.conv2(self.denormalize(z.permute(0, 2, 1, 3, 4)))
        frames = [self.decoder(x[:, :, i:i + 1], cache) for i in range(x.shape[2])]
        out = torch.cat(frames, dim=2).float().clamp_(-1, 1)
        return out.permute(0, 2, 1, 3, 4), cache

    def denormalize(self, z):
        """z [B, 16, T, h, w] -> z * std + mean (per channel), written as upstream computes it."""
        view = (1, self.z_dim, 1, 1, 1)
        mean = self.mean.to(z.device, z.dtype).view(view)
        inverse_std = 1.0 / self.std.to(z.device, z.dtype).view(view)
        return z / inverse_std + mean


def expected_cache_shapes(decoder: VAEDecoder3d, batch: int, h: int, w: int) -> List[tuple]:
    """Per cache entry: (batch, channels, height, width) its tensors have for latents of h x w."""
    return [(batch, conv.in_channels, h * scale, w * scale)
            for conv, scale, _ in decoder.cached_layers]


def check_decoder_inputs(wrapper: VAEDecoderWrapper, z, cache) -> None:
    """A clear error, before anything runs, for latents or a cache the decoder cannot take:
    TypeError for a value that is not a tensor (or None, in the cache), ValueError for a wrong
    shape, dtype or device (the dtype and device must be the weights'). NaN/inf are not checked
    (no host sync): they propagate into the frames and, through the cache, into later blocks."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a tensor of latents [batch, frames, {wrapper.z_dim}, h, w], "
                        f"got {type(z).__name__}")
    if z.ndim != 5 or z.shape[2] != wrapper.z_dim:
        raise ValueError(f"z must be [batch, frames, {wrapper.z_dim}, h, w] latents, got "
                         f"{tuple(z.shape)}")
    if z.shape[1] < 1:
        raise ValueError("z holds no latent frames")
    if 0 in (z.shape[0], z.shape[3], z.shape[4]):
        raise ValueError(f"z {tuple(z.shape)} is empty: batch, h and w must each be at least 1")
    weight = wrapper.conv2.weight
    if z.dtype != weight.dtype or z.device != weight.device:
        raise ValueError(f"z is {z.dtype} on {z.device} but the decoder's weights are "
                         f"{weight.dtype} on {weight.device}: convert one of them")
    entries = wrapper.decoder.cache_entries
    if len(cache) != entries:
        hint = ""
        if len(cache) == 1 and isinstance(cache[0], (list, tuple)):
            hint = " (a list was passed as one argument: unpack it, decoder(z, *cache))"
        raise ValueError(f"the decoder takes a cache of {entries} entries (all None for a new "
                         f"stream: decoder(z, *([None] * {entries}))); got {len(cache)}{hint}")
    b, _, _, h, w = z.shape
    for i, (entry, shape) in enumerate(zip(cache, expected_cache_shapes(wrapper.decoder, b, h, w))):
        if entry is None:
            continue
        if not isinstance(entry, torch.Tensor):
            raise TypeError(f"cache entry {i} must be None or a [B, C, frames, H, W] tensor, got "
                            f"{type(entry).__name__} {entry!r:.40} (upstream's 'Rep' marker is a "
                            f"0-frame tensor here: pass back the cache this decoder returned)")
        if entry.ndim != 5:
            raise ValueError(f"cache entry {i} must be None or a [B, C, frames, H, W] tensor, "
                             f"got {tuple(entry.shape)}")
        got = (entry.shape[0], entry.shape[1], entry.shape[3], entry.shape[4])
        if got != shape:
            raise ValueError(f"cache entry {i} is {tuple(entry.shape)}, but for latents of batch {b} "
                             f"and {h} x {w} it must be [{shape[0]}, {shape[1]}, frames, {shape[2]}, "
                             f"{shape[3]}]: a cache from another stream or resolution")
        if entry.dtype != weight.dtype or entry.device != weight.device:
            raise ValueError(f"cache entry {i} is {entry.dtype} on {entry.device} but the "
                             f"decoder's weights are {weight.dtype} on {weight.device}: a cache "
                             f"from a decoder of another dtype or device")
    started = [entry is not None for entry in cache]
    if any(started) and not all(started):
        raise ValueError("the cache is partly None: pass it on whole, or all None for a new stream")


def decoder_state_dict(state: dict) -> dict:
    """The decoder's part of a Wan2.1 VAE state dict (`decoder.*` and `conv2.*`), as upstream's
    inference.py selects it."""
    return {k: v for k, v in state.items()
            if isinstance(k, str) and (k.startswith("decoder.") or k.startswith("conv2."))}


def load_decoder_weights(decoder: VAEDecoderWrapper, path) -> VAEDecoderWrapper:
    """Load the decoder from upstream's `Wan2.1_VAE.pth` (a plain state dict, read with
    weights_only=True: nothing is unpickled) or a .safetensors file; strict, with every missing,
    unexpected, mis-shaped or mis-typed key listed. A file that cannot be read, or whose decoder
    entries are not tensors, is an error naming it (and the key); the decoder is left as it was."""
    if isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(".safetensors"):
        state = read_state_dict(path)
    else:
        state = read_torch_state_dict(path)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        check_state_tensors(state if not isinstance(state, dict) else decoder_state_dict(state),
                            path)
    state = decoder_state_dict(state)
    problems = describe_mismatch(decoder, state, strict=True)
    if problems:
        raise CheckpointMismatchError(f"{path} does not match {type(decoder).__name__}:\n{problems}")
    decoder.load_state_dict(state)
    return decoder


def frames_out(latent_frames: int, first_block: bool) -> int:
    """Video frames a block of latent frames decodes to."""
    return 4 * latent_frames - 3 if first_block else 4 * latent_frames

