"""Each Triton kernel against its eager twin and a float64 reference, on random inputs at the
model's shapes and awkward ones (odd sizes, 2^k + 17, strided views). On a CPU the kernels run in
Triton's interpreter in float32 and float16 (it mishandles bfloat16); on a GPU in bfloat16 too."""
import pytest
import torch

from helpers import HAS_CUDA, assert_close_elementwise, build_model, make_caches, max_rel_err
from helpers import rel_err, run_stream
from wan.modules.presets import tiny_variant_config

pytest.importorskip("triton")
from wan.kernels import eager  # noqa: E402
from wan.kernels import triton as triton_ops  # noqa: E402
from wan.modules.optimized_causal_model import OptimizedCausalWanModel  # noqa: E402
from wan.modules.random_init import random_action_attention_args  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# relative error (whole-tensor norm) against float64 allowed, per dtype (a few roundings of the
# output); beside it every test checks each element (helpers.assert_close_elementwise)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _randn(shape, dtype, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


ACTION_CASES = [  # (N, frames, queries per frame, H, D, cache rows, slots of the frames, attended)
    (40, 3, 1, 2, 64, 6, (3, 4, 5), 6),      # mouse-like: sequences of 3 frames, window full
    (1, 3, 2 ** 5 + 17, 2, 64, 6, (5, 0, 1), 6),  # keyboard-like: 2^k + 17 queries per frame
    (3, 1, 5, 3, 32, 4, (0,), 1),            # a single key: the stream's first frame
    (2, 2, 35, 2, 16, 40, (31, 7), 33),      # more keys than one block: the online-softmax loop
]
if HAS_CUDA:  # the real shapes, window full
    ACTION_CASES += [(880, 3, 1, 16, 64, 6, (3, 4, 5), 6), (1, 3, 880, 16, 64, 6, (0, 1, 2), 6)]


