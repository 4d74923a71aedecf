"""Rotary position embeddings of the reference model.

Two flavours live in Matrix-Game-2:

* self-attention: 3-axis RoPE (frame, row, column) of the 128-wide heads, angles in float64 and
  applied in float64 (`rope_rotations_3d`, `rope_apply_3d`). In streaming the frame axis starts at
  the block's absolute frame, so cached keys carry the rotation of their absolute position.
* action module: a (time, row, column) RoPE with `rope_dim_list` [8, 28, 28] over a 1 x 1 spatial
  grid, so only the first 8 channels of each 64-wide head rotate, by the frame index; upstream
  applies it in float32 whatever the input dtype (`ActionRope`).

Angles come from the positions (wan/modules/shared/rope_tables.py, shared with the optimized
model), so a stream has no length limit; upstream's 1024-frame table survives only as the model's
`freqs` attribute.
"""
import torch

from .shared.rope_tables import (action_inverse_frequencies, angles, inverse_frequencies,
                                   self_attention_angles, self_attention_axis_dims)


def rope_params(max_seq_len: int, dim: int, theta: float = 10000) -> torch.Tensor:
    """[max_seq_len, dim/2] complex128 table: e^(i * pos * theta^(-2j/dim))."""
    table = angles(torch.arange(max_seq_len), inverse_frequencies(dim, theta))
    return torch.polar(torch.ones_like(table), table)


def self_attention_rope_table(head_dim: int, max_frames: int = 1024) -> torch.Tensor:
    """Upstream's `freqs` attribute: frame, row and column tables side by side
    ([max_frames, head_dim/2] complex). The forward does not read it."""
    return torch.cat([rope_params(max_frames, dim) for dim in self_attention_axis_dims(head_dim)],
                     dim=1)


def rope_rotations_3d(grid_sizes, start_frame: int, head_dim: int, device=None) -> torch.Tensor:
    """Per-token complex rotations [f*h*w, 1, head_dim/2] for a (f, h, w) grid from `start_frame`."""
    f, h, w = (int(s) for s in grid_sizes)
    table = self_attention_angles(torch.arange(start_frame, start_frame + f, device=device), h, w,
                                  head_dim)
    return torch.polar(torch.ones_like(table), table)[:, None]


def rope_apply_3d(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] (channel pairs as complex numbers) in float64; returns x's dtype."""
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rotations).flatten(-2).type_as(x)


class ActionRope:
    """The action module's time-only RoPE, applied in float32 as upstream does. Channels past
    `rope_dim_list[0]` have zero angle and pass through unchanged (up to the float32 round trip)."""

    def __init__(self, rope_dim_list, theta: float):
        self.head_dim = sum(rope_dim_list)
        self.inv_freq = action_inverse_frequencies(list(rope_dim_list), theta, device="cpu")

    def table(self, start_frame: int, num_frames: int, device):
        """(cos, sin) [num_frames, head_dim] float32, each angle repeated for its channel pair."""
        if self.inv_freq.device != torch.device(device):  # moved once, like a buffer
            self.inv_freq = self.inv_freq.to(device)
        frames = torch.arange(start_frame, start_frame + num_frames, device=device)
        table = angles(frames, self.inv_freq).repeat_interleave(2, dim=1)
        return table.cos().float(), table.sin().float()

    def __call__(self, x: torch.Tensor, start_frame: int) -> torch.Tensor:
        """x: [N, T, ..., head_dim] with frames on dim 1; frame t sits at `start_frame + t`."""
        cos, sin = self.table(start_frame, x.shape[1], x.device)
        view = (1, x.shape[1]) + (1,) * (x.ndim - 3) + (x.shape[-1],)
        x32 = x.float()
        pairs = x32.reshape(*x32.shape[:-1], -1, 2)
        rotated_half = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return (x32 * cos.view(view) + rotated_half * sin.view(view)).type_as(x)
