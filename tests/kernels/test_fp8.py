"""precision="fp8": the quantization math against float64 (CPU), every FP8 kernel beside its eager
twin (GPU), the model's FP8 path through the emulated GEMM (CPU) and through the real one with CUDA
graphs (GPU), the switch, the refusal where there are no FP8 tensor cores, and `python -m
wan.compare`.

Triton's CPU interpreter rounds float8 wrongly (a carry into the exponent is dropped: 127.08 -> 64),
so the Triton FP8 kernels are tested on the GPU only; on a CPU the quantization math is tested in
float32 through the eager twin."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (assert_close_elementwise, build_model, make_caches, make_inputs, rel_err,
                     requires_cuda, run_stream)
from wan.modules.presets import tiny_variant_config
from wan.kernels import eager
from wan.kernels.fp8 import E4M3, E4M3_MAX, Fp8Rows, quantize_rows, quantize_weight
from wan.runtime.options import DEFAULT_FP8_GEMMS, FP8_GEMMS
from wan.kernels.registry import BackendUnavailableError
from wan.modules.optimized_causal_model import OptimizedCausalWanModel

ROOT = Path(__file__).resolve().parents[2]
EMULATED = {"linear_fp8": "eager"}
# e4m3: 3 mantissa bits, so rounding to nearest is within 2^-4 relative for normal values;
# values below 2^-6 (subnormal) are within half a step of 2^-9, i.e. 2^-10, absolute
HALF_ULP, SUBNORMAL_HALF_STEP = 2.0 ** -4, 2.0 ** -10

ROW_SHAPES = [(1, 17), (7, 64), (33, 2 ** 10 + 17), (5, 1536), (3, 8960)]


def _rows(shape, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    # rows of very different magnitudes, one outlier per row (what per-token scales are for)
    x = x * torch.logspace(-3, 3, shape[0], dtype=torch.float64)[:, None]
    x[:, shape[1] // 2] *= 20
    return x.to(device=device, dtype=dtype)


def _assert_rounded_to_nearest(x, q: Fp8Rows):
    """Each dequantized value is x rounded to e4m3 on the row's grid (against float64)."""
    x = x.double()
    scale = q.scale.double()
    deq = q.data.double() * scale
    bound = torch.maximum(HALF_ULP * x.abs(), SUBNORMAL_HALF_STEP * scale.expand_as(x))
    assert ((deq - x).abs() <= bound * (1 + 1e-6)).all()
    # the row's largest magnitude lands on 448 exactly
    assert torch.allclose(q.scale.double().squeeze(-1) * E4M3_MAX, x.abs().amax(-1), rtol=1e-6)


@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
def test_quantize_rows_rounds_to_nearest_with_a_scale_per_row(shape):
    x = _rows(shape, seed=shape[1])
    q = quantize_rows(x)
    assert q.data.dtype == E4M3 and q.scale.shape == (shape[0], 1)
    _assert_rounded_to_nearest(x, q)


def test_zero_rows_and_weights_quantize_to_zero():
    x = torch.zeros(3, 32)
    x[1] = torch.linspace(-1, 1, 32)
    q = quantize_rows(x)
    assert torch.equal(q.dequantize()[0], x[0]) and torch.isfinite(q.scale).all()
    w = quantize_weight(_rows((48, 32), seed=3))
    assert w.scale.shape == (48,) and w.data.is_contiguous()
    _assert_rounded_to_nearest(_rows((48, 32), seed=3), Fp8Rows(w.data, w.scale[:, None]))


@pytest.mark.parametrize("bias", [True, False])
def test_emulated_fp8_gemm_is_the_float64_product_of_the_quantized_operands(bias):
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(37, 64, generator=gen), torch.randn(48, 64, generator=gen)
    b = torch.randn(48, dtype=torch.float64).float() if bias else None
    got = eager.linear_fp8(quantize_rows(x), quantize_weight(w), b)
    expected = quantize_rows(x).dequantize().double() @ quantize_weight(w).dequantize().double().t()
    if bias:
        expected = expected + b.double()
    assert got.dtype == torch.float32 and rel_err(got, expected) < 1e-6
    # and the product of the quantized operands is within FP8's error of the exact one
    exact = x.double() @ w.double().t() + (b.double() if bias else 0)
    assert 1e-3 < rel_err(got, exact) < 0.1


