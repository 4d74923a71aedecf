"""Loading and saving weights as safetensors (never pickle).

What a load refuses, before the model is touched (each error names the file, or the file and key):
* a path that is not a str/PathLike (TypeError), absent (FileNotFoundError), or not a
  `.safetensors` file or a directory holding some; a path that is not a regular file (a FIFO,
  socket or device: reading it could block for ever) is a CheckpointFileError;
* a file that safetensors cannot read (truncated, corrupt, not a safetensors file) and, in a
  directory of shards, a key held by two shards (which one should win is not knowable):
  CheckpointFileError, a ValueError;
* a checkpoint that does not fit the model: missing, unexpected or mis-shaped keys, and integer,
  bool or complex tensors where the model holds floating-point ones (a cast would turn them into
  weights silently): CheckpointMismatchError, a ValueError listing every such key.
Floating-point tensors of another precision (a bf16 checkpoint into a float32 model) are cast to
each parameter's dtype, as torch's `load_state_dict` does.
"""
import os
import pickle
from pathlib import Path
from typing import Dict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# upstream checkpoints are saved from a wrapper that holds the network as `.model`
WRAPPER_PREFIX = "model."


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys, shapes or dtypes do not match the model."""


class CheckpointFileError(ValueError):
    """A checkpoint file (or directory of shards) that cannot be read as one: unreadable or
    corrupt, a key in two shards, values that are not tensors."""


def _as_path(path, what: str = "checkpoint") -> Path:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"the {what} path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def checkpoint_files(path) -> list:
    path = _as_path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in directory {path}")
        for file in files:
            if not file.is_file():
                raise CheckpointFileError(f"{file} in the checkpoint directory is not a file")
        return files
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"only .safetensors checkpoints are supported, got {path}")
    _check_regular_file(path)
    return [path]


def _check_regular_file(path: Path) -> None:
    """CheckpointFileError unless `path` is a regular file (or a link to one): reading a FIFO, a
    socket or a device would block or never end, so they are refused before anything is read."""
    if not path.is_file():
        raise CheckpointFileError(f"{path} is not a regular file (a FIFO, socket or device?); a "
                                  f"checkpoint must be a file on disk")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_safetensors_file(file) -> Dict[str, torch.Tensor]:
    """The tensors of one .safetensors file; an unreadable one is an error naming it."""
    file = _as_path(file)
    if file.exists():
        _check_regular_file(file)
    try:
        return load_file(os.fspath(file))
    except PermissionError as err:
        raise PermissionError(f"cannot read checkpoint {file}: {_first_line(err)}") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {file}") from None
    except (SafetensorError, OSError) as err:
        raise CheckpointFileError(f"{file} is not a readable safetensors file (truncated, corrupt "
                                  f"or another format): {_first_line(err)}") from None


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """All tensors of a .safetensors file or directory, with a leading `model.` stripped. A key
    held by two shards of a directory is refused (naming it and both files)."""
    state, source = {}, {}
    for file in checkpoint_files(path):
        for key, tensor in read_safetensors_file(file).items():
            if key in source:
                raise CheckpointFileError(
                    f"checkpoint directory {path}: key {key!r} is in two shards, "
                    f"{source[key].name} and {file.name}; which one to load is ambiguous")
            state[key], source[key] = tensor, file
    if state and all(k.startswith(WRAPPER_PREFIX) for k in state):
        state = {k[len(WRAPPER_PREFIX):]: v for k, v in state.items()}
    return state


def read_torch_state_dict(path) -> dict:
    """What `torch.load(path, weights_only=True)` reads (a .pth/.pt state dict): never unpickles
    anything but tensors and plain containers. Unreadable files and refused payloads are errors
    naming the file."""
    path = _as_path(path)
    if path.is_dir():
        raise CheckpointFileError(f"{path} is a directory; expected a state dict file (.pth) or "
                                  f"a .safetensors file")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _check_regular_file(path)
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointFileError(
            f"{path} is not a plain state dict: torch.load(weights_only=True) refused it and "
            f"nothing was unpickled ({_first_line(err)})") from None
    except PermissionError as err:
        raise PermissionError(f"cannot read checkpoint {path}: {_first_line(err)}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointFileError(f"{path} cannot be read as a PyTorch checkpoint (truncated or "
                                  f"corrupt?): {_first_line(err)}") from None


def check_state_tensors(state, source) -> None:
    """CheckpointFileError unless `state` is a dict of str -> tensor (naming the first bad key)."""
    if not isinstance(state, dict):
        raise CheckpointFileError(f"{source} holds a {type(state).__name__}, not a state dict "
                                  f"(a dict of parameter name -> tensor)")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointFileError(f"{source}: state dict key {key!r} is not a str")
        if not isinstance(value, torch.Tensor):
            raise CheckpointFileError(f"{source}: {key!r} holds a {type(value).__name__}, not a "
                                      f"tensor")


def _mistyped(checkpoint: torch.dtype, model: torch.dtype) -> bool:
    """Whether loading a `checkpoint` tensor into a `model` one would change what it means: any
    cast into a floating-point parameter but from another floating-point dtype."""
    if model.is_floating_point:
        return not checkpoint.is_floating_point
    return checkpoint != model


def describe_mismatch(model: torch.nn.Module, state: Dict[str, torch.Tensor], strict: bool) -> str:
    """'' when `state` fits `model`; otherwise a report of missing, unexpected, mis-shaped and
    mis-typed keys (shapes and dtypes are checked for the keys both hold, strict or not)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state)) if strict else []
    unexpected = sorted(set(state) - set(expected)) if strict else []
    shared = set(state) & set(expected)
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in shared if state[k].shape != expected[k].shape)
    mistyped = sorted(f"{k}: checkpoint {state[k].dtype} vs model {expected[k].dtype}"
                      for k in shared if _mistyped(state[k].dtype, expected[k].dtype))
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped), ("mis-typed", mistyped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"{len(items)} {title} key(s):\n    " + "\n    ".join(shown))
    if mistyped:
        lines.append("(floating-point weights of another precision are cast; integer, bool or "
                     "complex ones are refused)")
    return "\n".join(lines)


def load_safetensors_checkpoint(model: torch.nn.Module, path, strict: bool = True):
    """Copy a checkpoint into `model` (cast to each parameter's dtype). Raises
    CheckpointMismatchError listing every problem; with strict=False only shapes and dtypes must
    agree. Nothing is written into the model unless the whole checkpoint fits."""
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
