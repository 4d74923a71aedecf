"""The static ring-buffer caches of OptimizedCausalWanModel.

Upstream keeps each cache as a buffer that it shifts left when full (a copy of the whole window per
layer and call) and reads back the last `window` entries. Keys are cached with the RoPE of their
absolute frame, so attention does not care in which order the cached frames sit. Here a frame has a
fixed slot: the first `sink` frames keep slots [0, sink); every later frame f goes to slot
`sink + (f - sink) % ring`. A call ending at frame E attends to the prefix [0, min(E, sink + ring))
of the slots: while the stream is young that prefix is frames [0, E) in order, afterwards it holds
exactly the frames upstream would attend to. No shifting, no host sync: the slots of a call are
computed on the device from the start frame, so one captured CUDA graph serves every block of a
phase (a phase = the prefix length).

Which (sink, ring) reproduces upstream for a buffer of `capacity` frames, an attention `window`
and `sink` frames (all in frames; the action caches of upstream always have sink 0):
* window >= capacity: upstream attends to everything it holds, the sink plus the latest
  capacity - sink frames: (sink, capacity - sink).
* window < capacity and (sink == 0 or window <= capacity - sink): upstream's view is a plain
  sliding window of the latest `window` frames: (0, window).
* otherwise upstream would attend to part of the sink and a shorter recent window once the buffer
  is full; that layout is not supported (make the cache `window` frames long).
"""
from dataclasses import dataclass
from typing import Optional

import torch



@dataclass(frozen=True)
class RingLayout:
    sink: int  # slots that keep the first `sink` frames
    ring: int  # slots that cycle through the later frames

    @staticmethod
    def matching_upstream(capacity: int, window: int, sink: int, name: str) -> "RingLayout":
        if window >= capacity:
            layout = RingLayout(sink, capacity - sink)
        elif sink == 0 or window <= capacity - sink:
            layout = RingLayout(0, window)
        else:
            raise ValueError(
                f"{name}: a {capacity}-frame cache with a {window}-frame attention window and "
                f"{sink} sink frame(s) makes upstream attend to part of the sink; not supported by "
                f"the ring cache: use a cache of {window} frames")
        if layout.ring < 1:
            raise ValueError(f"{name}: a {capacity}-frame cache leaves no room after {sink} sink "
                             f"frame(s)")
        return layout

    @property
    def slots(self) -> int:
        return self.sink + self.ring

    def attended(self, end_frame: int) -> int:
        """How many leading slots a call ending at `end_frame` attends to."""
        return min(end_frame, self.slots)

    def slot_of(self, frames: torch.Tensor) -> torch.Tensor:
        """Slot index of each absolute frame (device tensor in, device tensor out)."""
        if self.sink == 0:
            return frames % self.ring
        return torch.where(frames < self.sink, frames, self.sink + (frames - self.sink) % self.ring)


