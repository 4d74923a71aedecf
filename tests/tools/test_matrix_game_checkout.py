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
  and decoder too, within the pipeline's own rounding of the latents to fp16 before decoding;
* the play server's start-image conditions (`CheckoutConditioner.start` + `advance` until settled)
  equal, bitwise, upstream's own tiled `vae.encode` of [image, 4 * (N - 1) black frames] at blocks
  0..12 and its `clip.encode_video` of the image, with weight files written from upstream's own
  classes at seeded random weights (tests/checkout/conditions.py; CPU, small frames, one tile and
  2 x 2 tiles); a missing CLIP file or tokenizer folder is named before anything loads.

Needs the checkout's Python dependencies (diffusers, transformers, einops, omegaconf, ...).
Stand-ins, only for what cannot be installed here (tests/checkout/standins.py): `flash_attn`
(SDPA), `torchvision` when its build does not fit the installed torch, and on a CPU
`torch.cuda.current_device` plus upstream's CUDA-only attention entry points (exact SDPA).
"""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


# start-image conditions (issue 30): the play server's, block by block, against upstream's encoding
ENCODER_DEPS = ("diffusers", "transformers", "tokenizers", "einops", "ftfy", "regex", "easydict",
                "tqdm")
CONDITION_FRAMES = 39  # N: 13 blocks of 3 latent frames


def _conditions(mode, *args, timeout=1800):
    missing = [name for name in ENCODER_DEPS if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"upstream's encoders need {', '.join(missing)}")
    result = subprocess.run([sys.executable, str(STANDINS / "conditions.py"), mode,
                             *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def condition_weights(checkout, tmp_path_factory):
    """Wan2.1_VAE.pth, the CLIP checkpoint and a tokenizer folder, written from upstream's own
    classes at seeded random weights (tests/checkout/conditions.py)."""
    out = tmp_path_factory.mktemp("condition-weights")
    _conditions("weights", "--checkout", checkout, "--out", out)
    return out


@pytest.mark.parametrize("size, tiles, dtype", [
    ("64x96", ["--tile-size", "44,80", "--tile-stride", "23,38"], "fp32"),  # the server's tiles
    ("32x48", ["--tile-size", "3,4", "--tile-stride", "1,2"], "bf16"),      # 2 x 2 tiles, blended
], ids=["server-tiles-fp32", "four-tiles-bf16"])
def test_server_conditions_equal_upstreams_encoding_at_every_block(checkout, condition_weights,
                                                                   tmp_path, size, tiles, dtype):
    """CheckoutConditioner.start() then advance() until done gives, for blocks 0..12, bitwise
    (same dtype) what upstream's own `vae.encode(video, tiled=True, ...)` of [image,
    4 * (N - 1) black frames] gives at those blocks (the mask before it, as
    inference_streaming.py), and visual_context is upstream's `clip.encode_video` of the image.
    Block 0 is ready after start() alone; the encoder settles where upstream's latents stop
    changing. (About 3 and 9 minutes on a 2-core CPU.)"""
    import torch
    common = ["--checkout", checkout, "--weights", condition_weights, "--size", size,
              "--frames", CONDITION_FRAMES, "--dtype", dtype, *tiles]
    _conditions("upstream", *common, "--out", tmp_path / "upstream.pt")
    ours_run = _conditions("ours", *common, "--out", tmp_path / "ours.pt", "--blocks", 13)
    upstream = torch.load(tmp_path / "upstream.pt")
    ours = torch.load(tmp_path / "ours.pt")
    print({k: ours[k] for k in ("settled_frame", "frames_encoded", "start_s", "settle_s",
                                "after_start")})
    assert ours["after_start"] == {"frames_encoded": 3, "done": False, "block0_ready": True,
                                   "block1_ready": False}
    cond = upstream["cond_concat"]
    assert cond.shape[2] == CONDITION_FRAMES
    for index, block in enumerate(ours["blocks"]):
        expected = cond[:, :, 3 * index:3 * index + 3]
        assert block.dtype == expected.dtype and block.shape == expected.shape
        assert torch.equal(block, expected), f"block {index}"
    assert ours["visual_context"].dtype == upstream["visual_context"].dtype
    assert torch.equal(ours["visual_context"], upstream["visual_context"])
    # settled where upstream's latents stop changing, before the last block compared
    settled = ours["settled_frame"]
    assert settled is not None and not ours["capped"] and settled <= CONDITION_FRAMES - 3
    latents = cond[:, 4:]
    assert not torch.equal(latents[:, :, settled - 1], latents[:, :, settled - 2])
    for frame in range(settled, CONDITION_FRAMES):
        assert torch.equal(latents[:, :, frame], latents[:, :, settled - 1]), frame
    assert ours["frames_encoded"] <= settled + 1
    assert "start-image conditions settled" in ours_run.stderr


def test_server_conditions_name_a_missing_clip_file_before_loading(checkout, tmp_path):
    """With the VAE but without the CLIP checkpoint or the tokenizer folder, CheckoutConditioner
    raises FileNotFoundError naming them, before importing or loading anything."""
    import torch
    from wan.play.conditioning import CLIP_FILE, TOKENIZER_DIR, VAE_FILE, CheckoutConditioner
    (tmp_path / VAE_FILE).write_bytes(b"")
    with pytest.raises(FileNotFoundError) as error:
        CheckoutConditioner(checkout, tmp_path, "cpu", torch.float32)
    assert CLIP_FILE in str(error.value) and TOKENIZER_DIR in str(error.value)
    assert VAE_FILE not in str(error.value).split("missing:")[1]
