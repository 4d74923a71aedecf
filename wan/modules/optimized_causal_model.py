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
attributes, so this file plus wan/kernels/ also works over upstream Matrix-Game-2's CausalWanModel:
`python -m wan.integrate` installs them into a checkout. The cache-free (training) forward is the
parent's.
"""
import contextlib
import inspect
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from ..runtime.conditioning import frame_windows, sinusoidal_embedding_1d
from ..runtime.input_checks import parse_switch
from ..runtime.layer_plan import FP8_GEMMS, ActionPlan, BlockPlan
from ..runtime.options import FastOptions, publish_model_options
from ..runtime.rope_tables import angles, self_attention_angles
from ..runtime.stream_cache import StreamCache
from ..runtime.streaming import StreamingForward
from ..runtime.weight_watch import ForgetsDerivedStateOnNewWeights
from .causal_model import CausalWanModel


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
                 precision: Optional[str] = None, fp8_gemms=None, fused_qkv: Optional[bool] = None,
                 residual_in_gemm: Optional[bool] = None, inject_sample_info: bool = False,
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
        * `inject_sample_info`: a key of upstream's config.json that no constructor uses; accepted
          (and ignored) so that building from that file keeps every key.

        These options can sit in the model's config.json, which `from_config` (this library's or
        diffusers', upstream's parent) passes here as keywords. They are resolved once, here
        (`self.options`), and reported by `options_report()` and the start-up log line.
        """
        super().__init__(*args, **kwargs)
        given = dict(backend=backend, cuda_graphs=cuda_graphs, precision=precision,
                     fp8_gemms=fp8_gemms, fused_qkv=fused_qkv, residual_in_gemm=residual_in_gemm)
        register = getattr(self, "register_to_config", None)
        if register is not None:  # diffusers' ConfigMixin (upstream's parent): keep them in .config
            register(**given, inject_sample_info=inject_sample_info)
        self.options = FastOptions.resolve(given)
        # what a user gave the DiT (its config.json): the decoder built with no options follows
        publish_model_options(cuda_graphs=cuda_graphs, backend=backend)
        self._runtime = StreamingForward(self)  # the call around the math: caches, plan, graphs
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

    # the runtime's plan and graphs, as tests and tools look at them
    @property
    def _plan(self):
        return self._runtime.plan

    @property
    def _graphs(self):
        return self._runtime.graphs

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

    @property
    def _stream(self) -> Optional[StreamCache]:
        return self._runtime.current

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
            return self._runtime(self._compute, x, t, visual_context, cond_concat,
                                 mouse_cond=mouse_cond, keyboard_cond=keyboard_cond,
                                 kv_cache=kv_cache, kv_cache_mouse=kv_cache_mouse,
                                 kv_cache_keyboard=kv_cache_keyboard,
                                 crossattn_cache=crossattn_cache, current_start=current_start,
                                 cache_update_only=cache_update_only)

    # ------------------------------------------------------------------ the captured part
    def _compute(self, x, t, cond_concat, mouse_window=None, keyboard_window=None, *, cache,
                 phase, state, plan, cache_update_only: bool = False):
        """Device work only (no host sync, shapes fixed by the inputs and `phase`). With
        `cache_update_only` only the cache writes matter: the last block stops after its own and
        no output is made (returns None)."""
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
        last = plan.blocks[-1].index
        for layer in plan.blocks:
            if cache_update_only and layer.index == last:
                # nothing after the last block's cache writes is read by a later call
                self._block(layer, tokens, normed, modulations[layer.index], step, None,
                            cache_writes_only=True)
                return None
            tokens, normed = self._block(layer, tokens, normed, modulations[layer.index], step,
                                         opening_norms[layer.index + 1])
        out = self.head.head(normed)
        pt, ph, pw = self.patch_size
        out = out.view(b, frames, h, w, pt, ph, pw, self.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
            b, self.out_dim, frames * pt, h * ph, w * pw)

    @staticmethod
    def _block(layer: BlockPlan, tokens, hn, modulation, step, next_norm,
               cache_writes_only: bool = False):
        """tokens and hn (their opening LayerNorm + modulation) -> this block's output and the
        output normalised by `next_norm` (shift, scale, eps, quantize). With `cache_writes_only`
        the block stops once it has written its caches (its self-attention k/v, and its action
        module's keys when it has one) and returns None."""
        ops, cache, i = step.ops, step.cache, layer.index
        _, _, gate_msa, shift_ffn, scale_ffn, gate_ffn = modulation.chunk(6, dim=2)

        # self-attention over this block and the cached frames: q/k/v in one GEMM, then RMS norm +
        # RoPE of q and k and the writes of k and v into their cache slots in one op
        q = ops.qkv_norm_rope_store(
            *layer.project_qkv(hn, ops), layer.q_norm, layer.k_norm, layer.qk_eps, *step.rope,
            layer.heads, cache.self_k[i], cache.self_v[i], step.self_slots, step.rope_dtype)
        if cache_writes_only and layer.action is None:
            return None
        y = ops.self_attention(q, *cache.self_window(i, step.attended_self))
        update = layer.self_out(y.flatten(2), ops)
        # the gated residual (per frame), with the cross-attention's pre-norm in the same pass
        norm = layer.cross_norm
        in_gemm = layer.cross_residual_in_gemm
        if norm is not None:
            # with the cross residual in its GEMM, the stream gets that GEMM's bias here
            tokens, normed = ops.gated_residual_layer_norm(
                tokens, update, gate_msa, norm.weight, norm.bias, norm.eps,
                quantize=layer.cross_q.takes_fp8,
                sum_bias=layer.cross_out.bias if in_gemm else None)
        else:
            tokens = normed = ops.gated_residual(tokens, update, gate_msa)

        # cross-attention to the image context (keys/values projected once per stream)
        q = ops.norm_rope_store(layer.cross_q(normed, ops), *layer.cross_q_norm, cos=None,
                                sin=None, heads=layer.heads)
        y = ops.cross_attention(q, cache.cross[i]["k"], cache.cross[i]["v"])
        if in_gemm:  # tokens is the fresh sum from the kernel above: accumulated into in place
            tokens = layer.cross_out.accumulate_into(tokens, y.flatten(2))
        else:
            tokens = tokens + layer.cross_out(y.flatten(2), ops)

        if layer.action is not None:
            tokens = _action(layer.action, i, tokens, step)
            if cache_writes_only:  # its keys are in the action caches now; the FFN is not read
                return None

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
    # happen inside them (wan/kernels/registry.py)
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


def _frame_windows(action, steps):
    """[B, steps, C] -> [B, frames, window * C] per-frame windows (inside the graphs)."""
    return frame_windows(steps, action.vae_time_compression_ratio, action.windows_size)


def _add_projection(tokens, y, linear):
    """tokens + linear(y). A bias-free layer accumulates into `tokens` inside its GEMM (beta = 1),
    in place: callers pass a `tokens` that nothing else holds (each block's residual stream is a
    fresh tensor from the cross-attention's residual add, or from the gated residual kernel that
    its output GEMM then accumulated into)."""
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
