"""The reference CausalWanModel of Matrix-Game-2: eager PyTorch, CPU-capable, numerically faithful.

This is the oracle every optimisation is tested against, so it favours clarity over speed. Its
interface matches upstream: constructor keywords, config files, state-dict names, the upstream cache
dicts and the forward keywords.

Shapes (universal config): x [B, 16, F, 44, 80] and cond_concat [B, 20, F, 44, 80] are patchified
(1, 2, 2) into F * 880 tokens of width 1536; t is [B, F]; visual_context [B, 257, 1280] is the CLIP
image context; mouse_cond [B, steps, 2] / keyboard_cond [B, steps, k] hold the action history.

Two forwards:
* streaming (`kv_cache` given): this block's frames start at token `current_start`; self-attention
  reads the rolling cache of earlier frames, and every call writes this block into the caches.
* cache-free (no `kv_cache`): all frames at once under a block-causal mask (the training path).
"""
import inspect
import json
import math
import os
from collections.abc import Mapping
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .shared.conditioning import attention_window_frames
from .action_module import ActionModule, cached_window
from .attention import attention, block_causal_mask
from .checkpoint import load_safetensors_checkpoint
from .shared.input_checks import check_forward_inputs, check_positive_ints, per_frame_timesteps
from .layers import (AttentionProjections, MLPProj, WAN_CROSSATTENTION_CLASSES, WanLayerNorm,
                     sinusoidal_embedding_1d)
from ..runtime.options import parse_switch
from .rope import rope_apply_3d, rope_rotations_3d, self_attention_rope_table

# config.json keys that upstream writes but its constructor does not take
IGNORED_CONFIG_KEYS = {"inject_sample_info"}
# the on/off keys of action_config (parsed as every switch is: "false" is False)
ACTION_SWITCHES = ("enable_mouse", "enable_keyboard", "qk_norm", "qkv_bias")
# width of the CLIP image tokens that `img_emb` projects
CLIP_DIM = 1280


def _constructor_keywords(cls) -> set:
    """Keyword names a class's constructor takes, following **kwargs up to the base classes."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__:
            continue
        params = inspect.signature(klass.__dict__["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names - {"self"}


def _check_config(owner, patch_size, in_dim, dim, ffn_dim, freq_dim, out_dim, num_heads, num_layers,
                  local_attn_size, sink_size, eps, action_config) -> dict:
    """The constructor's sizes, each a clear error naming the keyword (a config.json typo would
    otherwise build a model that fails deep inside its first forward, or silently differs).
    Returns the action config as a dict."""
    check_positive_ints(owner, in_dim=in_dim, dim=dim, ffn_dim=ffn_dim, freq_dim=freq_dim,
                        out_dim=out_dim, num_heads=num_heads, num_layers=num_layers)
    if dim % num_heads or (dim // num_heads) % 2:
        raise ValueError(f"{owner}: dim {dim} / num_heads {num_heads} must give an even head size")
    if freq_dim % 2:
        raise ValueError(f"{owner}: freq_dim must be even (cosines and sines), got {freq_dim}")
    if isinstance(patch_size, (str, bytes)) or not hasattr(patch_size, "__len__") \
            or len(patch_size) != 3:
        raise TypeError(f"{owner}: patch_size must be (frames, height, width), got {patch_size!r}")
    check_positive_ints(owner, **{f"patch_size[{i}]": p for i, p in enumerate(patch_size)})
    if isinstance(local_attn_size, bool) or not isinstance(local_attn_size, int):
        raise TypeError(f"{owner}: local_attn_size must be an int, got {local_attn_size!r}")
    if local_attn_size != -1 and local_attn_size < 1:
        raise ValueError(f"{owner}: local_attn_size must be -1 (global attention) or at least 1 "
                         f"frame, got {local_attn_size}")
    if isinstance(sink_size, bool) or not isinstance(sink_size, int):
        raise TypeError(f"{owner}: sink_size must be an int, got {sink_size!r}")
    if sink_size < 0:
        raise ValueError(f"{owner}: sink_size must be at least 0, got {sink_size}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{owner}: eps must be a number, got {type(eps).__name__} {eps!r}")
    if not 0 <= eps < 1:
        raise ValueError(f"{owner}: eps must be a small non-negative number, got {eps!r}")
    if action_config is not None and not isinstance(action_config, dict):
        raise TypeError(f"{owner}: action_config must be a dict, got {type(action_config).__name__}")
    action_config = dict(action_config or {})
    for key in ACTION_SWITCHES:
        if key in action_config:
            action_config[key] = parse_switch(action_config[key], f"{owner}: action_config[{key!r}]")
    if action_config:
        blocks = action_config.get("blocks")
        if (not isinstance(blocks, (list, tuple))
                or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)):
            raise ValueError(f"{owner}: action_config['blocks'] must list the layers (ints) that "
                             f"get an action module, got {blocks!r}")
        outside = [b for b in blocks if not 0 <= b < num_layers]
        if outside:
            raise ValueError(f"{owner}: action_config['blocks'] names layers {outside}, but the "
                             f"model has layers 0..{num_layers - 1}")
        width = action_config.get("img_hidden_size", dim)
        if width != dim:
            raise ValueError(f"{owner}: action_config['img_hidden_size'] {width!r} must equal dim "
                             f"{dim} (the action modules work on the blocks' tokens)")
    return action_config


def _detach_entries(crossattn_cache: dict):
    """The cross-attention dict's k/v without autograd history (the values unchanged)."""
    for key in ("k", "v"):
        value = crossattn_cache.get(key)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            crossattn_cache[key] = value.detach()


