"""The call around OptimizedCausalWanModel's streaming math.

blocks.py beside this file holds the math of a streaming forward (`compute`: device work only, no
host sync). `StreamingForward` holds everything a call does around it, in this order:

1. check the inputs (wan/modules/shared/input_checks.py), the caller's cache dicts only when they
   were not checked already (the cross-attention dicts whenever what they hold changed);
2. find the cache: a ring over the caller's upstream-style dicts (wan/runtime/stream_cache.py,
   made once per set of k/v tensors and kept with the dicts) or the model's own current stream,
   and check the stream position;
3. per device and dtype once: the ops chosen from the registry (wan/kernels/registry.py), the RoPE
   dtype, the device-side start frame; the per-layer plan (wan/runtime/layer_plan.py), rebuilt
   when any parameter or submodule was replaced since (`ParameterWatch`, every parameter);
4. the image context's cross-attention keys/values, projected for the layers whose dict asks
   (is_init False: a new stream), read from the caller's dicts of this call, which are identified
   by what they hold, not by which dict objects came before (or on every call when the caller
   passes no `crossattn_cache`: the image may change, as the reference model reads it every call);
5. run `blocks.compute` (the math) from the CUDA graph of this phase, or eagerly.

Before step 2, the first call of a stream in caller's dicts that were not warmed up for calls of
this shape (upstream's pipeline makes new dicts for every video and never calls `warm_up`) runs
the explicit warm-up over them, then itself (`first_call_warm_up`, on by default with graphs):
every graph the stream replays is captured inside its first block, where the caller already
waits, instead of one phase at a time as the window fills and its blocks settle (measured on an
H100 in upstream's pipeline: the second block 349 ms against 132 steady).

So the data of a call goes one way: the model's forward (optimized_causal_model.py) -> this
module (checks, caches, positions, graphs) -> the math (blocks.py) -> the ops (wan/kernels);
nothing below calls back up (the graph runner is handed the math as a function to capture and
replay, as torch.cuda.graph is). It also owns the model's own streams
(`start_stream`), the CUDA graphs and the explicit warm-up that captures every graph a stream
will replay before its first real call.
"""
import collections
import functools
import math
import sys
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch

from ...kernels.registry import (FP8_OPS, BackendUnavailableError, describe_resolved, resolve,
                                 resolve_all)
from ...runtime.cuda_graphs import GraphRunner
from ...runtime.layer_plan import ModelPlan
from ...runtime.log import info
from ...runtime.options import FP8_GEMMS
from ...runtime.stream_cache import (StreamCache, bind, bound_cache, buffer_ids, cross_identity,
                                     dict_identity)
from ...runtime.weight_watch import ParameterWatch
from ..shared.conditioning import (attention_window_frames, condition_steps, frame_tokens,
                                   history_steps)
from ..shared.input_checks import (check_forward_inputs, check_stream_position,
                                   check_stream_request, check_tensor_arguments,
                                   check_warm_up_inputs, first_action_module, per_frame_timesteps)
from ..shared.rope_tables import action_inverse_frequencies
from ..shared.upstream_caches import new_stream_caches
from . import blocks


@dataclass
class DeviceState:
    """What the streaming forward needs per (device, dtype), made once."""
    ops: SimpleNamespace        # op name -> the implementation chosen for it (wan/kernels/registry)
    backends: dict              # op name -> the backend's name (the report)
    rope_dtype: torch.dtype     # float64 models rotate in float64 (as upstream), others in float32
    start_frame: torch.Tensor   # the call's first frame, on the device (a graph reads it by value)
    side_stream: Optional[torch.cuda.Stream]  # the action conditions' projections run beside
    action_inv_freq: Optional[torch.Tensor]   # the action RoPE's frequencies (None: no actions)
    description: str = ""       # which backend runs each op (the start-up line)


