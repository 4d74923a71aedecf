"""Math both models share that is not attention: the timestep sinusoid, the attention window's
length, the tokens of one latent frame, the action histories' length and their per-frame windows.
`python -m wan.integrate` copies this package with the optimized model into an upstream tree."""
import torch

# upstream's cache length (frames) when local attention is off (local_attn_size == -1)
GLOBAL_ATTENTION_FRAMES = 15
# action steps per latent frame after the first (the VAE's temporal compression; upstream's
# `vae_time_compression_ratio` default)
VAE_TIME_COMPRESSION = 4


def history_steps(last_frame: int, ratio: int = VAE_TIME_COMPRESSION) -> int:
    """Action steps a call whose last latent frame is `last_frame` reads: the whole history,
    `1 + ratio * last_frame` (upstream's pipeline passes exactly that many)."""
    return 1 + ratio * last_frame


def frame_tokens(latent_h: int, latent_w: int, patch_size=(1, 2, 2)) -> int:
    """Tokens of one latent frame of size latent_h x latent_w: 880 for 44 x 80 and patch (1, 2, 2)."""
    return (latent_h // patch_size[1]) * (latent_w // patch_size[2])


def attention_window_frames(local_attn_size: int) -> int:
    """Frames a streaming call may attend to: `local_attn_size`, or 15 when it is -1."""
    return local_attn_size if local_attn_size != -1 else GLOBAL_ATTENTION_FRAMES


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[N] positions (timesteps) -> [N, dim] float64 embedding: cosines of all frequencies, then
    sines, as upstream builds it."""
    if dim % 2:
        raise ValueError(f"sinusoidal embedding needs an even dim, got {dim}")
    half = dim // 2
    position = position.to(torch.float64)
    inv_freq = torch.pow(10000, -torch.arange(half, device=position.device).to(position).div(half))
    phase = torch.outer(position, inv_freq)
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)


def condition_steps(cond: torch.Tensor, start_frame: int, frames: int, ratio: int,
                    windows_size: int) -> torch.Tensor:
    """The action steps latent frames [start, start + frames) read: [B, ratio*(frames-1) + window,
    C] with window = ratio * windows_size. Frame j reads the `window` steps before step ratio * j;
    steps before the first one read the first one (upstream pads that way)."""
    window = ratio * windows_size
    first = ratio * start_frame - window  # negative near the start of a stream: padding
    last = ratio * (start_frame + frames - 1)
    if first >= 0:
        return cond[:, first:last]
    return torch.cat([cond[:, :1].expand(-1, -first, -1), cond[:, :last]], dim=1)


def frame_windows(steps: torch.Tensor, ratio: int, windows_size: int) -> torch.Tensor:
    """`condition_steps` output [B, steps, C] -> [B, frames, window * C]: each frame's window of
    steps, step-major (as upstream concatenates them)."""
    return steps.unfold(1, ratio * windows_size, ratio).transpose(2, 3).flatten(2)
