"""Rotary angles of Matrix-Game-2's two RoPEs, computed from the positions themselves.

Upstream keeps tables of 1024 frames (self-attention) and 7500 frames (action modules), so a stream
ends there. Here angles are computed for whatever positions a call covers, as
position x inverse frequency in float64 (exact for any frame a stream reaches: the product of an
integer below 2^53 / 2^24 and a float), and only cos/sin are cast to the precision that applies
them. Within upstream's tables the values are upstream's: self-attention angles are bit-identical
to its float64 table; the action module's use upstream's float32 frequencies, and their cos/sin
differ from its float32 table by at most float32 rounding.

Both models use these functions (the reference applies the angles as complex rotations in float64,
the optimized model as cos/sin tables on the device, inside its CUDA graphs).
"""
import torch

SELF_ATTENTION_THETA = 10000.0


def self_attention_axis_dims(head_dim: int):
    """Channels of a head that rotate with the frame, the row and the column (upstream's split)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def inverse_frequencies(dim: int, theta: float = SELF_ATTENTION_THETA, device=None):
    """theta^(-2j/dim) for j < dim/2, in float64 (upstream's `rope_params`)."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even dim, got {dim}")
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=device).to(torch.float64).div(dim))


def angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[P] integer positions x [J] inverse frequencies -> [P, J] float64 angles."""
    return positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]


def self_attention_angles(frame_ids: torch.Tensor, h: int, w: int, head_dim: int) -> torch.Tensor:
    """[F*h*w, head_dim/2] float64 angles of the tokens of frames `frame_ids` (absolute positions)
    on an h x w grid, frame-major: each token's (frame, row, column) parts side by side."""
    device = frame_ids.device
    frame_dim, row_dim, col_dim = self_attention_axis_dims(head_dim)
    frames = frame_ids.shape[0]
    parts = (angles(frame_ids, inverse_frequencies(frame_dim, device=device))[:, None, None],
             angles(torch.arange(h, device=device), inverse_frequencies(row_dim, device=device))
             [None, :, None],
             angles(torch.arange(w, device=device), inverse_frequencies(col_dim, device=device))
             [None, None, :])
    return torch.cat([p.expand(frames, h, w, -1) for p in parts], dim=-1).reshape(frames * h * w, -1)


def action_inverse_frequencies(rope_dim_list, theta, device=None) -> torch.Tensor:
    """[sum(rope_dim_list) / 2] float64: upstream's float32 frequencies of the time axis, zeros for
    the row and column axes (the action module's grid is 1 x 1, so they never rotate)."""
    time_dim = rope_dim_list[0]
    time = 1.0 / (theta ** (torch.arange(0, time_dim, 2, device=device)[: time_dim // 2].float()
                            / time_dim))
    rest = torch.zeros(sum(d // 2 for d in rope_dim_list[1:]), device=device)
    return torch.cat([time, rest]).to(torch.float64)