def test_fused_norms_quantize_what_they_would_return():
    x = _rows((60, 40), seed=4).view(2, 30, 40) * 1e-2
    shift, scale = (torch.randn(2, 3, 1, 40) for _ in range(2))
    expected = quantize_rows(eager.layer_norm_modulate(x, shift, scale, 1e-6))
    got = eager.layer_norm_modulate(x, shift, scale, 1e-6, quantize=True)
    assert torch.equal(got.data.float(), expected.data.float())
    total, normed = eager.gated_residual_layer_norm(x, x, shift, None, None, 1e-6, quantize=True)
    assert torch.equal(normed.scale, quantize_rows(eager.layer_norm(total, None, None, 1e-6)).scale)


# ------------------------------------------------------------------ the model (CPU: emulated GEMM)
def _fp8_pair(variant="universal"):
    config = tiny_variant_config(variant)
    reference = build_model(config=config, seed=0)
    model = build_model(config=config, seed=0, cls=OptimizedCausalWanModel, backend=EMULATED,
                        precision="fp8", dtype=torch.float32)
    return reference, model


@torch.no_grad()
@pytest.mark.parametrize("variant", ["universal", "templerun"])
def test_fp8_stream_stays_within_fp8_error_of_float64(variant):
    reference, model = _fp8_pair(variant)
    expected = run_stream(reference, 3, caches=make_caches(reference))
    model.start_stream(latent_size=(8, 16))
    got = run_stream(model, 3)
    errors = [rel_err(g, e) for g, e in zip(got, expected)]
    # e4m3 rounds each operand within 6%; over 2 layers the outputs land at ~2-3%
    assert 3e-3 < min(errors) and max(errors) < 0.08, errors
    native = build_model(config=tiny_variant_config(variant), seed=0, cls=OptimizedCausalWanModel,
                         backend="eager", dtype=torch.float32)
    native.start_stream(latent_size=(8, 16))
    assert max(rel_err(g, e) for g, e in zip(run_stream(native, 3), expected)) < 1e-5


@torch.no_grad()
def test_switching_precision_keeps_weights_and_follows_loads():
    reference, model = _fp8_pair()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = make_inputs(model)
    inputs = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    model.start_stream(latent_size=(8, 16))
    fp8_out = model(**inputs, current_start=0)
    assert model.precision_report()["fp8_gemms"] == list(DEFAULT_FP8_GEMMS)
    model.set_precision("native")
    model.start_stream(latent_size=(8, 16))
    native_out = model(**inputs, current_start=0)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert rel_err(native_out, reference(**{k: (v.double() if isinstance(v, torch.Tensor) else v)
                                            for k, v in inputs.items()})) < 1e-5
    assert 1e-3 < rel_err(fp8_out, native_out) < 0.08
    # FP8 weights are quantized again from weights loaded later
    model.set_precision("fp8")
    model.start_stream(latent_size=(8, 16))
    model(**inputs, current_start=0)
    before = model._runtime.plan.blocks[0].ffn_in.fp8.data.float().clone()
    model.load_state_dict(build_model(seed=5, dtype=torch.float32).state_dict())
    model.start_stream(latent_size=(8, 16))
    model(**inputs, current_start=0)
    assert not torch.equal(model._runtime.plan.blocks[0].ffn_in.fp8.data.float(), before)