class CausalWanSelfAttention(AttentionProjections):

    def __init__(self, dim: int, num_heads: int, local_attn_size: int = -1, sink_size: int = 0,
                 qk_norm: bool = True, eps: float = 1e-6):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size

    @property
    def window_frames(self) -> int:
        return attention_window_frames(self.local_attn_size)

    def forward(self, x, grid_sizes, allowed=None, kv_cache=None, current_start: int = 0):
        """x [B, L, C] -> [B, L, C]. `allowed`: the block-causal mask of the cache-free path."""
        b, s = x.shape[:2]
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        tokens_per_frame = grid_sizes[1] * grid_sizes[2]
        start_frame = current_start // tokens_per_frame if kv_cache is not None else 0
        rotations = rope_rotations_3d(grid_sizes, start_frame, d, device=x.device)
        q, k = rope_apply_3d(q, rotations), rope_apply_3d(k, rotations)
        if kv_cache is None:
            out = attention(q, k, v, allowed)
        else:
            k, v = cached_window(kv_cache, k, v, current_start,
                                 sink=self.sink_size * tokens_per_frame,
                                 window=self.window_frames * tokens_per_frame)
            out = attention(q, k, v)
        return self.o(out.flatten(2))


class CausalWanAttentionBlock(nn.Module):
    """Self-attention, cross-attention to the image, optional action module, FFN; adaLN-modulated."""

    def __init__(self, cross_attn_type: str, dim: int, ffn_dim: int, num_heads: int,
                 local_attn_size: int = -1, sink_size: int = 0, qk_norm: bool = True,
                 cross_attn_norm: bool = False, action_config: Optional[dict] = None,
                 block_idx: int = 0, eps: float = 1e-6):
        super().__init__()
        action_config = action_config or {}
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.num_heads = num_heads
        self.local_attn_size = local_attn_size
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps
        if action_config and block_idx in action_config["blocks"]:
            self.action_model = ActionModule(**action_config, local_attn_size=local_attn_size)
        else:
            self.action_model = None
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = CausalWanSelfAttention(dim, num_heads, local_attn_size, sink_size,
                                                qk_norm, eps)
        self.norm3 = (WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm
                      else nn.Identity())
        self.cross_attn = WAN_CROSSATTENTION_CLASSES[cross_attn_type](dim, num_heads, (-1, -1),
                                                                      qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e, grid_sizes, context, allowed=None, mouse_cond=None,
                keyboard_cond=None, kv_cache=None, kv_cache_mouse=None, kv_cache_keyboard=None,
                crossattn_cache=None, current_start: int = 0, num_frame_per_block: int = 1):
        """x [B, F*S, C]; e [B, F, 6, C] (per-frame time modulation)."""
        num_frames, frame_tokens = e.shape[1], x.shape[1] // e.shape[1]
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = \
            (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)

        def per_frame(t):  # [B, F*S, C] <-> [B, F, S, C] so [B, F, 1, C] factors broadcast
            return t.unflatten(1, (num_frames, frame_tokens))

        y = self.self_attn((per_frame(self.norm1(x)) * (1 + scale_msa) + shift_msa).flatten(1, 2),
                           grid_sizes, allowed, kv_cache, current_start)
        x = x + (per_frame(y) * gate_msa).flatten(1, 2)

        x = x + self.cross_attn(self.norm3(x.to(context.dtype)), context, crossattn_cache)
        if crossattn_cache is not None:  # the dict keeps values, never an autograd graph
            _detach_entries(crossattn_cache)
        if self.action_model is not None:
            start_frame = current_start // (grid_sizes[1] * grid_sizes[2])
            x = self.action_model(x.to(context.dtype), *grid_sizes, mouse_cond, keyboard_cond,
                                  kv_cache_mouse, kv_cache_keyboard, start_frame,
                                  num_frame_per_block)

        y = self.ffn((per_frame(self.norm2(x)) * (1 + scale_ffn) + shift_ffn).flatten(1, 2))
        return x + (per_frame(y) * gate_ffn).flatten(1, 2)