@pytest.mark.parametrize("eps", [1e-6, None], ids=["qk_norm", "no_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ACTION_CASES, ids=str)
def test_action_attention(case, dtype, eps):
    """Norm + RoPE + store + attention vs float64 math; the caches vs the eager twin's."""
    q, k, v, cache, slots, attended, cos, sin = random_action_attention_args(case, dtype, DEVICE)
    wide = cache.double()
    exact = eager.action_attention(q.double(), k.double(), v.double(), wide[0], wide[1], slots,
                                   attended, cos.double(), sin.double(), eps)
    twin_cache = cache.clone()
    twin = eager.action_attention(q, k, v, twin_cache[0], twin_cache[1], slots, attended, cos, sin,
                                  eps)
    got = triton_ops.action_attention(q, k, v, cache[0], cache[1], slots, attended, cos, sin, eps)
    assert got.shape == exact.shape and got.dtype == dtype
    err, twin_err = rel_err(got, exact), rel_err(twin, exact)
    assert err <= max(TOLERANCE[dtype], 2 * twin_err), (err, twin_err)
    assert_close_elementwise(got, exact, twin=twin)
    assert_close_elementwise(cache, wide, dtype=dtype, twin=twin_cache, what="cache")
    # written slots hold the same keys/values as the twin's; the others are untouched
    assert rel_err(cache, twin_cache) <= TOLERANCE[dtype]
    assert rel_err(cache[0], wide[0]) <= TOLERANCE[dtype]
    others = [r for r in range(cache.shape[2]) if r not in slots.tolist()]
    assert torch.equal(cache[:, :, others], twin_cache[:, :, others])


MODULATION_CASES = [(1, 3, 32, 64), (2, 2, 17, 100), (1, 3, 5, 2 ** 6 + 17)]  # (B, F, S, C)
if HAS_CUDA:
    MODULATION_CASES += [(1, 3, 880, 1536)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MODULATION_CASES, ids=str)
def test_layer_norm_modulate(case, dtype):
    b, frames, per_frame, c = case
    x = _randn((b, frames * per_frame, c), dtype, 3) * 3 + 1
    mod = _randn((b, frames, 6, c), dtype, 4)
    shift, scale = mod[:, :, 0:1], mod[:, :, 1:2]  # strided, as chunks of the modulation
    exact = eager.layer_norm_modulate(x.double(), shift.double(), scale.double(), 1e-6)
    got = triton_ops.layer_norm_modulate(x, shift, scale, 1e-6)
    twin = eager.layer_norm_modulate(x, shift, scale, 1e-6)
    err, twin_err = rel_err(got, exact), rel_err(twin, exact)
    assert err <= max(TOLERANCE[dtype], 2 * twin_err), (err, twin_err)
    assert_close_elementwise(got, exact, twin=twin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MODULATION_CASES, ids=str)
def test_gated_residual(case, dtype):
    b, frames, per_frame, c = case
    x = _randn((b, frames * per_frame, c), dtype, 5)
    y = _randn((b, frames * per_frame, c), dtype, 6)
    gate = _randn((b, frames, 6, c), dtype, 7)[:, :, 2:3]
    exact = eager.gated_residual(x.double(), y.double(), gate.double())
    got = triton_ops.gated_residual(x, y, gate)
    assert rel_err(got, exact) <= TOLERANCE[dtype]
    assert_close_elementwise(got, exact)


def test_bad_shapes_are_errors():
    x = _randn((1, 6, 8), torch.float32, 8)
    with pytest.raises(ValueError, match="frames"):
        triton_ops.layer_norm_modulate(x, x[:, :4, None], x[:, :4, None], 1e-6)
    q = _randn((2, 3, 2, 24), torch.float32, 9)
    angles = torch.zeros(3, 12, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        triton_ops.action_attention(q, q, q, q, q, slots, 3, angles, angles, None)
    q = _randn((2, 4, 2, 16), torch.float32, 9)
    with pytest.raises(ValueError, match="do not split into 3 frames"):
        triton_ops.action_attention(q, q[:, :3], q[:, :3], q, q, slots, 3, angles[:, :8],
                                    angles[:, :8], None)
    with pytest.raises(ValueError, match="attended 5"):
        triton_ops.action_attention(q[:, :3], q[:, :3], q[:, :3], q, q, slots, 5, angles[:, :8],
                                    angles[:, :8], None)


@torch.no_grad()
def test_model_with_triton_backend_matches_reference():
    """The optimized model with every Triton kernel selected, over a 3-block stream in float32
    (on a CPU through the interpreter)."""
    config = tiny_variant_config()
    reference = build_model(config=config, dtype=torch.float64, device=DEVICE)
    optimized = build_model(config=config, dtype=torch.float32, device=DEVICE,
                            cls=OptimizedCausalWanModel, backend="triton")
    assert {optimized.backend[op] for op in triton_ops.OPS} == {"triton"}
    expected = run_stream(reference, 3, caches=make_caches(reference))
    got = run_stream(optimized, 3, caches=make_caches(optimized))
    assert max_rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MODULATION_CASES, ids=str)
def test_layer_norm(case, dtype, affine):
    b, frames, per_frame, c = case
    x = _randn((b, frames * per_frame, c), dtype, 14) * 3 + 1
    weight = 1 + 0.1 * _randn((c,), dtype, 15) if affine else None
    bias = 0.1 * _randn((c,), dtype, 16) if affine else None
    wide = (weight.double(), bias.double()) if affine else (None, None)
    exact = eager.layer_norm(x.double(), *wide, 1e-6)
    got = triton_ops.layer_norm(x, weight, bias, 1e-6)
    twin = eager.layer_norm(x, weight, bias, 1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    err, twin_err = rel_err(got, exact), rel_err(twin, exact)
    assert err <= max(TOLERANCE[dtype], 2 * twin_err), (err, twin_err)
    assert_close_elementwise(got, exact, twin=twin)


@pytest.mark.parametrize("norm", ["modulate", "affine", "plain", "affine+sum_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MODULATION_CASES, ids=str)
def test_gated_residual_layer_norm(case, dtype, norm):
    """The residual sum and its LayerNorm from one pass, both vs float64 and the eager twin;
    with sum_bias the stored sum carries the next residual add's bias (the norm does not)."""
    b, frames, per_frame, c = case
    x = _randn((b, frames * per_frame, c), dtype, 27) * 3 + 1
    y = _randn((b, frames * per_frame, c), dtype, 28)
    mod = _randn((b, frames, 6, c), dtype, 29)
    gate = mod[:, :, 2:3]
    if norm == "modulate":
        op, factors = "gated_residual_layer_norm_modulate", (mod[:, :, 0:1], mod[:, :, 1:2])
    else:
        op = "gated_residual_layer_norm"
        factors = ((1 + 0.1 * _randn((c,), dtype, 30), 0.1 * _randn((c,), dtype, 31))
                   if norm.startswith("affine") else (None, None))
    wide = tuple(None if f is None else f.double() for f in factors)
    extra = {}
    if norm.endswith("sum_bias"):
        extra = {"sum_bias": _randn((c,), dtype, 32)}
    wide_extra = {k: v.double() for k, v in extra.items()}
    exact = getattr(eager, op)(x.double(), y.double(), gate.double(), *wide, 1e-6, **wide_extra)
    twin = getattr(eager, op)(x, y, gate, *factors, 1e-6, **extra)
    got = getattr(triton_ops, op)(x, y, gate, *factors, 1e-6, **extra)
    if extra:  # the sum with the bias ahead, and the LayerNorm of the sum without it
        plain = eager.gated_residual(x.double(), y.double(), gate.double())
        assert rel_err(exact[0], plain + wide_extra["sum_bias"]) == 0
        assert rel_err(exact[1], eager.layer_norm(plain, *wide, 1e-6)) == 0
        # the bias joins the sum before it is rounded: one rounding, not two (notebook step 46)
        once = (eager.gated_residual(x.float(), y.float(), gate.float())
                + extra["sum_bias"].float()).to(dtype)
        assert torch.equal(twin[0], once)
    for g, t, e in zip(got, twin, exact):
        assert g.shape == e.shape and g.dtype == dtype
        err, twin_err = rel_err(g, e), rel_err(t, e)
        assert err <= max(TOLERANCE[dtype], 2 * twin_err), (err, twin_err)
        assert_close_elementwise(g, e, twin=t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MODULATION_CASES, ids=str)
def test_frame_bias_gelu(case, dtype):
    b, frames, per_frame, c = case
    x = _randn((b, frames * per_frame, c), dtype, 17) * 2
    bias = _randn((b, frames, 3, c), dtype, 18)[:, :, 1:2]  # strided, one row per frame
    exact = eager.frame_bias_gelu(x.double(), bias.double())
    got = triton_ops.frame_bias_gelu(x, bias)
    twin = eager.frame_bias_gelu(x, bias)
    err, twin_err = rel_err(got, exact), rel_err(twin, exact)
    assert err <= max(TOLERANCE[dtype], 2 * twin_err), (err, twin_err)
    assert_close_elementwise(got, exact, twin=twin)


NORM_ROPE_CASES = [(1, 2, 32, 2, 64), (2, 3, 17, 3, 32), (1, 1, 2 ** 5 + 17, 1, 16)]  # B F S H D
if HAS_CUDA:
    NORM_ROPE_CASES += [(1, 3, 880, 12, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NORM_ROPE_CASES, ids=str)
def test_norm_rope_store(case, dtype):
    """q path (new tensor) and k path (into ring slots [2, 0, ...] of a cache) vs float64."""
    b, frames, per_frame, heads, dim = case
    length, c = frames * per_frame, heads * dim
    x = _randn((b, length, c), dtype, 10) * 2
    weight = 1 + 0.1 * _randn((c,), dtype, 11)
    angles = _randn((length, dim // 2), torch.float32, 12) * 3
    cos, sin = angles.cos(), angles.sin()
    exact = eager.norm_rope_store(x.double(), weight.double(), 1e-6, cos.double(), sin.double(),
                                  heads, rope_dtype=torch.float64)
    got = triton_ops.norm_rope_store(x, weight, 1e-6, cos, sin, heads)
    assert rel_err(got, exact) <= TOLERANCE[dtype]
    assert_close_elementwise(got, exact,
                             twin=eager.norm_rope_store(x, weight, 1e-6, cos, sin, heads))
    slots = torch.arange(frames, device=DEVICE).flip(0) + 1   # frames land in reverse order
    cache = torch.zeros(b, (frames + 1) * per_frame, heads, dim, dtype=dtype, device=DEVICE)
    triton_ops.norm_rope_store(x, weight, 1e-6, cos, sin, heads, cache, slots)
    twin = torch.zeros_like(cache)
    eager.norm_rope_store(x, weight, 1e-6, cos, sin, heads, twin, slots)
    assert torch.equal(cache[:, :per_frame], twin[:, :per_frame])  # slot 0 untouched: zeros
    assert rel_err(cache, twin) <= TOLERANCE[dtype]
    assert_close_elementwise(cache, twin, what="cache vs the eager twin's")
    value = triton_ops.norm_rope_store(x, None, None, None, None, heads)  # v: a plain store
    assert torch.equal(value, x.view(b, length, heads, dim))


@pytest.mark.parametrize("with_norm", [True, False], ids=["qk_norm", "no_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NORM_ROPE_CASES, ids=str)
def test_qkv_norm_rope_store(case, dtype, with_norm):
    """One launch for q (returned), k and v (into reversed ring slots) vs the eager twin's three
    calls and float64 math."""
    b, frames, per_frame, heads, dim = case
    length, c = frames * per_frame, heads * dim
    q, k, v = (_randn((b, length, c), dtype, 20 + i) * 2 for i in range(3))
    wq, wk = ((1 + 0.1 * _randn((c,), dtype, 23 + i)) if with_norm else None for i in range(2))
    angles = _randn((length, dim // 2), torch.float32, 25) * 3
    cos, sin = angles.cos(), angles.sin()
    slots = torch.arange(frames, device=DEVICE).flip(0) + 1
    caches = _randn((2, b, (frames + 1) * per_frame, heads, dim), dtype, 26)
    wide = caches.double()
    widen = (lambda t: None if t is None else t.double())
    exact = eager.qkv_norm_rope_store(q.double(), k.double(), v.double(), widen(wq), widen(wk),
                                      1e-6, cos.double(), sin.double(), heads, wide[0], wide[1],
                                      slots, torch.float64)
    got = triton_ops.qkv_norm_rope_store(q, k, v, wq, wk, 1e-6, cos, sin, heads, caches[0],
                                         caches[1], slots)
    assert got.shape == (b, length, heads, dim) and got.dtype == dtype
    assert rel_err(got, exact) <= TOLERANCE[dtype]
    assert rel_err(caches, wide) <= TOLERANCE[dtype]
    assert_close_elementwise(got, exact)
    assert_close_elementwise(caches, wide, dtype=dtype, what="caches")
    assert torch.equal(caches[:, :, :per_frame], wide[:, :, :per_frame].to(dtype))  # slot 0 kept


def test_norm_rope_store_refuses_a_head_dim_off_its_tile():
    x = _randn((1, 4, 2 * 24), torch.float32, 13)
    with pytest.raises(ValueError, match="power of two"):
        triton_ops.norm_rope_store(x, None, None, None, None, 2)


NORM_SILU_CASES = [(1, 96, 3, 5, 7), (2, 2 ** 6 + 17, 2, 3, 4), (1, 384, 1, 4, 6)]  # B, C, T, H, W


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NORM_SILU_CASES, ids=str)
def test_rms_norm_silu(case, dtype, with_bias):
    """The decoder's channel RMS norm + SiLU (after the previous conv's bias) into a strided
    destination (the frames after the history in a channels-last buffer) vs float64, and vs its
    eager twin."""
    b, c, t, h, w = case
    x = _randn(case, dtype, 0).contiguous(memory_format=torch.channels_last_3d)
    gamma = _randn((c, 1, 1, 1), dtype, 1)
    bias = _randn((c,), dtype, 2) if with_bias else None
    exact = eager.rms_norm_silu(x.double(), gamma.double(), None,
                                None if bias is None else bias.double())
    buffer = torch.zeros(b, c, 2 + t, h, w, dtype=dtype, device=DEVICE).contiguous(
        memory_format=torch.channels_last_3d)
    got = triton_ops.rms_norm_silu(x, gamma, buffer[:, :, 2:], bias)
    assert got.data_ptr() == buffer[:, :, 2:].data_ptr()
    assert torch.equal(buffer[:, :, :2], torch.zeros_like(buffer[:, :, :2]))  # history untouched
    twin = eager.rms_norm_silu(x, gamma, None, bias)
    err, twin_err = rel_err(buffer[:, :, 2:], exact), rel_err(twin, exact)
    assert err <= max(TOLERANCE[dtype], 2 * twin_err), (err, twin_err)
    assert_close_elementwise(buffer[:, :, 2:], exact, twin=twin)
    contiguous = triton_ops.rms_norm_silu(x.contiguous(), gamma, None, bias)  # not channels-last
    assert rel_err(contiguous, exact) <= max(TOLERANCE[dtype], 2 * twin_err)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NORM_SILU_CASES, ids=str)
def test_bias_residual_add(case, dtype):
    c = case[1]
    h = _randn(case, dtype, 0).contiguous(memory_format=torch.channels_last_3d)
    residual = _randn(case, dtype, 1)  # contiguous, not channels-last: the kernel converts it
    bias = _randn((c,), dtype, 2)
    exact = eager.bias_residual_add(h.double(), bias.double(), residual.double())
    got = triton_ops.bias_residual_add(h, bias, residual)
    twin = eager.bias_residual_add(h, bias, residual)
    err, twin_err = rel_err(got, exact), rel_err(twin, exact)
    assert got.dtype == dtype and err <= max(TOLERANCE[dtype], 2 * twin_err), (err, twin_err)
    assert_close_elementwise(got, exact, twin=twin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NORM_SILU_CASES, ids=str)
def test_bias_residual_add_rms_norm_silu(case, dtype):
    """The fused residual add + the next norm: the sum and the norm written into a strided
    destination (the frames after the history in a conv buffer) vs float64 and the eager twin,
    and bitwise what the two unfused kernels give (the norm reads the sum as stored)."""
    b, c, t, hh, w = case
    h = _randn(case, dtype, 0).contiguous(memory_format=torch.channels_last_3d)
    residual = _randn(case, dtype, 1)  # contiguous, not channels-last: the kernel converts it
    bias, gamma = _randn((c,), dtype, 2), _randn((c, 1, 1, 1), dtype, 3)
    wide = [t_.double() for t_ in (h, bias, residual, gamma)]
    exact_sum = eager.bias_residual_add(*wide[:3])
    exact_norm = eager.rms_norm_silu(exact_sum, wide[3])
    buffer = torch.zeros(b, c, 2 + t, hh, w, dtype=dtype, device=DEVICE).contiguous(
        memory_format=torch.channels_last_3d)
    got = triton_ops.bias_residual_add_rms_norm_silu(h, bias, residual, gamma, buffer[:, :, 2:])
    assert torch.equal(buffer[:, :, :2], torch.zeros_like(buffer[:, :, :2]))  # history untouched
    twin_norm = torch.empty_like(buffer[:, :, 2:])
    twin_sum = eager.bias_residual_add_rms_norm_silu(h, bias, residual, gamma, twin_norm)
    for what, out, twin, exact in (("sum", got, twin_sum, exact_sum),
                                   ("norm", buffer[:, :, 2:], twin_norm, exact_norm)):
        err, twin_err = rel_err(out, exact), rel_err(twin, exact)
        assert err <= max(TOLERANCE[dtype], 2 * twin_err), (what, err, twin_err)
        assert_close_elementwise(out, exact, twin=twin, what=what)
    unfused_sum = triton_ops.bias_residual_add(h, bias, residual)
    unfused_norm = triton_ops.rms_norm_silu(unfused_sum, gamma)
    assert torch.equal(got, unfused_sum)
    assert torch.equal(buffer[:, :, 2:], unfused_norm)
    with pytest.raises(ValueError, match="out must be a channels-last"):
        triton_ops.bias_residual_add_rms_norm_silu(h, bias, residual, gamma,
                                                   torch.empty(case, dtype=dtype, device=DEVICE))
