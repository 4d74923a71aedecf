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


def new_cache(batch: int, capacity: int, heads: int, head_dim: int, dtype, device) -> dict:
    """A zeroed upstream-style cache dict."""
    return {
        "k": torch.zeros(batch, capacity, heads, head_dim, dtype=dtype, device=device),
        "v": torch.zeros(batch, capacity, heads, head_dim, dtype=dtype, device=device),
        "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
        "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
    }


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


def new_stream_caches(model, batch: int, cache_frames: int, tokens_per_frame: int,
                      context_tokens: int = 257, dtype=None, device=None) -> dict:
    """Zeroed upstream-style caches for every layer of `model`, as Matrix-Game-2's pipeline makes
    them: keyword arguments `kv_cache`, `kv_cache_mouse`, `kv_cache_keyboard`, `crossattn_cache`.

    Self-attention holds `cache_frames * tokens_per_frame` tokens; the action caches hold
    `cache_frames` frames (mouse: one row per batch element and spatial token). Caches of layers
    without an action module are allocated too, as upstream does, so every list has one per layer.
    """
    dtype = dtype or model.patch_embedding.weight.dtype
    device = device or model.patch_embedding.weight.device
    heads, head_dim = model.num_heads, model.dim // model.num_heads
    actions = [b.action_model for b in model.blocks if b.action_model is not None]
    caches = {
        "kv_cache": [new_cache(batch, cache_frames * tokens_per_frame, heads, head_dim, dtype, device)
                     for _ in range(model.num_layers)],
        "crossattn_cache": [{"k": torch.zeros(batch, context_tokens, heads, head_dim, dtype=dtype,
                                              device=device),
                             "v": torch.zeros(batch, context_tokens, heads, head_dim, dtype=dtype,
                                              device=device),
                             "is_init": False} for _ in range(model.num_layers)],
        "kv_cache_mouse": None,
        "kv_cache_keyboard": None,
    }
    if actions:
        action = actions[0]
        a_heads = action.heads_num
        if action.enable_mouse:
            a_dim = action.t_qkv.in_features // a_heads
            caches["kv_cache_mouse"] = [
                new_cache(batch * tokens_per_frame, cache_frames, a_heads, a_dim, dtype, device)
                for _ in range(model.num_layers)]
        if action.enable_keyboard:
            k_dim = action.mouse_attn_q.out_features // a_heads
            caches["kv_cache_keyboard"] = [
                new_cache(batch, cache_frames, a_heads, k_dim, dtype, device)
                for _ in range(model.num_layers)]
    return caches
