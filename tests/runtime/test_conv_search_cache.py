"""The decoder's conv search cache (wan/runtime/conv_search_cache.py), on a CPU.

* the file is written once (the first start-up, which searched), read at the next (no write, the
  recorded strategies applied), and refused, said and rebuilt when its key differs (another
  driver, cuDNN, torch, GPU) or it is damaged (truncated, not JSON, another format, a bad
  strategy or problem, too large, a pickle): it is never unpickled;
* a calibrated entry (strategies measured in child processes) makes the next start-up search only
  the problems whose fast plan needs a search;
* `record_convolutions` lists a function's conv problems without running them; `decide` picks the
  cheapest start within the tolerance of the fastest plan; the strategies' cudnn flags.

"A start-up" here is a new decoder after `conv_search_cache._done` is cleared, which is what a new
process starts with (torch keeps plans per process, and so does the module's record of them);
one test runs two real processes.
"""
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import build_decoder
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.runtime import conv_search_cache as csc

ROOT = Path(__file__).resolve().parents[2]
HW = (1, 2)


@pytest.fixture(autouse=True)
def _new_process():
    csc._done.clear()
    yield
    csc._done.clear()


def _start_up(path, hw=HW):
    """A start-up as a new process makes it: a new decoder, no plans yet, compile()."""
    csc._done.clear()
    decoder = build_decoder(OptimizedVAEDecoderWrapper, torch.float32)
    decoder._conv_search_device_types = ("cuda", "cpu")  # the search pass on a CPU
    decoder.startup_shape = (1, 3, *hw)
    decoder.conv_search_cache = str(path)
    decoder.compile()
    return decoder


