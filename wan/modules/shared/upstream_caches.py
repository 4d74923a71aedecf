"""Zeroed upstream-style cache dicts, as Matrix-Game-2's pipeline allocates them: `k`, `v`
[N, capacity, H, D] and `global_end_index` / `local_end_index` long tensors [1] per layer.

Shared by the reference model's users, the benchmarks and the seed suite, which also runs inside
an integrated Matrix-Game-2 checkout (where wan.integrate installs this package). It reads only what
upstream's CausalWanModel also has.
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


def new_stream_caches(model, batch: int, cache_frames: int, tokens_per_frame: int,
                      context_tokens: int = 257, dtype=None, device=None,
                      action_layers_only: bool = False) -> dict:
    """Zeroed upstream-style caches for every layer of `model`, as Matrix-Game-2's pipeline makes
    them: keyword arguments `kv_cache`, `kv_cache_mouse`, `kv_cache_keyboard`, `crossattn_cache`.

    Self-attention holds `cache_frames * tokens_per_frame` tokens; the action caches hold
    `cache_frames` frames (mouse: one row per batch element and spatial token). Caches of layers
    without an action module are allocated too, as upstream does, so every list has one per layer;
    `action_layers_only` leaves None there instead (the optimized model's own stream: ~0.3 GB less
    for the universal config in bf16).
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
    layers = [b.action_model is not None or not action_layers_only for b in model.blocks]
    if actions:
        action = actions[0]
        a_heads = action.heads_num
        if action.enable_mouse:
            a_dim = action.t_qkv.in_features // a_heads
            caches["kv_cache_mouse"] = [
                new_cache(batch * tokens_per_frame, cache_frames, a_heads, a_dim, dtype, device)
                if wanted else None for wanted in layers]
        if action.enable_keyboard:
            k_dim = action.mouse_attn_q.out_features // a_heads
            caches["kv_cache_keyboard"] = [
                new_cache(batch, cache_frames, a_heads, k_dim, dtype, device)
                if wanted else None for wanted in layers]
    return caches
