"""OptimizedCausalWanModel: the same model, a faster streaming forward.

`OptimizedCausalWanModel` takes the constructor, config, checkpoint and forward keywords of
`CausalWanModel` (plus `backend` and `cuda_graphs`) and gives the same outputs. What differs is
the streaming path:

* every attention, norm and RoPE goes through the backend registry (wan/kernels/registry.py);
* caches are ring buffers (wan/kernels/stream_cache.py): a frame's K/V is written once into a
  fixed slot, nothing shifts, and the stream position lives on the host, so the forward has no
  `.item()` and no host sync. Either the model owns them (`start_stream`) or the caller's
  upstream-style dicts serve as the storage (drop-in);
* optionally the whole streaming forward is replayed from a CUDA graph (`cuda_graphs=True`).

It relies on its parent only through the constructor, the module tree, parameter names and public
attributes, so this file plus wan/kernels/ also works over upstream Matrix-Game-2's CausalWanModel:
`python -m wan.integrate` installs them into a checkout. The cache-free (training) forward is the
parent's.
"""
import contextlib
import functools
import inspect
import sys
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.conditioning import condition_steps, frame_windows, sinusoidal_embedding_1d
from ..kernels.cuda_graphs import GraphRunner, cuda_graphs_setting
from ..kernels.input_checks import (check_forward_inputs, check_stream_position,
                                   first_action_module, per_frame_timesteps)
from ..kernels.registry import describe_resolved, load_selection, resolve_all
from ..kernels.rope_tables import action_inverse_frequencies, angles, self_attention_angles
from ..kernels.stream_cache import StreamCache
from .causal_model import CausalWanModel


class _CallerStorage(NamedTuple):
    """The caller's cache dicts of the last call, as the model remembers them."""
    ids: tuple                  # id() of every tensor under "k"/"v", in a fixed order
    tensors: list               # those tensors (held: their ids stay unique)
    cache: StreamCache          # the ring view built over them
    checked_shape: torch.Size   # the input shape they were checked against


@dataclass
class _DeviceState:
    """What the streaming forward needs per (device, dtype), made once."""
    ops: SimpleNamespace        # op name -> the implementation chosen for it (wan/kernels/registry)
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


