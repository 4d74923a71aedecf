"""cuDNN's engine choice for the decoder's convolutions: which search each one gets at start-up,
measured once and kept across processes in a small JSON file.

What torch allows. With `cudnn.benchmark` on, torch times cuDNN's engines for a convolution the
first time it sees its problem (sizes, memory format, dtype, padding/stride/dilation, groups and
the deterministic/allow_tf32 flags) and keeps the fastest plan for the rest of the process, per
thread; `benchmark_limit` caps how many engines it times, in the order of cuDNN's heuristics
(0: all of them, torch's "exhaustive" search). There is no API to hand torch a plan found by
another process, and once a problem has a plan (searched or not) torch never searches it again
in that thread. So a later process cannot skip the search by reading what an earlier one found;
what it can skip is a search that does not pay, if it knows which one that is.

So this file keeps, per convolution problem, a *strategy*:

* `heuristic`: no search, cuDNN's first heuristic engine (what torch runs with benchmark off);
* `search:N`: torch's search over the first N engines of cuDNN's heuristic order;
* `search:all`: the exhaustive search (benchmark_limit=0), the default for a problem not
  measured yet (the heuristic engine of the decoder's 96-channel convs reads their input three
  times: 4.7 ms per conv against 2.0 ms searched on an H200).

A start-up with no entry for its GPU/driver/cuDNN/torch and conv problems runs `search:all`,
records what it ran (per problem the search's seconds and the plan's time) and writes the entry.
`calibrate` measures several strategies, each in a child process of its own (in one process the
first strategy would decide every later one), and writes per problem the strategy that starts
cheapest among those within `tolerance` of the fastest plan: a start-up that finds it searches
only where a cheaper choice loses. What a calibrated start-up saves is exactly the search seconds
of the problems whose heuristic (or short search) plan was as fast; a problem whose fast plan
only the exhaustive search finds keeps costing its search at every start-up.

The file (`cache_path()`: WAN_CONV_SEARCH_CACHE, else $XDG_CACHE_HOME/wan/conv_search.json, else
~/.cache/wan/conv_search.json; "0"/"off" turns it off) is JSON only, read with `json.loads` and
checked field by field: never unpickled. A file that is not valid (truncated, edited, another
format) is said to be damaged and rebuilt; an entry whose environment differs from this process's
(another driver, cuDNN or torch) is stale and replaced; both are logged.

`record_convolutions(fn)` lists the convolution problems `fn` runs without running them (a
dispatch mode answers each with an empty output of the right shape and layout), so the decoder
can search its steady block's problems one by one, before it captures the block's CUDA graph.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .log import info

FORMAT = "wan.conv_search_cache/1"
ENV_VAR = "WAN_CONV_SEARCH_CACHE"
DEFAULT_STRATEGY = "search:all"
# what calibrate() compares by default: no search, torch's default limit, a short one, all
CALIBRATION_STRATEGIES = ("heuristic", "search:3", "search:10", "search:all")
TOLERANCE = 0.03          # a plan within 3% of the fastest is as fast
MAX_FILE_BYTES = 4 << 20  # larger: damaged (a few hundred problems take ~100 KB)
MAX_ENTRIES = 32          # oldest entries go first
_OFF = ("0", "off", "false", "no", "none")


# ---------------------------------------------------------------------- strategies
def check_strategy(strategy: str) -> str:
    """`strategy` itself when it is one ('heuristic', 'search:all' or 'search:N', N >= 1)."""
    if strategy in ("heuristic", "search:all"):
        return strategy
    if isinstance(strategy, str) and strategy.startswith("search:"):
        count = strategy[len("search:"):]
        if count.isdigit() and int(count) >= 1 and str(int(count)) == count:
            return strategy
    raise ValueError(f"unknown conv search strategy {strategy!r}: use 'heuristic', 'search:all' "
                     f"or 'search:N' (N >= 1)")


@contextlib.contextmanager
def strategy_flags(strategy: str):
    """cudnn's `benchmark` and `benchmark_limit` as a strategy runs a problem's first call,
    restored after; every other flag stays as it is (deterministic and allow_tf32 are part of
    torch's cache key)."""
    check_strategy(strategy)
    cudnn = torch.backends.cudnn
    benchmark = strategy != "heuristic"
    limit = None if not benchmark else (
        0 if strategy == "search:all" else int(strategy.split(":")[1]))
    has_limit = cudnn.is_available()  # (a build without cuDNN has no limit to set)
    before = (cudnn.benchmark, cudnn.benchmark_limit if has_limit else None)
    cudnn.benchmark = benchmark
    if limit is not None and has_limit:
        cudnn.benchmark_limit = limit
    try:
        yield
    finally:
        cudnn.benchmark = before[0]
        if has_limit:
            cudnn.benchmark_limit = before[1]


# ---------------------------------------------------------------------- problems
@dataclass(frozen=True)
class ConvProblem:
    """One convolution as the decoder calls it (torch's aten.convolution, not transposed)."""
    input_size: Tuple[int, ...]
    input_stride: Tuple[int, ...]
    input_offset: int
    weight_size: Tuple[int, ...]
    weight_stride: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int
    dtype: str

    @property
    def name(self) -> str:
        """A readable key: dtype, input [size]/(stride)+offset, weight, stride, padding,
        dilation, groups."""
        def ints(values):
            return ",".join(map(str, values))
        return (f"{self.dtype} x[{ints(self.input_size)}]({ints(self.input_stride)})"
                f"+{self.input_offset} w[{ints(self.weight_size)}]({ints(self.weight_stride)}) "
                f"s{ints(self.stride)} p{ints(self.padding)} d{ints(self.dilation)} "
                f"g{self.groups}")

    def to_json(self) -> dict:
        return {"input_size": list(self.input_size), "input_stride": list(self.input_stride),
                "input_offset": self.input_offset, "weight_size": list(self.weight_size),
                "weight_stride": list(self.weight_stride), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "dtype": self.dtype}

    @classmethod
    def from_json(cls, data) -> "ConvProblem":
        """Checked field by field (a damaged file must not reach cuDNN)."""
        if not isinstance(data, dict) or set(data) != set(cls.__dataclass_fields__):
            raise ValueError(f"a conv problem needs exactly {sorted(cls.__dataclass_fields__)}")

        def int_list(key, lo=0):
            value = data[key]
            if not (isinstance(value, list) and 1 <= len(value) <= 8 and all(
                    type(v) is int and v >= lo for v in value)):
                raise ValueError(f"conv problem field {key!r}: a list of integers >= {lo}")
            return tuple(value)

        dims = len(int_list("input_size", 1))
        problem = cls(int_list("input_size", 1), int_list("input_stride"),
                      _int(data["input_offset"], "input_offset"), int_list("weight_size", 1),
                      int_list("weight_stride"), int_list("stride", 1), int_list("padding"),
                      int_list("dilation", 1), _int(data["groups"], "groups", 1),
                      str(data["dtype"]))
        if not (len(problem.input_stride) == len(problem.weight_size) ==
                len(problem.weight_stride) == dims and len(problem.stride) ==
                len(problem.padding) == len(problem.dilation) == dims - 2):
            raise ValueError("conv problem: sizes, strides and parameters disagree in rank")
        if not isinstance(getattr(torch, problem.dtype, None), torch.dtype):
            raise ValueError(f"conv problem: unknown dtype {problem.dtype!r}")
        return problem

    def tensors(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Input and weight with this problem's sizes, strides, offset (so its alignment) and
        dtype, small random values."""
        dtype = getattr(torch, self.dtype)
        gen = torch.Generator(device=device).manual_seed(0)

        def make(size, stride, offset):
            span = 1 + sum((s - 1) * st for s, st in zip(size, stride))
            base = torch.randn(offset + span, generator=gen, device=device, dtype=dtype)
            return base.mul_(0.1).as_strided(size, stride, offset)

        return (make(self.input_size, self.input_stride, self.input_offset),
                make(self.weight_size, self.weight_stride, 0))

    def run(self, x, w):
        return torch.ops.aten.convolution.default(
            x, w, None, list(self.stride), list(self.padding), list(self.dilation), False,
            [0] * len(self.stride), self.groups)


def _int(value, key, lo=0) -> int:
    if type(value) is not int or value < lo:
        raise ValueError(f"conv problem field {key!r}: an integer >= {lo}")
    return value


def problem_of(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups) -> ConvProblem:
    return ConvProblem(tuple(x.shape), tuple(x.stride()), x.storage_offset(), tuple(w.shape),
                       tuple(w.stride()), tuple(stride), tuple(padding), tuple(dilation),
                       int(groups), str(x.dtype).replace("torch.", ""))


def _output_like(x, w, args):
    """An empty output of the convolution `args` with the shape torch gives and the layout
    cuDNN would (channels-last when the input or the weight is)."""
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    shape = torch.ops.aten.convolution.default(*meta).shape
    fmt = torch.contiguous_format
    if x.dim() == 5 and (x.is_contiguous(memory_format=torch.channels_last_3d)
                         or w.is_contiguous(memory_format=torch.channels_last_3d)):
        fmt = torch.channels_last_3d
    elif x.dim() == 4 and (x.is_contiguous(memory_format=torch.channels_last)
                           or w.is_contiguous(memory_format=torch.channels_last)):
        fmt = torch.channels_last
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def record_convolutions(fn: Callable[[], object]) -> List[ConvProblem]:
    """The distinct convolution problems `fn()` runs, in order, without running them: each
    convolution answers an empty tensor of its output's shape and layout (garbage values; every
    other op runs for real on them). fn's own results are meaningless."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: Dict[ConvProblem, None] = {}

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten.convolution.default and not args[6]:  # not transposed
                x, w = args[0], args[1]
                seen.setdefault(problem_of(x, w, args[3], args[4], args[5], args[8]))
                return _output_like(x, w, args)
            return func(*args, **kwargs)

    with torch.no_grad(), _Recorder():
        fn()
    return list(seen)


# ---------------------------------------------------------------------- running problems
def _clock(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_problem(problem: ConvProblem, strategy: str, device, reps: int = 5) -> dict:
    """The problem's first call under `strategy` (torch's search, where it searches; the plan is
    then kept for this process and thread) and its plan's time: {"search_s", "ms"}."""
    x, w = problem.tensors(device)
    begin = _clock(device)
    with strategy_flags(strategy):
        problem.run(x, w)
    search_s = _clock(device) - begin
    times = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(max(1, reps)):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            problem.run(x, w)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            problem.run(x, w)
            times.append((time.perf_counter() - begin) * 1e3)
    times.sort()
    return {"search_s": search_s, "ms": times[len(times) // 2]}


# what this process ran per (thread, device, cudnn flags, problem): torch keeps one plan per
# problem and thread, so a problem is run once per thread
_done: Dict[tuple, dict] = {}
_done_lock = threading.Lock()


def _flags_key(device) -> tuple:
    cudnn = torch.backends.cudnn
    device = torch.device(device)
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else -1)
    return (threading.get_ident(), device.type, index, bool(cudnn.deterministic),
            bool(cudnn.allow_tf32))


def search(problems: Sequence[ConvProblem], strategies: Mapping[str, str], device) -> dict:
    """Run every problem once under its strategy (`strategies`: {problem name: strategy}, missing
    names get DEFAULT_STRATEGY), except those this thread ran already (torch keeps their plan).
    Returns {"searched": problems run under a search, "heuristic": problems run without one,
    "reused": already run, "search_s": seconds spent, "measured": {name: {strategy: {search_s,
    ms}}}} (only the problems run now are measured)."""
    key = _flags_key(device)
    report = {"searched": 0, "heuristic": 0, "reused": 0, "search_s": 0.0, "measured": {}}
    for problem in problems:
        strategy = check_strategy(strategies.get(problem.name, DEFAULT_STRATEGY))
        with _done_lock:
            done = _done.get((key, problem))
        if done is not None:
            report["reused"] += 1
            continue
        result = run_problem(problem, strategy, device)
        with _done_lock:
            _done[(key, problem)] = {"strategy": strategy, **result}
        report["searched" if strategy != "heuristic" else "heuristic"] += 1
        report["search_s"] += result["search_s"]
        report["measured"][problem.name] = {strategy: result}
    if report["measured"] and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the problems' stand-in tensors (up to ~1 GB at 44 x 80)
    return report


def decide(measured: Mapping[str, Mapping[str, Mapping[str, float]]],
           tolerance: float = TOLERANCE) -> Dict[str, str]:
    """{problem: strategy}: among a problem's measured strategies, those whose plan is within
    `tolerance` of the fastest, and of those the one whose search took the least time."""
    chosen = {}
    for name, by_strategy in measured.items():
        ok = {s: r for s, r in by_strategy.items()
              if isinstance(r, Mapping) and math.isfinite(r.get("ms", math.nan))}
        if not ok:
            continue
        best = min(r["ms"] for r in ok.values())
        fast = [s for s, r in ok.items() if r["ms"] <= best * (1 + tolerance)]
        chosen[name] = min(fast, key=lambda s: (ok[s]["search_s"], s != "heuristic"))
    return chosen


# ---------------------------------------------------------------------- the environment
def _driver_version() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for word in text.split():
            parts = word.split(".")
            if len(parts) >= 2 and all(p.isdigit() for p in parts):
                return word
    except OSError:
        pass
    try:
        import pynvml  # nvidia-ml-py, optional
        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001  (no NVML: fall back to the CUDA driver API's number)
        pass
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    return f"cuda-driver-api {getter()}" if getter is not None else "unknown"


def environment(device) -> dict:
    """What a plan choice depends on besides the problem: the GPU, its driver, cuDNN, torch and
    CUDA, and the cudnn flags that are part of torch's cache key."""
    device = torch.device(device)
    cudnn = torch.backends.cudnn
    env = {"device_type": device.type, "torch": torch.__version__,
           "cuda": torch.version.cuda or "none",
           "cudnn": (cudnn.version() if cudnn.is_available() else None) or 0,
           "deterministic": bool(cudnn.deterministic), "allow_tf32": bool(cudnn.allow_tf32)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, driver=_driver_version())
    else:
        env.update(gpu=device.type, capability="none", multiprocessors=0, driver="none")
    return env


# ---------------------------------------------------------------------- the file
def cache_path(given=None) -> Optional[Path]:
    """The cache file: `given` (a path; False or 'off': none), else WAN_CONV_SEARCH_CACHE (a
    path, or 0/off), else $XDG_CACHE_HOME/wan/conv_search.json, else
    ~/.cache/wan/conv_search.json. None: no cache file."""
    if given is False:
        return None
    if given is None:
        given = os.environ.get(ENV_VAR, "").strip() or None
    if given is not None:
        if str(given).strip().lower() in _OFF:
            return None
        return Path(given).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "wan" / "conv_search.json"


class DamagedCacheError(ValueError):
    """The cache file is not what this module writes."""


@dataclass
class Entry:
    environment: dict
    problems: List[ConvProblem]
    strategies: Dict[str, str]
    measured: dict
    calibrated: bool
    written: str

    def to_json(self) -> dict:
        return {"environment": self.environment,
                "problems": [p.to_json() for p in self.problems],
                "strategies": self.strategies, "measured": self.measured,
                "calibrated": self.calibrated, "written": self.written}

    @classmethod
    def from_json(cls, data) -> "Entry":
        if not isinstance(data, dict):
            raise DamagedCacheError("an entry is not an object")
        missing = {"environment", "problems", "strategies", "measured", "calibrated",
                   "written"} - set(data)
        if missing:
            raise DamagedCacheError(f"an entry lacks {sorted(missing)}")
        env, problems, strategies = data["environment"], data["problems"], data["strategies"]
        if not isinstance(env, dict) or not all(
                isinstance(v, (str, int, float, bool)) or v is None for v in env.values()):
            raise DamagedCacheError("an entry's environment is not a flat object")
        if not isinstance(problems, list):
            raise DamagedCacheError("an entry's problems are not a list")
        try:
            parsed = [ConvProblem.from_json(p) for p in problems]
        except ValueError as err:
            raise DamagedCacheError(str(err)) from None
        names = {p.name for p in parsed}
        if not isinstance(strategies, dict) or set(strategies) != names:
            raise DamagedCacheError("an entry's strategies do not name its problems")
        for strategy in strategies.values():
            try:
                check_strategy(strategy)
            except ValueError as err:
                raise DamagedCacheError(str(err)) from None
        if not isinstance(data["measured"], dict) or not isinstance(data["calibrated"], bool):
            raise DamagedCacheError("an entry's measurements are not an object")
        return cls(env, parsed, dict(strategies), data["measured"], data["calibrated"],
                   str(data["written"]))


class SearchCache:
    """The cache file: entries keyed by (environment, the list of conv problems)."""

    def __init__(self, path):
        self.path = Path(path)

    def _read(self) -> List[Entry]:
        """The file's entries ([] when there is no file); DamagedCacheError when it is not
        valid. json.loads only: nothing is unpickled or evaluated."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size > MAX_FILE_BYTES:
            raise DamagedCacheError(f"{size} bytes, more than {MAX_FILE_BYTES}")
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DamagedCacheError(f"not JSON ({err.__class__.__name__}: {err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise DamagedCacheError(f"format {found!r}, expected {FORMAT!r}")
        if not isinstance(data.get("entries"), list):
            raise DamagedCacheError("no list of entries")
        return [Entry.from_json(e) for e in data["entries"]]

    def load(self, env: dict, problems: Sequence[ConvProblem]) -> Tuple[Optional[Entry], str]:
        """(the entry for this environment and these problems or None, what happened: 'hit',
        'missing', 'stale: ...' or 'damaged: ...'); stale and damaged are logged."""
        try:
            entries = self._read()
        except (DamagedCacheError, OSError) as err:
            status = f"damaged: {err}"
            info("conv search cache %s is damaged (%s): ignored, rebuilt at this start-up",
                 self.path, err)
            return None, status
        names = [p.name for p in problems]
        for entry in entries:
            if [p.name for p in entry.problems] != names:
                continue
            if entry.environment == env:
                return entry, "hit"
            changed = sorted(k for k in set(env) | set(entry.environment)
                             if env.get(k) != entry.environment.get(k))
            detail = ", ".join(f"{k} {entry.environment.get(k)!r} -> {env.get(k)!r}"
                               for k in changed)
            info("conv search cache %s: the entry for these %d convolutions is stale (%s): "
                 "searched again and replaced", self.path, len(problems), detail)
            return None, f"stale: {detail}"
        return None, "missing"

    def store(self, env: dict, problems: Sequence[ConvProblem], strategies: Mapping[str, str],
              measured: Mapping, calibrated: bool = False) -> bool:
        """Write (replace) the entry for (env, problems), keeping the file's other valid entries
        (a damaged file is rewritten whole). Atomic (a temporary file, then os.replace). A file
        that cannot be written is logged, not an error: the cache only saves time. Returns
        whether it was written."""
        try:
            entries = self._read()
        except (DamagedCacheError, OSError):
            entries = []
        names = [p.name for p in problems]
        entries = [e for e in entries if [p.name for p in e.problems] != names]
        entry = Entry(dict(env), list(problems), {n: check_strategy(strategies[n]) for n in names},
                      json.loads(json.dumps(measured)), calibrated,
                      datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        entries = (entries + [entry])[-MAX_ENTRIES:]
        text = json.dumps({"format": FORMAT, "entries": [e.to_json() for e in entries]},
                          indent=1)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text)
            os.replace(temporary, self.path)
        except OSError as err:
            info("conv search cache %s could not be written (%s): the next start-up searches "
                 "again", self.path, err)
            with contextlib.suppress(OSError):
                temporary.unlink()
            return False
        return True


# ---------------------------------------------------------------------- calibration
def probe_in_child(problems: Sequence[ConvProblem], strategy: str, device="cuda",
                   python: str = sys.executable, timeout: float = 1800.0) -> dict:
    """Every problem under `strategy` in a fresh process (torch's plans of this process do not
    reach it): {"wall_s": the child's whole time, "measured": {name: {search_s, ms}}}."""
    import subprocess
    check_strategy(strategy)
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    begin = time.perf_counter()
    cudnn = torch.backends.cudnn  # the flags of torch's cache key, as in this process
    result = subprocess.run(
        [python, "-m", "wan.runtime.conv_search_cache", "probe", "--strategy", strategy,
         "--device", str(device), "--deterministic", str(int(cudnn.deterministic)),
         "--allow-tf32", str(int(cudnn.allow_tf32))],
        input=json.dumps([p.to_json() for p in problems]), capture_output=True, text=True,
        timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"the {strategy} probe failed (exit {result.returncode}): "
                           f"{result.stderr.strip()[-2000:]}")
    return {"wall_s": time.perf_counter() - begin, "measured": json.loads(result.stdout)}


def calibrate(problems: Sequence[ConvProblem], device="cuda",
              strategies: Iterable[str] = CALIBRATION_STRATEGIES, tolerance: float = TOLERANCE,
              cache: Optional[SearchCache] = None, env: Optional[dict] = None) -> dict:
    """Measure `strategies` for `problems` (each in a child process), decide per problem
    (`decide`) and, with `cache`, write the entry as calibrated. Returns {"strategies": chosen,
    "measured": {name: {strategy: {search_s, ms}}}, "children": {strategy: wall_s},
    "search_s": {strategy: total search seconds, "chosen": ...}, "conv_ms": {...}}."""
    strategies = [check_strategy(s) for s in strategies]
    measured: Dict[str, Dict[str, dict]] = {p.name: {} for p in problems}
    children = {}
    for strategy in strategies:
        probe = probe_in_child(problems, strategy, device)
        children[strategy] = probe["wall_s"]
        for name, result in probe["measured"].items():
            measured[name][strategy] = result
    chosen = decide(measured, tolerance)
    for problem in problems:  # a problem nothing measured keeps the default
        chosen.setdefault(problem.name, DEFAULT_STRATEGY)
    totals = {s: sum(m[s]["search_s"] for m in measured.values() if s in m) for s in strategies}
    conv_ms = {s: sum(m[s]["ms"] for m in measured.values() if s in m) for s in strategies}
    totals["chosen"] = sum(measured[n][s]["search_s"] for n, s in chosen.items()
                           if s in measured[n])
    conv_ms["chosen"] = sum(measured[n][s]["ms"] for n, s in chosen.items() if s in measured[n])
    if cache is not None:
        cache.store(env or environment(device), problems, chosen, measured, calibrated=True)
    return {"strategies": chosen, "measured": measured, "children": children,
            "search_s": totals, "conv_ms": conv_ms}


def describe(path=None) -> str:
    """A few lines on the cache file: its entries, their strategies and measurements."""
    path = cache_path(path)
    if path is None:
        return "conv search cache: off"
    cache = SearchCache(path)
    try:
        entries = cache._read()
    except (DamagedCacheError, OSError) as err:
        return f"conv search cache {path}: damaged ({err})"
    lines = [f"conv search cache {path}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"]
    for entry in entries:
        env = entry.environment
        counts: Dict[str, int] = {}
        for strategy in entry.strategies.values():
            counts[strategy] = counts.get(strategy, 0) + 1
        lines.append(f"  {env.get('gpu')} driver {env.get('driver')} cuDNN {env.get('cudnn')} "
                     f"torch {env.get('torch')}: {len(entry.problems)} convs, "
                     f"{'calibrated' if entry.calibrated else 'recorded'} {entry.written}, "
                     + ", ".join(f"{n} x {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


def _main(argv=None):
    p = argparse.ArgumentParser(prog="python -m wan.runtime.conv_search_cache",
                                description="The decoder's conv search cache: show it, or (for "
                                            "calibrate()) probe problems given on stdin.")
    sub = p.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="the cache file's entries")
    show.add_argument("--path", default=None)
    probe = sub.add_parser("probe", help="run the problems (JSON on stdin) under one strategy; "
                                         "JSON on stdout")
    probe.add_argument("--strategy", required=True)
    probe.add_argument("--device", default="cuda")
    probe.add_argument("--deterministic", type=int, choices=(0, 1), default=None)
    probe.add_argument("--allow-tf32", type=int, choices=(0, 1), default=None)
    args = p.parse_args(argv)
    if args.command == "show":
        print(describe(args.path))
        return
    problems = [ConvProblem.from_json(d) for d in json.loads(sys.stdin.read())]
    if args.deterministic is not None:
        torch.backends.cudnn.deterministic = bool(args.deterministic)
    if args.allow_tf32 is not None:
        torch.backends.cudnn.allow_tf32 = bool(args.allow_tf32)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = {problem.name: run_problem(problem, check_strategy(args.strategy), device)
           for problem in problems}
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
