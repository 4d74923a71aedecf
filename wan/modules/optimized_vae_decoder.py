"""OptimizedVAEDecoderWrapper: the streaming VAE decoder, same call and outputs, faster.

What differs from the reference (vae_decoder.py):

* a block's latent frames go through the decoder together, not one by one (the convolutions are
  causal in time and everything else is per frame, so the result is the same), except the
  stream's first latent frame, which the temporal upsamplers treat differently: it goes alone;
* every cached convolution reads its input from a static buffer [B, C, 2 + T, H, W] whose first
  two frames are the history: the layer before writes its output straight after them, the
  convolution runs over the buffer without padding in time, and the last two frames are copied
  to the front for the next call. No `cat` of the history, no padding copies, no marker strings;
* each RMS norm + SiLU is one op of the backend registry (`rms_norm_silu`: a Triton row kernel on
  CUDA, `backend=` / WAN_BACKEND select it like the DiT's ops) that writes the convolution's
  input straight into its buffer; inside a residual block the convolutions run without their
  bias, which the next op adds (the norm, or `bias_residual_add` with the shortcut): cuDNN's 3-D
  channels-last path would add it in a separate pass over the output;
* activations and weights are channels-last (cuDNN's fast layout for half precision) and the
  nearest upsampling runs in the activations' dtype;
* optionally (`cuda_graphs=True`, or WAN_CUDA_GRAPHS) each phase (a stream's first block, a later
  block) is replayed from a CUDA graph.

Streams: each stream (a call with an all-None cache starts one) has its own history buffers, and
with CUDA graphs its own graphs (one shared memory pool), so any number of players' streams
alternate through one decoder without copies or captures. The returned cache is the stream's live
state: the list's tensors are views of its buffers, valid until that stream's next call (pass it
back as upstream's pipeline does); its first tensor carries the stream (attribute
`wan_decoder_stream`), which lives as long as the caller keeps the cache, graphs included. A cache
made elsewhere (the reference decoder's, upstream's shapes) is copied into a new stream, so streams
can move between the decoders.
"""
from types import SimpleNamespace
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..kernels.cuda_graphs import ForgetsDerivedStateOnNewWeights, GraphRunner, cuda_graphs_setting
from ..kernels.registry import load_selection, resolve
from .vae_decoder import (HISTORY_FRAMES, AttentionBlock, ResidualBlock, Resample,
                          VAEDecoderWrapper, check_decoder_inputs, expected_cache_shapes)


DECODER_OPS = ("rms_norm_silu", "bias_residual_add", "upsample_nearest2x")  # the backend registry's decoder ops
STREAM_TAG = "wan_decoder_stream"  # the attribute of a returned cache's first tensor


class _HistoryBuffers:
    """Per cached convolution of one stream (batch, latent size, dtype, device): a channels-last
    buffer of 2 + T frames, T the most frames a call has given that convolution."""

    def __init__(self, shapes: List[tuple], dtype, device):
        self.shapes, self.dtype, self.device = shapes, dtype, device
        self.buffers = [self._new(shape, 0) for shape in shapes]
        self.started = False  # whether the stream's first latent frame was decoded
        self.returned_ids = None  # ids of the cache tensors handed out last

    def continues(self, cache, shapes, dtype, device) -> bool:
        """Whether `cache` is the list this stream handed out last, for these inputs."""
        return (tuple(map(id, cache)) == self.returned_ids and shapes == self.shapes
                and dtype == self.dtype and device == self.device)

    def _new(self, shape, frames: int):
        b, c, h, w = shape
        return torch.zeros(b, c, HISTORY_FRAMES + frames, h, w, dtype=self.dtype,
                           device=self.device).contiguous(memory_format=torch.channels_last_3d)

    def reserve(self, frames_per_entry: List[int]) -> bool:
        """Room for this call's frames after every history (buffers grow, history kept); True
        when a buffer was replaced (graphs captured over the old ones are then stale)."""
        grown = False
        for index, frames in enumerate(frames_per_entry):
            buffer = self.buffers[index]
            if buffer.shape[2] < HISTORY_FRAMES + frames:
                bigger = self._new(self.shapes[index], frames)
                bigger[:, :, :HISTORY_FRAMES].copy_(buffer[:, :, :HISTORY_FRAMES])
                self.buffers[index] = bigger
                grown = True
        return grown

    def histories(self) -> list:
        """The cache list handed back to the caller: views of the history frames."""
        return [buffer[:, :, :HISTORY_FRAMES] for buffer in self.buffers]

    def load(self, cache) -> None:
        """Copy a cache from elsewhere (frames it lacks are zeros, as the causal padding)."""
        for buffer, entry in zip(self.buffers, cache):
            history = buffer[:, :, :HISTORY_FRAMES]
            history.zero_()
            frames = min(entry.shape[2], HISTORY_FRAMES)
            if frames:
                history[:, :, HISTORY_FRAMES - frames:].copy_(entry[:, :, -frames:])
        self.started = True

    def save_histories(self) -> list:
        return [buffer[:, :, :HISTORY_FRAMES].clone() for buffer in self.buffers]

    def restore_histories(self, saved: list) -> None:
        for buffer, history in zip(self.buffers, saved):
            buffer[:, :, :HISTORY_FRAMES].copy_(history)