def test_subset_of_fp8_gemms_from_the_environment(monkeypatch):
    _, model = _fp8_pair()
    monkeypatch.setenv("WAN_FP8_GEMMS", "ffn_in,ffn_out")
    model.set_precision("fp8")
    report = model.precision_report()
    assert report["fp8_gemms"] == ["ffn_in", "ffn_out"] and "qkv" in report["native_gemms"]
    model.start_stream(latent_size=(8, 16))
    model(**{k: (v.float() if isinstance(v, torch.Tensor) else v)
             for k, v in make_inputs(model).items()}, current_start=0)
    assert model._runtime.plan.blocks[0].qkv[0].fp8 is None and model._runtime.plan.blocks[0].ffn_out.fp8 is not None
    monkeypatch.setenv("WAN_FP8_GEMMS", "all")
    model.set_precision("fp8")
    assert model.precision_report()["fp8_gemms"] == list(FP8_GEMMS)
    monkeypatch.setenv("WAN_FP8_GEMMS", "ffn,qkv")
    with pytest.raises(ValueError, match="WAN_FP8_GEMMS.*ffn"):
        model.set_precision("fp8")
        model.precision_report()


@torch.no_grad()
@pytest.mark.parametrize("gemm", FP8_GEMMS)
def test_each_gemm_alone_in_fp8_runs_and_costs_some_accuracy(gemm, monkeypatch):
    """Every group can be the only one in FP8 (its producer hands over the right form)."""
    monkeypatch.setenv("WAN_FP8_GEMMS", gemm)
    reference, model = _fp8_pair()
    inputs = make_inputs(reference)
    expected = reference(**inputs, **make_caches(reference), current_start=0)
    model.start_stream(latent_size=(8, 16))
    got = model(**{k: (v.float() if isinstance(v, torch.Tensor) else v)
                   for k, v in inputs.items()}, current_start=0)
    assert 1e-4 < rel_err(got, expected) < 0.05


def test_fp8_without_fp8_tensor_cores_is_a_clear_error(monkeypatch):
    model = build_model(cls=OptimizedCausalWanModel, precision="fp8", dtype=torch.float32)
    model.start_stream(latent_size=(8, 16))
    with pytest.raises(BackendUnavailableError, match="precision='fp8'.*FP8 tensor cores"):
        model(**{k: (v.float() if isinstance(v, torch.Tensor) else v)
                 for k, v in make_inputs(model).items()}, current_start=0)
    with pytest.raises(ValueError, match="precision='fp4'.*native, fp8"):
        build_model(cls=OptimizedCausalWanModel, precision="fp4")
    monkeypatch.setenv("WAN_PRECISION", "int8")
    with pytest.raises(ValueError, match="WAN_PRECISION"):
        build_model(cls=OptimizedCausalWanModel)


def test_precision_comes_from_the_config():
    from wan.modules.presets import model_config
    model = OptimizedCausalWanModel.from_config({**model_config("tiny"), "precision": "fp8"})
    assert model.precision == "fp8"