class CausalHead(nn.Module):

    def __init__(self, dim: int, out_dim: int, patch_size, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim
        self.patch_size = patch_size
        self.eps = eps
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e):
        """x [B, F*S, C]; e [B, F, 1, C] -> [B, F, S, prod(patch) * out_dim]."""
        num_frames = e.shape[1]
        shift, scale = (self.modulation.unsqueeze(1) + e).chunk(2, dim=2)
        normed = self.norm(x).unflatten(1, (num_frames, x.shape[1] // num_frames))
        return self.head(normed * (1 + scale) + shift)


class CausalWanModel(nn.Module):
    """Matrix-Game-2's causal Wan backbone (image-to-video with action modules)."""

    def __init__(self, model_type: str = "i2v", patch_size=(1, 2, 2), text_len: int = 512,
                 in_dim: int = 36, dim: int = 1536, ffn_dim: int = 8960, freq_dim: int = 256,
                 text_dim: int = 4096, out_dim: int = 16, num_heads: int = 12, num_layers: int = 30,
                 local_attn_size: int = -1, sink_size: int = 0, qk_norm: bool = True,
                 cross_attn_norm: bool = True, action_config: Optional[dict] = None,
                 eps: float = 1e-6):
        super().__init__()
        # upstream's default is 't2v', which its own constructor rejects: only 'i2v' exists
        if model_type != "i2v":
            raise ValueError(f"model_type {model_type!r} is not supported: Matrix-Game-2 is 'i2v'")
        action_config = _check_config(type(self).__name__, patch_size, in_dim, dim, ffn_dim, freq_dim, out_dim,
                                      num_heads, num_layers, local_attn_size, sink_size, eps,
                                      action_config)
        # on/off keys: a config.json may carry "false", which bool() would read as True
        qk_norm = parse_switch(qk_norm, f"{type(self).__name__}: qk_norm")
        cross_attn_norm = parse_switch(cross_attn_norm, f"{type(self).__name__}: cross_attn_norm")
        self.model_type = model_type
        self.use_action_module = len(action_config) > 0
        self.patch_size = tuple(patch_size)
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.freq_dim = freq_dim
        self.text_dim = text_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.action_config = action_config
        self.eps = eps

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size,
                                         stride=self.patch_size)
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([
            CausalWanAttentionBlock("i2v_cross_attn", dim, ffn_dim, num_heads, local_attn_size,
                                    sink_size, qk_norm, cross_attn_norm, action_config=action_config,
                                    block_idx=i, eps=eps)
            for i in range(num_layers)])
        self.head = CausalHead(dim, out_dim, self.patch_size, eps)
        self.img_emb = MLPProj(CLIP_DIM, dim)
        # upstream's complex128 RoPE table of 1024 frames (a plain attribute, not a buffer, so
        # .to(dtype) leaves it alone); kept for code that reads it: the forward computes the angles
        # of any position instead (wan/modules/shared/rope_tables.py)
        self.freqs = self_attention_rope_table(dim // num_heads)
        self.init_weights()
        self.gradient_checkpointing = False
        # the pipeline sets this (3 for Matrix-Game-2); upstream's constructor sets 1
        self.num_frame_per_block = 1

    # ----------------------------------------------------------------- construction and loading
    @classmethod
    def from_config(cls, config, **overrides) -> "CausalWanModel":
        """Build from a config dir (holding config.json), a config.json path, or a dict."""
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"model config not found: {path}")
            with open(path) as f:
                try:
                    config = json.load(f)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise ValueError(f"model config {path} is not valid JSON: {err}") from None
            if not isinstance(config, dict):
                raise ValueError(f"model config {path} holds a JSON {type(config).__name__}, "
                                 f"not an object of constructor keywords")
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a config dir, a config.json path or a dict, got "
                            f"{type(config).__name__}")
        kwargs = {k: v for k, v in dict(config).items()
                  if not k.startswith("_") and k not in IGNORED_CONFIG_KEYS}
        kwargs.update(overrides)
        accepted = _constructor_keywords(cls)
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(f"unknown config keys for {cls.__name__}: {unknown}")
        return cls(**kwargs)

    def load_checkpoint(self, path, strict: bool = True):
        """Load a .safetensors file or a directory of them (a `model.` key prefix is stripped)."""
        return load_safetensors_checkpoint(self, path, strict=strict)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def init_weights(self):
        """Xavier-uniform linears with zero bias, small time-embedding weights, zero output head and
        zero action projections (so an untrained model starts as the identity on actions)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in self.time_embedding.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        for block in self.blocks:
            action = block.action_model
            for name in ("proj_mouse", "proj_keyboard"):
                layer = getattr(action, name, None) if action is not None else None
                if layer is not None:
                    nn.init.zeros_(layer.weight)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)

    # ----------------------------------------------------------------------------- forward
    def forward(self, x, t, visual_context, cond_concat, mouse_cond=None, keyboard_cond=None,
                kv_cache: Optional[Sequence[dict]] = None, kv_cache_mouse=None,
                kv_cache_keyboard=None, crossattn_cache=None, current_start: int = 0,
                cache_start: int = 0):
        """Returns the prediction [B, out_dim, F, H, W]. Streaming when `kv_cache` is given.

        `cache_start` is accepted for upstream compatibility and, as upstream, not used.
        """
        check_forward_inputs(self, x, t, visual_context, cond_concat, mouse_cond, keyboard_cond,
                             kv_cache, kv_cache_mouse, kv_cache_keyboard, crossattn_cache,
                             current_start)
        t = per_frame_timesteps(self, x, t)
        if kv_cache is not None:
            return self._forward_inference(x, t, visual_context, cond_concat, mouse_cond,
                                           keyboard_cond, kv_cache, kv_cache_mouse,
                                           kv_cache_keyboard, crossattn_cache, current_start,
                                           cache_start)
        return self._forward_train(x, t, visual_context, cond_concat, mouse_cond, keyboard_cond)

    def _embed(self, x, t, visual_context, cond_concat):
        """Patchify and embed. Returns tokens [B, L, C], grid (f, h, w), the time embedding
        [B, F, 1, C] (for the head), its 6-way projection [B, F, 6, C] and the image context."""
        x = self.patch_embedding(torch.cat([x, cond_concat], dim=1))
        grid_sizes = tuple(x.shape[2:])
        tokens = x.flatten(2).transpose(1, 2)
        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t.flatten()).type_as(tokens))
        e0 = self.time_projection(e).unflatten(1, (6, self.dim)).unflatten(0, t.shape)
        e_head = e.unflatten(0, t.shape).unsqueeze(2)
        return tokens, grid_sizes, e_head, e0, self.img_emb(visual_context)

    def _finish(self, tokens, e_head, grid_sizes):
        return self.unpatchify(self.head(tokens, e_head), grid_sizes)

    def _forward_inference(self, x, t, visual_context, cond_concat, mouse_cond=None,
                           keyboard_cond=None, kv_cache=None, kv_cache_mouse=None,
                           kv_cache_keyboard=None, crossattn_cache=None, current_start: int = 0,
                           cache_start: int = 0):
        tokens, grid_sizes, e_head, e0, context = self._embed(x, t, visual_context, cond_concat)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, e0, grid_sizes, context, None, mouse_cond,
                           keyboard_cond, kv_cache[i],
                           kv_cache_mouse[i] if kv_cache_mouse is not None else None,
                           kv_cache_keyboard[i] if kv_cache_keyboard is not None else None,
                           crossattn_cache[i] if crossattn_cache is not None else None,
                           current_start, self.num_frame_per_block)
        return self._finish(tokens, e_head, grid_sizes)

    def _forward_train(self, x, t, visual_context, cond_concat, mouse_cond=None,
                       keyboard_cond=None):
        tokens, grid_sizes, e_head, e0, context = self._embed(x, t, visual_context, cond_concat)
        f, h, w = grid_sizes
        allowed = block_causal_mask(f, h * w, self.num_frame_per_block, self.local_attn_size,
                                    device=tokens.device)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = torch.utils.checkpoint.checkpoint(
                    block, tokens, e0, grid_sizes, context, allowed, mouse_cond,
                    keyboard_cond, num_frame_per_block=self.num_frame_per_block,
                    use_reentrant=False)
            else:
                tokens = block(tokens, e0, grid_sizes, context, allowed, mouse_cond,
                               keyboard_cond, num_frame_per_block=self.num_frame_per_block)
        return self._finish(tokens, e_head, grid_sizes)

    def unpatchify(self, x, grid_sizes):
        """[B, F, S, prod(patch) * C] (or [B, L, ...]) -> [B, C, F*pt, H*ph, W*pw]."""
        c = self.out_dim
        b = x.shape[0]
        x = x.reshape(b, *grid_sizes, *self.patch_size, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(b, c, *[g * p for g, p in zip(grid_sizes, self.patch_size)])
