"""Rotary position embeddings.

Two flavours live in Matrix-Game-2:

* self-attention: 3-axis RoPE (frame, row, column) of the 128-wide heads, frequencies in float64 and
  applied in float64 (`rope_params`, `rope_apply_3d`). In streaming the frame axis starts at the
  block's absolute frame, so cached keys carry the rotation of their absolute position.
* action module: a (time, row, column) table with `rope_dim_list` [8, 28, 28] over a 1 x 1 spatial
  grid, so only the first 8 channels of each 64-wide head rotate, by the frame index. The table is
  float32 and upstream applies it in float32 whatever the input dtype (`ActionRope`).
"""
import torch


def rope_params(max_seq_len: int, dim: int, theta: float = 10000) -> torch.Tensor:
    """[max_seq_len, dim/2] complex128 table: e^(i * pos * theta^(-2j/dim))."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even dim, got {dim}")
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim))
    angles = torch.outer(torch.arange(max_seq_len), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def self_attention_rope_table(head_dim: int, max_frames: int = 1024) -> torch.Tensor:
    """Frame, row and column tables concatenated along dim 1 ([max_frames, head_dim/2] complex)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    d = head_dim
    return torch.cat([
        rope_params(max_frames, d - 4 * (d // 6)),
        rope_params(max_frames, 2 * (d // 6)),
        rope_params(max_frames, 2 * (d // 6)),
    ], dim=1)


def rope_rotations_3d(freqs: torch.Tensor, grid_sizes, start_frame: int = 0) -> torch.Tensor:
    """Per-token complex rotations [f*h*w, 1, head_dim/2] for a (f, h, w) grid from `start_frame`."""
    f, h, w = (int(s) for s in grid_sizes)
    half = freqs.shape[1]
    spatial = half // 3
    frame_f, row_f, col_f = freqs.split([half - 2 * spatial, spatial, spatial], dim=1)
    if start_frame + f > frame_f.shape[0]:
        raise ValueError(f"frame position {start_frame + f} exceeds the RoPE table "
                         f"({frame_f.shape[0]} frames)")
    rot = torch.cat([
        frame_f[start_frame:start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
        row_f[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        col_f[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1)
    return rot.reshape(f * h * w, 1, half)


def rope_apply_3d(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] (channel pairs as complex numbers) in float64; returns x's dtype."""
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rotations).flatten(-2).type_as(x)


class ActionRope:
    """The action module's time-only RoPE, computed and applied in float32 as upstream does.

    The table covers `max_frames` frame positions; channels past `rope_dim_list[0]` have zero angle
    (their grid axes have a single position) and pass through unchanged, up to the float32 round trip.
    """

    def __init__(self, rope_dim_list, theta: float, max_frames: int = 7500):
        dims = list(rope_dim_list)
        self.head_dim = sum(dims)
        self.max_frames = max_frames
        cos_parts, sin_parts = [], []
        for axis, dim in enumerate(dims):
            # axis 0 runs over frames; the row/column axes have one position (0) each
            positions = torch.arange(max_frames if axis == 0 else 1, dtype=torch.float32)
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
            angles = torch.outer(positions, inv_freq)
            cos_parts.append(angles.cos().repeat_interleave(2, dim=1).expand(max_frames, -1))
            sin_parts.append(angles.sin().repeat_interleave(2, dim=1).expand(max_frames, -1))
        self.cos = torch.cat(cos_parts, dim=1).contiguous()  # [max_frames, head_dim] float32
        self.sin = torch.cat(sin_parts, dim=1).contiguous()

    def table(self, start_frame: int, num_frames: int, device):
        if start_frame + num_frames > self.max_frames:
            raise ValueError(f"frame position {start_frame + num_frames} exceeds the action RoPE "
                             f"table ({self.max_frames} frames)")
        if self.cos.device != device:
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        sl = slice(start_frame, start_frame + num_frames)
        return self.cos[sl], self.sin[sl]

    def __call__(self, x: torch.Tensor, start_frame: int) -> torch.Tensor:
        """x: [N, T, ..., head_dim] with frames on dim 1; frame t sits at `start_frame + t`."""
        cos, sin = self.table(start_frame, x.shape[1], x.device)
        view = (1, x.shape[1]) + (1,) * (x.ndim - 3) + (x.shape[-1],)
        x32 = x.float()
        pairs = x32.reshape(*x32.shape[:-1], -1, 2)
        rotated_half = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return (x32 * cos.view(view) + rotated_half * sin.view(view)).type_as(x)
