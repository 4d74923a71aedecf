"""What the command line tools share: a user's mistake is one line on stderr and exit status 2,
and what can be checked is checked before any work (paths, files, argument ranges, memory).

`run(prog, main, argv)` calls `main(argv)` and turns the exceptions in USER_ERRORS into one line,
`prog: error: message`, and exit 2. Which exceptions, and why these only:

* ValueError and its subclasses: the library's answer to a bad value or a bad file's content
  (json.JSONDecodeError and UnicodeDecodeError are ValueErrors; so are the checkpoint loaders'
  CheckpointMismatchError and CheckpointFileError, and UsageError below);
* TypeError: the library's answer to a value of the wrong type (a config.json entry of the wrong
  kind, a checkpoint whose values are not tensors);
* FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError: a path the user gave
  (and not OSError as a whole: a full disk or an I/O error is not the command line's fault);
* BackendUnavailableError (wan.kernels.registry, a RuntimeError): a backend or precision asked for
  that this machine cannot run;
* torch.OutOfMemoryError: the sizes asked for did not fit after all (the estimate below is
  rough; a RuntimeError too, but one the user fixes by asking for less).

Everything else keeps its traceback: RuntimeError from torch, KeyError, AttributeError,
IndexError, AssertionError... are not something to fix on the command line but a bug to fix in
the code, and a traceback points at it. A ValueError or TypeError can be a bug too: set
WAN_TRACEBACK=1 to see the traceback of any error. NonFiniteOutputError (NaN or inf in a block's
output: the weights, not the command line) is one line as well, with exit status 1.

The checks (each raises UsageError, FileNotFoundError or PermissionError with a message naming
the option): `positive_int` / `non_negative_int` / `device` (argparse types), `output_file`,
`input_file`, `weights_file`, `config_file`, and `check_memory` with the estimates
`model_bytes`, `stream_bytes` and `decoder_history_bytes`.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from ..kernels.registry import BackendUnavailableError
from ..serving.runner import NonFiniteOutputError

GIB = 2 ** 30


class UsageError(ValueError):
    """A command-line value a tool refuses before doing any work."""


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError,
               NotADirectoryError, BackendUnavailableError, torch.OutOfMemoryError)
RUN_FAILURES = (NonFiniteOutputError,)


def one_line(error: BaseException) -> str:
    """The error's message on one line: a list under a line ending in ':' (the checkpoint
    loaders' missing/unexpected keys) joined with ', ', the other lines with '; '."""
    lines = [(line[:1].isspace(), line.strip()) for line in str(error).splitlines()]
    lines = [(indented, text) for indented, text in lines if text]
    if not lines:
        return type(error).__name__
    out = lines[0][1]
    for (_, before), (indented, text) in zip(lines, lines[1:]):
        out += (" " if before.endswith(":") else ", " if indented else "; ") + text
    return out


def run(prog: str, main: Callable, argv=None):
    """`main(argv)`, with user errors as one line on stderr and SystemExit(2) (failures of the run
    with a clear cause, NonFiniteOutputError: one line and SystemExit(1)). Returns what main
    returns."""
    try:
        return main(argv)
    except RUN_FAILURES as error:
        if os.environ.get("WAN_TRACEBACK"):
            raise
        print(f"{prog}: failed: {one_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except USER_ERRORS as error:
        if os.environ.get("WAN_TRACEBACK"):
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (`prog: error: message (see --help)`, exit 2)
    instead of the usage text followed by the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# argparse types ------------------------------------------------------------------------------
def _int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def parse_device(text: str) -> torch.device:
    """A torch device this machine has: 'cpu', 'cuda' or 'cuda:N' (UsageError otherwise)."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {text!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {text!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {text!r}: torch sees no CUDA GPU on this machine "
                             f"(use cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"device {text!r}: this machine has {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1})")
    return device


def device(text: str) -> torch.device:
    """argparse type: parse_device."""
    try:
        return parse_device(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# files ---------------------------------------------------------------------------------------
def output_file(path, option: str = "--out") -> Path:
    """Refuses, before any work, an output path that cannot be written: a missing parent folder
    (not created: a typo would make folders), a folder, a file without write permission, a
    folder where nothing can be created (a read-only mount). Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    parent = path.parent
    if not parent.exists():
        raise UsageError(f"{option} {path}: folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a folder")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{option} {path}: the file is not writable")
        return path
    try:  # what os.access cannot see (root, read-only mounts): make a file there and remove it
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".wan-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise PermissionError(f"{option} {path}: cannot write in {parent} "
                              f"({error.strerror or error})") from None
    return path