class OptimizedVAEDecoderWrapper(ForgetsDerivedStateOnNewWeights, VAEDecoderWrapper):

    def __init__(self, cuda_graphs: Optional[bool] = None, backend=None):
        super().__init__()
        self.cuda_graphs = cuda_graphs_setting(cuda_graphs)
        self.backend = load_selection(backend)
        self._ops = None  # the decoder's registry ops for the streams' device/dtype
        self._graphs = GraphRunner()  # per stream's buffers, one shared pool
        self._prepared_for = None  # (device, dtype) of the weights' layout and the ops
        self._watch_weights()

    def _forget_derived_state(self):
        """After .to() or a load: the graphs (they read the old weights) and the weights' layout
        go; a stream whose buffers no longer fit is taken up again from its cache (copied in)."""
        if getattr(self, "_graphs", None) is not None:
            self._graphs.clear()
            self._prepared_for = None

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def forward(self, z: torch.Tensor, *feat_cache):
        check_decoder_inputs(self, z, feat_cache)
        self._prepare(z.device, z.dtype)
        state = self._stream_of(z, feat_cache)
        z = z.permute(0, 2, 1, 3, 4)  # [B, 16, T, h, w]
        pieces = []
        # frames each convolution gets in this call's largest pass (the first latent frame of a
        # stream goes alone: one frame everywhere)
        rest = z.shape[2] - (0 if state.started else 1)
        grown = state.reserve([max(t * rest, 1) for _, _, t in self.decoder.cached_layers])
        if self.cuda_graphs and z.is_cuda:  # this stream's graphs (new ones if buffers grew)
            self._graphs.use_storage(state, lambda: state.buffers, changed=grown)
        if not state.started:  # the first latent frame alone: the temporal upsamplers skip it
            pieces.append(self._run("first", z[:, :, :1], state))
            state.started = True
            z = z[:, :, 1:]
        if z.shape[2]:
            pieces.append(self._run("next", z, state))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        returned = state.histories()
        setattr(returned[0], STREAM_TAG, state)  # the caller's cache keeps the stream alive
        state.returned_ids = tuple(map(id, returned))
        return out, returned

    def _stream_of(self, z, cache) -> _HistoryBuffers:
        """The stream this call continues: the one that handed out `cache`, or a new one, zeroed
        (all None) or loaded from a cache made elsewhere."""
        b, _, _, h, w = z.shape
        shapes = expected_cache_shapes(self.decoder, b, h, w)
        state = getattr(cache[0], STREAM_TAG, None) if cache[0] is not None else None
        if isinstance(state, _HistoryBuffers) and state.continues(cache, shapes, z.dtype,
                                                                  z.device):
            return state
        state = _HistoryBuffers(shapes, z.dtype, z.device)
        if cache[0] is not None:
            state.load(cache)
        return state

    def _prepare(self, device, dtype):
        """Once per device/dtype: the conv weights laid out channels-last (values unchanged), the
        registry ops resolved, the latent statistics moved."""
        if self._prepared_for == (device, dtype):
            return
        self._graphs.clear()  # captured over the old layout
        self._ops = SimpleNamespace(**{
            op: resolve(op, self.backend[op], device, dtype, 0)[1] for op in DECODER_OPS})
        # plain attributes (upstream's), so .to() leaves them: on the device once, not per call
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        for module in self.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(
                    memory_format=torch.channels_last_3d)
            elif isinstance(module, torch.nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(
                    memory_format=torch.channels_last)
        self._prepared_for = (device, dtype)

    def _run(self, phase: str, z, state):
        def compute(z):
            return self._decode(z, state, first=phase == "first")

        if not (self.cuda_graphs and z.is_cuda):
            return compute(z)
        key = (phase, tuple(z.shape), z.dtype)
        if not self._graphs.captured(key):
            # capturing warms up by decoding for real, which moves the histories on: keep them
            saved = state.save_histories()
            self._graphs.capture(key, compute, {"z": z})
            state.restore_histories(saved)
        return self._graphs.run(key, compute, {"z": z})

    # ------------------------------------------------------------------ device work
    def _decode(self, z, state, first: bool):
        """Latents [B, 16, T, h, w] -> frames [B, T', 3, 8h, 8w] float32 in [-1, 1]."""
        decoder = self.decoder
        x = self.conv2(self.denormalize(z).contiguous(memory_format=torch.channels_last_3d))
        x = _causal_conv(decoder.conv1, _copy_of(x), x.shape[2], state, 0)
        for layer in [*decoder.middle, *decoder.upsamples]:
            if isinstance(layer, ResidualBlock):
                x = self._residual(layer, x, state)
            elif isinstance(layer, AttentionBlock):
                x = layer(x)
            elif isinstance(layer, Resample):
                x = self._resample(layer, x, state, first)
        norm, _, conv = decoder.head
        x = _causal_conv(conv, self._normed(norm, x), x.shape[2], state, len(state.buffers) - 1)
        return x.float().clamp_(-1, 1).permute(0, 2, 1, 3, 4)

    def _residual(self, block: ResidualBlock, x, state):
        """shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))), each conv's bias added by the
        op after it."""
        norm1, _, conv1, norm2, _, _, conv2 = block.residual
        frames = x.shape[2]
        h = _causal_conv(conv1, self._normed(norm1, x), frames, state, block.first_index,
                         bias=False)
        h = _causal_conv(conv2, self._normed(norm2, h, conv1.bias), frames, state,
                         block.first_index + 1, bias=False)
        return self._ops.bias_residual_add(h, conv2.bias, block.shortcut(x))

    def _resample(self, layer: Resample, x, state, first: bool):
        """Frames doubled by the causal time conv (not at a stream's first latent frame), then
        each frame upsampled 2x and convolved, channels-last throughout."""
        if layer.mode == "upsample3d" and not first:
            b, c, t, h, w = x.shape
            y = _causal_conv(layer.time_conv, _copy_of(x), t, state, layer.index)
            # channel half 0 -> even frames, half 1 -> odd frames
            x = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # a view in channels-last memory
        y = layer.resample[1](self._ops.upsample_nearest2x(frames))
        return y.view(b, t, *y.shape[1:]).transpose(1, 2)

    def _normed(self, norm, x, bias=None):
        """A writer of silu(norm(x + bias)) into a convolution's buffer."""
        return lambda dest: self._ops.rms_norm_silu(x, norm.gamma, dest, bias)


def _copy_of(x):
    """A writer of x itself into a convolution's buffer."""
    return lambda dest: dest.copy_(x)


def _causal_conv(conv, write, frames: int, state: _HistoryBuffers, index: int, bias: bool = True):
    """conv over [the two previous frames, this call's `frames` input frames] through entry
    `index`'s buffer: `write(dest)` puts the input right after the history; the last two frames
    stay as the next call's history. bias=False leaves the conv's bias to the caller."""
    buffer = state.buffers[index]  # reserved for this call's frames
    window = buffer[:, :, :HISTORY_FRAMES + frames]
    write(window[:, :, HISTORY_FRAMES:])
    pw, _, ph, _ = conv.spatial_padding
    y = F.conv3d(window, conv.weight, conv.bias if bias else None, conv.stride, (0, ph, pw),
                 conv.dilation, conv.groups)
    tail = window[:, :, frames:]  # the last two frames of [history, input]
    buffer[:, :, :HISTORY_FRAMES].copy_(tail.clone() if frames < HISTORY_FRAMES else tail)
    return y
