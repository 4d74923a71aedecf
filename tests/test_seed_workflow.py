"""The seed documents' commands (tests/README.md, tests/QUICK_START.md), typed verbatim from the
repository root: class-qualified node ids, the `[warmup-iterations]` ids, and tests/run_tests.sh."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HAS_CUDA

ROOT = Path(__file__).resolve().parent.parent
NODE = "tests/test_causal_wan_model.py::TestCausalWanModel::"
SEED_COMMANDS = [
    ("pytest tests/test_causal_wan_model.py -v", 5),
    (f"pytest {NODE}test_forward_correctness -v -s", 1),
    (f"pytest {NODE}test_forward_with_kv_cache -v -s", 1),
    (f"pytest {NODE}test_performance_benchmark -v -s", 2),
    (f"pytest {NODE}test_performance_benchmark[3-20] -v -s", 1),
    (f"pytest {NODE}test_performance_benchmark[3-10] -v -s", 1),
    (f"pytest {NODE}test_model_comparison -v -s", 1),
    ("./tests/run_tests.sh correctness", 2),
]


def _run(command: str) -> subprocess.CompletedProcess:
    # `pytest` as a user's shell finds it: the environment this suite runs in comes first on PATH
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


# On a GPU each command builds three universal-size models (a minute each): the GPU run of the
# suite is `./tests/run_tests.sh all` by hand (benchmarks/results/ keeps its log).
@pytest.mark.skipif(HAS_CUDA, reason="CPU check of the commands; on a GPU run ./tests/run_tests.sh")
@pytest.mark.parametrize("command,tests", SEED_COMMANDS, ids=[c for c, _ in SEED_COMMANDS])
def test_seed_command_runs_as_typed(command, tests):
    result = _run(command)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    passed = sum(int(line.split(" passed")[0].split()[-1]) for line in output.splitlines()
                 if " passed" in line and line.startswith("="))
    assert passed == tests, output[-3000:]
    assert " skipped" not in output and "no tests ran" not in output
    if "benchmark" in command:
        report = (ROOT / "tests" / "baseline_performance.txt").read_text()
        assert report.startswith("Original Model Baseline") and "Speedup (median)" in report


def test_run_tests_sh_rejects_an_unknown_mode():
    result = _run("./tests/run_tests.sh nonsense")
    assert result.returncode == 1 and "Unknown test type" in result.stderr