class StreamingForward:
    """The streaming call of one OptimizedCausalWanModel (see the module's docstring)."""

    def __init__(self, model):
        self.model = model
        self.graphs = GraphRunner()    # graphs per cache storage, one shared pool
        self.plan: Optional[ModelPlan] = None
        self.plan_watch: Optional[ParameterWatch] = None  # the parameters the plan was built on
        self.per_device = {}           # (device, dtype) -> DeviceState
        self.owned: list = []          # every stream the model owns (start_stream)
        self.current: Optional[StreamCache] = None
        self._warned_no_graphs = False
        self._said_no_graphs = None  # the graphs setting a CPU device's start-up log line reported
        self._warming = False        # inside warm_up: its own calls must not warm up again
        # the device types whose forward replays graphs (a seam: the CPU tests add "cpu" with an
        # EagerGraphRunner, so that captures are counted there as on a GPU)
        self.graph_device_types = ("cuda",)

    # ------------------------------------------------------------------ derived state
    def forget_plan(self):
        """The plan packed over the parameters' storage, and the graphs that read it, go."""
        if self.plan is not None:
            self.plan = None
            self.graphs.clear()

    def forget_devices(self):
        """Resolved ops go (new options): resolved again at the next call."""
        self.per_device.clear()

    def layer_plan(self) -> ModelPlan:
        """The plan, packed again (and the graphs dropped) when a parameter or submodule was
        replaced since it was built (every parameter is watched, `ParameterWatch`), or, with FP8
        copies of weights, written in place."""
        if self.plan is not None and self.plan.is_current():
            changed = self.plan_watch.changed()
            if changed is None:
                return self.plan
            info("%s: %s changed since the plan was built; packing the weights again%s",
                 type(self.model).__name__, changed, " (CUDA graphs dropped)" if len(self.graphs)
                 else "")
        self.forget_plan()
        options = self.model.options
        self.plan = ModelPlan(self.model, fp8=options.fp8_gemms, fuse_qkv=options.fused_qkv,
                              residual_in_gemm=options.residual_in_gemm)
        # watched after packing: the packed parameters' data are views of the packed tensors now
        self.plan_watch = ParameterWatch(self.model, values=bool(self.plan.fp8))
        return self.plan

    # ------------------------------------------------------------------ the model's own streams
    def start_stream(self, batch: int, latent_size, new: bool) -> StreamCache:
        model = self.model
        check_stream_request(batch, latent_size, model.patch_size)
        tokens = frame_tokens(latent_size[0], latent_size[1], model.patch_size)
        weight = model.patch_embedding.weight
        s = self.current
        if (new or s is None or s.self_k[0].shape[0] != batch or s.tokens_per_frame != tokens
                or s.self_k[0].dtype != weight.dtype or s.self_k[0].device != weight.device):
            if not new and s is not None:
                self.owned.remove(s)  # replaced: its graphs go with it
            s = _allocate_stream(model, batch, tokens)
            self.owned.append(s)
        s.latent_size = tuple(latent_size)
        s.reset()
        self.current = s
        return s

    def use_stream(self, stream: StreamCache):
        if not any(stream is s for s in self.owned):
            raise ValueError("not a stream of this model (start it with start_stream(new=True)) "
                             "or it was ended")
        self.current = stream

    def end_stream(self, stream: Optional[StreamCache]):
        stream = stream or self.current
        self.owned = [s for s in self.owned if s is not stream]
        if stream is self.current:
            self.current = None

    def release(self):
        self.owned, self.current = [], None
        self.graphs.clear()

    # ------------------------------------------------------------------ the call
    def __call__(self, x, t, visual_context, cond_concat, mouse_cond=None,
                 keyboard_cond=None, kv_cache=None, kv_cache_mouse=None, kv_cache_keyboard=None,
                 crossattn_cache=None, current_start: int = 0, cache_update_only: bool = False):
        model = self.model
        if not isinstance(cache_update_only, bool):
            raise TypeError(f"cache_update_only must be True or False, got "
                            f"{type(cache_update_only).__name__}")
        check_tensor_arguments(x, t, visual_context, cond_concat, mouse_cond, keyboard_cond)
        # 1. inputs, checked (the caller's dicts only when they were not checked already: the
        # stream dicts once per storage and call shape, the cross-attention dicts whenever what
        # they hold changed)
        stream_dicts = (kv_cache, kv_cache_mouse, kv_cache_keyboard)
        identity = dict_identity(stream_dicts) if kv_cache is not None else None
        bound = bound_cache(stream_dicts, identity) if kv_cache is not None else None
        dicts_checked = bound is not None and bound.checked_shape == (tuple(x.shape), identity[2])
        cross_key = None
        if kv_cache is not None and crossattn_cache is not None:
            cross_key = (tuple(x.shape), cross_identity(crossattn_cache, model.num_layers))
        cross_checked = (dicts_checked and (crossattn_cache is None or (
            cross_key[1] is not None and bound.cross_checked == cross_key)))
        check_forward_inputs(model, x, t, visual_context, cond_concat, mouse_cond, keyboard_cond,
                             *stream_dicts, crossattn_cache, current_start,
                             read_cache_position=False, streaming=True,
                             check_caches=not dicts_checked, check_cross=not cross_checked)
        tokens_per_frame = frame_tokens(x.shape[3], x.shape[4], model.patch_size)
        start = current_start // tokens_per_frame
        if self._first_call_warm_up_due(x, t, bound, start, kv_cache, cache_update_only):
            self._warm_up_first_call(x, t, visual_context, cond_concat, mouse_cond, keyboard_cond,
                                     stream_dicts, crossattn_cache, cache_update_only)
            # the call itself, over the warmed dicts (checked again: the warm-up bound them)
            return self(x, t, visual_context, cond_concat, mouse_cond, keyboard_cond, *stream_dicts,
                        crossattn_cache, current_start, cache_update_only)
        t = per_frame_timesteps(model, x, t)
        frames = x.shape[2] // model.patch_size[0]

        # 2. the cache (a ring over the caller's dicts, or the owned stream) and the position
        if kv_cache is not None:  # the dicts' ring cache carries their stream's position
            cache = bound
            if cache is None or cache.tokens_per_frame != tokens_per_frame:
                if start != 0:
                    raise ValueError(
                        f"current_start {current_start} (frame {start}): this model has not "
                        f"streamed into these kv_cache/kv_cache_mouse/kv_cache_keyboard tensors "
                        f"{'at this latent size ' if cache is not None else ''}before (new "
                        f"dicts, or new tensors in them), so it cannot know which frames they "
                        f"hold: a stream in new cache tensors starts at frame 0 "
                        f"(current_start=0)")
                cache = StreamCache.from_upstream_dicts(
                    model, *stream_dicts, crossattn_cache, tokens_per_frame,
                    attention_window_frames(model.local_attn_size))
            if start == 0:  # upstream pipelines start a new stream at frame 0 in reset dicts
                cache.end_frame = 0
        else:
            cache = self._owned_stream(x.shape[0], tokens_per_frame)
        check_stream_position("stream", cache.end_frame, start, frames, "frames")

        # 3. what this device and dtype run (an unrunnable backend fails here, before writes)
        state = self.device_state(x.device, x.dtype)
        plan = self.layer_plan()
        graphs = self._graphs_usable(x)

        # 4. the image context's keys/values, for the layers whose dict asks for them (is_init
        # False: a new stream; every layer on every call without the caller's crossattn_cache,
        # as the reference reads the image on every call)
        if kv_cache is not None:
            cache.use_cross(crossattn_cache, model.num_layers)
        layers = cache.unprojected_layers()
        if layers:
            _cross_storage(model, cache, visual_context, layers, self._graph_references())
        cross_ids = buffer_ids(cache.cross)
        if graphs:
            self.graphs.use_storage(cache, cache.buffers, changed=cross_ids != cache.cross_ids)
        cache.cross_ids = cross_ids
        if layers:
            project = functools.partial(blocks.project_image_context, model, cache=cache,
                                        ops=state.ops, plan=plan, layers=layers)
            if graphs:  # a new stream every call (the seed protocol) costs one replay, not ~150
                self.graphs.run(("image_context", tuple(visual_context.shape), x.dtype, layers),
                                project, {"visual_context": visual_context})
            else:
                project(visual_context)
            for i in layers:
                cache.cross[i]["is_init"] = True
        if kv_cache is not None:
            if not dicts_checked or cache is not bound:
                bind(stream_dicts, cache, tuple(x.shape))  # checked (step 1): remembered
            if crossattn_cache is not None:  # as they are now (projected: flags and tensors)
                cache.cross_checked = (tuple(x.shape),
                                       cross_identity(crossattn_cache, model.num_layers))

        # 5. the math, replayed from the graph of this phase or run eagerly
        inputs = {"x": x, "t": t, "cond_concat": cond_concat}
        action = first_action_module(model)
        if action is not None and action.enable_mouse:
            inputs["mouse_window"] = _condition_window(action, mouse_cond, start, frames)
        if action is not None and action.enable_keyboard:
            inputs["keyboard_window"] = _condition_window(action, keyboard_cond, start, frames)
        state.start_frame.fill_(start)
        end = start + frames
        phase = (cache.self_layout.attended(end), cache.action_layout.attended(end))
        run = functools.partial(blocks.compute, model, cache=cache, phase=phase, state=state,
                                plan=plan, cache_update_only=cache_update_only)
        if graphs:
            # shapes and dtypes: a graph captured for t in bfloat16 must not replay a float32 t
            key = (phase, tuple((name, tuple(v.shape), v.dtype) for name, v in inputs.items()),
                   cache_update_only)
            out = self.graphs.run(key, run, inputs)
        else:
            out = run(**inputs)
        cache.end_frame = max(cache.end_frame, end)
        return out

    def _first_call_warm_up_due(self, x, t, bound, start, kv_cache, cache_update_only) -> bool:
        """Whether this call starts a stream (frame 0) in caller's dicts whose graphs for calls
        like it were not captured by a warm-up yet, with graphs and `first_call_warm_up` on."""
        if (self._warming or kv_cache is None or start != 0
                or not self.model.options.first_call_warm_up or not self._graphs_usable(x)):
            return False
        # (the key holds x's shape, so a latent size the ring cache was not warmed for is new)
        return (bound is None
                or _warm_key(x.shape, t.dtype, cache_update_only) not in bound.warmed_for)

    def _warm_up_first_call(self, x, t, visual_context, cond_concat, mouse_cond, keyboard_cond,
                            stream_dicts, crossattn_cache, cache_update_only):
        begin = time.perf_counter()
        captured = self.warm_up(
            visual_context, cond_concat, mouse_cond, keyboard_cond,
            caches=dict(zip(("kv_cache", "kv_cache_mouse", "kv_cache_keyboard"), stream_dicts),
                        crossattn_cache=crossattn_cache),
            t_dtype=t.dtype, cache_update_only=cache_update_only)
        info("%s: a stream's first call in new cache dicts: warmed up first (%d graphs captured, "
             "%.0f ms; first_call_warm_up=False / WAN_FIRST_CALL_WARM_UP=0 turns this off)",
             type(self.model).__name__, captured, (time.perf_counter() - begin) * 1e3)

    def _graph_references(self) -> dict:
        """id -> how many of the captured graphs' storages hold that tensor (references of this
        model's own, which say nothing about whether a caller still holds it)."""
        storages = getattr(self.graphs, "_storages", {}).values()
        return collections.Counter(id(b) for storage in storages for b in storage.buffers)

    def _owned_stream(self, batch: int, tokens_per_frame: int) -> StreamCache:
        cache = self.current
        if cache.self_k[0].shape[0] != batch or cache.tokens_per_frame != tokens_per_frame:
            raise ValueError(
                f"the stream was started for batch {cache.self_k[0].shape[0]} and "
                f"{cache.tokens_per_frame} tokens per frame; got batch {batch} and "
                f"{tokens_per_frame}: call start_stream(batch=..., latent_size=...)")
        return cache

    def _graphs_usable(self, x) -> bool:
        """Graphs replay on CUDA unless turned off (default: on). Asked for off CUDA: the forward
        runs eagerly, said once: by the start-up log line of the device when graphs were already
        asked for then, else (turned on later) by a warning."""
        setting = self.model.options.cuda_graphs
        if setting is False:
            return False
        if x.device.type in self.graph_device_types:
            return True
        if setting and not self._warned_no_graphs and self._said_no_graphs is not setting:
            warnings.warn("cuda_graphs=True needs a CUDA device; running the forward eagerly")
            self._warned_no_graphs = True
        return False

    def device_state(self, device, dtype) -> DeviceState:
        """Resolved ops, RoPE settings and the device-side start frame for (device, dtype)."""
        key = (device, dtype)
        if key not in self.per_device:
            self.per_device[key] = state = _device_state(self.model, device, dtype)
            options = self.model.options
            precision = ""
            if options.precision == "fp8":
                precision = (f", FP8 GEMMs: "
                             f"{', '.join(sorted(options.fp8_gemms, key=FP8_GEMMS.index))}")
            info("%s on %s in %s, %s%s: %s", type(self.model).__name__, device, dtype,
                 options.describe_graphs(device), precision, state.description)
            if device.type != "cuda":  # that line said graphs are off here: no warning repeats it
                self._said_no_graphs = options.cuda_graphs
        return self.per_device[key]

    # ------------------------------------------------------------------ explicit warm-up
    def warm_up(self, visual_context, cond_concat, mouse_cond=None, keyboard_cond=None,
                stream: Optional[StreamCache] = None, caches: Optional[dict] = None,
                t_dtype: torch.dtype = torch.float32, cache_update_only: bool = False) -> int:
        """Capture, before a stream's first real call, every graph its calls will replay: run
        the blocks of a stream on zeros (one forward each, the shapes of the given inputs) until
        the phase and the input shapes stop changing, then rewind the stream. The stream: the
        caller's upstream-style cache dicts (`caches`: {"kv_cache": ..., "kv_cache_mouse": ...,
        "kv_cache_keyboard": ..., "crossattn_cache": ...}, as the pipeline passes them), else an
        owned one (`stream`, default the current one). `t_dtype`: the dtype the real calls' `t` has
        (a graph is captured per input dtype). `cache_update_only`: the stream's blocks will
        also be written by `cache_update_only=True` calls (the block runner's t=0 update): their
        graphs are captured too. Returns the graphs captured. Without CUDA graphs it
        only resolves the ops and builds the plan."""
        model = self.model
        if caches is None:
            stream = stream or self.current
            if stream is None:
                raise RuntimeError("warm_up needs a stream: call start_stream() first, or pass "
                                   "the caller's cache dicts as caches=")
        check_warm_up_inputs(model, visual_context, cond_concat, mouse_cond, keyboard_cond,
                             stream if caches is None else None)
        if caches is None:
            self.use_stream(stream)
            stream.reset()
        before = self.graphs.captures
        self._warming = True
        try:
            x_shape = self._warm_up_blocks(visual_context, cond_concat, mouse_cond,
                                           keyboard_cond, caches, t_dtype, cache_update_only)
        finally:
            self._warming = False
        # rewound: the next call at frame 0 starts the stream and projects its image again
        if caches is None:
            stream.reset()
        else:
            for slot in caches["crossattn_cache"] or ():
                slot["is_init"] = False
            stream_dicts = (caches["kv_cache"], caches.get("kv_cache_mouse"),
                            caches.get("kv_cache_keyboard"))
            stream = bound_cache(stream_dicts, dict_identity(stream_dicts))
        if stream is not None:  # (None: no call bound the dicts, e.g. without graphs on a CPU)
            stream.warmed_for.update(_warm_key(x_shape, t_dtype, update_only)
                                     for update_only in {False, cache_update_only})
        return self.graphs.captures - before

    def _warm_up_blocks(self, visual_context, cond_concat, mouse_cond, keyboard_cond, caches,
                        t_dtype, cache_update_only):
        """warm_up's blocks on zeros (the caller's dicts, `caches`, or the current stream);
        returns the shape of the x they were called with."""
        model = self.model
        batch, _, frames, h, w = cond_concat.shape
        frames //= model.patch_size[0]
        tokens_per_frame = frame_tokens(h, w, model.patch_size)
        action = first_action_module(model)
        # after the window has filled, a block's phase and shapes repeat; the condition windows
        # settle once the first block's shorter history is past: two more blocks cover both
        window = attention_window_frames(model.local_attn_size)
        x = cond_concat.new_zeros(batch, model.out_dim, frames * model.patch_size[0], h, w)
        # t in float32, as upstream's pipeline and the runner pass it (`t_dtype` otherwise)
        t = torch.zeros(batch, frames, dtype=t_dtype, device=cond_concat.device)
        for block in range(math.ceil(window / frames) + 2):
            conditions = {}
            for name, cond, on in (("mouse_cond", mouse_cond, action and action.enable_mouse),
                                   ("keyboard_cond", keyboard_cond,
                                    action and action.enable_keyboard)):
                if on:
                    steps = history_steps((block + 1) * frames - 1)
                    conditions[name] = cond.new_zeros(batch, steps, cond.shape[-1])
            for update_only in (False, True) if cache_update_only else (False,):
                model(x, t, visual_context, cond_concat, **conditions, **(caches or {}),
                      current_start=block * frames * tokens_per_frame,
                      cache_update_only=update_only)
        return tuple(x.shape)


