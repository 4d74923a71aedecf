"""Against a real Matrix-Game-2 checkout (SkyworkAI/Matrix-Game or the zoheth fork, the folder
`Matrix-Game-2/`) named by MATRIX_GAME_DIR; skipped without one. The checkout is copied first: the
one named is never changed.

* `python -m wan.integrate` applies, is idempotent, and its undo leaves the tree byte-identical;
* upstream's own CausalInferencePipeline.inference on a CPU in float32 (a small config with
  upstream's hard-coded head sizes: 2 layers) gives the same latents with the integrated optimized
  model as with upstream's model: relative error <= 1e-5 over 6 blocks, two videos through one
  pipeline (tests/checkout/run_pipeline.py);
* the seed's `./tests/run_tests.sh compare` (and `correctness`) pass inside the integrated checkout,
  run as the README says, `bash scripts/checkout_suite.sh CHECKOUT compare` (the stand-ins below);
* upstream's scripts' own model-building code (`_init_models` of inference.py and
  inference_streaming.py, every --vae_compile_mode) builds OptimizedVAEDecoderWrapper, calls no
  torch.compile, and the only file read with weights_only=False is the decoder's marker, whose
  pickle names one function of this library and which gives back the decoder just built
  (tests/checkout/build_decoder.py);
* upstream's pipeline with upstream's DiT and the integrated decoder gives upstream's frames (float32,
  decoded over an 8 x 16 crop of the latents: relative error <= 1e-5), and with the integrated DiT
  and decoder too, within the pipeline's own rounding of the latents to fp16 before decoding.

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
    assert "utils/wan_wrapper.py" in changed and "wan/ops/registry.py" in changed
    upstream_changed = {path for path in changed if path in before}
    assert upstream_changed <= {"utils/wan_wrapper.py", "wan/modules/optimized_causal_model.py",
                                "tests/test_causal_wan_model.py", "tests/run_tests.sh",
                                "tests/README.md", "tests/QUICK_START.md", "inference.py",
                                "inference_streaming.py"}
    assert {"inference.py", "inference_streaming.py", "wan/modules/optimized_vae_decoder.py",
            "wan/modules/vae_decoder.py"} <= changed
    assert "+from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper as " \
           "VAEDecoderWrapper" in first.stdout


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
    """The README's command: scripts/checkout_suite.sh runs the checkout's ./tests/run_tests.sh
    with the stand-ins this machine needs."""
    checkout, _, _ = integrated
    result = subprocess.run(["bash", str(ROOT / "scripts" / "checkout_suite.sh"), str(checkout),
                             mode], env=dict(os.environ, PYTHON=sys.executable),
                            capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"checkout_suite.sh: running {checkout}/tests/run_tests.sh {mode}" in result.stderr
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


def test_upstream_scripts_build_the_optimized_decoder_without_compile_or_unpickling(integrated,
                                                                                    tmp_path):
    checkout, _, _ = integrated
    out = tmp_path / "build.json"
    result = subprocess.run([sys.executable, str(STANDINS / "build_decoder.py"), "--out", str(out)],
                            cwd=checkout, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["torch_compile_calls"] == 0
    modes = [(run["script"], run["vae_compile_mode"]) for run in report["runs"]]
    assert modes == [("inference_streaming", None), ("inference", "none"), ("inference", "auto"),
                     ("inference", "auto"), ("inference", "force")]
    for run in report["runs"]:
        assert run["decoder_class"] == "OptimizedVAEDecoderWrapper", run
        assert run["generator_class"] == "OptimizedCausalWanModel"
        assert run["decoder_is_the_one_built"] and not run["compiled_call_impl"]
        assert run["decoder_dtype"] == "torch.float16"
        for load in run["loads"]:  # upstream reads Wan2.1_VAE.pth with torch's default
            if load["weights_only"] is False:
                assert load["file"] == "compiled_vae_decoder.pt"
                assert load["pickle_globals"] == ["wan.modules.optimized_vae_decoder "
                                                  "_resume_decoder"]
    auto_first, auto_second = report["runs"][2], report["runs"][3]
    assert not auto_first["cache_existed"] and auto_first["cache_bytes"] < 4096
    assert auto_second["cache_existed"] and any(
        load["weights_only"] is False for load in auto_second["loads"])
    # compile() turned the graphs on where the user had not turned them off
    assert report["runs"][0]["decoder_cuda_graphs"] is True


@pytest.mark.parametrize("dit", ["upstream", "integrated"])
def test_upstream_pipeline_gives_the_same_frames_with_the_integrated_decoder(integrated, tmp_path,
                                                                            dit):
    checkout, _, _ = integrated
    out = tmp_path / "frames.json"
    flags = ["--upstream-dit-only"] if dit == "upstream" else []
    result = subprocess.run(
        [sys.executable, str(STANDINS / "run_pipeline.py"), "--out", str(out), "--blocks", "3",
         "--videos", "2", "--decoder", "integrated", "--decoder-dtype", "fp32",
         "--decode-crop", "8x16", *flags], cwd=checkout, capture_output=True, text=True,
        timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    print(json.dumps({k: report[k] for k in ("optimized_vs_upstream_rel_err",
                                             "frames_optimized_vs_upstream_rel_err")}))
    assert report["upstream"]["decoder_class"] == "VAEDecoderWrapper"
    assert report["optimized"]["decoder_class"] == "OptimizedVAEDecoderWrapper"
    assert len(report["frames_optimized_vs_upstream_rel_err"]) == 2
    if dit == "upstream":  # the same latents reach both decoders
        assert max(report["optimized_vs_upstream_rel_err"]) == 0
        assert max(report["frames_optimized_vs_upstream_rel_err"]) <= LATENT_TOLERANCE
    else:
        assert max(report["optimized_vs_upstream_rel_err"]) <= LATENT_TOLERANCE
        # the pipeline rounds the latents to fp16 (`denoised_pred.half()`) before decoding: latents
        # 4e-7 apart land on neighbouring fp16 values here and there (2^-11 relative each)
        assert max(report["frames_optimized_vs_upstream_rel_err"]) <= 1e-4
