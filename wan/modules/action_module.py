"""Matrix-Game-2's action module: injects mouse and keyboard input into the video tokens.

* mouse: every spatial token gets its own short sequence over frames. The token's features are
  concatenated with the window of raw mouse steps belonging to its frame, passed through an MLP, and
  attend over frames (temporal self-attention, `heads_num` heads, time-only RoPE).
* keyboard: the key steps of each frame's window are embedded and become the keys/values of a
  cross-attention from every image token (time-only RoPE on both sides).

Conditions hold the whole history: `1 + vae_time_compression_ratio * (last_frame)` steps. The window
of latent frame j is the `ratio * windows_size` steps before step `ratio * j`, with positions before
the first step reading the first step.
"""
from typing import Optional

import torch
import torch.nn as nn

from . import layers
from .shared.conditioning import (VAE_TIME_COMPRESSION, attention_window_frames, condition_steps,
                                   frame_windows)
from .shared.input_checks import check_positive_ints
from .attention import attention, block_causal_mask
from .rolling_cache import write_and_read_window
from .rope import ActionRope
from ..runtime.options import parse_switch


def cached_window(cache: dict, k, v, start: int, sink: int, window: int):
    """`write_and_read_window` whose cache writes never carry autograd history: a streaming
    forward outside `torch.no_grad()` would otherwise leave every block's graph (and the
    activations it holds) reachable from the caches, growing memory block after block. The
    values written are the same; the window returned still carries gradients to this call's own
    k and v (its newest entries), so the call's output differentiates as before."""
    tracked = k.requires_grad or v.requires_grad
    wk, wv = write_and_read_window(cache, k.detach(), v.detach(), start, sink, window)
    if not tracked:
        return wk, wv
    new, held = k.shape[1], wk.shape[1]
    if held <= new:  # the window holds only (the end of) this call's entries
        return k[:, new - held:], v[:, new - held:]
    return (torch.cat([wk[:, :held - new], k], dim=1),
            torch.cat([wv[:, :held - new], v], dim=1))