def _warm_key(x_shape, t_dtype, cache_update_only: bool) -> tuple:
    """What a warm-up over a storage covers: calls with this x shape, t dtype and kind."""
    return tuple(x_shape), t_dtype, cache_update_only


def _device_state(model, device, dtype) -> DeviceState:
    action = first_action_module(model)
    head_dims = {op: model.dim // model.num_heads
                 for op in ("self_attention", "cross_attention", "norm_rope_store",
                            "qkv_norm_rope_store")}
    if action is not None:
        head_dims["mouse_attention"] = head_dims["keyboard_attention"] = \
            sum(action.mouse_qk_dim_list)
    resolved = resolve_all(model.options.backend, device, dtype, head_dims)
    if model.options.precision == "fp8":
        try:
            resolved.update({op: resolve(op, model.options.backend[op], device, dtype, 0)
                             for op in FP8_OPS})
        except BackendUnavailableError as err:
            raise BackendUnavailableError(f"precision='fp8' cannot run here: {err}") from None
    return DeviceState(
        ops=SimpleNamespace(**{op: fn for op, (_, fn) in resolved.items()}),
        backends={op: name for op, (name, _) in resolved.items()},
        # float64 models keep float64 RoPE (as upstream); others rotate in float32
        rope_dtype=torch.float64 if dtype == torch.float64 else torch.float32,
        start_frame=torch.zeros((), dtype=torch.long, device=device),
        side_stream=torch.cuda.Stream(device) if device.type == "cuda" else None,
        action_inv_freq=None if action is None else action_inverse_frequencies(
            action.mouse_qk_dim_list, action.rope_theta, device),
        description=describe_resolved(resolved))


