"""How much memory a served model and its players take, before anything is allocated, and whether
it fits: the DiT's weights (`model_bytes`), one stream's caches (`stream_bytes`), the decoder's
weights and one stream's decoder history (`decoder_weight_bytes`, `decoder_history_bytes`), what a
device still has (`available_memory`), and `check_memory`, which raises NotEnoughMemory (a
ValueError: the command lines turn it into their one-line refusal) with the estimate when they do
not fit. The estimates are rough by design: a refusal before minutes of building, not an
allocator."""
import os
from typing import Dict, Optional

import torch

GIB = 2 ** 30


class NotEnoughMemory(ValueError):
    """The sizes asked for do not fit the device (or the machine's RAM); the message holds the
    estimate."""


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: free GPU memory, or on a CPU the RAM the
    kernel says is available (MemAvailable; else free pages)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def gib(n: float) -> str:
    """Bytes as a short text: '1.5 GiB', '12 MiB'."""
    if n >= 1000 * GIB:
        return f"{n / GIB:,.0f} GiB"
    return f"{n / GIB:.3g} GiB" if n >= GIB / 100 else f"{n / 2 ** 20:.3g} MiB"


def check_memory(parts: Dict[str, float], device: torch.device, what: str,
                 host_parts: Optional[Dict[str, float]] = None):
    """NotEnoughMemory, naming the estimate, when `parts` (bytes on `device`) do not fit in what
    `device` has free, or `host_parts` (bytes in the machine's RAM) do not fit in its RAM. On a
    CPU both count against the RAM."""
    host_parts = dict(host_parts or {})
    if device.type == "cpu":
        parts, host_parts = {**parts, **{f"{k} (host)": v for k, v in host_parts.items()}}, {}
    for where, items in ((str(device), parts), ("host RAM", host_parts)):
        if not items:
            continue
        need = sum(items.values())
        free = available_memory(device if where == str(device) else torch.device("cpu"))
        if need > free:
            shown = ", ".join(f"{k} {gib(v)}" for k, v in items.items() if v)
            place = "RAM available" if where in ("cpu", "host RAM") else "free"
            raise NotEnoughMemory(f"{what} needs about {gib(need)} ({shown}) but {where} has "
                                  f"{gib(free)} {place}: ask for less")


def model_bytes(config: dict, dtype: torch.dtype) -> int:
    """The DiT's weights in `dtype`, from its config (built on the meta device: nothing is
    allocated)."""
    from ..modules.causal_model import CausalWanModel
    with torch.device("meta"):
        model = CausalWanModel.from_config(config)
    return sum(p.numel() for p in model.parameters()) * _itemsize(dtype)


def stream_bytes(config: dict, latent_hw, dtype: torch.dtype) -> int:
    """One stream's DiT cache dicts (upstream's layout, what StreamingBlockRunner allocates),
    from the config: self-attention k/v over the attention window, cross-attention k/v over the
    257 image tokens, the action modules' k/v."""
    from ..modules.shared.conditioning import attention_window_frames, frame_tokens
    dim, layers = config["dim"], config["num_layers"]
    patch = config.get("patch_size", (1, 2, 2))
    tokens = frame_tokens(latent_hw[0], latent_hw[1], patch)
    window = attention_window_frames(config.get("local_attn_size", -1))
    elements = layers * 2 * (window * tokens + 257) * dim
    action = config.get("action_config") or {}
    if action:  # upstream allocates them for every layer, with an action module or not
        if action.get("enable_mouse"):
            elements += layers * 2 * tokens * window * action.get("mouse_hidden_dim", 1024)
        if action.get("enable_keyboard"):
            elements += layers * 2 * window * action.get("keyboard_hidden_dim", 1024)
    return elements * _itemsize(dtype)


# elements of the decoder's history per latent pixel, per unit of its width (96: upstream's):
# measured, 151,328 elements per latent pixel at width 96 (1.0 GiB at 44 x 80 in fp16)
DECODER_HISTORY_PER_PIXEL_PER_DIM = 151_328 / 96


def decoder_history_bytes(latent_hw, dtype: torch.dtype, dim: int = 96) -> int:
    """One stream's decoder history (the 32 cache entries it carries between blocks)."""
    return int(DECODER_HISTORY_PER_PIXEL_PER_DIM * dim * latent_hw[0] * latent_hw[1]
               * _itemsize(dtype))


def decoder_weight_bytes(dtype: torch.dtype, dim: int = 96) -> int:
    """The decoder's weights (73.3e6 parameters at upstream's width 96; ~quadratic in it)."""
    return int(73_295_603 * (dim / 96) ** 2 * _itemsize(dtype))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
