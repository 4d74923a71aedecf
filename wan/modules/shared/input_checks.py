"""Checks of a forward call's inputs, run before anything is computed or written to a cache.

Shared by the reference and the optimized model (`python -m wan.integrate` copies this package
with the optimized model into an upstream tree).

Upstream fails late (an assert, a shape error deep inside, or silently wrong output). Here every
problem is a ValueError/TypeError that names the argument, what was expected and what came, raised
before any cache is touched: TypeError for a value of the wrong type or dtype (a list for `x`, a
bool `t`, a float `current_start`), ValueError for a wrong shape, size, device or position. The
checks read only what upstream's CausalWanModel also has (`patch_size`, `in_dim`, `num_layers`,
`num_heads`, `dim`, `local_attn_size`, `blocks[i].self_attn`, `blocks[i].action_model`,
`patch_embedding`), so they serve the optimized model over either parent.

NaN and inf are not checked, on purpose, by either model or either forward: finding one needs the
values on the host (a device sync, which the streaming forward never makes), and a check in the
cache-free forward only would make the two forwards disagree. Non-finite values propagate, as in
upstream: a call with one in its input returns non-finite output, and a streaming call writes
non-finite keys/values into the caches, which reach every later block that attends to them (the
layers after the first mix all cached frames), so the stream stays poisoned until it starts again
at frame 0 (fresh or reset caches, `start_stream`/`reset_stream`: nothing of the old stream is
read then). Where the values reach the host anyway (a runner or server that copies each block's
frames out), `non_finite(...)` below names the bad ones.
"""
import torch

from .conditioning import frame_tokens, history_steps

SELF_CACHE_KEYS = ("k", "v", "global_end_index", "local_end_index")
CROSS_CACHE_KEYS = ("k", "v", "is_init")


def model_dtype(model) -> torch.dtype:
    return model.patch_embedding.weight.dtype


def first_action_module(model):
    """The first block's action module (all of them share one configuration), or None."""
    return next((b.action_model for b in model.blocks if b.action_model is not None), None)


def _check_tensor(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")


def check_tensor_arguments(x, t, visual_context, cond_concat, mouse_cond=None,
                           keyboard_cond=None) -> None:
    """TypeError unless the forward's tensor arguments are tensors (the action conditions may be
    None). Reads no shape, so it can run first, before anything else looks at `x.shape`."""
    for name, tensor in (("x", x), ("t", t), ("visual_context", visual_context),
                         ("cond_concat", cond_concat)):
        _check_tensor(name, tensor)
    for name, tensor in (("mouse_cond", mouse_cond), ("keyboard_cond", keyboard_cond)):
        if tensor is not None:
            _check_tensor(name, tensor)


def non_finite(**tensors) -> list:
    """Names of the given tensors that hold a NaN or an infinity (None values are skipped). One
    host sync per tensor: for host-side paths (a runner checking a block's output), never for the
    streaming forward."""
    return [name for name, tensor in tensors.items()
            if tensor is not None and not bool(torch.isfinite(tensor).all())]


def _check_device(name, tensor, device):
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the model is on {device}; move it "
                         f"(or the model) so they agree")


def _check_dtype(name, tensor, dtype):
    _check_tensor(name, tensor)
    if tensor.dtype != dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but the model runs in {dtype}; "
                        f"cast the input (or the model) so they agree")


def _check_cache_list(name, caches, num_layers, keys, layers=None):
    """A list (or tuple) of at least `num_layers` dicts holding `keys`; `layers`: the indices that
    must hold a dict (default all; the action caches may hold None for layers without one)."""
    if not isinstance(caches, (list, tuple)):
        raise TypeError(f"{name} must be a list of {num_layers} dicts (one per layer), "
                        f"got {type(caches).__name__}")
    if len(caches) < num_layers:  # longer lists are fine: upstream's pipeline makes 30 entries
        raise ValueError(f"{name} has {len(caches)} entries but the model has {num_layers} layers")
    for i in range(num_layers) if layers is None else layers:
        if not isinstance(caches[i], dict):
            raise TypeError(f"{name}[{i}] must be a dict with the keys {list(keys)}, got "
                            f"{type(caches[i]).__name__}")
        missing = [k for k in keys if k not in caches[i]]
        if missing:
            raise ValueError(f"{name}[{i}] lacks the keys {missing} (expected {list(keys)})")