def test_compare_cli_reports_both_precisions(tmp_path):
    out = tmp_path / "compare.json"
    printed = subprocess.run(
        [sys.executable, "-m", "wan.compare", "--preset", "tiny", "--blocks", "2", "--device",
         "cpu", "--emulate-fp8", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
        check=True).stdout
    report = json.loads(out.read_text())
    assert set(report["per_block"]) == {"native", "fp8"} and report["blocks"] == 2
    assert len(report["per_block"]["fp8"]) == 2
    assert report["summary"]["native"]["rel_max"] < 1e-5
    assert 1e-3 < report["summary"]["fp8"]["rel_mean"] < 0.08
    assert {"device", "torch", "date", "command"} <= set(report)
    assert "fp8 rel" in printed and "native's mean" in printed


# ------------------------------------------------------------------ GPU: kernels and graphs
GPU_ROW_SHAPES = [(2640, 1536), (2640, 8960), (7, 17), (33, 2 ** 10 + 17)]


@requires_cuda
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", GPU_ROW_SHAPES, ids=str)
def test_triton_quantize_matches_its_eager_twin(shape, gelu):
    from wan.kernels import triton as triton_ops
    x = _rows(shape, seed=shape[1], dtype=torch.bfloat16, device="cuda")
    strided = torch.empty(shape[0], shape[1] + 8, dtype=x.dtype, device="cuda")[:, 3:3 + shape[1]]
    strided.copy_(x)
    for source in (x, strided):
        got = triton_ops.OPS["quantize_fp8"](source, gelu=gelu)
        expected = eager.quantize_fp8(source, gelu=gelu)
        assert torch.allclose(got.scale, expected.scale, rtol=1e-6, atol=0)
        # the GELU in float32 may round to the neighbouring bf16 value, and the GPU's e4m3
        # conversion (cvt.rn.satfinite) and torch's differ on a few values: one e4m3 step then
        differs = got.data.float() != expected.data.float()
        assert differs.float().mean().item() < 3e-3, (
            source[differs][:8].tolist(), got.data[differs][:8].float().tolist(),
            expected.data[differs][:8].float().tolist())
        _assert_within_one_step(got, expected)


def _assert_within_one_step(got: Fp8Rows, expected: Fp8Rows, allowed_fraction: float = 0.0):
    """Dequantized values at most one e4m3 step apart (relative 2^-3, or 2^-9 of the scale), but
    for at most `allowed_fraction` of them."""
    diff = (got.dequantize() - expected.dequantize()).abs()
    step = torch.maximum(2 * HALF_ULP * expected.dequantize().abs(),
                         2 * SUBNORMAL_HALF_STEP * expected.scale)
    worst = (diff / step).flatten().argmax()
    beyond = (diff > step * (1 + 1e-6)).float().mean().item()
    assert beyond <= allowed_fraction, (beyond,
        (diff / step).flatten()[worst].item(), got.data.float().flatten()[worst].item(),
        expected.data.float().flatten()[worst].item(),
        got.scale.expand_as(diff).flatten()[worst].item(),
        expected.scale.expand_as(diff).flatten()[worst].item())


FUSED_NORM_SHAPES = [(1, 2640, 1536), (2, 3 * 37, 2 ** 7 + 17)]


def _fused_norm_cases(shape):
    """The Triton norms that can quantize, each as `quantize -> output`, on bf16 inputs."""
    from wan.kernels import triton as triton_ops
    b, length, c = shape
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*s):
        return torch.randn(*s, generator=gen, device="cuda").bfloat16()
    x, y = randn(b, length, c), randn(b, length, c)
    gate, shift, scale = randn(b, 3, 1, c), randn(b, 3, 1, c), randn(b, 3, 1, c)
    weight, bias = randn(c), randn(c)
    return [
        (lambda q: triton_ops.OPS["layer_norm_modulate"](x, shift, scale, 1e-6, quantize=q)),
        (lambda q: triton_ops.OPS["gated_residual_layer_norm_modulate"](
            x, y, gate, shift, scale, 1e-6, quantize=q)[1]),
        (lambda q: triton_ops.OPS["gated_residual_layer_norm"](
            x, y, gate, weight, bias, 1e-6, quantize=q)[1]),
    ]


@requires_cuda
@pytest.mark.parametrize("shape", FUSED_NORM_SHAPES, ids=str)
def test_triton_fused_norm_quantization_matches_quantizing_the_output(shape):
    """quantize=True in the Triton norms equals quantizing their bf16 output (the same kernel
    without quantize) with the eager twin: the same scales (to an ulp), and the same e4m3 values
    but where the GPU's conversion and torch's round differently (one step, rarely)."""
    for op in _fused_norm_cases(shape):
        got, expected = op(True), quantize_rows(op(False))
        # torch divides by the Python scalar 448 as a multiply by its reciprocal: 1 ulp at most
        scale_diff = ((got.scale - expected.scale).abs() / expected.scale).max().item()
        assert scale_diff <= 2.5e-7, scale_diff
        differs = (got.data.float() != expected.data.float()).float().mean().item()
        assert differs < 3e-3, differs
        # one step: ties (x / scale halfway between two e4m3 values, frequent with bf16 inputs)
        # round up in the GPU's conversion where torch rounds to even. Rarer (one element in 4M
        # on an H200) the fused kernel lands further off; not explained yet (OPTIMIZATION_GUIDE.md,
        # step 28): bounded here so that it cannot grow unseen, and stated as the expected failure
        # below
        _assert_within_one_step(got, expected, allowed_fraction=1e-5)


