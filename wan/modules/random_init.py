"""Realistic random weights and inputs for tests and benchmarks without a checkpoint.

The default initialisation zeroes the output head and the action projections, which would hide
most of the network from any comparison. Here every parameter is drawn: linear and conv weights with
variance 1/fan_in, small biases, norm scales near 1, and the adaLN modulation tables at upstream's
own scale (randn / sqrt(dim); it was 0.5 * randn here before). With these weights a bf16 forward of
the universal config is ~1.8% from float32 on every call of a block, when t reaches the model in
float32 as upstream's pipeline passes it. (Rounding t to bf16, as this project's harnesses did until
2026-11-30, moves the warped steps 908.84 -> 908 and 713.98 -> 712 and the outputs by 13-34%: that,
not the weights, was the "chaotic init" of earlier notes.)
"""
import zlib

import torch

from .shared.conditioning import history_steps


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    device = next(model.parameters()).device
    # drawn where the model lives: a 1.6e9-parameter model takes a minute on one CPU core
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        draw = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if "modulation" in name:
            value = draw / param.shape[-1] ** 0.5
        elif leaf == "bias":
            value = 0.02 * draw
        elif param.ndim == 1:  # norm scales
            value = 1.0 + 0.1 * draw
        else:
            value = draw / param[0].numel() ** 0.5
        param.copy_(value.to(param.dtype))
    return model


def random_inputs(model, latent_hw, frames: int = 3, start_frame: int = 0, batch: int = 1,
                  seed: int = 1, t: float = 500.0) -> dict:
    """Forward keyword arguments for a call covering frames [start_frame, start_frame + frames):
    latents, CLIP context, and action histories of the length the pipeline passes."""
    gen = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    dtype, device = model.patch_embedding.weight.dtype, model.patch_embedding.weight.device

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    steps = history_steps(start_frame + frames - 1)
    inputs = {"x": rand(batch, 16, frames, h, w),
              "t": torch.full((batch, frames), t, dtype=dtype, device=device),
              "visual_context": rand(batch, 257, 1280),
              "cond_concat": rand(batch, 20, frames, h, w),
              "mouse_cond": None, "keyboard_cond": None}
    action = next((b.action_model for b in model.blocks if b.action_model is not None), None)
    if action is not None and action.enable_mouse:
        inputs["mouse_cond"] = 0.1 * rand(batch, steps, 2)
    if action is not None and action.enable_keyboard:
        width = action.keyboard_embed[0].in_features
        inputs["keyboard_cond"] = (rand(batch, steps, width) > 0).to(dtype)
    return inputs


def random_action_attention_args(case, dtype, device, seed: int = 1):
    """Arguments of the mouse/keyboard attention op (wan/kernels/registry.py) for
    case = (N, frames, queries per frame, H, D, cache rows, slots of the frames, attended):
    q, k, v (k/v strided views of one tensor, as the model passes them), the k/v caches stacked
    [2, N, rows, H, D] with random old entries, slots, attended, cos, sin."""
    n, frames, per_frame, heads, dim, rows, slots, attended = case
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    q = (randn(n, frames * per_frame, heads, dim) * 2).to(dtype)
    k, v = (randn(n, frames, 2, heads, dim) * 2).to(dtype).unbind(2)
    cache = randn(2, n, rows, heads, dim).to(dtype)
    angles = randn(frames, dim // 2) * 3
    return (q, k, v, cache, torch.tensor(slots, device=device), attended, angles.cos(),
            angles.sin())



@torch.no_grad()
def randomize_decoder_weights_(decoder: torch.nn.Module) -> torch.nn.Module:
    """The VAE decoder's random weights by state-dict name (the recipe of tests/golden's
    vae_decoder.safetensors): each tensor from a generator seeded with crc32(name); tensors of
    2 or more dims randn / sqrt(shape[1:].numel()) (so the [C, 1, 1, 1] RMS-norm gammas are plain
    randn), other names ending in `gamma` 1 + 0.1 randn, the rest (biases) 0.02 randn. Drawn in
    float64 on the CPU (73 M values, a few seconds), then copied to the decoder's device/dtype."""
    for name, tensor in decoder.state_dict().items():
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        draw = torch.randn(tensor.shape, generator=gen, dtype=torch.float64)
        if tensor.ndim >= 2:
            value = draw / tensor.shape[1:].numel() ** 0.5
        elif name.endswith("gamma"):
            value = 1.0 + 0.1 * draw
        else:
            value = 0.02 * draw
        tensor.copy_(value)
    return decoder
