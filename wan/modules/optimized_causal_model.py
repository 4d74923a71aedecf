"""OptimizedCausalWanModel: the same model, a faster streaming forward.

`OptimizedCausalWanModel` takes the constructor, config, checkpoint and forward keywords of
`CausalWanModel` (plus `backend`, `cuda_graphs` and `precision`) and gives the same outputs. What
differs is the streaming path:

* every attention, norm and RoPE goes through the backend registry (wan/kernels/registry.py);
* caches are ring buffers (wan/runtime/stream_cache.py): a frame's K/V is written once into a
  fixed slot, nothing shifts, and the stream position lives on the host, so the forward has no
  `.item()` and no host sync. Either the model owns them (`start_stream`) or the caller's
  upstream-style dicts serve as the storage (drop-in);
* on CUDA the whole streaming forward is replayed from a CUDA graph (the default; `cuda_graphs=False`,
  WAN_CUDA_GRAPHS=0 or `"cuda_graphs": false` in config.json turn it off);
* optionally the blocks' big GEMMs run in FP8 (`precision="fp8"`, opt-in: e4m3 weights with a scale
  per output channel, activations with a scale per token quantized by the norms that produce them;
  wan/kernels/fp8.py). Its cost in accuracy on one's own weights: `python -m wan.compare`.

It relies on its parent only through the constructor, the module tree, parameter names and public
attributes, so this file with what it imports (wan/modules/streaming/, wan/modules/shared/,
wan/runtime/, wan/kernels/) also works over upstream Matrix-Game-2's CausalWanModel:
`python -m wan.integrate` installs them into a checkout. The cache-free (training) forward is the
parent's.

Where to read what: this class is what a user calls (options, streams, warm-up, forward); a
streaming call's checks, caches, positions and graphs are wan/modules/streaming/call.py, and its
math, top to bottom, wan/modules/streaming/blocks.py.
"""
import inspect
from typing import Optional

import torch

from ..runtime.options import FP8_GEMMS, FastOptions, parse_switch, publish_model_options
from ..runtime.stream_cache import StreamCache
from ..runtime.weight_watch import ForgetsDerivedStateOnNewWeights
from .causal_model import CausalWanModel
from .streaming.call import StreamingForward


