"""RoPE tables the optimized model builds from attributes that upstream's modules also have."""
import torch


def action_rope_table(rope_dim_list, theta, max_frames: int = 7500):
    """(cos, sin) [max_frames, sum(rope_dim_list) / 2] float32 angle tables of the action module.

    Upstream builds a (time, row, column) table over a 1 x 1 spatial grid in float32, so only the
    first rope_dim_list[0] channels rotate (by the frame index); the others have angle 0. Kept in
    float32 because upstream applies it in float32 whatever the input dtype.
    """
    angles = []
    for axis, dim in enumerate(rope_dim_list):
        positions = torch.arange(max_frames if axis == 0 else 1, dtype=torch.float32)
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        angles.append(torch.outer(positions, inv_freq).expand(max_frames, -1))
    angles = torch.cat(angles, dim=1)
    return angles.cos(), angles.sin()


def split_self_attention_freqs(freqs: torch.Tensor):
    """The model's complex RoPE table [frames, D/2] -> (cos, sin) per axis (frame, row, column),
    float64, split as upstream splits it."""
    half = freqs.shape[1]
    spatial = half // 3
    parts = freqs.split([half - 2 * spatial, spatial, spatial], dim=1)
    return [(p.real.contiguous(), p.imag.contiguous()) for p in parts]