def input_file(path, option: str) -> Path:
    """A file that exists, is a regular file, is not empty and can be read."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such file")
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path}: is a folder, expected a file")
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as error:
        raise PermissionError(f"{option} {path}: cannot be read ({error.strerror or error})") \
            from None
    if not first:
        raise UsageError(f"{option} {path}: the file is empty")
    return path


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why `path` is not a whole safetensors file (its header names more bytes than it holds,
    or it has no header), or None. Reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes: too short for a safetensors file"
        length = int.from_bytes(head, "little")
        if length > size - 8 or length > 100 * 2 ** 20:
            return "not a safetensors file (no header), or truncated"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "not a safetensors file (its header is not JSON), or truncated"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    end = max((entry["data_offsets"][1] for key, entry in header.items()
               if key != "__metadata__" and isinstance(entry, dict)
               and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
               and isinstance(entry["data_offsets"][1], int)), default=0)
    if 8 + length + end > size:
        return (f"truncated: its header places tensors up to byte {8 + length + end}, the file "
                f"has {size}")
    return None


def weights_file(path, option: str, directory_ok: bool = False) -> Path:
    """A checkpoint the loaders can read, as far as that can be seen without reading it: present
    and readable; a .safetensors file whole (its header read); a .pth zip archive with its
    directory at the end (a truncated one has none); with `directory_ok` a folder of
    .safetensors shards, each checked so."""
    path = Path(path)
    if directory_ok and path.is_dir():
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"{option} {path}: no .safetensors files in this folder")
        for shard in shards:
            weights_file(shard, option)
        return path
    input_file(path, option)
    if path.suffix == ".safetensors":
        problem = _safetensors_problem(path)
        if problem:
            raise UsageError(f"{option} {path}: {problem}")
    elif path.suffix in (".pth", ".pt"):
        with open(path, "rb") as f:
            zipped = f.read(2) == b"PK"
        if zipped and not zipfile.is_zipfile(path):
            raise UsageError(f"{option} {path}: an incomplete PyTorch checkpoint (its zip "
                             f"directory is missing: truncated?)")
    elif directory_ok:
        raise UsageError(f"{option} {path}: expected a .safetensors file or a folder of them")
    else:
        raise UsageError(f"{option} {path}: expected a .pth or .safetensors file")
    return path


def config_file(path, option: str = "--config") -> dict:
    """A model config.json (or a folder holding one), read: a JSON object."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    input_file(path, option)
    try:
        config = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UsageError(f"{option} {path}: not a text file") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{option} {path}: not valid JSON ({error.msg} at line {error.lineno} "
                         f"column {error.colno})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{option} {path}: holds a JSON {type(config).__name__}, not an object "
                         f"of model settings")
    return config


# memory --------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: free GPU memory, or on a CPU the RAM the
    kernel says is available (MemAvailable; else free pages)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _gib(n: float) -> str:
    if n >= 1000 * GIB:
        return f"{n / GIB:,.0f} GiB"
    return f"{n / GIB:.3g} GiB" if n >= GIB / 100 else f"{n / 2 ** 20:.3g} MiB"


def check_memory(parts: Dict[str, float], device: torch.device, what: str,
                 host_parts: Optional[Dict[str, float]] = None):
    """UsageError, printing the estimate, when `parts` (bytes on `device`) do not fit in what
    `device` has free, or `host_parts` (bytes in the machine's RAM) do not fit in its RAM. On a
    CPU both count against the RAM."""
    host_parts = dict(host_parts or {})
    if device.type == "cpu":
        parts, host_parts = {**parts, **{f"{k} (host)": v for k, v in host_parts.items()}}, {}
    for where, items, free in ((str(device), parts, None), ("host RAM", host_parts, None)):
        if not items:
            continue
        need = sum(items.values())
        free = available_memory(device if where == str(device) else torch.device("cpu"))
        if need > free:
            shown = ", ".join(f"{k} {_gib(v)}" for k, v in items.items() if v)
            place = "RAM available" if where in ("cpu", "host RAM") else "free"
            raise UsageError(f"{what} needs about {_gib(need)} ({shown}) but {where} has "
                             f"{_gib(free)} {place}: ask for less")


def model_bytes(config: dict, dtype: torch.dtype) -> int:
    """The DiT's weights in `dtype`, from its config (built on the meta device: nothing is
    allocated)."""
    from ..modules.causal_model import CausalWanModel
    with torch.device("meta"):
        model = CausalWanModel.from_config(config)
    return sum(p.numel() for p in model.parameters()) * _itemsize(dtype)


def stream_bytes(config: dict, latent_hw, dtype: torch.dtype) -> int:
    """One stream's DiT cache dicts (upstream's layout, what StreamingBlockRunner allocates),
    from the config: self-attention k/v over the attention window, cross-attention k/v over the
    257 image tokens, the action modules' k/v."""
    from ..runtime.conditioning import attention_window_frames, frame_tokens
    dim, layers = config["dim"], config["num_layers"]
    patch = config.get("patch_size", (1, 2, 2))
    tokens = frame_tokens(latent_hw[0], latent_hw[1], patch)
    window = attention_window_frames(config.get("local_attn_size", -1))
    elements = layers * 2 * (window * tokens + 257) * dim
    action = config.get("action_config") or {}
    if action:  # upstream allocates them for every layer, with an action module or not
        if action.get("enable_mouse"):
            elements += layers * 2 * tokens * window * action.get("mouse_hidden_dim", 1024)
        if action.get("enable_keyboard"):
            elements += layers * 2 * window * action.get("keyboard_hidden_dim", 1024)
    return elements * _itemsize(dtype)


# elements of the decoder's history per latent pixel, per unit of its width (96: upstream's):
# measured, 151,328 elements per latent pixel at width 96 (1.0 GiB at 44 x 80 in fp16)
DECODER_HISTORY_PER_PIXEL_PER_DIM = 151_328 / 96


def decoder_history_bytes(latent_hw, dtype: torch.dtype, dim: int = 96) -> int:
    """One stream's decoder history (the 32 cache entries it carries between blocks)."""
    return int(DECODER_HISTORY_PER_PIXEL_PER_DIM * dim * latent_hw[0] * latent_hw[1]
               * _itemsize(dtype))


def decoder_weight_bytes(dtype: torch.dtype, dim: int = 96) -> int:
    """The decoder's weights (73.3e6 parameters at upstream's width 96; ~quadratic in it)."""
    return int(73_295_603 * (dim / 96) ** 2 * _itemsize(dtype))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
