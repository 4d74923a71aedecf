"""CUDA-graph capture and replay of the streaming forward (and of the decoder).

A graph writes into the buffers it was captured with, so graphs are kept per storage: per owner
object (a stream's ring cache, the decoder's shared workspace), one graph per key (attended
slots, dtype, input names and shapes). Several players' streams therefore each keep their graphs,
and alternating between them replays without capturing again. All graphs share one memory pool,
as nano-vllm's runner shares one across batch sizes: they replay one at a time, so their
intermediate activations can share memory; each graph's output is cloned out of the pool.
A storage's graphs go when its owner is garbage (the caller dropped the caches: upstream's
pipeline allocates new dicts for every video) or when the owner's buffers were replaced.
Inputs are copied into static buffers before each replay. Capture follows the usual recipe: warm
up on a side stream, then capture the same call.
"""
import functools
import weakref
from typing import Callable, Dict, List, Optional

import torch


class _Storage:
    """The graphs captured over one owner's buffers; the buffers are held, so that equal ids mean
    the same tensors and the memory a graph writes stays theirs."""

    def __init__(self, buffers: List[torch.Tensor]):
        self.ids = tuple(map(id, buffers))
        self.buffers = buffers
        self.graphs: Dict[tuple, tuple] = {}


class GraphRunner:
    # calls on a side stream before capturing (lazy initialisation, autotuning, allocator state)
    WARMUP_CALLS = 2

    def __init__(self):
        self.pool = None
        self.captures = 0  # graphs captured so far (a serving loop should stop adding to it)
        self._storages: Dict[int, _Storage] = {}  # id(owner) -> its graphs
        self._current: Optional[_Storage] = None

    def __len__(self):
        """Graphs held, over every storage."""
        return sum(len(storage.graphs) for storage in self._storages.values())

    def clear(self):
        self._storages.clear()
        self._current = None
        self.pool = None

    def use_storage(self, owner, buffers: Callable[[], List[torch.Tensor]], changed: bool):
        """The graphs run next write into `owner`'s buffers (`buffers()` lists them). Graphs
        captured before for this owner are kept unless `changed` says its buffers may have been
        replaced and they have (e.g. a new stream gave the image context new tensors)."""
        key = id(owner)
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(buffers())
            # the owner's end (caches dropped) drops its graphs and lets its buffers go
            weakref.finalize(owner, self._drop, key)
        elif changed:
            current = buffers()
            if tuple(map(id, current)) != storage.ids:
                self._drop(key)
                self._storages[key] = storage = _Storage(current)
        self._current = storage

    def _drop(self, key: int):
        """Drop a storage's graphs. With no graph left the allocator frees the pool, so the next
        capture must start a new one (capturing into a freed pool is an internal error)."""
        storage = self._storages.pop(key, None)
        if storage is not None and storage is self._current:
            self._current = None
        if not any(s.graphs for s in self._storages.values()):
            self.pool = None

    def run(self, key: tuple, fn: Callable[..., torch.Tensor], inputs: Dict[str, torch.Tensor]):
        """fn(**inputs) through the current storage's graph of `key`, capturing it on first use.
        fn must only launch device work (no host syncs, no allocation that depends on values)."""
        graphs = self._current.graphs
        if key not in graphs:
            self.capture(key, fn, inputs)
        graph, static_inputs, static_out = graphs[key]
        # one dispatch for all the copies: each separate copy_ costs ~25 us of host time on a
        # slow host, and the GPU waits for it
        torch._foreach_copy_([static_inputs[name] for name in inputs], list(inputs.values()))
        graph.replay()
        # fn may only write into buffers it was given (returns None)
        return None if static_out is None else static_out.clone()

    def captured(self, key: tuple) -> bool:
        return key in self._current.graphs

    def capture(self, key: tuple, fn, inputs):
        """Capture fn(**inputs) as the current storage's graph of `key` without replaying it. The
        warm-up runs fn WARMUP_CALLS times for real: a caller whose fn updates state (not
        idempotent) saves and restores that state around this call."""
        self._current.graphs[key] = self._capture(fn, inputs)
        self.captures += 1

    def _capture(self, fn, inputs):
        static_inputs = {name: value.clone() for name, value in inputs.items()}
        side = _capture_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_CALLS):
                fn(**static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # captured on that side stream, of the current device: torch.cuda.graph's default capture
        # stream is one per process, made on the first device that captured, so a capture on a
        # second GPU (the split player's decoder) would run on the first one and fail
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            static_out = fn(**static_inputs)
        self.pool = graph.pool()
        return graph, static_inputs, static_out


class EagerGraphRunner(GraphRunner):
    """GraphRunner's twin for a CPU (tests and the benchmarks' CPU runs of code that captures
    graphs): a capture runs the function once and keeps it, a replay runs it again into the
    static output, so the counts and the flow are a GPU's."""
    WARMUP_CALLS = 0  # (a real capture's warm-up calls only cost time here)

    def _capture(self, fn, inputs):
        static_inputs = {name: value.clone() for name, value in inputs.items()}
        static_out = fn(**static_inputs)

        class _Graph:
            @staticmethod
            def replay():
                out = fn(**static_inputs)
                if static_out is not None:
                    static_out.copy_(out)

        return _Graph(), static_inputs, static_out


@functools.lru_cache(maxsize=None)
def _capture_stream(device: int) -> torch.cuda.Stream:
    """One capture stream per device for every capture: cuBLAS and cuDNN keep a workspace per
    stream for the life of the process, so a new stream per capture (per player's graphs) would
    leave ~100 MiB behind every player who came and went (measured on an H200)."""
    return torch.cuda.Stream(device)
