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
* on CUDA each phase (a stream's first block, a later block) is replayed from a CUDA graph (the
  default; `cuda_graphs=False` or WAN_CUDA_GRAPHS=0 turn it off).

Options (CUDA graphs, backend) come from the same places as the DiT's: this constructor's keywords,
else what the optimized DiT of this process was given (its config.json: upstream's scripts build
the decoder with no arguments: the hand-off of wan/runtime/options.py), else WAN_CUDA_GRAPHS / WAN_BACKEND, else
the defaults (graphs on wherever it runs on CUDA, backend `auto`). They are resolved at the first
call, and one start-up line (logging, `wan.fast`) says which backend runs each op and whether
graphs are on, and why.

Upstream's scripts call `compile(mode=...)` on their decoder, and the fork's inference.py then
saves the module with `torch.save` and reads it back with `torch.load(weights_only=False)`. Here
`compile()` runs no torch.compile (it would trace over the graphed decoder for minutes and gain
nothing): it keeps the decoder's own CUDA graphs on, says so once, and returns None as
nn.Module.compile does. Pickling the decoder (`torch.save`) writes a marker only: no module, no
weights, no graphs, just a reference to `_resume_decoder` and a format tag; unpickling that marker
(the fork's cached path) gives back the decoder this process built last, the one the script has
just built and loaded Wan2.1_VAE.pth into before it looks for the cache. Without one it is an
error that says so.

Streams: a stream (a call with an all-None cache starts one) owns only its history, the cache
list: per cached convolution its last two input frames. The convolution buffers are one workspace
shared by all streams (the history is copied in at a call's start, skipped when the cache passed
is the one the last call returned, and out into new tensors at its end), so any number of players'
streams alternate through one decoder with one set of CUDA graphs and ~1 GiB of history each
(44 x 80, fp16). Each call returns a new cache and leaves the one passed in as it was (as the
reference decoder does): a call repeated with an earlier cache (a retry) decodes the same frames
again. A cache made elsewhere (the reference decoder's, upstream's shapes) is copied into a new
stream, so streams can move between the decoders.

Start-up (issue 35): nothing is paid in the middle of a stream. `compile()` (what upstream's
scripts call at start-up, or the cached marker's load) warms the decoder up at upstream's shapes
(`startup_shape`: batch 1, 3 latent frames, 44 x 80): cuDNN's engine search for the steady block's
convolutions and the graphs of both phases (a stream's first block and a later one). A call whose
shapes were not warmed up (compile() never called, a `.to()` since, which drops the graphs, other
shapes) warms both phases up at its own shapes before it decodes: the first block pays, the
second (the first steady one) does not. A search torch ran in this process and thread is not run
again (torch keeps its plans), so the re-warm-up after upstream's `pipeline.to(...)` only
captures. `counters` says what happened (captures, conv searches, warm-ups).

cuDNN's engine search (`conv_search`): the steady block's convolution problems are listed without
running them (wan/runtime/conv_search_cache.py `record_convolutions`) and each is run once under
its strategy before the graphs are captured (the graphs then replay those plans): `search:all`
unless the search cache file (keyed by GPU, driver, cuDNN, torch and the problems; JSON, never
unpickled) holds a measured choice for it. A start-up without an entry writes one; `calibrate_
conv_search()` measures cheaper strategies in child processes and keeps, per problem, the one
that starts cheapest at the fastest plan's speed.

CUDA graphs are captured before a call copies its stream's history in (a capture decodes zeros
for real), at the first call that needs them, or all of them up front by `warm_up(z)` (a player's
first block then pays no capture).

A returned cache's tensors may be edited in place by the caller: the next call passing them back
sees the edit (each returned tensor's `_version` is remembered; a changed one is copied in), and
a cache returned earlier than the last call is copied in too, so either decodes as the reference
decoder would.
"""
import contextlib
import threading
import time
import weakref
from types import SimpleNamespace
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..runtime import conv_search_cache
from ..runtime.cuda_graphs import GraphRunner
from ..runtime.weight_watch import ForgetsDerivedStateOnNewWeights
from ..runtime.log import info
from ..runtime.options import FastOptions, model_options
from ..kernels.registry import BackendUnavailableError, describe_resolved, resolve
from .vae_decoder import (HISTORY_FRAMES, AttentionBlock, ResidualBlock, Resample,
                          VAEDecoderWrapper, check_decoder_inputs, expected_cache_shapes)


# the backend registry's decoder ops
DECODER_OPS = ("rms_norm_silu", "bias_residual_add", "bias_residual_add_rms_norm_silu",
               "upsample_conv2d", "conv3d_narrow")
STARTED_TAG = "wan_decoder_stream_started"  # set on a stream's first history tensor
STARTUP_SHAPE = (1, 3, 44, 80)  # what compile() warms up: upstream's batch, block, latent size
PICKLE_FORMAT = "wan.OptimizedVAEDecoderWrapper/marker-1"  # what torch.save writes of a decoder
_last_built = None  # weak reference to the decoder this process built last (for the marker)
_compile_noted = False  # compile()'s note is logged once per process


def new_histories(shapes: List[tuple], dtype, device) -> list:
    """A new stream's history: per cached convolution its last two input frames, zeros (the causal
    padding), channels-last [B, C, 2, H, W]."""
    return [torch.zeros(b, c, HISTORY_FRAMES, h, w, dtype=dtype, device=device).contiguous(
        memory_format=torch.channels_last_3d) for b, c, h, w in shapes]


class _Workspace:
    """Per cached convolution a channels-last input buffer [B, C, 2 + T, H, W] (T: the most frames
    a call has given it), shared by every stream of one batch/latent size/dtype/device: a call
    copies its stream's history into the first two frames, the layer before each convolution
    writes its output after them, and the new history is copied back to the stream at the end.
    Per stream only the history is kept (~1 GiB at 44 x 80 in fp16, against ~6 GiB for a stream
    with buffers of its own), and one set of CUDA graphs serves every stream."""

    def __init__(self, shapes: List[tuple], dtype, device):
        self.shapes, self.dtype, self.device = shapes, dtype, device
        self.buffers = [self._new(shape, 0) for shape in shapes]
        # (weak reference, _version) of each history tensor the fronts hold: the cache the last
        # call returned, as it was returned
        self._resident = ()

    def fits(self, shapes, dtype, device) -> bool:
        return shapes == self.shapes and dtype == self.dtype and device == self.device

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

    def fronts(self) -> list:
        """The history frames of every buffer (views)."""
        return [buffer[:, :, :HISTORY_FRAMES] for buffer in self.buffers]

    def holds(self, histories: list) -> bool:
        """Whether the fronts hold `histories` already: they are the tensors the last call
        returned, none edited in place since (a tensor's `_version` moves with every in-place
        write, the caller's included)."""
        return len(self._resident) == len(histories) and all(
            ref() is t and t._version == version
            for (ref, version), t in zip(self._resident, histories))

    def take_in(self, histories: list) -> bool:
        """The stream's history into the fronts, skipped when they hold it already (`holds`).
        Returns whether it was copied."""
        if self.holds(histories):
            return False
        torch._foreach_copy_(self.fronts(), histories)
        return True

    def hand_back(self) -> list:
        """The new history as new tensors: the cache passed in stays as it was, so a call
        repeated with an earlier cache (a retry) decodes the same frames again, as the
        reference decoder does."""
        histories = [front.clone(memory_format=torch.channels_last_3d) for front in self.fronts()]
        self._resident = tuple((weakref.ref(t), t._version) for t in histories)
        return histories

    def forget_resident(self):
        """The fronts no longer hold any stream's history (a capture wrote them)."""
        self._resident = ()


class OptimizedVAEDecoderWrapper(ForgetsDerivedStateOnNewWeights, VAEDecoderWrapper):

    def __init__(self, cuda_graphs: Optional[bool] = None, backend=None,
                 conv_search: Optional[bool] = None):
        """Upstream's VAEDecoderWrapper() plus three options (upstream's scripts pass none):

        * `cuda_graphs`: replay each phase from CUDA graphs; None: the optimized DiT's option,
          else WAN_CUDA_GRAPHS, else on wherever the decoder runs on CUDA;
        * `backend`: a name, {op: name} or a YAML path (configs/backends/) for the decoder's ops;
          None: the DiT's, else WAN_BACKEND, else `auto`;
        * `conv_search`: on CUDA, let cuDNN time engines for the steady blocks' convolutions
          once per process, at the warm-up (`compile()`, `warm_up`, or the first call's): by
          default every engine (torch's `cudnn.benchmark` with `benchmark_limit=0`; the
          heuristics pick a tile that reads the 96-channel convs' input three times: ~21 ms per
          block more on an H200), ~23-26 s, or per convolution what the search cache file holds
          (wan/runtime/conv_search_cache.py); None: WAN_CONV_SEARCH, else on.

        Plain attributes: `startup_shape` (batch, latent frames, latent h, w) that `compile()`
        warms up at (upstream's (1, 3, 44, 80)); `conv_search_cache`: the cache file's path,
        False for none, None (default) for WAN_CONV_SEARCH_CACHE or ~/.cache/wan.
        """
        global _last_built
        super().__init__()
        self._given = {"cuda_graphs": cuda_graphs, "backend": backend,
                       "conv_search": conv_search}
        # resolved at the first call (or compile()): upstream's scripts may build the DiT after
        self.options: Optional[FastOptions] = None
        FastOptions.resolve(self._given, given_as="")  # a bad option fails here already
        self._ops = None  # the decoder's registry ops for the streams' device/dtype
        self._graphs = GraphRunner()  # over the workspace's buffers
        self._workspace: Optional[_Workspace] = None
        self._prepared_for = None  # (device, dtype) of the weights' layout and the ops
        self._fold_resample_bias = True  # see the properties
        self._fuse_residual_norm = True
        self._fold_shortcut_bias = True
        self.startup_shape = STARTUP_SHAPE
        self.conv_search_cache = None
        self._warmed = set()     # (batch, frames, h, w, dtype, device) warmed up since the graphs
        self._searched = set()   # (thread, device, dtype, phase key): steady problems searched
        self._counts = {"captures": 0, "searches": 0, "search_s": 0.0, "warm_ups": 0,
                        "history_copies": 0}
        self.conv_search_report = None  # the last search pass: problems, strategies, cache
        self._watch_weights()
        _last_built = weakref.ref(self)

    @property
    def cuda_graphs(self) -> Optional[bool]:
        return self._resolved_options().cuda_graphs

    @property
    def backend(self) -> dict:
        """{op: backend name or 'auto'} of the decoder's options (resolved at the first call)."""
        return dict(self._resolved_options().backend)

    @property
    def fold_resample_bias(self) -> bool:
        """Whether a resample's 2-D conv leaves its bias to the next residual block (its norm
        and its residual add, where its shortcut is the identity) instead of a pass of its own
        (default True; False: in the conv, as upstream). Changing it drops the captured graphs,
        which hold either way."""
        return self._fold_resample_bias

    @fold_resample_bias.setter
    def fold_resample_bias(self, fold: bool):
        self._set_layout_switch("fold_resample_bias", fold)

    @property
    def fuse_residual_norm(self) -> bool:
        """Whether a residual block's closing add also writes the next norm of its sum (the next
        block's first norm, or the head's) into that norm's convolution buffer, in one pass
        (`bias_residual_add_rms_norm_silu`; default True; False: the add, then the norm reading
        the sum back). Changing it drops the captured graphs."""
        return self._fuse_residual_norm

    @fuse_residual_norm.setter
    def fuse_residual_norm(self, fuse: bool):
        self._set_layout_switch("fuse_residual_norm", fuse)

    @property
    def fold_shortcut_bias(self) -> bool:
        """Whether a residual block's 1x1x1 shortcut conv (where the channel count changes) runs
        without its bias, which the block's closing add adds with conv2's, instead of torch's
        separate bias pass over the shortcut's output (default True; False: in the conv, as
        upstream). Changing it drops the captured graphs."""
        return self._fold_shortcut_bias

    @fold_shortcut_bias.setter
    def fold_shortcut_bias(self, fold: bool):
        self._set_layout_switch("fold_shortcut_bias", fold)

    def _set_layout_switch(self, name: str, value: bool):
        """Set an on/off choice of how the decode is laid out; the graphs captured under the
        other choice go."""
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
        if value != getattr(self, "_" + name):
            setattr(self, "_" + name, value)
            self._drop_graphs()

    @cuda_graphs.setter
    def cuda_graphs(self, enabled: Optional[bool]):
        self._given["cuda_graphs"] = enabled
        if self.options is not None:
            self.options = self.options.with_option("cuda_graphs", enabled)
        if enabled is False:
            self._drop_graphs()

    # ------------------------------------------------------------------ upstream's compile path
    def compile(self, *args, **kwargs):
        """What upstream's scripts call (`compile(mode="max-autotune-no-cudagraphs")`): no
        torch.compile, the decoder's own CUDA graphs instead (kept off only where they were turned
        off: `cuda_graphs=False`, WAN_CUDA_GRAPHS=0, the DiT's config), and the start-up warm-up
        (`warm_up_for_startup`: the conv search and both phases' graphs at `startup_shape`, where
        the weights are on CUDA), so that no block of a stream waits for them. Returns None, as
        nn.Module.compile does."""
        global _compile_noted
        options = self._resolved_options()
        if options.cuda_graphs is None:
            self.options = options.with_option("cuda_graphs", True, origin="compile()")
        if not _compile_noted:
            _compile_noted = True
            state = ("its own CUDA graphs stay off (turned off)" if self.cuda_graphs is False
                     else "its own CUDA graphs replay instead, wherever it runs on CUDA")
            info("%s.compile(%s): not running torch.compile over this decoder; %s",
                 type(self).__name__,
                 ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]), state)
        self.warm_up_for_startup(reason="start-up (the compile call)")

    def warm_up_for_startup(self, reason: str = "start-up") -> int:
        """Warm up at `startup_shape` (batch, latent frames, h, w) in the weights' dtype and on
        their device: the steady block's conv search and both phases' graphs. Nothing where
        neither applies (graphs and the search are CUDA's): the first call warms up then.
        Returns the graphs captured."""
        param = next(self.parameters())
        if not self._warm_up_applies(param.device):
            return 0
        batch, frames, h, w = self.startup_shape
        begin = time.perf_counter()
        before = dict(self.counters)
        z = torch.zeros(batch, frames, self.z_dim, h, w, dtype=param.dtype, device=param.device)
        captured = self.warm_up(z)
        after = self.counters
        info("%s warmed up at %s for %s: %d conv problems searched (%.1f s), %d graphs "
             "captured, %.1f s in all", type(self).__name__, reason, tuple(z.shape),
             after["searches"] - before["searches"], after["search_s"] - before["search_s"],
             captured, time.perf_counter() - begin)
        return captured

    @property
    def counters(self) -> dict:
        """What the decoder paid so far (this object, cumulative): `captures` (CUDA graphs
        captured), `searches` (convolution problems cuDNN's search ran for: each once per process
        and thread), `search_s` (their seconds), `warm_ups` (both phases readied at one shape),
        `history_copies` (calls that copied a stream's history in)."""
        return dict(self._counts, captures=self._graphs.captures)

    def __reduce_ex__(self, protocol):
        """torch.save / pickle write a marker, not the module: see the module's docstring."""
        return _resume_decoder, (PICKLE_FORMAT,)

    def __deepcopy__(self, memo):
        """A new decoder with the same options, weights, device, dtype and mode (not the marker
        that pickling writes, and no graphs or streams: they are rebuilt at its first call)."""
        copy = type(self)(**self._given)
        copy.startup_shape, copy.conv_search_cache = self.startup_shape, self.conv_search_cache
        copy.load_state_dict(self.state_dict())
        reference = next(self.parameters())
        copy.to(reference.device, reference.dtype).train(self.training)
        for mine, theirs in zip(copy.parameters(), self.parameters()):
            mine.requires_grad_(theirs.requires_grad)
        return copy

    def _resolved_options(self) -> FastOptions:
        """Once, at the first call (or compile()): options not given to the constructor follow the
        optimized DiT's (its config.json), else the environment, else the defaults. This is the
        one place the DiT -> decoder hand-off is read (`model_options`, wan/runtime/options.py):
        upstream's scripts build this decoder with no arguments, so it has no other way to learn
        the options the user gave the DiT."""
        if self.options is None:
            self.options = FastOptions.resolve(self._given, inherited=model_options(),
                                               given_as="")
        return self.options

    def _forget_derived_state(self):
        """After .to() or a load: the graphs (they read the old weights) and the weights' layout
        go; a stream whose buffers no longer fit is taken up again from its cache (copied in).
        The next call warms up again (captures; torch keeps this process's searched plans)."""
        if getattr(self, "_graphs", None) is not None:
            self._drop_graphs()
            self._prepared_for, self._workspace = None, None

    def _drop_graphs(self):
        """The captured graphs go; every shape is warmed up again at its next call."""
        self._graphs.clear()
        self._warmed.clear()

    # where graphs may be captured and cuDNN's search runs (a test seam: the CPU checkout test
    # adds "cpu" with a stand-in GraphRunner to count captures and searches)
    _graph_device_types = ("cuda",)
    _conv_search_device_types = ("cuda",)

    def _graphs_on(self, device) -> bool:
        device = torch.device(device)
        if device.type == "cuda" or device.type not in self._graph_device_types:
            return self.options.graphs_on(device)
        return self.options.cuda_graphs is not False

    def _searches_on(self, device) -> bool:
        return (self._resolved_options().conv_search
                and torch.device(device).type in self._conv_search_device_types)

    def _warm_up_applies(self, device) -> bool:
        """Whether a warm-up does anything on `device`: graphs to capture or a conv search."""
        self._resolved_options()
        return self._graphs_on(device) or self._searches_on(device)

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def forward(self, z: torch.Tensor, *feat_cache):
        check_decoder_inputs(self, z, feat_cache)
        self._prepare(z.device, z.dtype)
        b, t, _, h, w = z.shape
        if (b, t, h, w, z.dtype, z.device) not in self._warmed and \
                self._warm_up_applies(z.device):
            self.warm_up(z)  # both phases at this call's shapes, before any history moves in
        shapes = expected_cache_shapes(self.decoder, b, h, w)
        histories = self._histories_of(feat_cache, shapes, z)
        started = getattr(histories[0], STARTED_TAG, False)
        phases = _phases(z.permute(0, 2, 1, 3, 4), started)
        work = self._workspace_for(shapes, z, phases, steady=started)  # missing graphs first
        if work.take_in(histories):
            self._counts["history_copies"] += 1
        # the search matters where cuDNN picks engines: eager calls (graphs were captured after
        # the search pass; an eager call on another thread searches here, torch's plans being
        # per thread)
        eager = not self._graphs_on(z.device)
        with self._conv_search(z.device, steady=started and eager):
            pieces = [self._run(name, latents, work) for name, latents in phases]
        histories = work.hand_back()
        setattr(histories[0], STARTED_TAG, True)
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return out, histories

    @torch.no_grad()
    def warm_up(self, z: torch.Tensor) -> int:
        """Capture every CUDA graph a stream of blocks like `z` ([B, T, 16, h, w], one block's
        latents) will replay, before the first real call (as nano-vllm captures before serving):
        a stream's first block and a later one, the later one after cuDNN's engine search for its
        convolutions (`conv_search`). No stream's state is touched. Returns the graphs captured
        (0 without graphs)."""
        check_decoder_inputs(self, z, [None] * len(self.decoder.cached_layers))
        self._prepare(z.device, z.dtype)
        b, t, _, h, w = z.shape
        shapes = expected_cache_shapes(self.decoder, b, h, w)
        latents = torch.zeros_like(z).permute(0, 2, 1, 3, 4)
        before = self._graphs.captures
        # a later block first: it needs the largest buffers, so the first block's graphs,
        # captured after, are not dropped by the buffers growing
        for started in (True, False):
            self._workspace_for(shapes, z, _phases(latents, started), steady=started)
        self._warmed.add((b, t, h, w, z.dtype, z.device))
        self._counts["warm_ups"] += 1
        return self._graphs.captures - before

    def _workspace_for(self, shapes, z, phases, steady: bool) -> "_Workspace":
        """The shared workspace, with room for these phases' frames, and on CUDA the graphs of
        these phases, captured now when missing: before any stream's history is copied in (a
        capture decodes for real, which moves the history in the buffers on). A steady block's
        convolutions are searched first (`_search_convs`, with `conv_search`): the captured
        graph then replays the engines the search picked."""
        work, grown = self._room_for(shapes, z, max(latents.shape[2] for _, latents in phases))
        graphs = self._graphs_on(z.device)
        if graphs:
            self._graphs.use_storage(work, lambda: work.buffers, changed=grown)
        # the phases still to be readied: with graphs, those not captured yet (a captured graph
        # replays the engines picked before its capture, on any thread: searching again for
        # another thread, torch's plans being per thread, would stall that thread's first block
        # for the whole search); without graphs every phase (eager calls use the thread's plans)
        pending = [(name, latents) for name, latents in phases if not graphs
                   or not self._graphs.captured((name, tuple(latents.shape), latents.dtype))]
        if steady and self._searches_on(z.device):
            for name, latents in pending:
                self._search_convs(name, latents, work)
        if not graphs:
            return work
        for name, latents in pending:
            key = (name, tuple(latents.shape), latents.dtype)
            # (the search pass ran every problem already: this only catches one it missed)
            with self._conv_search(z.device, steady):
                self._graphs.capture(key, self._computation(name, work),
                                     {"z": torch.zeros_like(latents)})
            work.forget_resident()
        return work

    def _room_for(self, shapes, z, frames: int):
        """(the shared workspace with room for `frames` latent frames per call, whether a buffer
        was replaced)."""
        work = self._workspace
        if work is None or not work.fits(shapes, z.dtype, z.device):
            work = self._workspace = _Workspace(shapes, z.dtype, z.device)
        grown = work.reserve([max(t * frames, 1) for _, _, t in self.decoder.cached_layers])
        return work, grown

    def _search_convs(self, phase: str, latents, work: "_Workspace"):
        """cuDNN's engine search for one steady phase's convolutions, once per process, thread,
        device, dtype and shape, before its graph is captured: the problems are listed without
        running them (the decode runs on the workspace with every conv answered by an empty
        tensor), then each runs once under its strategy (the cache file's, else search:all),
        which leaves torch's plan for the capture. A start-up that found no entry writes one."""
        device = latents.device
        key = (threading.get_ident(), device, latents.dtype, phase, tuple(latents.shape))
        if key in self._searched:
            return
        problems = conv_search_cache.record_convolutions(
            lambda: self._decode(torch.zeros_like(latents), work, first=phase == "first"))
        work.forget_resident()  # the listing decoded garbage through the buffers
        env = conv_search_cache.environment(device)
        path = conv_search_cache.cache_path(self.conv_search_cache)
        cache = conv_search_cache.SearchCache(path) if path is not None else None
        entry, status = cache.load(env, problems) if cache is not None else (None, "off")
        strategies = entry.strategies if entry is not None else {
            p.name: conv_search_cache.DEFAULT_STRATEGY for p in problems}
        done = conv_search_cache.search(problems, strategies, device)
        self._searched.add(key)
        self._counts["searches"] += done["searched"]
        self._counts["search_s"] += done["search_s"]
        written = False
        if cache is not None and entry is None and done["measured"]:
            written = cache.store(env, problems, strategies, done["measured"])
        self.conv_search_report = {
            "problems": len(problems), "searched": done["searched"],
            "heuristic": done["heuristic"], "reused": done["reused"],
            "search_s": done["search_s"], "cache": status, "cache_path": str(path),
            "cache_written": written, "strategies": dict(strategies)}
        if done["searched"] or done["heuristic"]:
            counts = {}
            for strategy in strategies.values():
                counts[strategy] = counts.get(strategy, 0) + 1
            info("%s: cuDNN engines for %d conv problems of a steady block %s: %d searched, %d "
                 "heuristic, %.1f s (%s; search cache %s: %s%s)", type(self).__name__,
                 len(problems), tuple(latents.shape), done["searched"], done["heuristic"],
                 done["search_s"], ", ".join(f"{n} x {s}" for s, n in sorted(counts.items())),
                 path if path is not None else "off", status, ", written" if written else "")

    @torch.no_grad()
    def calibrate_conv_search(self, z: Optional[torch.Tensor] = None,
                              strategies=conv_search_cache.CALIBRATION_STRATEGIES,
                              tolerance: float = conv_search_cache.TOLERANCE) -> dict:
        """Measure cuDNN search strategies for the steady block's convolutions (`z`: one block's
        latents, default zeros at `startup_shape` in the weights' dtype and device), each in a
        child process (in this one, torch's first plan per problem would decide the others), and
        write the cache file's entry for this environment with, per problem, the strategy that
        starts cheapest within `tolerance` of the fastest plan. Later start-ups (other processes)
        then search only where that pays; this process keeps the plans it has. Returns the
        measurements and the choice (conv_search_cache.calibrate)."""
        if z is None:
            param = next(self.parameters())
            batch, frames, h, w = self.startup_shape
            z = torch.zeros(batch, frames, self.z_dim, h, w, dtype=param.dtype,
                            device=param.device)
        check_decoder_inputs(self, z, [None] * len(self.decoder.cached_layers))
        self._prepare(z.device, z.dtype)
        b, _, _, h, w = z.shape
        latents = torch.zeros_like(z).permute(0, 2, 1, 3, 4)
        work, grown = self._room_for(expected_cache_shapes(self.decoder, b, h, w), z,
                                     latents.shape[2])
        if grown:  # graphs captured over the old buffers are stale
            self._drop_graphs()
        problems = conv_search_cache.record_convolutions(
            lambda: self._decode(latents, work, first=False))
        work.forget_resident()
        path = conv_search_cache.cache_path(self.conv_search_cache)
        if path is None:
            raise ValueError("calibrate_conv_search: the search cache is off (conv_search_cache="
                             "False or WAN_CONV_SEARCH_CACHE=0): nowhere to keep the result")
        result = conv_search_cache.calibrate(problems, z.device, strategies, tolerance,
                                             cache=conv_search_cache.SearchCache(path),
                                             env=conv_search_cache.environment(z.device))
        info("%s: conv search calibrated for %d problems (%s): search at start-up %.1f s -> "
             "%.1f s, conv time per block %.2f -> %.2f ms; written to %s", type(self).__name__,
             len(problems), tuple(z.shape), result["search_s"].get("search:all", float("nan")),
             result["search_s"]["chosen"], result["conv_ms"].get("search:all", float("nan")),
             result["conv_ms"]["chosen"], path)
        return result

    def _conv_search(self, device, steady: bool):
        """cuDNN's full engine search for the convolutions run inside (a steady block's, with
        `conv_search` on, on CUDA), else nothing changes. torch keeps what the search picked per
        conv shape, and a graph captured under it replays those engines."""
        if not (steady and self.options.conv_search and torch.device(device).type == "cuda"):
            return contextlib.nullcontext()
        return conv_search_cache.strategy_flags(conv_search_cache.DEFAULT_STRATEGY)

    def _histories_of(self, cache, shapes, z) -> list:
        """The stream's own history tensors: the cache itself when this decoder made it (its
        tensors are updated in place), new zeros for a new stream (all None), or a copy of a cache
        made elsewhere (frames it lacks are zeros, as the causal padding)."""
        if cache[0] is not None and getattr(cache[0], STARTED_TAG, False) and all(
                tuple(entry.shape) == (b, c, HISTORY_FRAMES, h, w) and entry.dtype == z.dtype
                and entry.device == z.device for entry, (b, c, h, w) in zip(cache, shapes)):
            return list(cache)
        histories = new_histories(shapes, z.dtype, z.device)
        if cache[0] is not None:
            for history, entry in zip(histories, cache):
                frames = min(entry.shape[2], HISTORY_FRAMES)
                if frames:
                    history[:, :, HISTORY_FRAMES - frames:].copy_(entry[:, :, -frames:])
            setattr(histories[0], STARTED_TAG, True)
        return histories

    def _prepare(self, device, dtype):
        """Once per device/dtype: the conv weights laid out channels-last (values unchanged), the
        registry ops resolved, the latent statistics moved."""
        if self._prepared_for == (device, dtype):
            return
        options = self._resolved_options()
        self._drop_graphs()  # captured over the old layout
        try:
            resolved = {op: resolve(op, options.backend[op], device, dtype, 0)
                        for op in DECODER_OPS}
        except BackendUnavailableError as err:
            if not options.sources["backend"].startswith("the DiT's"):
                raise  # asked for here or in WAN_BACKEND: a clear error
            # the DiT's choice does not run the decoder here (e.g. triton in float64 on a CPU)
            info("%s: not following %s (%s); WAN_BACKEND or auto instead", type(self).__name__,
                 options.sources["backend"], err)
            options = self.options = FastOptions.resolve(
                self._given, inherited=dict(options.inherited, backend=None), given_as="")
            resolved = {op: resolve(op, options.backend[op], device, dtype, 0)
                        for op in DECODER_OPS}
        self._ops = SimpleNamespace(**{op: fn for op, (_, fn) in resolved.items()})
        backend = options.sources["backend"]
        info("%s on %s in %s, %s: %s%s", type(self).__name__, device, dtype,
             options.describe_graphs(device), describe_resolved(resolved),
             f" (backend from {backend})" if backend != "default" else "")
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

    def _computation(self, phase: str, state: "_Workspace"):
        def compute(z):
            return self._decode(z, state, first=phase == "first")
        return compute

    def _run(self, phase: str, z, state: "_Workspace"):
        if not self._graphs_on(z.device):
            return self._decode(z, state, first=phase == "first")
        return self._graphs.run((phase, tuple(z.shape), z.dtype), self._computation(phase, state),
                                {"z": z})

    # ------------------------------------------------------------------ device work
    def _decode(self, z, state, first: bool):
        """Latents [B, 16, T, h, w] -> frames [B, T', 3, 8h, 8w] float32 in [-1, 1]."""
        decoder = self.decoder
        x = self.conv2(self.denormalize(z).contiguous(memory_format=torch.channels_last_3d))
        x = _causal_conv(decoder.conv1, _copy_of(x), x.shape[2], state, 0)
        layers = [*decoder.middle, *decoder.upsamples]
        pending_bias = None  # a conv bias the next block adds (see the resample below)
        normed = False  # x's next norm already in its conv's buffer (written by the last add)
        for layer, after in zip(layers, [*layers[1:], None]):  # after None: the head follows
            if isinstance(layer, ResidualBlock):
                then = self._norm_after(after, state)
                x = self._residual(layer, x, state, pending_bias, normed, then)
                normed = then is not None
            elif isinstance(layer, AttentionBlock):
                x, normed = layer(x), False
            pending_bias = None
            if isinstance(layer, Resample):
                # a resample's conv bias is left to the next block when its shortcut is the
                # identity: its norm adds it before normalising, its residual add with its own
                # conv's bias (one full-resolution pass fewer)
                fold = (self.fold_resample_bias and isinstance(after, ResidualBlock)
                        and isinstance(after.shortcut, torch.nn.Identity))
                x, normed = self._resample(layer, x, state, first, bias=not fold), False
                if fold:
                    pending_bias = layer.resample[1].bias
        norm, _, conv = decoder.head
        # the head (96 -> 3 channels): one GEMM over the pixels + a 27-tap sum (wan/kernels/triton/conv3d.py)
        x = _causal_conv(conv, None if normed else self._normed(norm, x), x.shape[2], state,
                         _head_index(state), conv_op=self._ops.conv3d_narrow)
        return x.float().clamp_(-1, 1).permute(0, 2, 1, 3, 4)

    def _residual(self, block: ResidualBlock, x, state, x_bias=None, x_normed=False, then=None):
        """shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))), each conv's bias added by the
        op after it. `x_bias`: the bias of the conv that made x, not added yet (only with an
        identity shortcut): norm1 adds it, and the residual add with conv2's. `x_normed`: norm1's
        output is in conv1's buffer already. `then` (`_norm_after`): the norm that reads the sum
        next, which the closing add writes too."""
        norm1, _, conv1, norm2, _, _, conv2 = block.residual
        frames = x.shape[2]
        h = _causal_conv(conv1, None if x_normed else self._normed(norm1, x, x_bias), frames,
                         state, block.first_index, bias=False)
        h = _causal_conv(conv2, self._normed(norm2, h, conv1.bias), frames, state,
                         block.first_index + 1, bias=False)
        if x_bias is not None:  # (h + b2) + (x + b_x) = (h + (b2 + b_x)) + x
            bias, shortcut = conv2.bias + x_bias, x
        elif self.fold_shortcut_bias and not isinstance(block.shortcut, torch.nn.Identity):
            # the 1x1x1 shortcut conv's bias joins conv2's: (h + b2) + (W x + b_s) =
            # (h + (b2 + b_s)) + W x (cuDNN's channels-last 3-D conv adds a bias in a pass of
            # its own over the output: 0.5 GB at 352 x 640 x 96)
            conv = block.shortcut
            bias, shortcut = conv2.bias + conv.bias, F.conv3d(x, conv.weight)
        else:
            bias, shortcut = conv2.bias, block.shortcut(x)
        if then is None:
            return self._ops.bias_residual_add(h, bias, shortcut)
        norm, index = then
        return self._ops.bias_residual_add_rms_norm_silu(h, bias, shortcut, norm.gamma,
                                                         _conv_input(state, index, frames))

    def _norm_after(self, after, state):
        """(norm, its conv's buffer index) of the norm that reads a residual block's sum next,
        when the block's closing add can write it (`fuse_residual_norm`): the next residual
        block's first norm, or the head's (`after` None: the decoder's last block); else None
        (an attention block or a resample follows)."""
        if not self.fuse_residual_norm:
            return None
        if isinstance(after, ResidualBlock):
            return after.residual[0], after.first_index
        if after is None:
            return self.decoder.head[0], _head_index(state)
        return None

    def _resample(self, layer: Resample, x, state, first: bool, bias: bool = True):
        """Frames doubled by the causal time conv (not at a stream's first latent frame), then
        each frame upsampled 2x and convolved, channels-last throughout (bias=False: without the
        2-D conv's bias, which the caller leaves to the next op)."""
        if layer.mode == "upsample3d" and not first:
            b, c, t, h, w = x.shape
            y = _causal_conv(layer.time_conv, _copy_of(x), t, state, layer.index)
            # channel half 0 -> even frames, half 1 -> odd frames
            x = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # a view in channels-last memory
        # Resample's conv is a 3x3, padding 1: upsampling + conv as one op (triton: a 2x2 conv of
        # the small frames)
        conv = layer.resample[1]
        y = self._ops.upsample_conv2d(frames, conv.weight, conv.bias if bias else None)
        return y.view(b, t, *y.shape[1:]).transpose(1, 2)

    def _normed(self, norm, x, bias=None):
        """A writer of silu(norm(x + bias)) into a convolution's buffer."""
        return lambda dest: self._ops.rms_norm_silu(x, norm.gamma, dest, bias)


def _phases(latents, started: bool) -> list:
    """[(phase, latents)] of one call, latents [B, 16, T, h, w]: a stream's first latent frame goes
    alone (the temporal upsamplers treat it differently), the rest together."""
    phases = [] if started else [("first", latents[:, :, :1])]
    rest = latents if started else latents[:, :, 1:]
    if rest.shape[2]:
        phases.append(("next", rest))
    return phases


def _copy_of(x):
    """A writer of x itself into a convolution's buffer."""
    return lambda dest: dest.copy_(x)


def _head_index(state: "_Workspace") -> int:
    """The head conv's entry: the last of the workspace's buffers."""
    return len(state.buffers) - 1


def _conv_input(state: "_Workspace", index: int, frames: int):
    """Where entry `index`'s convolution reads this call's `frames` input frames: right after
    the history in its buffer."""
    return state.buffers[index][:, :, HISTORY_FRAMES:HISTORY_FRAMES + frames]


def _causal_conv(conv, write, frames: int, state: _Workspace, index: int, bias: bool = True,
                 conv_op=None):
    """conv over [the two previous frames, this call's `frames` input frames] through entry
    `index`'s buffer: `write(dest)` puts the input right after the history (None: it is there
    already, `_conv_input`); the last two frames stay as the next call's history. bias=False
    leaves the conv's bias to the caller. `conv_op`: a registry op that runs the conv instead of
    torch's (3x3x3, stride 1, padded 1 in H/W)."""
    buffer = state.buffers[index]  # reserved for this call's frames
    window = buffer[:, :, :HISTORY_FRAMES + frames]
    if write is not None:
        write(window[:, :, HISTORY_FRAMES:])
    if conv_op is not None:
        y = conv_op(window, conv.weight, conv.bias if bias else None)
    else:
        pw, _, ph, _ = conv.spatial_padding
        y = F.conv3d(window, conv.weight, conv.bias if bias else None, conv.stride, (0, ph, pw),
                     conv.dilation, conv.groups)
    tail = window[:, :, frames:]  # the last two frames of [history, input]
    buffer[:, :, :HISTORY_FRAMES].copy_(tail.clone() if frames < HISTORY_FRAMES else tail)
    return y


def _resume_decoder(format_tag: str):
    """What unpickling a saved OptimizedVAEDecoderWrapper calls: the decoder this process built
    last (upstream's inference.py builds it and loads its weights before reading the cache)."""
    if format_tag != PICKLE_FORMAT:
        raise ValueError(f"a saved decoder marker of an unknown format {format_tag!r}")
    decoder = _last_built() if _last_built is not None else None
    if decoder is None:
        raise RuntimeError(
            "this file was written by torch.save of an OptimizedVAEDecoderWrapper and holds no "
            "module and no weights (nothing compiled to cache): build the decoder and load its "
            "weights first (as upstream's inference.py does), or delete the file")
    # the fork's cached path stands for compile(): the start-up warm-up happens here too
    decoder.warm_up_for_startup(reason="the saved decoder's load")
    return decoder
