"""Realistic random weights for tests and benchmarks without a checkpoint.

The default initialisation zeroes the output head and the action projections, which would hide
most of the network from any comparison. Here every parameter is drawn: linear and conv weights with
variance 1/fan_in, small biases, norm scales near 1, and modulation tables of unit-ish size.
"""
import torch


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        draw = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if "modulation" in name:
            value = 0.5 * draw
        elif leaf == "bias":
            value = 0.02 * draw
        elif param.ndim == 1:  # norm scales
            value = 1.0 + 0.1 * draw
        else:
            value = draw / param[0].numel() ** 0.5
        param.copy_(value.to(param.dtype))
    return model