def _refs_through(holder, key) -> int:
    """Python references to holder[key] as seen from here (the dict's, and this call's own)."""
    return sys.getrefcount(holder[key])


# what _refs_through counts for an object that its dict alone holds (measured, not assumed: the
# interpreter's own references to an argument differ between Python versions)
_ONLY_THE_DICT = _refs_through({"k": object()}, "k")


def _cross_storage(model, cache: StreamCache, visual_context, layers, graph_refs):
    """Give each of `layers`' cross-attention k/v a tensor of the right shape to be written in
    place. Upstream gives every projection new tensors, so a tensor it replaced keeps the old
    image for whoever else holds it (new dicts wrapping the old tensors, a dict kept from before).
    Writing in place keeps the CUDA graphs' storage, and is the same as long as the dict alone
    holds the tensor: so a tensor that anything else holds (another dict, a variable; not counting
    this model's captured graphs, `graph_refs`: id -> references) is left alone and the dict gets
    a new one, as a dict holding None or a tensor of another shape, dtype or device does."""
    b, tokens = visual_context.shape[:2]
    for i in layers:
        slot, attn = cache.cross[i], model.blocks[i].cross_attn
        shape = (b, tokens, attn.num_heads, attn.head_dim)
        for name in ("k", "v"):
            held = slot[name]
            fits = (isinstance(held, torch.Tensor) and held.shape == shape
                    and held.dtype == visual_context.dtype and held.device == visual_context.device)
            shared = fits and _refs_through(slot, name) > (
                _ONLY_THE_DICT + 1 + graph_refs.get(id(held), 0))  # + 1: `held` here
            del held
            if not fits or shared:
                slot[name] = visual_context.new_empty(shape)


def _allocate_stream(model, batch: int, tokens_per_frame: int) -> StreamCache:
    """Caches owned by the model (its dtype and device): upstream-style dicts sized by the
    attention window (its sink included) and nothing more, action caches only for layers with an
    action module, used as ring storage."""
    window = attention_window_frames(model.local_attn_size)
    dicts = new_stream_caches(model, batch, window, tokens_per_frame, action_layers_only=True)
    return StreamCache.from_upstream_dicts(model, dicts["kv_cache"], dicts["kv_cache_mouse"],
                                           dicts["kv_cache_keyboard"], dicts["crossattn_cache"],
                                           tokens_per_frame, window)


def _condition_window(action, cond, start_frame: int, frames: int):
    """The action steps this call's frames read (host-side slicing, outside the graphs)."""
    return condition_steps(cond, start_frame, frames, action.vae_time_compression_ratio,
                           action.windows_size)