class OptimizedCausalWanModel(CausalWanModel):

    def __init__(self, *args, backend=None, cuda_graphs: Optional[bool] = None,
                 inject_sample_info: bool = False, **kwargs):
        """Arguments of CausalWanModel, plus:

        * `backend`: a name, {op: name}, or a YAML path (configs/backends/); ops it leaves out
          follow WAN_BACKEND, then 'auto';
        * `cuda_graphs`: replay the streaming forward from CUDA graphs; None reads WAN_CUDA_GRAPHS
          (1/true/on or 0/false/off), default off;
        * `inject_sample_info`: a key of upstream's config.json that no constructor uses; accepted
          (and ignored) so that building from that file keeps every key.

        Both options can sit in the model's config.json, which `from_config` (this library's or
        diffusers', upstream's parent) passes here; a value given there wins over the environment.
        """
        super().__init__(*args, **kwargs)
        register = getattr(self, "register_to_config", None)
        if register is not None:  # diffusers' ConfigMixin (upstream's parent): keep them in .config
            register(backend=backend, cuda_graphs=cuda_graphs,
                     inject_sample_info=inject_sample_info)
        self.backend = load_selection(backend)
        self.cuda_graphs = cuda_graphs_setting(cuda_graphs)
        self._stream: Optional[StreamCache] = None
        self._graphs = GraphRunner()
        self._graph_storage = None  # (identity, tensors) of the storage the graphs write to
        # the caller's cache dicts of the last call (a _CallerStorage). Holding the tensors keeps
        # every id unique, so equal ids mean the very same tensors; it also keeps them alive until
        # a call brings other dicts or release_caches() is called.
        self._caller: Optional[_CallerStorage] = None
        self._per_device = {}      # (device, dtype) -> resolved ops and RoPE tables
        self._warned_no_graphs = False

    # ------------------------------------------------------------------ configuration
    def set_backend(self, backend=None):
        """Select backends again (same forms as the constructor's `backend`)."""
        self.backend = load_selection(backend)
        self._per_device.clear()
        self._drop_graphs()

    def enable_cuda_graphs(self, enabled: bool = True):
        self.cuda_graphs = enabled
        if not enabled:
            self._drop_graphs()

    def backend_report(self, device=None, dtype=None) -> dict:
        """{op: backend name} that runs for the model's (or the given) device and dtype."""
        return dict(self._state(torch.device(device or self.patch_embedding.weight.device),
                                dtype or self.patch_embedding.weight.dtype).backends)

    # ------------------------------------------------------------------ owned stream
    def start_stream(self, batch: int = 1, latent_size=(44, 80)):
        """Start a stream in caches the model owns (allocated once per batch/latent/dtype/device
        and reused). Then call forward without kv_cache arguments, `current_start` advancing one
        block at a time, as the pipeline does."""
        _, ph, pw = self.patch_size
        tokens = (latent_size[0] // ph) * (latent_size[1] // pw)
        dtype, device = self.patch_embedding.weight.dtype, self.patch_embedding.weight.device
        s = self._stream
        if (s is None or s.self_k[0].shape[0] != batch or s.tokens_per_frame != tokens
                or s.self_k[0].dtype != dtype or s.self_k[0].device != device):
            self._drop_graphs()  # captured for the previous buffers
            self._stream = StreamCache.allocate(self, batch, tokens)
        self._stream.reset()
        return self._stream

    def reset_stream(self):
        """Rewind the owned stream to frame 0 (new image context on the next call)."""
        if self._stream is None:
            raise RuntimeError("no stream was started: call start_stream() first")
        self._stream.reset()

    def end_stream(self):
        """Free the owned caches; forward without kv_cache is the cache-free forward again."""
        self._stream = None
        self._drop_graphs()

    def release_caches(self):
        """Drop every reference the model holds to cache memory: the owned stream, the caller's
        dicts of the last call and the captured graphs (and their memory pool)."""
        self.end_stream()
        self._caller = None

    def _drop_graphs(self):
        self._graphs.clear()
        self._graph_storage = None

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
        caller = self._caller_storage(kv_cache, kv_cache_mouse, kv_cache_keyboard, crossattn_cache)
        known = caller is not None and self._caller is not None and caller[0] == self._caller.ids
        check_forward_inputs(self, x, t, visual_context, cond_concat, mouse_cond, keyboard_cond,
                             kv_cache, kv_cache_mouse, kv_cache_keyboard, crossattn_cache,
                             current_start, read_cache_position=False, streaming=True,
                             check_caches=not (known and self._caller.checked_shape == x.shape))
        t = per_frame_timesteps(self, x, t)
        pt, ph, pw = self.patch_size
        tokens_per_frame = (x.shape[3] // ph) * (x.shape[4] // pw)
        frames = x.shape[2] // pt
        start = current_start // tokens_per_frame
        if kv_cache is not None:
            if known and self._caller.cache.tokens_per_frame == tokens_per_frame:
                cache = self._caller.cache
            else:
                cache = StreamCache.from_upstream_dicts(self, kv_cache, kv_cache_mouse,
                                                        kv_cache_keyboard, crossattn_cache,
                                                        tokens_per_frame)
            if start == 0:  # upstream pipelines start a new stream at frame 0 in reset dicts
                cache.end_frame = 0
        else:
            cache = self._stream
            if cache.self_k[0].shape[0] != x.shape[0] or cache.tokens_per_frame != tokens_per_frame:
                raise ValueError(
                    f"the stream was started for batch {cache.self_k[0].shape[0]} and "
                    f"{cache.tokens_per_frame} tokens per frame; got batch {x.shape[0]} and "
                    f"{tokens_per_frame}: call start_stream(batch=..., latent_size=...)")
        check_stream_position("stream", cache.end_frame, start, frames, "frames")
        state = self._state(x.device, x.dtype)  # an unrunnable backend fails here, before writes

        if not cache.cross_ready:  # new stream: the image context's k/v get (fixed) storage
            self._cross_storage(cache, visual_context)
            if caller is not None:  # that storage may be new tensors in the caller's dicts
                caller = self._caller_storage(kv_cache, kv_cache_mouse, kv_cache_keyboard,
                                              crossattn_cache)
        # (identity, what keeps it unique): the caller's tensors, or the owned stream (its graphs
        # are dropped whenever it is reallocated)
        storage = caller if caller is not None else (("owned", id(cache)), cache)
        graphs = self._graphs_usable(x)
        if graphs and (self._graph_storage is None or storage[0] != self._graph_storage[0]):
            # a graph is tied to the buffers it captured; upstream's pipeline allocates new
            # dicts for every video, so keep only the current storage's graphs (and pool)
            self._drop_graphs()
            self._graph_storage = storage

        if not cache.cross_ready:
            project = functools.partial(self._project_image_context, cache=cache, ops=state.ops)
            if graphs:  # a new stream every call (the seed protocol) costs one replay, not ~150
                self._graphs.run(("image_context", visual_context.shape, x.dtype), project,
                                 {"visual_context": visual_context})
            else:
                project(visual_context)
            for slot in cache.cross:
                slot["is_init"] = True
        inputs = {"x": x, "t": t, "cond_concat": cond_concat}
        action = first_action_module(self)
        if action is not None and action.enable_mouse:
            inputs["mouse_window"] = _condition_steps(action, mouse_cond, start, frames)
        if action is not None and action.enable_keyboard:
            inputs["keyboard_window"] = _condition_steps(action, keyboard_cond, start, frames)
        state.start_frame.fill_(start)
        end = start + frames
        phase = (cache.self_layout.attended(end), cache.action_layout.attended(end))
        compute = functools.partial(self._compute, cache=cache, phase=phase, state=state)
        if graphs:
            key = (phase, x.dtype, tuple((name, value.shape) for name, value in inputs.items()))
            out = self._graphs.run(key, compute, inputs)
        else:
            out = compute(**inputs)
        cache.end_frame = max(cache.end_frame, end)
        if caller is not None:  # only the latest caller storage is remembered
            self._caller = _CallerStorage(*caller, cache, x.shape)
        return out

    @staticmethod
    def _caller_storage(kv_cache, kv_cache_mouse, kv_cache_keyboard, crossattn_cache):
        """(ids, tensors) of everything under "k"/"v" in the caller's cache dicts, None without
        dicts or when they are malformed (the input checks then say what is wrong)."""
        if kv_cache is None:
            return None
        try:
            tensors = [cache[key] for caches in (kv_cache, kv_cache_mouse, kv_cache_keyboard,
                                                 crossattn_cache) if caches is not None
                       for cache in caches for key in ("k", "v")]
        except (KeyError, TypeError, IndexError):
            return None
        return tuple(map(id, tensors)), tensors

    # ------------------------------------------------------------------ pieces run outside graphs
    def _graphs_usable(self, x) -> bool:
        if not self.cuda_graphs:
            return False
        if x.is_cuda:
            return True
        if not self._warned_no_graphs:
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
            print(f"{type(self).__name__} on {device} in {dtype}, CUDA graphs "
                  f"{'on' if self.cuda_graphs else 'off'}: {describe_resolved(resolved)}",
                  file=sys.stderr, flush=True)
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

    def _project_image_context(self, visual_context, *, cache: StreamCache, ops):
        """Cross-attention keys/values of the image context, once per stream, written into the
        storage `_cross_storage` prepared."""
        context = self.img_emb(visual_context)
        b = context.shape[0]
        for block, slot in zip(self.blocks, cache.cross):
            attn = block.cross_attn
            ops.norm_rope_store(attn.k(context), *_norm_args(attn.norm_k), None, None,
                                attn.num_heads, slot["k"])
            slot["v"].copy_(attn.v(context).view(b, -1, attn.num_heads, attn.head_dim))

    # ------------------------------------------------------------------ the captured part
    def _compute(self, x, t, cond_concat, mouse_window=None, keyboard_window=None, *, cache,
                 phase, state):
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
                     conditions=self._condition_projections(mouse_window, keyboard_window, frames,
                                                            state.side_stream))
        # every block's adaLN factors in two launches instead of one add per block: [L, B, F, 6, C]
        modulations = torch.stack([block.modulation for block in self.blocks])[:, None] + e0
        head_shift, head_scale = (self.head.modulation.unsqueeze(1)
                                  + e.unflatten(0, (b, frames)).unsqueeze(2)).chunk(2, dim=2)
        # (shift, scale, eps) of the LayerNorm + modulation that opens each block, then the head's
        opening_norms = [(m[:, :, 0:1], m[:, :, 1:2], block.norm1.eps)
                         for m, block in zip(modulations, self.blocks)]
        opening_norms.append((head_shift, head_scale, self.head.norm.eps))
        # each block ends with its FFN's gated residual fused with the next opening norm, so a block
        # gets its input normalised already
        normed = ops.layer_norm_modulate(tokens, *opening_norms[0])
        for i, block in enumerate(self.blocks):
            tokens, normed = self._block(i, block, tokens, normed, modulations[i], step,
                                         opening_norms[i + 1])
        out = self.head.head(normed)
        pt, ph, pw = self.patch_size
        out = out.view(b, frames, h, w, pt, ph, pw, self.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
            b, self.out_dim, frames * pt, h * ph, w * pw)

    def _block(self, i, block, tokens, hn, modulation, step, next_norm):
        """tokens and hn (their opening LayerNorm + modulation) -> this block's output and the
        output normalised by `next_norm` (shift, scale, eps)."""
        ops, cache = step.ops, step.cache
        _, _, gate_msa, shift_ffn, scale_ffn, gate_ffn = modulation.chunk(6, dim=2)

        # self-attention over this block and the cached frames
        attn = block.self_attn
        heads = attn.num_heads
        cos, sin = step.rope
        # RMS norm + RoPE of q and k, and the writes of k and v into their cache slots, in one op
        q = ops.qkv_norm_rope_store(
            attn.q(hn), attn.k(hn), attn.v(hn), _norm_weight(attn.norm_q), _norm_weight(attn.norm_k),
            _shared_norm_eps(attn.norm_q, attn.norm_k), cos, sin, heads, cache.self_k[i],
            cache.self_v[i], step.self_slots, step.rope_dtype)
        y = ops.self_attention(q, *cache.self_window(i, step.attended_self))
        update = attn.o(y.flatten(2))
        # the gated residual (per frame), with the cross-attention's pre-norm in the same pass
        if isinstance(block.norm3, nn.LayerNorm):
            tokens, normed = ops.gated_residual_layer_norm(
                tokens, update, gate_msa, block.norm3.weight, block.norm3.bias, block.norm3.eps)
        else:
            tokens = normed = ops.gated_residual(tokens, update, gate_msa)

        # cross-attention to the image context (keys/values projected once per stream)
        cross = block.cross_attn
        q = ops.norm_rope_store(cross.q(normed), *_norm_args(cross.norm_q), None, None, heads)
        y = ops.cross_attention(q, cache.cross[i]["k"], cache.cross[i]["v"])
        tokens = tokens + cross.o(y.flatten(2))

        if block.action_model is not None:
            tokens = self._action(i, block.action_model, tokens, step)

        hn = ops.layer_norm_modulate(tokens, shift_ffn, scale_ffn, block.norm2.eps)
        ffn_in, ffn_out = _ffn_linears(block.ffn)
        hidden = ops.linear_gelu(hn, ffn_in.weight, ffn_in.bias)
        return ops.gated_residual_layer_norm_modulate(tokens, ffn_out(hidden), gate_ffn,
                                                      *next_norm)

    def _condition_projections(self, mouse_window, keyboard_window, frames, side_stream):
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
            for i, block in enumerate(self.blocks):
                action = block.action_model
                if action is None:
                    continue
                mouse = keyboard_k = keyboard_v = None
                if action.enable_mouse:  # the first layer's input is [tokens, mouse window]
                    first = action.mouse_mlp[0]
                    mouse = F.linear(_frame_windows(action, mouse_window),
                                     first.weight[:, self.dim:], first.bias)[:, :, None]
                if action.enable_keyboard:
                    embedded = action.keyboard_embed(keyboard_window)
                    keyboard_k, keyboard_v = action.keyboard_attn_kv(
                        _frame_windows(action, embedded)).view(
                            embedded.shape[0], frames, 2, action.heads_num, -1).unbind(2)
                ready = None
                if side_stream is not None:
                    ready = torch.cuda.Event()
                    ready.record(side_stream)
                projections[i] = (mouse, keyboard_k, keyboard_v, ready)
        return projections

    def _action(self, i, action, tokens, step):
        ops, cache = step.ops, step.cache
        n_action, slots = step.attended_action, step.action_slots
        cos, sin = step.action_rope
        frames = step.frames
        b, length, c = tokens.shape
        spatial = length // frames
        heads = action.heads_num
        mouse_bias, keyboard_k, keyboard_v, ready = step.conditions[i]
        if ready is not None:
            torch.cuda.current_stream().wait_event(ready)

        # the attention ops take the raw projections: q/k norm, RoPE and the cache writes of k/v
        # happen inside them (wan/kernels/registry.py)
        if action.enable_mouse:
            # attention per spatial token over frames. The MLP runs in the tokens' own frame-major
            # layout, and its first layer is split: the mouse window is shared by all tokens of a
            # frame, so it is projected once per frame instead of concatenated to 880 tokens
            first, second, norm = _mouse_mlp_layers(action.mouse_mlp)
            h = ops.frame_bias_gelu(F.linear(tokens, first.weight[:, :c]), mouse_bias)
            h = ops.layer_norm(second(h), norm.weight, norm.bias, norm.eps)
            qkv = action.t_qkv(h).view(b, frames, spatial, 3, heads, -1)
            # [B*S, F, H, D] sequence views of the projection (a copy only when B > 1)
            q, k, v = qkv.transpose(1, 2).reshape(b * spatial, frames, 3, heads, -1).unbind(2)
            eps = _shared_norm_eps(action.img_attn_q_norm, action.img_attn_k_norm)
            y = ops.mouse_attention(q, k, v, cache.mouse_k[i], cache.mouse_v[i], slots,
                                    n_action, cos, sin, eps)
            y = y.reshape(b, spatial, frames, -1).transpose(1, 2).reshape(b, length, -1)
            tokens = _add_projection(tokens, y, action.proj_mouse)

        if action.enable_keyboard:
            # every token attends to the few key frames directly: the keys are never repeated
            q = action.mouse_attn_q(tokens).view(b, length, heads, -1)
            eps = _shared_norm_eps(action.key_attn_q_norm, action.key_attn_k_norm)
            y = ops.keyboard_attention(q, keyboard_k, keyboard_v, cache.keyboard_k[i],
                                       cache.keyboard_v[i], slots, n_action, cos, sin, eps)
            tokens = _add_projection(tokens, y.flatten(2), action.proj_keyboard)
        return tokens


def _condition_steps(action, cond, start_frame: int, frames: int):
    """The action steps this call's frames read (host-side slicing, outside the graphs)."""
    return condition_steps(cond, start_frame, frames, action.vae_time_compression_ratio,
                           action.windows_size)


def _frame_windows(action, steps):
    """[B, steps, C] -> [B, frames, window * C] per-frame windows (inside the graphs)."""
    return frame_windows(steps, action.vae_time_compression_ratio, action.windows_size)


def _norm_args(norm):
    """(weight, eps) of the backbone's RMS norm, (None, None) when qk_norm is off."""
    return (None, None) if isinstance(norm, nn.Identity) else (norm.weight, norm.eps)


def _add_projection(tokens, y, linear):
    """tokens + linear(y). A bias-free layer accumulates into `tokens` inside its GEMM (beta = 1),
    in place: callers pass a `tokens` that nothing else holds (each block's residual stream is a
    fresh tensor from the cross-attention's add)."""
    if linear.bias is not None:
        return tokens + linear(y)
    return tokens.view(-1, tokens.shape[-1]).addmm_(y.reshape(-1, y.shape[-1]),
                                                    linear.weight.t()).view(tokens.shape)


def _layers_of(sequence, kinds, name):
    """The modules of an nn.Sequential, which must match `kinds` (a GELU must be the tanh form,
    as upstream's): the fused ops replace them by their math."""
    ok = len(sequence) == len(kinds) and all(
        isinstance(m, kind) and (kind is not nn.GELU or m.approximate == "tanh")
        for m, kind in zip(sequence, kinds))
    if not ok:
        expected = ", ".join("GELU(approximate='tanh')" if k is nn.GELU else k.__name__
                             for k in kinds)
        raise ValueError(f"expected {name} of {expected}; got {sequence}")
    return list(sequence)


def _ffn_linears(ffn):
    """The FFN's two Linear layers: the first one and the GELU run as one `linear_gelu` op."""
    first, _, second = _layers_of(ffn, (nn.Linear, nn.GELU, nn.Linear), "an FFN")
    return first, second


def _mouse_mlp_layers(mlp):
    """(first Linear, second Linear, LayerNorm) of the mouse MLP; its GELU runs inside the
    `frame_bias_gelu` op."""
    first, _, second, norm = _layers_of(mlp, (nn.Linear, nn.GELU, nn.Linear, nn.LayerNorm),
                                        "a mouse MLP")
    return first, second, norm


def _norm_weight(norm):
    return None if isinstance(norm, nn.Identity) else norm.weight


def _shared_norm_eps(q_norm, k_norm):
    """The eps of a q/k pair of RMS norms, None when qk_norm is off: the fused ops take one eps
    for both."""
    eps = {None if isinstance(n, nn.Identity) else n.eps for n in (q_norm, k_norm)}
    if len(eps) != 1:
        raise ValueError(f"the action module's q and k norms differ (eps {sorted(map(str, eps))})")
    return eps.pop()


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
