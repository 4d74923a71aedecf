"""Plain scaled-dot-product attention for the reference model (any device, any float dtype)."""
from typing import Optional

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention in the layout upstream uses for flash-attn.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; `allowed`: optional boolean [Lq, Lk] (True = may attend).
    Returns [B, Lq, H, D]. The scale is 1/sqrt(D).
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed)
    return out.transpose(1, 2)


def block_causal_mask(num_frames: int, tokens_per_frame: int, frames_per_block: int,
                      window_frames: int, device=None) -> torch.Tensor:
    """Boolean [L, L] mask (L = frames * tokens_per_frame) of the cache-free, training-path forward.

    A query may see every key before the end of its own block of `frames_per_block` frames, limited
    to the last `window_frames` frames before that end (-1: no limit), and always itself.
    """
    total = num_frames * tokens_per_frame
    idx = torch.arange(total, device=device)
    block_tokens = frames_per_block * tokens_per_frame
    block_end = (idx // block_tokens + 1) * block_tokens
    q_end = block_end[:, None]
    kv = idx[None, :]
    allowed = kv < q_end
    if window_frames != -1:
        allowed &= kv >= q_end - window_frames * tokens_per_frame
    return allowed | (idx[:, None] == kv)
