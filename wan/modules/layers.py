"""Small building blocks of the Wan backbone: norms, time embedding, image projection, cross-attention.

Numerics follow Matrix-Game-2 exactly, including where it computes in another precision than the
input: `WanRMSNorm` normalises in float32 and the time embedding's sinusoid is built in float64.
"""
import torch
import torch.nn as nn

from .shared.conditioning import sinusoidal_embedding_1d  # noqa: F401 (upstream's name here)
from .attention import attention


class WanRMSNorm(nn.Module):
    """RMS norm over the last dim with a learned scale; the normalisation itself runs in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm (no affine by default) whose output keeps the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


class MLPProj(nn.Module):
    """Projects CLIP image tokens (1280 wide) into the model width: LN, Linear, GELU, Linear, LN."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
            nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(image_embeds)


class AttentionProjections(nn.Module):
    """The projections every Wan attention owns (state-dict names q, k, v, o, norm_q, norm_k):
    q/k/v/o linears of width `dim` and, with qk_norm, RMS norms of q and k over all heads."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_norm = qk_norm
        self.eps = eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()


class WanI2VCrossAttention(AttentionProjections):
    """Cross-attention from video tokens to the projected image context.

    With `crossattn_cache` (an upstream dict with keys `k`, `v`, `is_init`) the context keys/values
    are computed on the first call, stored in the dict, and reused while `is_init` is true.
    """

    def __init__(self, dim: int, num_heads: int, window_size=(-1, -1), qk_norm: bool = True,
                 eps: float = 1e-6):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.window_size = window_size

    def context_kv(self, context: torch.Tensor):
        b, n, d = context.shape[0], self.num_heads, self.head_dim
        k = self.norm_k(self.k(context)).view(b, -1, n, d)
        v = self.v(context).view(b, -1, n, d)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor, crossattn_cache=None) -> torch.Tensor:
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        if crossattn_cache is None:
            k, v = self.context_kv(context)
        elif not crossattn_cache["is_init"]:
            k, v = self.context_kv(context)
            crossattn_cache["k"], crossattn_cache["v"] = k, v
            crossattn_cache["is_init"] = True
        else:
            k, v = crossattn_cache["k"], crossattn_cache["v"]
        return self.o(attention(q, k, v).flatten(2))


WAN_CROSSATTENTION_CLASSES = {"i2v_cross_attn": WanI2VCrossAttention}