class StreamCache:
    """Per-layer K/V storage of one stream (or of several streams in lockstep: batch > 1).

    `self_k[i]`, `self_v[i]`: [B, slots * S, H, D]; `mouse_k/v[i]`: [B * S, slots, Ha, Da];
    `keyboard_k/v[i]`: [B, slots, Ha, Da] (None for layers without the branch); `cross[i]`: an
    upstream-style dict {"k", "v" [B, context, H, D], "is_init"}. `end_frame` is the host-side
    stream position (frames written so far).
    """

    def __init__(self, self_k, self_v, mouse_k, mouse_v, keyboard_k, keyboard_v, cross, self_layout,
                 action_layout, tokens_per_frame):
        self.self_k, self.self_v = self_k, self_v
        self.mouse_k, self.mouse_v = mouse_k, mouse_v
        self.keyboard_k, self.keyboard_v = keyboard_k, keyboard_v
        self.cross = cross  # list of upstream-style dicts {"k", "v", "is_init"}
        self.self_layout, self.action_layout = self_layout, action_layout
        self.tokens_per_frame = tokens_per_frame
        self.end_frame = 0
        self.source_ids = None      # ids of the caller's dict tensors it wraps (bind)
        self.checked_shape = None   # (input shape, index entry ids) those dicts were checked for
        # the cross-attention dicts: the caller's are taken afresh at every call (`use_cross`), so
        # what counts is what they hold (their tensors and is_init flags), not which dict objects
        # came last
        self.own_cross = None       # storage of streams given no crossattn_cache
        self.cross_checked = None   # (input shape, cross_identity) of the dicts last checked
        self.cross_ids = buffer_ids(self.cross)  # the k/v tensors the graphs were captured with
        # (input shape, t dtype, cache_update_only) of the calls whose graphs `warm_up` captured
        # over this storage (the streaming call's first-call warm-up asks)
        self.warmed_for = set()

    @property
    def cross_ready(self) -> bool:
        return all(c["is_init"] for c in self.cross)

    def use_cross(self, crossattn_cache, layers: int):
        """Read this call's cross-attention dicts: the caller's (their first `layers`), or, when
        the call passes none, storage of the stream's own whose image context is projected on
        every call (as the reference reads the image on every call without a cache)."""
        if crossattn_cache is not None:
            self.cross = list(crossattn_cache[:layers])
            return
        if self.own_cross is None:
            self.own_cross = [{"k": None, "v": None, "is_init": False} for _ in range(layers)]
        for slot in self.own_cross:
            slot["is_init"] = False
        self.cross = self.own_cross

    def unprojected_layers(self) -> tuple:
        """The layers whose dict asks for the image context to be projected (is_init False)."""
        return tuple(i for i, c in enumerate(self.cross) if not c["is_init"])

    def reset(self):
        """Start a new stream in the same storage: the position rewinds and the image context will
        be projected again on the next call. Slots need no clearing: only written ones are read."""
        self.end_frame = 0
        for c in self.cross:
            c["is_init"] = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_upstream_dicts(cls, model, kv_cache, kv_cache_mouse, kv_cache_keyboard,
                            crossattn_cache, tokens_per_frame: int,
                            window: int) -> "StreamCache":
        """Use the caller's upstream-style dicts as ring storage (drop-in). Their index tensors
        are not read or updated: the position comes from `current_start`. Entries past the
        model's layers (upstream's pipeline always makes 30) are left alone. `window`: the
        frames a call may attend to (the model's `attention_window_frames`)."""
        layers = model.num_layers
        kv_cache, crossattn_cache = kv_cache[:layers], crossattn_cache and crossattn_cache[:layers]
        kv_cache_mouse = kv_cache_mouse and kv_cache_mouse[:layers]
        kv_cache_keyboard = kv_cache_keyboard and kv_cache_keyboard[:layers]
        capacity = _common_length("kv_cache", [c["k"] for c in kv_cache]) // tokens_per_frame
        self_layout = RingLayout.matching_upstream(capacity, window, _sink_frames(model), "kv_cache")
        action_capacity = _common_length("action caches", [
            c[key] for caches in (kv_cache_mouse, kv_cache_keyboard) if caches is not None
            for c, block in zip(caches, model.blocks) if block.action_model is not None
            for key in ("k", "v")])
        action_layout = RingLayout.matching_upstream(action_capacity or window, window, 0,
                                                     "action caches")

        has_action = [b.action_model is not None for b in model.blocks]

        def per_layer(caches, key):
            if caches is None:
                return [None] * model.num_layers
            return [c[key] if action else None for c, action in zip(caches, has_action)]

        if crossattn_cache is None:  # upstream requires one; without it, project on every call
            crossattn_cache = [{"k": None, "v": None, "is_init": False} for _ in model.blocks]
        return cls([c["k"] for c in kv_cache], [c["v"] for c in kv_cache],
                   per_layer(kv_cache_mouse, "k"), per_layer(kv_cache_mouse, "v"),
                   per_layer(kv_cache_keyboard, "k"), per_layer(kv_cache_keyboard, "v"),
                   crossattn_cache, self_layout, action_layout, tokens_per_frame)

    # ------------------------------------------------------------------ reads and writes
    def self_window(self, layer: int, attended_slots: int):
        n = attended_slots * self.tokens_per_frame
        return self.self_k[layer][:, :n], self.self_v[layer][:, :n]

    def buffers(self) -> list:
        """Every tensor the cache writes into (what a captured CUDA graph is tied to)."""
        groups = (self.self_k, self.self_v, self.mouse_k, self.mouse_v, self.keyboard_k,
                  self.keyboard_v, [c[name] for c in self.cross for name in ("k", "v")])
        return [t for group in groups for t in group if isinstance(t, torch.Tensor)]


