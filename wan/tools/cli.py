"""The one argument helper every command line uses (`python -m wan.serve|compare|integrate|
kernels|play`, `python -m wan.play.client`, the benchmarks): a user's mistake is one line on stderr
and exit status 2, and what can be checked is checked before any work (paths, files, argument
ranges; memory through wan.serving.memory, whose NotEnoughMemory is a ValueError).

Every tool has the same shape: `PROG`, a `cli.ArgumentParser` whose every argument has a help
text, and `main(argv=None)`, which is `cli.run(PROG, _main, argv)`: what `python -m wan.<tool>`
and the `wan-<tool>` script (pyproject.toml's [project.scripts]) call.

`run(prog, main, argv)` calls `main(argv)` and turns the exceptions in USER_ERRORS into one line,
`prog: error: message`, and exit 2. Which exceptions, and why these only:

* ValueError and its subclasses: the library's answer to a bad value or a bad file's content
  (json.JSONDecodeError and UnicodeDecodeError are ValueErrors; so are the checkpoint loaders'
  CheckpointMismatchError and CheckpointFileError, wan.serving.memory's NotEnoughMemory, and
  UsageError below);
* TypeError: the library's answer to a value of the wrong type (a config.json entry of the wrong
  kind, a checkpoint whose values are not tensors);
* FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError: a path the user gave
  (and not OSError as a whole: a full disk or an I/O error is not the command line's fault);
* BackendUnavailableError (wan.kernels.registry, a RuntimeError): a backend or precision asked for
  that this machine cannot run;
* torch.OutOfMemoryError: the sizes asked for did not fit after all (the estimate is rough; a
  RuntimeError too, but one the user fixes by asking for less);
* SystemExit whose code is a message (a tool's own refusal, as wan.integrate's IntegrateError).

Everything else keeps its traceback: RuntimeError from torch, KeyError, AttributeError,
IndexError, AssertionError... are not something to fix on the command line but a bug to fix in
the code, and a traceback points at it. A ValueError or TypeError can be a bug too: set
WAN_TRACEBACK=1 to see the traceback of any error. NonFiniteOutputError (NaN or inf in a block's
output: the weights, not the command line) is one line as well, with exit status 1.

This module imports neither torch nor the rest of wan at its top: the torch and wan errors above
are recognised once their modules are loaded (an error of a module never loaded cannot occur), and
`device` imports torch when it is called.

The checks (each raises UsageError, FileNotFoundError or PermissionError with a message naming
the option): `positive_int` / `non_negative_int` / `positive_float` / `non_negative_float` /
`device` (argparse types), `output_file`, `input_file`, `weights_file`, `config_file`.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

WAN = __name__.rsplit(".", 2)[0]  # this package's name ("wan")


class UsageError(ValueError):
    """A command-line value a tool refuses before doing any work."""


USER_ERRORS = (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError,
               NotADirectoryError)
# (module, class): user errors and run failures of modules a tool may have loaded
LOADED_USER_ERRORS = (("torch", "OutOfMemoryError"), (f"{WAN}.kernels.registry",
                                                      "BackendUnavailableError"))
LOADED_RUN_FAILURES = ((f"{WAN}.serving.runner", "NonFiniteOutputError"),)


def _loaded(names) -> tuple:
    """The classes of `names` whose modules are loaded (an error of a module never loaded cannot
    have been raised)."""
    return tuple(getattr(sys.modules[module], name) for module, name in names
                 if module in sys.modules)


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


def run(prog: str, main: Callable, argv=None, label: Optional[str] = None,
        interrupted: Optional[Callable[[], str]] = None):
    """`main(argv)`, with user errors as one line on stderr, `LABEL: error: message`, and
    SystemExit(2) (failures of the run with a clear cause, NonFiniteOutputError: one line and
    SystemExit(1); Ctrl-C: `LABEL: interrupted`, plus what `interrupted()` says, and exit status
    130). LABEL is `label`, by default `prog`. Returns what main returns (an exit status or
    None): `raise SystemExit(main())` in a `__main__`."""
    label = label or prog
    try:
        return main(argv)
    except SystemExit as error:
        if not isinstance(error.code, str):
            raise
        print(f"{label}: error: {' '.join(error.code.split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        hint = interrupted() if interrupted else ""
        print(f"{label}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as error:
        if os.environ.get("WAN_TRACEBACK"):
            raise
        if isinstance(error, _loaded(LOADED_RUN_FAILURES)):
            print(f"{label}: failed: {one_line(error)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        if isinstance(error, USER_ERRORS + _loaded(LOADED_USER_ERRORS)):
            print(f"{label}: error: {one_line(error)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (`LABEL: error: message (see --help)`, exit 2; LABEL
    is `label`, by default the prog) instead of the usage text followed by the error."""

    def __init__(self, *args, label: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.label = label

    def error(self, message):
        self.exit(2, f"{self.label or self.prog}: error: {message} (see --help)\n")


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


def parse_device(text: str):
    """A torch device this machine has: 'cpu', 'cuda' or 'cuda:N' (UsageError otherwise)."""
    import torch
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


def device(text: str):
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