def _problems(n=2):
    x = torch.zeros(1, 4, 3, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    out = []
    for k in range(n):
        w = torch.zeros(4 + k, 4, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
        out.append(csc.problem_of(x, w, (1, 1, 1), (0, 1, 1), (1, 1, 1), 1))
    return out


def test_written_once_then_read_at_the_next_start_up(tmp_path, caplog):
    path = tmp_path / "conv_search.json"
    first = _start_up(path)
    report = first.conv_search_report
    assert report["cache"] == "missing" and report["cache_written"]
    assert first.counters["searches"] == report["problems"] > 10
    written = path.read_bytes()
    data = json.loads(written)
    assert data["format"] == csc.FORMAT and len(data["entries"]) == 1
    entry = data["entries"][0]
    env = csc.environment("cpu")
    assert entry["environment"] == env
    assert {"gpu", "driver", "cudnn", "torch", "cuda"} <= set(env)
    assert set(entry["strategies"].values()) == {"search:all"} and not entry["calibrated"]
    assert len(entry["measured"]) == report["problems"]

    second = _start_up(path)
    assert second.conv_search_report["cache"] == "hit"
    assert not second.conv_search_report["cache_written"]
    assert path.read_bytes() == written  # read, not written again
    # what it recorded (search:all everywhere) is what it ran
    assert second.counters["searches"] == report["problems"]


def test_a_calibrated_entry_spares_the_searches_that_do_not_pay(tmp_path):
    """An entry that says 'heuristic' for some problems: the next start-up runs those without a
    search (counted as heuristic, not as searches)."""
    path = tmp_path / "conv_search.json"
    first = _start_up(path)
    data = json.loads(path.read_text())
    names = sorted(data["entries"][0]["strategies"])
    for name in names[::2]:
        data["entries"][0]["strategies"][name] = "heuristic"
    for name in names[1::4]:
        data["entries"][0]["strategies"][name] = "search:3"
    data["entries"][0]["calibrated"] = True
    path.write_text(json.dumps(data))
    second = _start_up(path)
    report = second.conv_search_report
    assert report["cache"] == "hit"
    assert report["heuristic"] == len(names[::2])
    assert second.counters["searches"] == len(names) - len(names[::2])
    assert first.counters["searches"] == len(names)
    assert report["strategies"] == data["entries"][0]["strategies"]


@pytest.mark.parametrize("field,value", [("driver", "0.0.1"), ("cudnn", 1), ("torch", "0.1"),
                                         ("gpu", "another GPU"), ("allow_tf32", None)])
def test_an_entry_of_another_environment_is_stale_said_and_rebuilt(tmp_path, caplog, field,
                                                                   value):
    path = tmp_path / "conv_search.json"
    _start_up(path)
    data = json.loads(path.read_text())
    env = data["entries"][0]["environment"]
    env[field] = value if value is not None else (not env[field])
    data["entries"][0]["strategies"] = {n: "heuristic" for n in data["entries"][0]["strategies"]}
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="wan.fast"):
        again = _start_up(path)
    report = again.conv_search_report
    assert report["cache"].startswith("stale: ") and field in report["cache"]
    assert "stale" in caplog.text and field in caplog.text
    # the stale entry's strategies were not used: the default search ran, and replaced it
    assert again.counters["searches"] == report["problems"] and report["heuristic"] == 0
    assert report["cache_written"]
    rebuilt = json.loads(path.read_text())
    assert len(rebuilt["entries"]) == 1
    assert rebuilt["entries"][0]["environment"] == csc.environment("cpu")


class _Exploit:
    """What an unpickler would run: it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _damage(path, how, tmp_path):
    text = path.read_text()
    data = json.loads(text)
    if how == "truncated":
        path.write_text(text[:len(text) // 2])
    elif how == "not_utf8":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif how == "pickle":
        path.write_bytes(pickle.dumps(_Exploit(tmp_path / "unpickled")))
    elif how == "other_format":
        path.write_text(json.dumps(dict(data, format="something/9")))
    elif how == "bad_strategy":
        strategies = data["entries"][0]["strategies"]
        strategies[next(iter(strategies))] = "search:-1"
        path.write_text(json.dumps(data))
    elif how == "bad_problem":
        data["entries"][0]["problems"][0]["input_size"] = [1, "two", 3]
        path.write_text(json.dumps(data))
    elif how == "strategies_mismatch":
        data["entries"][0]["strategies"].popitem()
        path.write_text(json.dumps(data))
    elif how == "too_large":
        path.write_text(text + " " * csc.MAX_FILE_BYTES)
    elif how == "a_list":
        path.write_text("[]")


@pytest.mark.parametrize("how", ["truncated", "not_utf8", "pickle", "other_format",
                                 "bad_strategy", "bad_problem", "strategies_mismatch",
                                 "too_large", "a_list"])
def test_a_damaged_file_is_refused_said_rebuilt_and_never_unpickled(tmp_path, caplog, how):
    path = tmp_path / "conv_search.json"
    _start_up(path)
    _damage(path, how, tmp_path)
    with caplog.at_level(logging.INFO, logger="wan.fast"):
        again = _start_up(path)
    report = again.conv_search_report
    assert report["cache"].startswith("damaged: "), report["cache"]
    assert "damaged" in caplog.text
    assert again.counters["searches"] == report["problems"]
    assert not (tmp_path / "unpickled").exists()
    rebuilt = json.loads(path.read_text())  # valid again
    assert rebuilt["format"] == csc.FORMAT and len(rebuilt["entries"]) == 1
    assert csc.SearchCache(path).load(csc.environment("cpu"), [
        csc.ConvProblem.from_json(p) for p in rebuilt["entries"][0]["problems"]])[1] == "hit"


def test_other_shapes_get_an_entry_of_their_own(tmp_path):
    path = tmp_path / "conv_search.json"
    _start_up(path, hw=(1, 2))
    other = _start_up(path, hw=(2, 2))
    assert other.conv_search_report["cache"] == "missing"
    assert len(json.loads(path.read_text())["entries"]) == 2
    assert _start_up(path, hw=(1, 2)).conv_search_report["cache"] == "hit"


def test_the_cache_can_be_off_and_its_path_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv(csc.ENV_VAR, "off")
    assert csc.cache_path() is None
    decoder = _start_up_with(None, tmp_path)
    assert decoder.conv_search_report["cache"] == "off"
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv(csc.ENV_VAR, str(tmp_path / "from_env.json"))
    assert csc.cache_path() == tmp_path / "from_env.json"
    assert csc.cache_path(str(tmp_path / "given.json")) == tmp_path / "given.json"
    assert csc.cache_path(False) is None
    monkeypatch.delenv(csc.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert csc.cache_path() == tmp_path / "xdg" / "wan" / "conv_search.json"


def _start_up_with(cache, tmp_path):
    csc._done.clear()
    decoder = build_decoder(OptimizedVAEDecoderWrapper, torch.float32)
    decoder._conv_search_device_types = ("cuda", "cpu")
    decoder.startup_shape = (1, 3, *HW)
    decoder.conv_search_cache = cache
    decoder.compile()
    return decoder


def test_an_unwritable_cache_is_said_and_the_start_up_goes_on(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.INFO, logger="wan.fast"):
        decoder = _start_up(blocker / "conv_search.json")
    assert not decoder.conv_search_report["cache_written"]
    assert "could not be written" in caplog.text
    assert decoder.counters["searches"] > 0


def test_a_second_process_reads_what_the_first_wrote(tmp_path):
    """Two real processes: the first writes the entry, the second finds it ('hit') and writes
    nothing."""
    path = tmp_path / "conv_search.json"
    script = (
        "import json, sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from helpers import build_decoder\n"
        "from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper as D\n"
        "d = build_decoder(D, torch.float32)\n"
        "d._conv_search_device_types = ('cuda', 'cpu')\n"
        f"d.startup_shape = (1, 3, {HW[0]}, {HW[1]})\n"
        f"d.conv_search_cache = {str(path)!r}\n"
        "d.compile()\n"
        "r = d.conv_search_report\n"
        "print(json.dumps({'cache': r['cache'], 'written': r['cache_written'],"
        " 'searches': d.counters['searches']}))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                   "")]))
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
        if len(runs) == 1:
            written = path.read_bytes()
    assert runs[0]["cache"] == "missing" and runs[0]["written"]
    assert runs[1]["cache"] == "hit" and not runs[1]["written"]
    assert path.read_bytes() == written


# ------------------------------------------------------------------ the pieces
def test_record_convolutions_lists_distinct_problems_without_running_them():
    x = torch.randn(1, 4, 3, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    w1 = torch.randn(5, 4, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    w2 = torch.randn(6, 4, 1, 1, 1)
    outputs = []

    def work():
        for _ in range(3):
            outputs.append(F.conv3d(x, w1, None, 1, (0, 1, 1)))
        outputs.append(F.conv3d(x, w2))
        outputs.append(outputs[0] * 2)  # other ops run on the stand-in outputs

    problems = csc.record_convolutions(work)
    assert [p.weight_size for p in problems] == [(5, 4, 3, 3, 3), (6, 4, 1, 1, 1)]
    assert problems[0].padding == (0, 1, 1) and problems[0].dtype == "float32"
    real = F.conv3d(x, w1, None, 1, (0, 1, 1))
    assert outputs[0].shape == real.shape
    assert outputs[0].is_contiguous(memory_format=torch.channels_last_3d)  # cuDNN's layout
    assert outputs[3].shape == (1, 6, 3, 5, 6)
    x_again, w_again = problems[0].tensors("cpu")
    assert x_again.stride() == x.stride() and w_again.stride() == w1.stride()
    assert csc.problem_of(x_again, w_again, (1, 1, 1), (0, 1, 1), (1, 1, 1), 1) == problems[0]
    assert csc.ConvProblem.from_json(json.loads(json.dumps(problems[0].to_json()))) == problems[0]


def test_decide_takes_the_cheapest_start_among_the_fast_plans():
    measured = {
        "a": {"heuristic": {"search_s": 0.01, "ms": 4.7}, "search:3": {"search_s": 0.9, "ms": 2.05},
              "search:all": {"search_s": 5.6, "ms": 2.0}},
        "b": {"heuristic": {"search_s": 0.01, "ms": 0.2}, "search:all": {"search_s": 3.0,
                                                                         "ms": 0.199}},
        "c": {"heuristic": {"search_s": 0.01, "ms": 1.0}, "search:all": {"search_s": 2.0,
                                                                         "ms": 0.5}},
        "d": {"heuristic": {"search_s": 0.01, "ms": float("nan")},
              "search:all": {"search_s": 2.0, "ms": 0.5}},
    }
    assert csc.decide(measured, tolerance=0.03) == {"a": "search:3", "b": "heuristic",
                                                     "c": "search:all", "d": "search:all"}
    assert csc.decide(measured, tolerance=0.0)["a"] == "search:all"


# (not named `benchmark`: pytest-benchmark, where installed, claims that name for its fixture)
@pytest.mark.parametrize("strategy,searches,limit", [("heuristic", False, None),
                                                     ("search:3", True, 3),
                                                     ("search:all", True, 0)])
def test_strategy_flags(strategy, searches, limit):
    cudnn = torch.backends.cudnn
    before = (cudnn.benchmark, cudnn.benchmark_limit)
    deterministic, allow_tf32 = cudnn.deterministic, cudnn.allow_tf32
    with csc.strategy_flags(strategy):
        assert cudnn.benchmark is searches
        if limit is not None and cudnn.is_available():  # (no limit without cuDNN)
            assert cudnn.benchmark_limit == limit
        assert (cudnn.deterministic, cudnn.allow_tf32) == (deterministic, allow_tf32)
    assert (cudnn.benchmark, cudnn.benchmark_limit) == before


@pytest.mark.parametrize("bad", ["search:0", "search:", "search:03", "exhaustive", "", None])
def test_unknown_strategies_are_refused(bad):
    with pytest.raises(ValueError, match="strategy"):
        csc.check_strategy(bad)


def test_search_runs_each_problem_once_per_process_and_thread():
    problems = _problems(2)
    first = csc.search(problems, {problems[0].name: "heuristic"}, "cpu")
    assert (first["searched"], first["heuristic"], first["reused"]) == (1, 1, 0)
    again = csc.search(problems, {}, "cpu")
    assert (again["searched"], again["heuristic"], again["reused"]) == (0, 0, 2)


def test_calibrate_measures_each_strategy_in_a_child_and_writes_the_choice(tmp_path):
    """The real mechanism on a CPU (where every strategy runs the same conv): children probe
    each strategy, the choice is the cheapest start, the entry is marked calibrated."""
    path = tmp_path / "conv_search.json"
    problems = _problems(2)
    env = csc.environment("cpu")
    result = csc.calibrate(problems, "cpu", strategies=("heuristic", "search:all"),
                           tolerance=10.0, cache=csc.SearchCache(path), env=env)
    assert set(result["children"]) == {"heuristic", "search:all"}
    for name in (p.name for p in problems):
        assert set(result["measured"][name]) == {"heuristic", "search:all"}
        assert result["measured"][name]["heuristic"]["ms"] > 0
    # with a tolerance that makes every plan "as fast", the cheaper start wins everywhere
    expected = csc.decide(result["measured"], 10.0)
    assert result["strategies"] == expected
    entry, status = csc.SearchCache(path).load(env, problems)
    assert status == "hit" and entry.calibrated and entry.strategies == expected


def test_calibrate_conv_search_on_the_decoder_writes_an_entry_its_start_up_reads(tmp_path):
    path = tmp_path / "conv_search.json"
    csc._done.clear()
    decoder = build_decoder(OptimizedVAEDecoderWrapper, torch.float32)
    decoder.startup_shape = (1, 3, *HW)
    decoder.conv_search_cache = str(path)
    result = decoder.calibrate_conv_search(strategies=("heuristic", "search:all"))
    assert len(result["strategies"]) > 10
    started = _start_up(path)
    report = started.conv_search_report
    assert report["cache"] == "hit" and report["strategies"] == result["strategies"]
    assert started.counters["searches"] == sum(
        s != "heuristic" for s in result["strategies"].values())


def test_show_and_probe_command_lines(tmp_path):
    path = tmp_path / "conv_search.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    problems = _problems(1)
    result = subprocess.run(
        [sys.executable, "-m", "wan.runtime.conv_search_cache", "probe", "--strategy",
         "heuristic", "--device", "cpu"], input=json.dumps([p.to_json() for p in problems]),
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert set(measured) == {problems[0].name} and measured[problems[0].name]["ms"] > 0
    csc.SearchCache(path).store(csc.environment("cpu"), problems, {problems[0].name: "heuristic"},
                                {problems[0].name: {"heuristic": measured[problems[0].name]}})
    shown = subprocess.run([sys.executable, "-m", "wan.runtime.conv_search_cache", "show",
                            "--path", str(path)], capture_output=True, text=True, env=env,
                           timeout=600)
    assert shown.returncode == 0 and "1 entry" in shown.stdout and "1 x heuristic" in shown.stdout
