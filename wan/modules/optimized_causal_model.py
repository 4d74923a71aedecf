"""OptimizedCausalWanModel: the same model, a faster streaming forward.

`OptimizedCausalWanModel` takes the constructor, config, checkpoint and forward keywords of
`CausalWanModel` (plus `backend`, `cuda_graphs` and `precision`) and gives the same outputs. What
differs is the streaming path:

* every attention, norm and RoPE goes through the backend registry (wan/ops/registry.py);
* caches are ring buffers (wan/runtime/stream_cache.py): a frame's K/V is written once into a
  fixed slot, nothing shifts, and the stream position lives on the host, so the forward has no
  `.item()` and no host sync. Either the model owns them (`start_stream`) or the caller's
  upstream-style dicts serve as the storage (drop-in);
* on CUDA the whole streaming forward is replayed from a CUDA graph (the default; `cuda_graphs=False`,
  WAN_CUDA_GRAPHS=0 or `"cuda_graphs": false` in config.json turn it off);
* optionally the blocks' big GEMMs run in FP8 (`precision="fp8"`, opt-in: e4m3 weights with a scale
  per output channel, activations with a scale per token quantized by the norms that produce them;
  wan/ops/fp8.py). Its cost in accuracy on one's own weights: `python -m wan.compare`.

It relies on its parent only through the constructor, the module tree, parameter names and public
attributes, so this file plus wan/kernels/ also works over upstream Matrix-Game-2's CausalWanModel:
`python -m wan.integrate` installs them into a checkout. The cache-free (training) forward is the
parent's.
"""
import contextlib
import functools
import inspect
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from ..runtime.conditioning import (condition_steps, frame_tokens, frame_windows,
                                   sinusoidal_embedding_1d)
from ..runtime.cuda_graphs import GraphRunner, cuda_graphs_setting, describe_cuda_graphs
from ..runtime.weight_watch import ForgetsDerivedStateOnNewWeights
from ..runtime.log import info
from ..runtime.options import publish_model_options
from ..ops.fp8 import precision_setting
from ..runtime.input_checks import (check_forward_inputs, check_stream_position,
                                    check_stream_request, first_action_module,
                                    per_frame_timesteps)
from ..ops.registry import (FP8_OPS, BackendUnavailableError, describe_resolved,
                                load_selection, resolve, resolve_all)
from ..runtime.rope_tables import action_inverse_frequencies, angles, self_attention_angles
from ..runtime.layer_plan import FP8_GEMMS, ActionPlan, BlockPlan, ModelPlan, fp8_gemms_setting
from ..runtime.stream_cache import StreamCache, bind, bound_cache, dict_identity
from .causal_model import CausalWanModel


@dataclass
class _DeviceState:
    """What the streaming forward needs per (device, dtype), made once."""
    ops: SimpleNamespace        # op name -> the implementation chosen for it (wan/ops/registry)
    backends: dict              # op name -> the backend's name (the report)
    rope_dtype: torch.dtype     # float64 models rotate in float64 (as upstream), others in float32
    start_frame: torch.Tensor   # the call's first frame, on the device (a graph reads it by value)
    side_stream: Optional[torch.cuda.Stream]  # the action conditions' projections run beside
    action_inv_freq: Optional[torch.Tensor]   # the action RoPE's frequencies (None: no actions)


@dataclass
class _Step:
    """What every block of one streaming call shares (inside the captured part)."""
    ops: SimpleNamespace
    cache: StreamCache
    attended_self: int          # cache slots the self-attention reads (the phase)
    attended_action: int        # ... and the action modules
    self_slots: torch.Tensor    # this call's frames' slots in the self-attention ring
    action_slots: torch.Tensor
    rope: tuple                 # (cos, sin) per token, self-attention
    action_rope: Optional[tuple]  # (cos, sin) per frame, action modules
    rope_dtype: torch.dtype
    frames: int
    conditions: dict            # layer -> the action conditions' projections (+ ready event)