FUSED_NORM_MULTI_STEP = (
    "known, unexplained: rare multi-step differences (about one element in 4M on an H200) between "
    "the fused norm's e4m3 output and quantizing its bf16 output with the eager twin "
    "(OPTIMIZATION_GUIDE.md, step 28); the test above bounds their fraction by 1e-5")


@requires_cuda
@pytest.mark.xfail(strict=False, reason=FUSED_NORM_MULTI_STEP)
@pytest.mark.parametrize("shape", FUSED_NORM_SHAPES, ids=str)
def test_triton_fused_norm_quantization_is_within_one_step_everywhere(shape):
    """What the fused norms should meet: every e4m3 value within one step of quantizing the bf16
    output (no exceptions). Expected to fail now and then until the multi-step cases are
    explained; it passes when the inputs happen to hit none."""
    for op in _fused_norm_cases(shape):
        _assert_within_one_step(op(True), quantize_rows(op(False)), allowed_fraction=0.0)


@requires_cuda
@pytest.mark.parametrize("mkn", [(2640, 1536, 4608), (2640, 8960, 1536), (17, 64, 48),
                                 (2 ** 10 + 17, 1536, 8960)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_matches_the_emulated_gemm(mkn, bias):
    from wan.kernels import cublas
    m, k, n = mkn
    x = _rows((m, k), seed=1, dtype=torch.bfloat16, device="cuda")
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
    b = (0.02 * torch.randn(n, device="cuda")).bfloat16() if bias else None
    xq, wq = quantize_rows(x), quantize_weight(w)
    got = cublas.linear_fp8(xq, wq, b)
    expected = eager.linear_fp8(xq, wq, b)
    assert got.dtype == torch.bfloat16
    # the same products; Hopper's FP8 tensor cores accumulate with fewer bits than float32 (as
    # DeepSeek-V3's report measured) and the output is rounded to bf16: ~7e-4 overall on an H200,
    # ~1% at worst on single values
    got, expected = got.float(), expected.float()
    assert rel_err(got, expected) < 4e-3, rel_err(got, expected)
    # each value: within a bf16 rounding (2^-8 relative) plus 2% of the largest output
    assert_close_elementwise(got, expected, atol=2e-2 * expected.abs().max().item(), rtol=2 ** -8)


@requires_cuda
@torch.no_grad()
def test_fp8_graph_replay_equals_eager_and_stays_near_bf16():
    config = tiny_variant_config("universal")
    config.update(dim=256, ffn_dim=512, num_heads=2)  # multiples of 16 for the FP8 GEMMs
    config["action_config"]["img_hidden_size"] = 256

    def stream(precision, graphs):
        model = build_model(config=config, seed=0, cls=OptimizedCausalWanModel, device="cuda",
                            dtype=torch.bfloat16, precision=precision, cuda_graphs=graphs)
        model.start_stream(latent_size=(8, 16))
        return run_stream(model, 4)

    eager_out, graph_out = stream("fp8", False), stream("fp8", True)
    assert all(torch.equal(a, b) for a, b in zip(eager_out, graph_out))
    bf16 = stream("native", True)
    reference = build_model(config=config, seed=0, device="cuda", dtype=torch.float32)
    expected = run_stream(reference, 4, caches=make_caches(reference))
    # the calls on fresh noise (t=1000, every third call) have the same inputs in every stream;
    # the later ones mix each model's own outputs in
    fresh = slice(0, None, 3)
    fp8_err = max(rel_err(g, e) for g, e in zip(graph_out[fresh], expected[fresh]))
    bf16_err = max(rel_err(g, e) for g, e in zip(bf16[fresh], expected[fresh]))
    assert bf16_err < fp8_err < 0.1, (fp8_err, bf16_err)
