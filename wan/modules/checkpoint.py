"""Loading and saving weights as safetensors (never pickle)."""
import os
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file, save_file

# upstream checkpoints are saved from a wrapper that holds the network as `.model`
WRAPPER_PREFIX = "model."


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model."""


def checkpoint_files(path) -> list:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in directory {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"only .safetensors checkpoints are supported, got {path}")
    return [path]


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """All tensors of a .safetensors file or directory, with a leading `model.` stripped."""
    state = {}
    for file in checkpoint_files(path):
        state.update(load_file(os.fspath(file)))
    if state and all(k.startswith(WRAPPER_PREFIX) for k in state):
        state = {k[len(WRAPPER_PREFIX):]: v for k, v in state.items()}
    return state


def describe_mismatch(model: torch.nn.Module, state: Dict[str, torch.Tensor], strict: bool) -> str:
    """'' when `state` fits `model`; otherwise a report of missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state)) if strict else []
    unexpected = sorted(set(state) - set(expected)) if strict else []
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"{len(items)} {title} key(s):\n    " + "\n    ".join(shown))
    return "\n".join(lines)


def load_safetensors_checkpoint(model: torch.nn.Module, path, strict: bool = True):
    """Copy a checkpoint into `model` (cast to each parameter's dtype). Raises
    CheckpointMismatchError listing every problem; with strict=False only shapes must agree."""
    state = read_state_dict(path)
    problems = describe_mismatch(model, state, strict)
    if problems:
        raise CheckpointMismatchError(f"checkpoint {path} does not match "
                                      f"{type(model).__name__}:\n{problems}")
    return model.load_state_dict(state, strict=strict)


def save_safetensors_checkpoint(model: torch.nn.Module, path, prefix: str = ""):
    """Write the model's state dict (optionally under a key prefix such as `model.`)."""
    state = {prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.fspath(path))