class OptimizedCausalWanModel(ForgetsDerivedStateOnNewWeights, CausalWanModel):

    def __init__(self, *args, backend=None, cuda_graphs: Optional[bool] = None,
                 precision: Optional[str] = None, fp8_gemms=None, fused_qkv: Optional[bool] = None,
                 residual_in_gemm: Optional[bool] = None,
                 first_call_warm_up: Optional[bool] = None, inject_sample_info: bool = False,
                 **kwargs):
        """Arguments of CausalWanModel, plus the options (wan/runtime/options.py; each None:
        its environment variable, else its default):

        * `backend`: a name, {op: name}, or a YAML path (configs/backends/); ops it leaves out
          follow WAN_BACKEND, then 'auto';
        * `cuda_graphs`: replay the streaming forward from CUDA graphs (WAN_CUDA_GRAPHS; default
          on wherever the model runs on CUDA, decided per forward from the input's device: a
          model built on the CPU and moved is graphed);
        * `precision`: 'native' (every GEMM in the model's dtype) or 'fp8' (the blocks' big GEMMs
          in FP8 e4m3; needs FP8 tensor cores and a bfloat16 model) (WAN_PRECISION; 'native');
        * `fp8_gemms`: which of the blocks' GEMMs 'fp8' runs in FP8: names of FP8_GEMMS, a
          comma-separated string of them, or 'all' (WAN_FP8_GEMMS; DEFAULT_FP8_GEMMS);
        * `fused_qkv`: self-attention's q, k and v in one GEMM (WAN_FUSED_QKV; on);
        * `residual_in_gemm`: the cross-attention's residual add inside its output GEMM, whose
          bias the LayerNorm kernel before adds to the residual stream ahead
          (WAN_RESIDUAL_IN_GEMM; on);
        * `first_call_warm_up`: with CUDA graphs, the first call of a stream in cache dicts this
          model has not warmed up (upstream's pipeline makes new ones for every video) runs
          `warm_up` over them first, so every graph the stream will replay is captured inside its
          first block, not one phase at a time in the middle of the stream
          (WAN_FIRST_CALL_WARM_UP; on);
        * `inject_sample_info`: a key of upstream's config.json that no constructor uses; accepted
          (and ignored) so that building from that file keeps every key.

        These options can sit in the model's config.json, which `from_config` (this library's or
        diffusers', upstream's parent) passes here as keywords. They are resolved once, here
        (`self.options`), and reported by `options_report()` and the start-up log line.
        """
        super().__init__(*args, **kwargs)
        given = dict(backend=backend, cuda_graphs=cuda_graphs, precision=precision,
                     fp8_gemms=fp8_gemms, fused_qkv=fused_qkv, residual_in_gemm=residual_in_gemm,
                     first_call_warm_up=first_call_warm_up)
        register = getattr(self, "register_to_config", None)
        if register is not None:  # diffusers' ConfigMixin (upstream's parent): keep them in .config
            register(**given, inject_sample_info=inject_sample_info)
        self.options = FastOptions.resolve(given)
        # the one hand-off (wan/runtime/options.py): upstream's scripts build the decoder with no
        # arguments, so a decoder given no options follows what this DiT's keywords (its
        # config.json) gave
        publish_model_options(cuda_graphs=cuda_graphs, backend=backend)
        # the call around the math (streaming/call.py): checks, caches, positions, plan, graphs
        self._runtime = StreamingForward(self)
        self._watch_weights()  # the plan and graphs are forgotten after .to() or a load

    # ------------------------------------------------------------------ options
    @property
    def backend(self) -> dict:
        return dict(self.options.backend)

    @property
    def cuda_graphs(self) -> Optional[bool]:
        return self.options.cuda_graphs

    @property
    def precision(self) -> str:
        return self.options.precision

    def options_report(self) -> dict:
        """The options this model runs with, and where each came from."""
        return self.options.report()

    def set_backend(self, backend=None):
        """Select backends again (same forms as the constructor's `backend`). Also reads the module
        tree again: call it after replacing a submodule."""
        self.options = self.options.with_option("backend", backend)
        self._runtime.forget_devices()
        self._forget_derived_state()
        self._runtime.graphs.clear()

    def set_precision(self, precision: Optional[str]):
        """Switch between 'native' and 'fp8' (None: WAN_PRECISION). The model's weights are never
        changed: FP8 copies are made from them at the next forward, and dropped on 'native'."""
        self.options = self.options.with_option("precision", precision)
        self._runtime.forget_devices()
        self._forget_derived_state()

    def enable_cuda_graphs(self, enabled: bool = True):
        """Turn the CUDA graphs on or off: a bool (or "true"/"false", 1/0, ... parsed as every
        switch is; anything else is an error, never truthiness: "false" is off)."""
        enabled = parse_switch(enabled, "enable_cuda_graphs(enabled)")
        self.options = self.options.with_option("cuda_graphs", enabled)
        if not enabled:
            self._runtime.graphs.clear()

    def precision_report(self) -> dict:
        """Which of the blocks' GEMMs run in FP8 and which in the model's dtype."""
        fp8 = sorted(self.options.fp8_gemms, key=FP8_GEMMS.index)
        return {"precision": self.precision, "fp8_gemms": fp8,
                "native_gemms": [g for g in FP8_GEMMS if g not in fp8]
                + ["patch_embedding", "time_embedding", "time_projection", "head",
                   "image context k/v", "action modules"]}

    @property
    def counters(self) -> dict:
        """What the streaming forward paid so far (as the decoder's `counters`): `captures` (CUDA
        graphs captured, cumulative: a serving loop should stop adding to it) and `graphs` (held
        now, over every stream)."""
        graphs = self._runtime.graphs
        return {"captures": graphs.captures, "graphs": len(graphs)}

    def backend_report(self, device=None, dtype=None) -> dict:
        """{op: backend name} that runs for the model's (or the given) device and dtype."""
        weight = self.patch_embedding.weight
        return dict(self._runtime.device_state(torch.device(device or weight.device),
                                               dtype or weight.dtype).backends)

    def _forget_derived_state(self):
        """The plan packed over the parameters' storage, and the graphs that read it, go (both
        are rebuilt at the next forward)."""
        runtime = getattr(self, "_runtime", None)
        if runtime is not None:
            runtime.forget_plan()

    # ------------------------------------------------------------------ owned streams
    def start_stream(self, batch: int = 1, latent_size=(44, 80), new: bool = False) -> StreamCache:
        """Start a stream in caches the model owns and make it the current one: calls without
        kv_cache arguments then go to it, `current_start` advancing one block at a time, as the
        pipeline does. Without `new` the current owned stream's caches are reused (rewound) when
        they fit, so one player restarting costs no allocation; `new=True` always allocates
        another stream (another player: ~1 GiB for the real model at 44 x 80) and keeps the
        others. Returns the stream, a handle for `use_stream`. The image context is projected
        at the stream's first call and kept for the stream (as upstream's crossattn_cache)."""
        return self._runtime.start_stream(batch, latent_size, new)

    def use_stream(self, stream: StreamCache):
        """Make one of the model's own streams (a `start_stream` result) the current one."""
        self._runtime.use_stream(stream)

    @property
    def streams(self) -> list:
        """The model's own streams, oldest first."""
        return list(self._runtime.owned)

    def reset_stream(self):
        """Rewind the current owned stream to frame 0 (new image context on the next call)."""
        if self._runtime.current is None:
            raise RuntimeError("no stream was started: call start_stream() first")
        self._runtime.current.reset()

    def end_stream(self, stream: Optional[StreamCache] = None):
        """Free an owned stream's caches (default: the current one; its graphs go with it). With no
        current stream left, forward without kv_cache is the cache-free forward again."""
        self._runtime.end_stream(stream)

    def release_caches(self):
        """Drop every reference the model holds to cache memory: the owned streams and the
        captured graphs (and their memory pool). Caller's dicts are never held by the model."""
        self._runtime.release()

    def warm_up(self, visual_context, cond_concat, mouse_cond=None, keyboard_cond=None,
                stream: Optional[StreamCache] = None, caches: Optional[dict] = None,
                t_dtype: torch.dtype = torch.float32, cache_update_only: bool = False) -> int:
        """Capture every CUDA graph a stream will replay before its first real call (as
        nano-vllm captures before serving), so that no real call pays a capture: the stream's
        blocks run once on zeros with the shapes of these inputs (`cond_concat` of one block;
        the conditions' widths only), then the stream is rewound. The stream: the caller's
        upstream-style cache dicts (`caches`, the four lists by their keyword names), else an
        owned one (`stream`, default the current one, which it then stays). `t_dtype`: the dtype
        of the real calls' `t` (float32, as upstream's pipeline passes it). `cache_update_only`:
        also capture the graphs of `forward(..., cache_update_only=True)` calls (the block
        runner's t=0 update). Returns the number of graphs captured (0 without graphs)."""
        return self._runtime.warm_up(visual_context, cond_concat, mouse_cond, keyboard_cond,
                                     stream, caches, t_dtype, cache_update_only)

    # ------------------------------------------------------------------ forward
    def forward(self, x, t, visual_context, cond_concat, mouse_cond=None, keyboard_cond=None,
                kv_cache=None, kv_cache_mouse=None, kv_cache_keyboard=None, crossattn_cache=None,
                current_start: int = 0, cache_start: int = 0, cache_update_only: bool = False):
        """Upstream's forward. `cache_update_only` (this library's; streaming calls only): the
        call is made for the cache writes alone, as the pipeline's t=0 update of a clean block
        is, and returns None: the last block stops after its cache writes and the head is
        skipped (the caches come out exactly as from the full call)."""
        if kv_cache is None and self._runtime.current is None:
            if cache_update_only:
                raise ValueError("cache_update_only=True needs a stream's caches (kv_cache "
                                 "dicts or a stream started with start_stream())")
            return super().forward(x, t, visual_context, cond_concat, mouse_cond=mouse_cond,
                                   keyboard_cond=keyboard_cond)
        with torch.no_grad():  # inference only: the Triton kernels have no backward
            return self._runtime(x, t, visual_context, cond_concat, mouse_cond=mouse_cond,
                                 keyboard_cond=keyboard_cond, kv_cache=kv_cache,
                                 kv_cache_mouse=kv_cache_mouse,
                                 kv_cache_keyboard=kv_cache_keyboard,
                                 crossattn_cache=crossattn_cache, current_start=current_start,
                                 cache_update_only=cache_update_only)


def _constructor_signature(parent_init, own_init) -> inspect.Signature:
    """The parent's named parameters followed by this class's own keyword options. Tools that read
    the constructor's signature to decide which config keys it takes (diffusers'
    ConfigMixin.from_config, this library's from_config) then see every keyword instead of
    *args/**kwargs, whichever CausalWanModel is the parent."""
    named = [p for p in inspect.signature(parent_init).parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    options = [p for p in inspect.signature(own_init).parameters.values()
               if p.kind == p.KEYWORD_ONLY]
    return inspect.Signature(named + options)


OptimizedCausalWanModel.__init__.__signature__ = _constructor_signature(
    CausalWanModel.__init__, OptimizedCausalWanModel.__init__)
