"""Against a real Matrix-Game-2 checkout (SkyworkAI/Matrix-Game or the zoheth fork, the folder
`Matrix-Game-2/`) named by MATRIX_GAME_DIR; skipped without one. The checkout is copied first: the
one named is never changed.

* `python -m wan.integrate` applies, is idempotent, and its undo leaves the tree byte-identical;
* upstream's own CausalInferencePipeline.inference on a CPU in float32 (a small config with
  upstream's hard-coded head sizes: 2 layers) gives the same latents with the integrated optimized
  model as with upstream's model: relative error <= 1e-5 over 6 blocks, two videos through one
  pipeline (tests/checkout/run_pipeline.py);
* the seed's `./tests/run_tests.sh compare` (and `correctness`) pass inside the integrated checkout.

Needs the checkout's Python dependencies (diffusers, transformers, einops, omegaconf, ...).
Stand-ins, only for what cannot be installed here (tests/checkout/standins.py): `flash_attn`
(SDPA), `torchvision` when its build does not fit the installed torch, and on a CPU
`torch.cuda.current_device` plus upstream's CUDA-only attention entry points (exact SDPA).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKOUT = os.environ.get("MATRIX_GAME_DIR")
pytestmark = pytest.mark.skipif(not CHECKOUT, reason="set MATRIX_GAME_DIR to a Matrix-Game-2 "
                                                     "checkout to run these")
STANDINS = ROOT / "tests" / "checkout"
LATENT_TOLERANCE = 1e-5


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and ".git" not in p.parts
            and ".pytest_cache" not in p.parts}


def _integrate(checkout: Path, *flags) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "wan.integrate", *flags, str(checkout)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    source = Path(CHECKOUT).resolve()
    if (source / "Matrix-Game-2").is_dir():
        source = source / "Matrix-Game-2"
    copy = tmp_path_factory.mktemp("checkout") / "Matrix-Game-2"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.mp4",
                                                                "*.pdf", "*.safetensors", "*.pth"))
    return copy


@pytest.fixture(scope="module")
def integrated(checkout):
    before = _tree(checkout)
    first = _integrate(checkout)
    yield checkout, before, first
    _integrate(checkout, "--undo")


def test_integrate_applies_shows_the_diff_and_is_idempotent(integrated):
    checkout, before, first = integrated
    assert "+from wan.modules.optimized_causal_model import OptimizedCausalWanModel as " \
           "CausalWanModel" in first.stdout
    assert "-from wan.modules.causal_model import CausalWanModel" in first.stdout
    assert "nothing changed" in _integrate(checkout).stdout
    changed = {path for path, digest in _tree(checkout).items() if before.get(path) != digest}
    assert "utils/wan_wrapper.py" in changed and "wan/kernels/registry.py" in changed
    upstream_changed = {path for path in changed if path in before}
    assert upstream_changed <= {"utils/wan_wrapper.py", "wan/modules/optimized_causal_model.py",
                                "tests/test_causal_wan_model.py", "tests/run_tests.sh",
                                "tests/README.md", "tests/QUICK_START.md"}


def test_upstream_pipeline_gives_the_same_latents(integrated, tmp_path):
    checkout, _, _ = integrated
    out = tmp_path / "pipeline.json"
    result = subprocess.run(
        [sys.executable, str(STANDINS / "run_pipeline.py"), "--out", str(out), "--blocks", "6",
         "--videos", "2"], cwd=checkout, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    print(json.dumps({k: report[k] for k in ("optimized_vs_upstream_rel_err", "blocks", "videos")}))
    assert report["optimized"]["model_class"] == "OptimizedCausalWanModel"
    assert report["upstream"]["model_class"] == "CausalWanModel"
    assert len(report["optimized_vs_upstream_rel_err"]) == 2
    assert max(report["optimized_vs_upstream_rel_err"]) <= LATENT_TOLERANCE
    # diffusers' from_config keeps every key of upstream's config.json for the optimized class
    assert "passed to OptimizedCausalWanModel, but are not expected" not in result.stderr


@pytest.mark.parametrize("mode", ["compare", "correctness"])
def test_seed_workflow_inside_the_checkout(integrated, mode):
    checkout, _, _ = integrated
    env = dict(os.environ, PYTHONPATH=str(STANDINS),
               PYTEST_ADDOPTS="-p standins",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["./tests/run_tests.sh", mode], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert " passed" in output and " failed" not in output and " skipped" not in output
    print(output[-1500:])


def test_undo_restores_the_tree_byte_for_byte(integrated):
    checkout, before, _ = integrated
    (checkout / "tests" / "baseline_performance.txt").write_text("rewritten by the suite\n")
    _integrate(checkout, "--undo")
    try:
        assert _tree(checkout) == before
    finally:
        _integrate(checkout)  # the fixture undoes it again at the end
