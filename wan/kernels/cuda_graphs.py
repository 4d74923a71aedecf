"""CUDA-graph capture and replay of the streaming forward.

One graph per key (attended slots, dtype, input names and shapes), all in one memory pool. A graph
writes into the cache buffers it was captured with, so the runner holds the graphs of one cache
storage at a time (`use_storage`): upstream's pipeline allocates new dicts for every video, and
another storage drops the graphs and their pool.
Inputs are copied into static buffers before each replay; the output is cloned out of the pool so a
caller can keep it across calls. Capture follows the usual recipe: warm up on a side stream, then
capture the same call.
"""
import os
from typing import Callable, Dict, List, Optional

import torch

ENV_VAR = "WAN_CUDA_GRAPHS"
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no", "")


def cuda_graphs_setting(requested: Optional[bool]) -> bool:
    """`requested` when given (a keyword or a config.json value), else WAN_CUDA_GRAPHS, else off."""
    if requested is not None:
        return bool(requested)
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: use 1/true/on or 0/false/off")
    return value in _TRUE


class GraphRunner:
    # calls on a side stream before capturing (lazy initialisation, autotuning, allocator state)
    WARMUP_CALLS = 2

    def __init__(self):
        self.graphs: Dict[tuple, tuple] = {}
        self.pool = None
        self._storage_ids: Optional[tuple] = None
        self._storage: List[torch.Tensor] = []  # held, so that equal ids mean the same tensors
        self._cache = None  # the StreamCache those buffers were read from

    def __len__(self):
        return len(self.graphs)

    def clear(self):
        self.graphs.clear()
        self.pool = None
        self._storage_ids, self._storage, self._cache = None, [], None

    def use_storage(self, cache, new_stream: bool):
        """The graphs run next write into `cache`'s buffers (a StreamCache): keep the graphs captured
        with these very tensors, drop all others. A cache object holds the same buffers for life,
        except the image context's, which a new stream may replace: only then are they compared."""
        if cache is self._cache and not new_stream:
            return
        tensors = cache.buffers()
        ids = tuple(map(id, tensors))
        if ids != self._storage_ids:
            self.clear()
            self._storage_ids, self._storage = ids, tensors
        self._cache = cache

    def run(self, key: tuple, fn: Callable[..., torch.Tensor], inputs: Dict[str, torch.Tensor]):
        """fn(**inputs) through the graph of `key`, capturing it on first use. fn must only launch
        device work (no host syncs, no allocation that depends on values)."""
        if key not in self.graphs:
            self.capture(key, fn, inputs)
        graph, static_inputs, static_out = self.graphs[key]
        # one dispatch for all the copies: each separate copy_ costs ~25 us of host time on a
        # slow host, and the GPU waits for it
        torch._foreach_copy_([static_inputs[name] for name in inputs], list(inputs.values()))
        graph.replay()
        # fn may only write into buffers it was given (returns None)
        return None if static_out is None else static_out.clone()

    def captured(self, key: tuple) -> bool:
        return key in self.graphs

    def capture(self, key: tuple, fn, inputs):
        """Capture fn(**inputs) as the graph of `key` without replaying it. The warm-up runs fn
        WARMUP_CALLS times for real: a caller whose fn updates state (not idempotent) saves and
        restores that state around this call."""
        self.graphs[key] = self._capture(fn, inputs)

    def _capture(self, fn, inputs):
        static_inputs = {name: value.clone() for name, value in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_CALLS):
                fn(**static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = fn(**static_inputs)
        self.pool = graph.pool()
        return graph, static_inputs, static_out


class ForgetsDerivedStateOnNewWeights:
    """Mixin for a module that keeps state derived from its parameters' storage (CUDA graphs read
    raw pointers; packed or re-laid-out weights): `_forget_derived_state()` (the module's own) runs
    whenever the parameters may get new storage or be new objects, i.e. after `.to()`, `.half()`,
    `.cuda()` (nn.Module's `_apply`) and after `load_state_dict` (assign=True puts new objects in
    place). Call `_watch_weights()` once in __init__."""

    def _watch_weights(self):
        self.register_load_state_dict_post_hook(_forget_after_load)

    def _apply(self, fn, *args, **kwargs):
        self._forget_derived_state()
        return super()._apply(fn, *args, **kwargs)

    def _forget_derived_state(self):
        """Drop what was derived (it may run before the subclass's __init__ has set it up)."""
        raise NotImplementedError


def _forget_after_load(module, incompatible_keys):
    """load_state_dict's post hook (a module-level function: modules stay picklable)."""
    module._forget_derived_state()