class OptimizedCausalWanModel(ForgetsDerivedStateOnNewWeights, CausalWanModel):

    def __init__(self, *args, backend=None, cuda_graphs: Optional[bool] = None,
                 precision: Optional[str] = None, inject_sample_info: bool = False, **kwargs):
        """Arguments of CausalWanModel, plus:

        * `backend`: a name, {op: name}, or a YAML path (configs/backends/); ops it leaves out
          follow WAN_BACKEND, then 'auto';
        * `cuda_graphs`: replay the streaming forward from CUDA graphs; None reads WAN_CUDA_GRAPHS
          (1/true/on or 0/false/off), default on wherever the model runs on CUDA (decided per
          forward, from the input's device: a model built on the CPU and moved is graphed);
        * `precision`: 'native' (every GEMM in the model's dtype) or 'fp8' (the blocks' big GEMMs
          in FP8 e4m3; needs FP8 tensor cores and a bfloat16 model); None reads WAN_PRECISION,
          default 'native';
        * `inject_sample_info`: a key of upstream's config.json that no constructor uses; accepted
          (and ignored) so that building from that file keeps every key.

        These options can sit in the model's config.json, which `from_config` (this library's or
        diffusers', upstream's parent) passes here; a value given there wins over the environment.
        """
        super().__init__(*args, **kwargs)
        register = getattr(self, "register_to_config", None)
        if register is not None:  # diffusers' ConfigMixin (upstream's parent): keep them in .config
            register(backend=backend, cuda_graphs=cuda_graphs, precision=precision,
                     inject_sample_info=inject_sample_info)
        self.backend = load_selection(backend)
        self._cuda_graphs_requested = cuda_graphs
        self.cuda_graphs = cuda_graphs_setting(cuda_graphs)  # True, False, None: on CUDA
        # what a user gave the DiT (its config.json): the decoder built with no options follows
        publish_model_options(cuda_graphs=cuda_graphs, backend=backend)
        self.precision = precision_setting(precision)
        self._stream: Optional[StreamCache] = None  # the current owned stream
        self._owned: list = []                      # every owned stream (start_stream)
        self._graphs = GraphRunner()                # graphs per cache storage, one shared pool
        self._plan: Optional[ModelPlan] = None  # built at the first streaming forward
        self._watch_weights()  # the plan and graphs are forgotten after .to() or a load
        self._per_device = {}      # (device, dtype) -> resolved ops and RoPE tables
        self._warned_no_graphs = False

    # ------------------------------------------------------------------ configuration
    def set_backend(self, backend=None):
        """Select backends again (same forms as the constructor's `backend`). Also reads the module
        tree again: call it after replacing a submodule."""
        self.backend = load_selection(backend)
        self._per_device.clear()
        self._forget_derived_state()
        self._drop_graphs()

    def set_precision(self, precision: Optional[str]):
        """Switch between 'native' and 'fp8' (None: WAN_PRECISION). The model's weights are never
        changed: FP8 copies are made from them at the next forward, and dropped on 'native'."""
        self.precision = precision_setting(precision)
        self._per_device.clear()
        self._forget_derived_state()

    def precision_report(self) -> dict:
        """Which of the blocks' GEMMs run in FP8 and which in the model's dtype."""
        fp8 = sorted(self._fp8_gemms(), key=FP8_GEMMS.index)
        return {"precision": self.precision, "fp8_gemms": fp8,
                "native_gemms": [g for g in FP8_GEMMS if g not in fp8]
                + ["patch_embedding", "time_embedding", "time_projection", "head",
                   "image context k/v", "action modules"]}

    def _fp8_gemms(self):
        return fp8_gemms_setting() if self.precision == "fp8" else frozenset()

    def _forget_derived_state(self):
        """The plan packed over the parameters' storage, and the graphs that read it, go (both
        are rebuilt at the next forward)."""
        if getattr(self, "_plan", None) is not None:
            self._plan = None
            self._drop_graphs()

    def enable_cuda_graphs(self, enabled: bool = True):
        self.cuda_graphs = self._cuda_graphs_requested = bool(enabled)
        if not enabled:
            self._drop_graphs()

    def backend_report(self, device=None, dtype=None) -> dict:
        """{op: backend name} that runs for the model's (or the given) device and dtype."""
        return dict(self._state(torch.device(device or self.patch_embedding.weight.device),
                                dtype or self.patch_embedding.weight.dtype).backends)

    # ------------------------------------------------------------------ owned streams
    def start_stream(self, batch: int = 1, latent_size=(44, 80), new: bool = False) -> StreamCache:
        """Start a stream in caches the model owns and make it the current one: calls without
        kv_cache arguments then go to it, `current_start` advancing one block at a time, as the
        pipeline does. Without `new` the current owned stream's caches are reused (rewound) when
        they fit, so one player restarting costs no allocation; `new=True` always allocates
        another stream (another player: ~1 GiB for the real model at 44 x 80) and keeps the
        others. Returns the stream, a handle for `use_stream`."""
        check_stream_request(batch, latent_size, self.patch_size)
        tokens = frame_tokens(latent_size[0], latent_size[1], self.patch_size)
        dtype, device = self.patch_embedding.weight.dtype, self.patch_embedding.weight.device
        s = self._stream
        if (new or s is None or s.self_k[0].shape[0] != batch or s.tokens_per_frame != tokens
                or s.self_k[0].dtype != dtype or s.self_k[0].device != device):
            if not new and s is not None:
                self._owned.remove(s)  # replaced: its graphs go with it
            s = StreamCache.allocate(self, batch, tokens)
            self._owned.append(s)
        s.reset()
        self._stream = s
        return s

    def use_stream(self, stream: StreamCache):
        """Make one of the model's own streams (a `start_stream` result) the current one."""
        if not any(stream is s for s in self._owned):
            raise ValueError("not a stream of this model (start it with start_stream(new=True)) "
                             "or it was ended")
        self._stream = stream

    @property
    def streams(self) -> list:
        """The model's own streams, oldest first."""
        return list(self._owned)

    def reset_stream(self):
        """Rewind the current owned stream to frame 0 (new image context on the next call)."""
        if self._stream is None:
            raise RuntimeError("no stream was started: call start_stream() first")
        self._stream.reset()

    def end_stream(self, stream: Optional[StreamCache] = None):
        """Free an owned stream's caches (default: the current one; its graphs go with it). With no
        current stream left, forward without kv_cache is the cache-free forward again."""
        stream = stream or self._stream
        self._owned = [s for s in self._owned if s is not stream]
        if stream is self._stream:
            self._stream = None

    def release_caches(self):
        """Drop every reference the model holds to cache memory: the owned streams and the
        captured graphs (and their memory pool). Caller's dicts are never held by the model."""
        self._owned, self._stream = [], None
        self._drop_graphs()

    def _drop_graphs(self):
        self._graphs.clear()

    # ------------------------------------------------------------------ forward
    def forward(self, x, t, visual_context, cond_concat, mouse_cond=None, keyboard_cond=None,
                kv_cache=None, kv_cache_mouse=None, kv_cache_keyboard=None, crossattn_cache=None,
                current_start: int = 0, cache_start: int = 0):
        if kv_cache is None and self._stream is None:
            return super().forward(x, t, visual_context, cond_concat, mouse_cond=mouse_cond,
                                   keyboard_cond=keyboard_cond)
        return self._forward_inference(x, t, visual_context, cond_concat, mouse_cond,
                                       keyboard_cond, kv_cache, kv_cache_mouse, kv_cache_keyboard,
                                       crossattn_cache, current_start, cache_start)

    @torch.no_grad()  # inference only: the Triton kernels have no backward (training: the parent)
    def _forward_inference(self, x, t, visual_context, cond_concat, mouse_cond=None,
                           keyboard_cond=None, kv_cache=None, kv_cache_mouse=None,
                           kv_cache_keyboard=None, crossattn_cache=None, current_start: int = 0,
                           cache_start: int = 0):
        # 1. inputs, checked (the caller's dicts only when they were not checked already)
        dicts = (kv_cache, kv_cache_mouse, kv_cache_keyboard, crossattn_cache)
        identity = dict_identity(dicts) if kv_cache is not None else None
        bound = bound_cache(dicts, identity) if kv_cache is not None else None
        dicts_checked = bound is not None and bound.checked_shape == x.shape
        check_forward_inputs(self, x, t, visual_context, cond_concat, mouse_cond, keyboard_cond,
                             *dicts, current_start, read_cache_position=False, streaming=True,
                             check_caches=not dicts_checked)
        t = per_frame_timesteps(self, x, t)
        tokens_per_frame = frame_tokens(x.shape[3], x.shape[4], self.patch_size)
        frames = x.shape[2] // self.patch_size[0]
        start = current_start // tokens_per_frame

        # 2. the cache (a ring over the caller's dicts, or the owned stream) and the position
        if kv_cache is not None:  # the dicts' ring cache carries their stream's position
            cache = bound
            if cache is None or cache.tokens_per_frame != tokens_per_frame:
                cache = StreamCache.from_upstream_dicts(self, *dicts, tokens_per_frame)
            if start == 0:  # upstream pipelines start a new stream at frame 0 in reset dicts
                cache.end_frame = 0
        else:
            cache = self._owned_stream(x.shape[0], tokens_per_frame)
        check_stream_position("stream", cache.end_frame, start, frames, "frames")
        state = self._state(x.device, x.dtype)  # an unrunnable backend fails here, before writes
        plan = self._layer_plan()
        graphs = self._graphs_usable(x)

        # 3. a new stream: the image context's keys/values, projected once into fixed storage
        new_stream = not cache.cross_ready
        if new_stream:
            self._cross_storage(cache, visual_context)
        if graphs:
            self._graphs.use_storage(cache, cache.buffers, changed=new_stream)
        if new_stream:
            project = functools.partial(self._project_image_context, cache=cache, ops=state.ops,
                                        plan=plan)
            if graphs:  # a new stream every call (the seed protocol) costs one replay, not ~150
                self._graphs.run(("image_context", visual_context.shape, x.dtype), project,
                                 {"visual_context": visual_context})
            else:
                project(visual_context)
            for slot in cache.cross:
                slot["is_init"] = True
        if kv_cache is not None and (new_stream or not dicts_checked or cache is not bound):
            bind(dicts, cache, x.shape)

        # 4. the blocks, replayed from the graph of this phase or run eagerly
        inputs = {"x": x, "t": t, "cond_concat": cond_concat}
        action = first_action_module(self)
        if action is not None and action.enable_mouse:
            inputs["mouse_window"] = _condition_steps(action, mouse_cond, start, frames)
        if action is not None and action.enable_keyboard:
            inputs["keyboard_window"] = _condition_steps(action, keyboard_cond, start, frames)
        state.start_frame.fill_(start)
        end = start + frames
        phase = (cache.self_layout.attended(end), cache.action_layout.attended(end))
        compute = functools.partial(self._compute, cache=cache, phase=phase, state=state,
                                    plan=plan)
        if graphs:
            key = (phase, x.dtype, tuple((name, value.shape) for name, value in inputs.items()))
            out = self._graphs.run(key, compute, inputs)
        else:
            out = compute(**inputs)
        cache.end_frame = max(cache.end_frame, end)
        return out

    def _owned_stream(self, batch: int, tokens_per_frame: int) -> StreamCache:
        cache = self._stream
        if cache.self_k[0].shape[0] != batch or cache.tokens_per_frame != tokens_per_frame:
            raise ValueError(
                f"the stream was started for batch {cache.self_k[0].shape[0]} and "
                f"{cache.tokens_per_frame} tokens per frame; got batch {batch} and "
                f"{tokens_per_frame}: call start_stream(batch=..., latent_size=...)")
        return cache

    def _layer_plan(self) -> ModelPlan:
        """The per-layer plan (wan/runtime/layer_plan.py), built again when parameters got new
        storage; graphs captured over the old storage are dropped with it."""
        if self._plan is None or not self._plan.is_current():
            self._forget_derived_state()
            self._plan = ModelPlan(self, fp8=self._fp8_gemms())
        return self._plan

    # ------------------------------------------------------------------ pieces run outside graphs
    def _graphs_usable(self, x) -> bool:
        """Graphs replay on CUDA unless turned off (default: on); asked for on a CPU: a warning."""
        if self.cuda_graphs is False:
            return False
        if x.is_cuda:
            return True
        if self.cuda_graphs and not self._warned_no_graphs:
            warnings.warn("cuda_graphs=True needs a CUDA device; running the forward eagerly")
            self._warned_no_graphs = True
        return False

    def _state(self, device, dtype) -> _DeviceState:
        """Resolved ops, RoPE settings and the device-side start frame for (device, dtype)."""
        key = (device, dtype)
        if key not in self._per_device:
            action = first_action_module(self)
            head_dims = {op: self.dim // self.num_heads
                         for op in ("self_attention", "cross_attention", "norm_rope_store",
                                    "qkv_norm_rope_store")}
            if action is not None:
                head_dims["mouse_attention"] = head_dims["keyboard_attention"] = \
                    sum(action.mouse_qk_dim_list)
            # float64 models keep float64 RoPE (as upstream); others rotate in float32
            rope_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            resolved = resolve_all(self.backend, device, dtype, head_dims)
            fp8 = self.precision == "fp8"
            if fp8:
                try:
                    resolved.update({op: resolve(op, self.backend[op], device, dtype, 0)
                                     for op in FP8_OPS})
                except BackendUnavailableError as err:
                    raise BackendUnavailableError(
                        f"precision='fp8' cannot run here: {err}") from None
            state = _DeviceState(
                ops=SimpleNamespace(**{op: fn for op, (_, fn) in resolved.items()}),
                backends={op: name for op, (name, _) in resolved.items()},
                rope_dtype=rope_dtype,
                start_frame=torch.zeros((), dtype=torch.long, device=device),
                side_stream=torch.cuda.Stream(device) if device.type == "cuda" else None,
                action_inv_freq=None if action is None else action_inverse_frequencies(
                    action.mouse_qk_dim_list, action.rope_theta, device))
            self._per_device[key] = state
            # once per device and dtype: which implementation runs each op
            precision = ""
            if fp8:
                precision = f", FP8 GEMMs: {', '.join(self.precision_report()['fp8_gemms'])}"
            graphs = describe_cuda_graphs(self.cuda_graphs, device, self._cuda_graphs_requested,
                                          f"cuda_graphs={self.cuda_graphs}: keyword or config.json")
            info("%s on %s in %s, %s%s: %s", type(self).__name__, device, dtype, graphs, precision,
                 describe_resolved(resolved))
        return self._per_device[key]

    def _cross_storage(self, cache: StreamCache, visual_context):
        """Give every layer's cross-attention k/v a tensor of the right shape to be written in
        place (the pipeline's preallocated dicts already have them; a dict holding None or another
        shape gets a new one, as upstream would replace it)."""
        b, tokens = visual_context.shape[:2]
        for block, slot in zip(self.blocks, cache.cross):
            attn = block.cross_attn
            shape = (b, tokens, attn.num_heads, attn.head_dim)
            for name in ("k", "v"):
                held = slot[name]
                if not (isinstance(held, torch.Tensor) and held.shape == shape
                        and held.dtype == visual_context.dtype
                        and held.device == visual_context.device):
                    slot[name] = visual_context.new_empty(shape)

    def _project_image_context(self, visual_context, *, cache: StreamCache, ops, plan):
        """Cross-attention keys/values of the image context, once per stream, written into the
        storage `_cross_storage` prepared."""
        context = self.img_emb(visual_context)
        b = context.shape[0]
        for layer, slot in zip(plan.blocks, cache.cross):
            ops.norm_rope_store(layer.cross_k(context), *layer.cross_k_norm, cos=None, sin=None,
                                heads=layer.heads, dest=slot["k"])
            slot["v"].copy_(layer.cross_v(context).view(b, -1, layer.heads, slot["v"].shape[-1]))

    # ------------------------------------------------------------------ the captured part
    def _compute(self, x, t, cond_concat, mouse_window=None, keyboard_window=None, *, cache,
                 phase, state, plan):
        """Device work only (no host sync, shapes fixed by the inputs and `phase`)."""
        ops = state.ops
        b = x.shape[0]
        tokens = self.patch_embedding(torch.cat([x, cond_concat], dim=1))
        _, c, frames, h, w = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2).contiguous()  # channels-last from here on
        e = self.time_embedding(
            sinusoidal_embedding_1d(self.freq_dim, t.flatten()).to(tokens.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, c)).unflatten(0, (b, frames))

        frame_ids = state.start_frame + torch.arange(frames, device=x.device)
        # RoPE angles of the absolute positions, computed on the device (no table: any frame)
        rope = _cos_sin(self_attention_angles(frame_ids, h, w, self.dim // self.num_heads),
                        state.rope_dtype)
        action_rope = None
        if state.action_inv_freq is not None:  # float32 whatever the model's dtype, as upstream
            action_rope = _cos_sin(angles(frame_ids, state.action_inv_freq), torch.float32)
        step = _Step(ops=ops, cache=cache, attended_self=phase[0], attended_action=phase[1],
                     self_slots=cache.self_layout.slot_of(frame_ids),
                     action_slots=cache.action_layout.slot_of(frame_ids), rope=rope,
                     action_rope=action_rope, rope_dtype=state.rope_dtype, frames=frames,
                     conditions=self._condition_projections(plan, mouse_window, keyboard_window,
                                                            frames, state.side_stream))
        # every block's adaLN factors in one add (the modulations are packed): [L, B, F, 6, C]
        modulations = plan.modulations.tensor[:, None] + e0
        head_shift, head_scale = (self.head.modulation.unsqueeze(1)
                                  + e.unflatten(0, (b, frames)).unsqueeze(2)).chunk(2, dim=2)
        # (shift, scale, eps, quantize) of the LayerNorm + modulation that opens each block (its
        # output quantized when the q/k/v GEMM runs in FP8), then the head's
        opening_norms = [(m[:, :, 0:1], m[:, :, 1:2], block.norm1.eps, layer.qkv[0].takes_fp8)
                         for m, block, layer in zip(modulations, self.blocks, plan.blocks)]
        opening_norms.append((head_shift, head_scale, self.head.norm.eps, False))
        # each block ends with its FFN's gated residual fused with the next opening norm, so a block
        # gets its input normalised already
        shift, scale, eps, quantize = opening_norms[0]
        normed = ops.layer_norm_modulate(tokens, shift, scale, eps, quantize=quantize)
        for layer in plan.blocks:
            tokens, normed = self._block(layer, tokens, normed, modulations[layer.index], step,
                                         opening_norms[layer.index + 1])
        out = self.head.head(normed)
        pt, ph, pw = self.patch_size
        out = out.view(b, frames, h, w, pt, ph, pw, self.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
            b, self.out_dim, frames * pt, h * ph, w * pw)

    @staticmethod
    def _block(layer: BlockPlan, tokens, hn, modulation, step, next_norm):
        """tokens and hn (their opening LayerNorm + modulation) -> this block's output and the
        output normalised by `next_norm` (shift, scale, eps, quantize)."""
        ops, cache, i = step.ops, step.cache, layer.index
        _, _, gate_msa, shift_ffn, scale_ffn, gate_ffn = modulation.chunk(6, dim=2)

        # self-attention over this block and the cached frames: q/k/v in one GEMM, then RMS norm +
        # RoPE of q and k and the writes of k and v into their cache slots in one op
        q = ops.qkv_norm_rope_store(
            *layer.project_qkv(hn, ops), layer.q_norm, layer.k_norm, layer.qk_eps, *step.rope,
            layer.heads, cache.self_k[i], cache.self_v[i], step.self_slots, step.rope_dtype)
        y = ops.self_attention(q, *cache.self_window(i, step.attended_self))
        update = layer.self_out(y.flatten(2), ops)
        # the gated residual (per frame), with the cross-attention's pre-norm in the same pass
        norm = layer.cross_norm
        if norm is not None:
            tokens, normed = ops.gated_residual_layer_norm(tokens, update, gate_msa, norm.weight,
                                                           norm.bias, norm.eps,
                                                           quantize=layer.cross_q.takes_fp8)
        else:
            tokens = normed = ops.gated_residual(tokens, update, gate_msa)

        # cross-attention to the image context (keys/values projected once per stream)
        q = ops.norm_rope_store(layer.cross_q(normed, ops), *layer.cross_q_norm, cos=None,
                                sin=None, heads=layer.heads)
        y = ops.cross_attention(q, cache.cross[i]["k"], cache.cross[i]["v"])
        tokens = tokens + layer.cross_out(y.flatten(2), ops)

        if layer.action is not None:
            tokens = _action(layer.action, i, tokens, step)

        hn = ops.layer_norm_modulate(tokens, shift_ffn, scale_ffn, layer.ffn_norm_eps,
                                     quantize=layer.ffn_in.takes_fp8)
        hidden = layer.ffn_hidden(hn, ops)
        shift, scale, eps, quantize = next_norm
        return ops.gated_residual_layer_norm_modulate(tokens, layer.ffn_out(hidden, ops), gate_ffn,
                                                      shift, scale, eps, quantize=quantize)

    def _condition_projections(self, plan, mouse_window, keyboard_window, frames, side_stream):
        """{layer: (mouse window's share of the mouse MLP's first layer [B, F, 1, C], keyboard
        keys, keyboard values, ready event)}: what the action modules compute from the conditions
        alone. ~7 tiny launches per action layer; on CUDA they run on a side stream beside the
        backbone, layer by layer, and each action module waits only for its own layer's event.
        (The side stream first waits for the main one, so its memory, freed to its own pool, is
        never reused while the main stream still reads it.)"""
        if side_stream is not None:
            side_stream.wait_stream(torch.cuda.current_stream())
        projections = {}
        on_side = (torch.cuda.stream(side_stream) if side_stream is not None
                   else contextlib.nullcontext())
        with on_side:
            for layer in plan.blocks:
                action = layer.action
                if action is None:
                    continue
                mouse = keyboard_k = keyboard_v = None
                if action.mouse:  # the first layer's input is [tokens, mouse window]
                    first = action.mouse_first
                    mouse = F.linear(_frame_windows(action.module, mouse_window),
                                     first.weight[:, self.dim:], first.bias)[:, :, None]
                if action.keyboard:
                    module = action.module
                    embedded = module.keyboard_embed(keyboard_window)
                    keyboard_k, keyboard_v = module.keyboard_attn_kv(
                        _frame_windows(module, embedded)).view(
                            embedded.shape[0], frames, 2, action.heads, -1).unbind(2)
                ready = None
                if side_stream is not None:
                    ready = torch.cuda.Event()
                    ready.record(side_stream)
                projections[layer.index] = (mouse, keyboard_k, keyboard_v, ready)
        return projections


def _action(action: ActionPlan, i: int, tokens, step):
    """The action module of layer i: mouse and keyboard attention added to the tokens."""
    ops, cache = step.ops, step.cache
    n_action, slots = step.attended_action, step.action_slots
    cos, sin = step.action_rope
    frames = step.frames
    b, length, c = tokens.shape
    spatial = length // frames
    heads, module = action.heads, action.module
    mouse_bias, keyboard_k, keyboard_v, ready = step.conditions[i]
    if ready is not None:
        torch.cuda.current_stream().wait_event(ready)

    # the attention ops take the raw projections: q/k norm, RoPE and the cache writes of k/v
    # happen inside them (wan/ops/registry.py)
    if action.mouse:
        # attention per spatial token over frames. The MLP runs in the tokens' own frame-major
        # layout, and its first layer is split: the mouse window is shared by all tokens of a
        # frame, so it is projected once per frame instead of concatenated to 880 tokens
        h = ops.frame_bias_gelu(F.linear(tokens, action.mouse_first.weight[:, :c]), mouse_bias)
        norm = action.mouse_norm
        h = ops.layer_norm(action.mouse_second(h), norm.weight, norm.bias, norm.eps)
        qkv = module.t_qkv(h).view(b, frames, spatial, 3, heads, -1)
        # [B*S, F, H, D] sequence views of the projection (a copy only when B > 1)
        q, k, v = qkv.transpose(1, 2).reshape(b * spatial, frames, 3, heads, -1).unbind(2)
        y = ops.mouse_attention(q, k, v, cache.mouse_k[i], cache.mouse_v[i], slots, n_action, cos,
                                sin, action.mouse_eps)
        y = y.reshape(b, spatial, frames, -1).transpose(1, 2).reshape(b, length, -1)
        tokens = _add_projection(tokens, y, module.proj_mouse)

    if action.keyboard:
        # every token attends to the few key frames directly: the keys are never repeated
        q = module.mouse_attn_q(tokens).view(b, length, heads, -1)
        y = ops.keyboard_attention(q, keyboard_k, keyboard_v, cache.keyboard_k[i],
                                   cache.keyboard_v[i], slots, n_action, cos, sin,
                                   action.keyboard_eps)
        tokens = _add_projection(tokens, y.flatten(2), module.proj_keyboard)
    return tokens


def _condition_steps(action, cond, start_frame: int, frames: int):
    """The action steps this call's frames read (host-side slicing, outside the graphs)."""
    return condition_steps(cond, start_frame, frames, action.vae_time_compression_ratio,
                           action.windows_size)


def _frame_windows(action, steps):
    """[B, steps, C] -> [B, frames, window * C] per-frame windows (inside the graphs)."""
    return frame_windows(steps, action.vae_time_compression_ratio, action.windows_size)


def _add_projection(tokens, y, linear):
    """tokens + linear(y). A bias-free layer accumulates into `tokens` inside its GEMM (beta = 1),
    in place: callers pass a `tokens` that nothing else holds (each block's residual stream is a
    fresh tensor from the cross-attention's add)."""
    if linear.bias is not None:
        return tokens + linear(y)
    return tokens.view(-1, tokens.shape[-1]).addmm_(y.reshape(-1, y.shape[-1]),
                                                    linear.weight.t()).view(tokens.shape)


def _cos_sin(angle, dtype):
    return angle.cos().to(dtype), angle.sin().to(dtype)


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
