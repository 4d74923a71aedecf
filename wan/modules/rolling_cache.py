"""Upstream-style KV cache dicts: `k`, `v` [N, capacity, H, D] and `global_end_index` /
`local_end_index` long tensors [1].

One mechanism serves the three caches of the reference model, which differ only in their unit along
dim 1: self-attention counts tokens, the mouse and keyboard caches count frames.

Semantics (those of Matrix-Game-2): positions are absolute (`start`, `end` = start + new); the
`global_end_index` is the absolute end written so far, `local_end_index` the end inside the buffer.
Calling again with the same `start` overwrites the same slots (the denoising steps of one block).
When new positions do not fit, the oldest entries after the first `sink` ones are dropped by
shifting the rest to the left. Attention then reads the last `window` entries up to the new end.
"""
import torch

# allocation lives in wan/modules/shared (both models and the seed suite, in checkouts too, use it)
from .shared.upstream_caches import new_cache, new_stream_caches  # noqa: F401


def cache_end(cache: dict) -> int:
    """The absolute end position written so far (host sync: the reference model is allowed it)."""
    return int(cache["global_end_index"].item())


def write_and_read_window(cache: dict, k: torch.Tensor, v: torch.Tensor, start: int, sink: int,
                          window: int):
    """Store k, v [N, new, H, D] for positions [start, start+new) and return the attention window
    (views of the cache, [N, <= window, H, D])."""
    new = k.shape[1]
    end = start + new
    capacity = cache["k"].shape[1]
    global_end = cache_end(cache)
    local_end = int(cache["local_end_index"].item())
    advance = end - global_end
    if end > global_end and new + local_end > capacity:
        evicted = new + local_end - capacity
        kept = local_end - evicted - sink
        for name in ("k", "v"):
            buf = cache[name]
            buf[:, sink:sink + kept] = buf[:, sink + evicted:sink + evicted + kept].clone()
        local_end = local_end + advance - evicted
    else:
        local_end = local_end + advance
    cache["k"][:, local_end - new:local_end] = k
    cache["v"][:, local_end - new:local_end] = v
    cache["global_end_index"].fill_(end)
    cache["local_end_index"].fill_(local_end)
    first = max(0, local_end - window)
    return cache["k"][:, first:local_end], cache["v"][:, first:local_end]