def buffer_ids(cross) -> tuple:
    """ids of the k/v entries of cross-attention dicts (what a captured graph reads)."""
    return tuple(id(c[name]) for c in cross for name in ("k", "v"))


def cross_identity(crossattn_cache, layers: int) -> Optional[tuple]:
    """What the caller's cross-attention dicts hold, per layer: (id of k, id of v, is_init), or
    None when they are malformed or absent (the input checks then say why). Dicts are identified
    by this, never by the dict objects: new dicts around the same tensors are the same only when
    they also agree on is_init."""
    if not isinstance(crossattn_cache, (list, tuple)):
        return None
    held = []
    for cache in crossattn_cache[:layers]:
        if (not isinstance(cache, dict) or not {"k", "v", "is_init"} <= cache.keys()
                or not isinstance(cache["is_init"], bool)):
            return None
        held.append((id(cache["k"]), id(cache["v"]), cache["is_init"]))
    return tuple(held)


def dict_identity(dicts) -> Optional[tuple]:
    """(ids, tensors, index ids) of the caller's upstream-style stream dicts (kv_cache,
    kv_cache_mouse, kv_cache_keyboard: the storage that carries the stream's position; a list
    given as None is skipped, and so is an entry given as None: the action caches of layers
    without an action module, as `new_stream_caches(..., action_layers_only=True)` makes them):
    the ids and objects of every "k"/"v" tensor, which find the ring cache over them, and the ids
    of their index entries, which the input checks saw too (a dict rebuilt around the same k/v
    with other index entries keeps its ring cache but is checked again). None when they are
    malformed (the input checks then say why). The cross-attention dicts are not part of it: they
    are read at every call (`StreamCache.use_cross`)."""
    tensors, indexes = [], []
    for caches in dicts:
        if caches is None:
            continue
        if not isinstance(caches, (list, tuple)):
            return None
        for cache in caches:
            if cache is None:
                continue
            if not isinstance(cache, dict) or "k" not in cache or "v" not in cache:
                return None
            tensors += [cache["k"], cache["v"]]
            indexes += [cache.get("global_end_index"), cache.get("local_end_index")]
    return tuple(map(id, tensors)), tensors, tuple(map(id, indexes))


# the key under which the first dict of the caller's `kv_cache` holds the ring cache made over
# the dicts: the stream's position lives with the dicts, as upstream keeps it in their index
# tensors, so any number of dict sets can alternate through one model (one per player), and a
# set's ring cache (and the CUDA graphs captured over it) goes when the caller drops the dicts
DICT_TAG = "wan_ring_cache"


def bound_cache(dicts, identity) -> Optional[StreamCache]:
    """The ring cache an earlier call made over these very dicts (same tensors), or None."""
    try:
        cache = dicts[0][0].get(DICT_TAG)
    except (TypeError, IndexError, KeyError, AttributeError):
        return None
    if not isinstance(cache, StreamCache) or identity is None or cache.source_ids != identity[0]:
        return None
    return cache


def bind(dicts, cache: StreamCache, checked_shape):
    """Tag the dicts with `cache`, which the call checked (with their index entries as they are
    now) for inputs of `checked_shape`."""
    identity = dict_identity(dicts)
    cache.source_ids = identity[0]
    cache.checked_shape = (checked_shape, identity[2])
    dicts[0][0][DICT_TAG] = cache


def _sink_frames(model) -> int:
    return model.blocks[0].self_attn.sink_size


def _common_length(name, tensors) -> Optional[int]:
    """The length (dim 1) that every one of `tensors` has: one ring layout serves all layers, so
    a shorter buffer would be written past its end on the device. None without tensors."""
    lengths = sorted({t.shape[1] for t in tensors})
    if len(lengths) > 1:
        raise ValueError(f"{name}: every layer's buffer must have the same length (dim 1) for the "
                         f"ring cache; got lengths {lengths}")
    return lengths[0] if lengths else None