class WanRMSNorm(layers.WanRMSNorm):
    """The action module's RMS norm. It owns a `weight` (for checkpoint compatibility) that upstream
    never applies, and it normalises in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)


def _norm_or_identity(qk_norm: bool, dim: int) -> nn.Module:
    return WanRMSNorm(dim, eps=1e-6) if qk_norm else nn.Identity()


class ActionModule(nn.Module):

    def __init__(self, mouse_dim_in: int = 2, keyboard_dim_in: int = 6, hidden_size: int = 128,
                 img_hidden_size: int = 1536, keyboard_hidden_dim: int = 1024,
                 mouse_hidden_dim: int = 1024,
                 vae_time_compression_ratio: int = VAE_TIME_COMPRESSION,
                 windows_size: int = 3, heads_num: int = 16, patch_size=(1, 2, 2),
                 qk_norm: bool = True, qkv_bias: bool = False, rope_dim_list=(8, 28, 28),
                 rope_theta=256, mouse_qk_dim_list=(8, 28, 28), enable_mouse: bool = True,
                 enable_keyboard: bool = True, local_attn_size: int = 6, blocks=()):
        super().__init__()
        # on/off keys: a config may carry "false", which bool() would read as True
        enable_mouse = parse_switch(enable_mouse, "action_config['enable_mouse']")
        enable_keyboard = parse_switch(enable_keyboard, "action_config['enable_keyboard']")
        qk_norm = parse_switch(qk_norm, "action_config['qk_norm']")
        qkv_bias = parse_switch(qkv_bias, "action_config['qkv_bias']")
        sizes = dict(hidden_size=hidden_size, img_hidden_size=img_hidden_size, heads_num=heads_num,
                     vae_time_compression_ratio=vae_time_compression_ratio,
                     windows_size=windows_size)
        if enable_mouse:
            sizes.update(mouse_dim_in=mouse_dim_in, mouse_hidden_dim=mouse_hidden_dim)
        if enable_keyboard:
            sizes.update(keyboard_dim_in=keyboard_dim_in, keyboard_hidden_dim=keyboard_hidden_dim)
        check_positive_ints("action_config", **sizes)
        self.local_attn_size = local_attn_size
        self.enable_mouse = enable_mouse
        self.enable_keyboard = enable_keyboard
        self.rope_dim_list = list(rope_dim_list)
        self.rope_theta = rope_theta
        self.mouse_qk_dim_list = list(mouse_qk_dim_list)
        self.heads_num = heads_num
        self.vae_time_compression_ratio = vae_time_compression_ratio
        self.windows_size = windows_size
        self.patch_size = list(patch_size)
        steps_per_window = vae_time_compression_ratio * windows_size

        if enable_keyboard:
            self.keyboard_embed = nn.Sequential(
                nn.Linear(keyboard_dim_in, hidden_size), nn.SiLU(),
                nn.Linear(hidden_size, hidden_size))
        if enable_mouse:
            c = mouse_hidden_dim
            self.mouse_mlp = nn.Sequential(
                nn.Linear(mouse_dim_in * steps_per_window + img_hidden_size, c),
                nn.GELU(approximate="tanh"), nn.Linear(c, c), nn.LayerNorm(c))
            self.t_qkv = nn.Linear(c, c * 3, bias=qkv_bias)
            self.img_attn_q_norm = _norm_or_identity(qk_norm, c // heads_num)
            self.img_attn_k_norm = _norm_or_identity(qk_norm, c // heads_num)
            self.proj_mouse = nn.Linear(c, img_hidden_size, bias=qkv_bias)
        if enable_keyboard:
            self.key_attn_q_norm = _norm_or_identity(qk_norm, keyboard_hidden_dim // heads_num)
            self.key_attn_k_norm = _norm_or_identity(qk_norm, keyboard_hidden_dim // heads_num)
            self.mouse_attn_q = nn.Linear(img_hidden_size, keyboard_hidden_dim, bias=qkv_bias)
            self.keyboard_attn_kv = nn.Linear(hidden_size * steps_per_window,
                                              keyboard_hidden_dim * 2, bias=qkv_bias)
            self.proj_keyboard = nn.Linear(keyboard_hidden_dim, img_hidden_size, bias=qkv_bias)

        # upstream builds one table (from mouse_qk_dim_list) and uses it for mouse and keyboard
        self.rope = ActionRope(self.mouse_qk_dim_list, rope_theta)
        for name, width, on in (("mouse_hidden_dim", mouse_hidden_dim, enable_mouse),
                                ("keyboard_hidden_dim", keyboard_hidden_dim, enable_keyboard)):
            if on and width != heads_num * self.rope.head_dim:
                raise ValueError(f"{name} {width} / heads_num {heads_num} must give heads of "
                                 f"sum(mouse_qk_dim_list) = {self.rope.head_dim} channels")

    @property
    def window_frames(self) -> int:
        """Frames each action attention may see in streaming."""
        return attention_window_frames(self.local_attn_size)

    def condition_windows(self, cond: torch.Tensor, first_frame: int, num_frames: int,
                          embed: Optional[nn.Module] = None) -> torch.Tensor:
        """cond [B, steps, C] -> [B, num_frames, window_steps * C], step-major in the last dim."""
        steps = condition_steps(cond, first_frame, num_frames, self.vae_time_compression_ratio,
                                self.windows_size)
        if embed is not None:
            steps = embed(steps)
        return frame_windows(steps, self.vae_time_compression_ratio, self.windows_size)

    def _attend(self, q, k, v, kv_cache, start_frame, num_frames, num_frame_per_block,
                queries_per_frame: int):
        """Attention over frames: through the rolling cache when streaming, else block-causal."""
        if kv_cache is not None:  # cache writes without autograd history (see cached_window)
            k, v = cached_window(kv_cache, k, v, start_frame, sink=0, window=self.window_frames)
            return attention(q, k, v)
        allowed = block_causal_mask(num_frames, 1, num_frame_per_block, self.local_attn_size,
                                    device=q.device)
        return attention(q, k, v, allowed.repeat_interleave(queries_per_frame, dim=0))

    def mouse_branch(self, x, mouse_condition, num_frames, spatial, start_frame, kv_cache,
                     num_frame_per_block):
        """x [B, F*S, C] -> the mouse update [B, F*S, C] (to be added to x)."""
        b, _, c = x.shape
        heads = self.heads_num
        tokens = x.view(b, num_frames, spatial, c).transpose(1, 2).reshape(b * spatial, num_frames, c)
        windows = self.condition_windows(mouse_condition, start_frame, num_frames)
        windows = windows[:, None].expand(b, spatial, num_frames, windows.shape[-1])
        h = self.mouse_mlp(torch.cat([tokens, windows.reshape(b * spatial, num_frames, -1)], dim=-1))
        q, k, v = self.t_qkv(h).view(b * spatial, num_frames, 3, heads, -1).unbind(2)
        q = self.rope(self.img_attn_q_norm(q), start_frame)
        k = self.rope(self.img_attn_k_norm(k), start_frame)
        out = self._attend(q, k, v, kv_cache, start_frame, num_frames, num_frame_per_block, 1)
        out = out.reshape(b, spatial, num_frames, -1).transpose(1, 2).reshape(b, num_frames * spatial, -1)
        return self.proj_mouse(out)

    def keyboard_branch(self, x, keyboard_condition, num_frames, spatial, start_frame, kv_cache,
                        num_frame_per_block):
        """x [B, F*S, C] -> the keyboard update [B, F*S, C] (to be added to x)."""
        b = x.shape[0]
        heads = self.heads_num
        q = self.key_attn_q_norm(self.mouse_attn_q(x).view(b, num_frames * spatial, heads, -1))
        windows = self.condition_windows(keyboard_condition, start_frame, num_frames,
                                         embed=self.keyboard_embed)
        k, v = self.keyboard_attn_kv(windows).view(b, num_frames, 2, heads, -1).unbind(2)
        k = self.key_attn_k_norm(k)
        head_dim = q.shape[-1]
        q = self.rope(q.view(b, num_frames, spatial * heads, head_dim), start_frame)
        q = q.view(b, num_frames * spatial, heads, head_dim)
        k = self.rope(k, start_frame)
        out = self._attend(q, k, v, kv_cache, start_frame, num_frames, num_frame_per_block, spatial)
        return self.proj_keyboard(out.flatten(2))

    def forward(self, x, tt, th, tw, mouse_condition=None, keyboard_condition=None,
                kv_cache_mouse=None, kv_cache_keyboard=None, start_frame: int = 0,
                num_frame_per_block: int = 3):
        """x [B, tt*th*tw, C] -> x with the mouse and keyboard updates added.

        Streaming when caches are given (this block's frames start at `start_frame`), otherwise the
        cache-free block-causal path over all `tt` frames.
        """
        spatial = th * tw
        if x.shape[1] != tt * spatial:
            raise ValueError(f"x has {x.shape[1]} tokens, expected {tt}*{th}*{tw}")
        if self.enable_mouse:
            if mouse_condition is None:
                raise ValueError("this action module has a mouse branch: mouse_condition is required")
            x = x + self.mouse_branch(x, mouse_condition, tt, spatial, start_frame, kv_cache_mouse,
                                      num_frame_per_block)
        if self.enable_keyboard:
            if keyboard_condition is None:
                raise ValueError("keyboard_condition is required")
            x = x + self.keyboard_branch(x, keyboard_condition, tt, spatial, start_frame,
                                         kv_cache_keyboard, num_frame_per_block)
        return x
