"""The flash backend: attention through the fastest FlashAttention that imports, else torch SDPA
restricted to its cuDNN and flash kernels (cuDNN first: the fast path on Hopper)."""
import importlib
import importlib.util

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .eager import action_attention_over


def _first_flash_attention():
    """(label, func(q, k, v) on [B, L, H, D]) for FA3, FA2 or FA4, or None."""
    candidates = (("FA3 flash_attn_interface", "flash_attn_interface", "flash_attn_func"),
                  ("FA2 flash_attn", "flash_attn", "flash_attn_func"),
                  ("FA4 flash_attn.cute", "flash_attn.cute", "flash_attn_func"))
    for label, module, func in candidates:
        try:
            if importlib.util.find_spec(module.split(".")[0]) is None:
                continue
            return label, getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError):
            continue
    return None


_FLASH = _first_flash_attention()
IMPLEMENTATION = _FLASH[0] if _FLASH else "torch SDPA (cuDNN, flash)"
_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
               SDPBackend.EFFICIENT_ATTENTION]


def _sdpa(q, k, v):
    with sdpa_kernel(_SDPA_ORDER, set_priority=True):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q, k, v):
    """[B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D], no mask, scale 1/sqrt(D)."""
    if _FLASH is None:
        return _sdpa(q, k, v)
    out = _FLASH[1](q, k, v)
    return out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)


# the action module's ops: the eager norm, RoPE and cache store, then this backend's attention
_action_attention = action_attention_over(attention)
OPS = {"self_attention": attention, "cross_attention": attention,
       "mouse_attention": _action_attention, "keyboard_attention": _action_attention}