def _check_cache_tensor(name, tensor, shape_desc, expected, dtype, device=None):
    """expected: tuple with None where any size is allowed."""
    _check_dtype(name, tensor, dtype)
    if device is not None:
        _check_device(name, tensor, device)
    ok = tensor.ndim == len(expected) and all(
        e is None or s == e for s, e in zip(tensor.shape, expected))
    if not ok:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape_desc} = "
                         f"{tuple('*' if e is None else e for e in expected)}")


def check_positive_ints(owner: str, **values) -> None:
    """TypeError unless each value is an int (not a bool), ValueError unless it is at least 1; the
    message names `owner` and the keyword (constructor and config checks)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{owner}: {name} must be at least 1, got {value}")


def check_stream_request(batch, latent_size, patch_size) -> None:
    """`start_stream(batch, latent_size)`: a positive int batch and a (height, width) pair of
    positive ints that the patch size divides."""
    if isinstance(batch, bool) or not isinstance(batch, int):
        raise TypeError(f"start_stream: batch must be an int, got {type(batch).__name__}")
    if batch < 1:
        raise ValueError(f"start_stream: batch must be at least 1, got {batch}")
    if (isinstance(latent_size, (str, bytes)) or not hasattr(latent_size, "__len__")
            or len(latent_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in latent_size)):
        raise TypeError(f"start_stream: latent_size must be (height, width) in latent pixels, "
                        f"got {latent_size!r}")
    _, ph, pw = patch_size
    h, w = latent_size
    if h < 1 or w < 1 or h % ph or w % pw:
        raise ValueError(f"start_stream: latent_size {tuple(latent_size)} must be positive and "
                         f"divisible by the patch size ({ph}, {pw})")


def per_frame_timesteps(model, x, t):
    """t as [B, frames]: a [B, 1] t (upstream's video-extension path passes one) is broadcast over
    the call's frames, as upstream's modulation broadcasts it."""
    frames = x.shape[2] // model.patch_size[0]
    return t.expand(t.shape[0], frames) if t.shape[1] != frames else t


def check_stream_position(name, written, start, length, unit):
    """A block either advances the stream (start == end so far) or repeats the latest block."""
    if start == written or start + length == written:
        return
    raise ValueError(
        f"{name}: this call covers {unit} [{start}, {start + length}) but the cache holds the stream "
        f"up to {unit} {written}; a call must start at {written} (next block) or repeat the latest "
        f"block. Going backwards or skipping needs a fresh (reset) cache.")


def _written(cache) -> int:
    return int(cache["global_end_index"].reshape(-1)[0].item())


def _check_action_condition(name, cond, batch, steps, width, dtype, last_frame, ratio):
    _check_dtype(name, cond, dtype)
    if cond.ndim != 3 or cond.shape[0] != batch or cond.shape[2] != width:
        raise ValueError(f"{name} has shape {tuple(cond.shape)}, expected [{batch}, steps, {width}]")
    if cond.shape[1] != steps:
        raise ValueError(f"{name} has {cond.shape[1]} steps; up to latent frame {last_frame} it must "
                         f"hold the whole history: 1 + {ratio} * {last_frame} = {steps} steps")


def check_forward_inputs(model, x, t, visual_context, cond_concat, mouse_cond, keyboard_cond,
                         kv_cache, kv_cache_mouse, kv_cache_keyboard, crossattn_cache,
                         current_start, read_cache_position: bool = True, streaming=None,
                         check_caches: bool = True, check_cross=None):
    """Raise on any problem. `read_cache_position` checks `current_start` against the caches'
    `global_end_index` (a host sync); the optimized model tracks the position itself instead.
    `streaming` defaults to "kv_cache was given"; the optimized model's own cache streams without.
    `check_caches=False` skips the per-layer cache checks (the optimized model runs them once per
    cache storage and call shape: ~120 tensors, a visible share of a 20 ms forward);
    `check_cross` (default: as `check_caches`) the same for `crossattn_cache` alone (the optimized
    model checks it again whenever what its dicts hold changed).
    Nothing here reads a tensor's values (no host sync but `read_cache_position`'s): NaN/inf
    are not checked (see the module's docstring)."""
    check_tensor_arguments(x, t, visual_context, cond_concat, mouse_cond, keyboard_cond)
    dtype = model_dtype(model)
    device = model.patch_embedding.weight.device
    for name, tensor in (("x", x), ("cond_concat", cond_concat), ("visual_context", visual_context)):
        _check_dtype(name, tensor, dtype)
    for name, tensor in (("x", x), ("t", t), ("cond_concat", cond_concat),
                         ("visual_context", visual_context), ("mouse_cond", mouse_cond),
                         ("keyboard_cond", keyboard_cond)):
        if tensor is not None:
            _check_device(name, tensor, device)
    if x.ndim != 5 or cond_concat.ndim != 5:
        raise ValueError(f"x and cond_concat must be [B, C, F, H, W], got {tuple(x.shape)} and "
                         f"{tuple(cond_concat.shape)}")
    if x.shape[0] != cond_concat.shape[0] or x.shape[2:] != cond_concat.shape[2:]:
        raise ValueError(f"x {tuple(x.shape)} and cond_concat {tuple(cond_concat.shape)} must agree "
                         f"in batch, frames and latent size")
    if x.shape[1] + cond_concat.shape[1] != model.in_dim:
        raise ValueError(f"x has {x.shape[1]} channels and cond_concat {cond_concat.shape[1]}; "
                         f"together they must make the model's in_dim {model.in_dim}")
    if 0 in (x.shape[0], x.shape[2], x.shape[3], x.shape[4]):
        raise ValueError(f"x {tuple(x.shape)} is empty: batch, frames, height and width must each "
                         f"be at least 1")
    batch = x.shape[0]
    pt, ph, pw = model.patch_size
    if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
        raise ValueError(f"latent size {tuple(x.shape[2:])} (F, H, W) is not divisible by the patch "
                         f"size {tuple(model.patch_size)}")
    frames, tokens_per_frame = x.shape[2] // pt, frame_tokens(x.shape[3], x.shape[4], model.patch_size)
    if tuple(t.shape) not in ((batch, frames), (batch, 1)):
        raise ValueError(f"t must be a tensor of shape [batch, frames] = [{batch}, {frames}] (or "
                         f"[{batch}, 1]: one timestep for every frame), got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"t has dtype {t.dtype}: timesteps are real numbers (a float dtype, or an "
                        f"integer one as upstream's pipeline may pass)")
    clip_dim = model.img_emb.proj[0].normalized_shape[0]
    if visual_context.ndim != 3 or visual_context.shape[0] != batch or visual_context.shape[2] != clip_dim:
        raise ValueError(f"visual_context has shape {tuple(visual_context.shape)}, expected "
                         f"[{batch}, tokens, {clip_dim}]")
    if visual_context.shape[1] < 1:
        raise ValueError("visual_context holds no tokens: cross-attention needs at least one "
                         "(the CLIP image encoder gives 257)")
    per_block = getattr(model, "num_frame_per_block", 1)
    if isinstance(per_block, bool) or not isinstance(per_block, int) or per_block < 1:
        raise ValueError(f"model.num_frame_per_block must be a positive int (the pipeline sets 3), "
                         f"got {per_block!r}")

    streaming = kv_cache is not None if streaming is None else streaming
    if streaming:
        if not isinstance(current_start, int) or isinstance(current_start, bool):
            raise TypeError(f"current_start must be a non-negative int (a token index), got "
                            f"{type(current_start).__name__} {current_start!r}")
        if current_start < 0:
            raise ValueError(f"current_start must be a non-negative int, got {current_start!r}")
        if current_start % tokens_per_frame:
            raise ValueError(f"current_start {current_start} is not a multiple of the "
                             f"{tokens_per_frame} tokens of one latent frame (latent size "
                             f"{tuple(x.shape[3:])}: is it the one the stream started with?)")
    start_frame = current_start // tokens_per_frame if streaming else 0
    # the caches first: a cache made for another latent size explains other mismatches
    check_cross = check_caches if check_cross is None else check_cross
    if kv_cache is not None and check_caches:
        _check_caches(model, batch, frames, tokens_per_frame, start_frame, kv_cache, kv_cache_mouse,
                      kv_cache_keyboard, dtype, read_cache_position, device)
    if kv_cache is not None and check_cross and crossattn_cache is not None:
        _check_cross_caches(model, batch, crossattn_cache, dtype, device)
    _check_actions(model, batch, frames, start_frame, mouse_cond, keyboard_cond, dtype)


def check_warm_up_inputs(model, visual_context, cond_concat, mouse_cond=None, keyboard_cond=None,
                         stream=None) -> None:
    """`warm_up(visual_context, cond_concat, mouse_cond, keyboard_cond)`'s arguments checked as its
    first block's call will check them, before anything runs or the stream is rewound: the
    forward's errors, named as the forward names them. The action conditions' length is free
    (warm_up reads only their width); an action branch the model has needs its condition. With
    `stream` (an owned stream), the batch and latent size must be the ones it was started for."""
    _check_tensor("visual_context", visual_context)
    _check_dtype("cond_concat", cond_concat, model_dtype(model))  # x is made from it
    _check_device("cond_concat", cond_concat, model.patch_embedding.weight.device)
    if cond_concat.ndim != 5:
        raise ValueError(f"warm_up: cond_concat must be one block's [B, C, F, H, W], got "
                         f"{tuple(cond_concat.shape)}")
    batch, _, frames, h, w = cond_concat.shape
    zero = cond_concat.new_zeros(())
    x = zero.expand(batch, model.out_dim, frames, h, w)  # what warm_up feeds (no memory here)
    t = zero.expand(batch, frames)
    action = first_action_module(model)
    steps = history_steps(max(frames // model.patch_size[0], 1) - 1,
                          action.vae_time_compression_ratio if action is not None else 4)
    conditions = {}
    for name, cond, on in (("mouse_cond", mouse_cond, action is not None and action.enable_mouse),
                           ("keyboard_cond", keyboard_cond,
                            action is not None and action.enable_keyboard)):
        if not on:
            continue
        if cond is None:
            raise ValueError(f"warm_up: the model has {name.split('_')[0]} actions: pass {name} "
                             f"(any length: only its width is used)")
        _check_tensor(name, cond)
        conditions[name] = (cond.new_zeros(()).expand(batch, steps, cond.shape[-1])
                            if cond.ndim == 3 else cond)
    check_forward_inputs(model, x, t, visual_context, cond_concat, conditions.get("mouse_cond"),
                         conditions.get("keyboard_cond"), None, None, None, None, 0,
                         read_cache_position=False, streaming=True, check_caches=False)
    if stream is not None:
        tokens = frame_tokens(h, w, model.patch_size)
        started = stream.self_k[0].shape[0]
        if started != batch or stream.tokens_per_frame != tokens:
            raise ValueError(f"warm_up: the stream was started for batch {started} and "
                             f"{stream.tokens_per_frame} tokens per frame; cond_concat gives batch "
                             f"{batch} and {tokens}")


def _check_actions(model, batch, frames, start_frame, mouse_cond, keyboard_cond, dtype):
    action = first_action_module(model)
    if action is None:
        if mouse_cond is not None or keyboard_cond is not None:
            raise ValueError("this model has no action module; pass mouse_cond=None and "
                             "keyboard_cond=None")
        return
    ratio = action.vae_time_compression_ratio
    last_frame = start_frame + frames - 1
    steps = history_steps(last_frame, ratio)
    window_steps = ratio * action.windows_size
    if action.enable_mouse:
        if mouse_cond is None:
            raise ValueError("this model has a mouse branch: mouse_cond is required")
        mouse_width = (action.mouse_mlp[0].in_features - action.proj_mouse.out_features) // window_steps
        _check_action_condition("mouse_cond", mouse_cond, batch, steps, mouse_width, dtype,
                                 last_frame, ratio)
    elif mouse_cond is not None:
        raise ValueError("this model has no mouse branch (enable_mouse is false); pass mouse_cond=None")
    if action.enable_keyboard:
        if keyboard_cond is None:
            raise ValueError("this model has a keyboard branch: keyboard_cond is required")
        _check_action_condition("keyboard_cond", keyboard_cond, batch, steps,
                                action.keyboard_embed[0].in_features, dtype, last_frame, ratio)
    elif keyboard_cond is not None:
        raise ValueError("this model has no keyboard branch; pass keyboard_cond=None")


def _check_index(name, value):
    """An index entry of a cache dict: a tensor holding one integer, as upstream allocates it
    (`torch.tensor([0])`); upstream (and the reference) read it with `.item()` and fill it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor holding one integer (upstream allocates "
                        f"torch.tensor([0], dtype=torch.long)), got {type(value).__name__} "
                        f"{value!r}")
    if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool \
            or value.is_complex():
        raise ValueError(f"{name} must hold one integer (torch.tensor([0], dtype=torch.long)), "
                         f"got a {value.dtype} tensor of shape {tuple(value.shape)}")


def _check_kv_pair(name, cache):
    """k and v of one cache dict must have the same shape (each was checked on its own)."""
    if cache["k"].shape != cache["v"].shape:
        raise ValueError(f"{name}: 'k' {tuple(cache['k'].shape)} and 'v' "
                         f"{tuple(cache['v'].shape)} must have the same shape (the same number "
                         f"of entries: they are written and read together)")


def _check_caches(model, batch, frames, tokens_per_frame, start_frame, kv_cache, kv_cache_mouse,
                  kv_cache_keyboard, dtype, read_position, device=None):
    layers = model.num_layers
    heads, head_dim = model.num_heads, model.dim // model.num_heads
    sink_frames = model.blocks[0].self_attn.sink_size
    _check_cache_list("kv_cache", kv_cache, layers, SELF_CACHE_KEYS)
    for i, cache in enumerate(kv_cache[:layers]):
        for key in ("k", "v"):
            _check_cache_tensor(f"kv_cache[{i}]['{key}']", cache[key], "[B, tokens, heads, head_dim]",
                                (batch, None, heads, head_dim), dtype, device)
        _check_kv_pair(f"kv_cache[{i}]", cache)
        for key in ("global_end_index", "local_end_index"):
            _check_index(f"kv_cache[{i}]['{key}']", cache[key])
    capacity = kv_cache[0]["k"].shape[1]
    if capacity % tokens_per_frame or capacity < (sink_frames + frames) * tokens_per_frame:
        raise ValueError(
            f"kv_cache holds {capacity} tokens: it must be a whole number of {tokens_per_frame}-token "
            f"frames and fit the {sink_frames} sink frame(s) plus this call's {frames} frames "
            f"(is the latent size the one the cache was made for?)")
    if read_position:
        check_stream_position("kv_cache", _written(kv_cache[0]), start_frame * tokens_per_frame,
                              frames * tokens_per_frame, "tokens")

    action = first_action_module(model)
    if action is None:
        return
    a_heads = action.heads_num
    for name, caches, enabled, rows in (
            ("kv_cache_mouse", kv_cache_mouse, action.enable_mouse, batch * tokens_per_frame),
            ("kv_cache_keyboard", kv_cache_keyboard, action.enable_keyboard, batch)):
        if not enabled:
            continue
        if caches is None:
            raise ValueError(f"{name} is required for streaming with this model's action modules")
        action_layers = [i for i, b in enumerate(model.blocks) if b.action_model is not None]
        _check_cache_list(name, caches, layers, SELF_CACHE_KEYS, action_layers)
        for i, block in enumerate(model.blocks):
            if block.action_model is None:
                continue
            for key in ("k", "v"):
                _check_cache_tensor(f"{name}[{i}]['{key}']", caches[i][key],
                                    "[rows, frames, heads, head_dim]", (rows, None, a_heads, None), dtype,
                                    device)
            _check_kv_pair(f"{name}[{i}]", caches[i])
            for key in ("global_end_index", "local_end_index"):
                _check_index(f"{name}[{i}]['{key}']", caches[i][key])
            if caches[i]["k"].shape[1] < frames:
                raise ValueError(f"{name}[{i}] holds {caches[i]['k'].shape[1]} frames, fewer than "
                                 f"this call's {frames}")
        if read_position:
            first = next(i for i, b in enumerate(model.blocks) if b.action_model is not None)
            check_stream_position(f"{name}[{first}]", _written(caches[first]), start_frame, frames,
                                  "frames")


def _check_cross_caches(model, batch, crossattn_cache, dtype, device=None):
    """The cross-attention dicts: a flag `is_init` (True or False) each, and where it is True,
    k and v that fit (they are read as they are)."""
    layers = model.num_layers
    heads, head_dim = model.num_heads, model.dim // model.num_heads
    _check_cache_list("crossattn_cache", crossattn_cache, layers, CROSS_CACHE_KEYS)
    for i, cache in enumerate(crossattn_cache[:layers]):
        if not isinstance(cache["is_init"], bool):
            raise TypeError(f"crossattn_cache[{i}]['is_init'] must be True or False, got "
                            f"{type(cache['is_init']).__name__} {cache['is_init']!r}")
        if not cache["is_init"]:  # its k/v are (re)computed by this call
            continue
        for key in ("k", "v"):  # reused as they are: they must fit
            _check_cache_tensor(f"crossattn_cache[{i}]['{key}']", cache[key],
                                "[B, context tokens, heads, head_dim]",
                                (batch, None, heads, head_dim), dtype, device)
        _check_kv_pair(f"crossattn_cache[{i}]", cache)
