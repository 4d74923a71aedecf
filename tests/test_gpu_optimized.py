"""GPU checks of the optimized model at the real (universal) size. Skip without CUDA."""
import copy

import pytest
import torch

from helpers import build_model, make_caches, make_inputs, rel_err, requires_cuda
from wan.kernels import eager, registry
from wan.modules.optimized_causal_model import OptimizedCausalWanModel

pytestmark = requires_cuda
BLOCKS = 10
STEPS = (1000.0, 666.0, 333.0)
TOKENS_PER_FRAME = 880


def _record_stream(model, caches):
    """Run the pipeline pattern on `model`; return (inputs of every call, outputs)."""
    calls, outputs = [], []
    for block in range(BLOCKS):
        inputs = make_inputs(model, 3, 3 * block, preset="universal", seed=block)
        for t in (*STEPS, 0.0):
            inputs["t"] = torch.full_like(inputs["t"], t)
            call = dict(inputs, current_start=3 * block * TOKENS_PER_FRAME)
            calls.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in call.items()})
            out = model(**call, **caches)
            outputs.append(out)
            if t:
                inputs["x"] = 0.5 * inputs["x"] + 0.5 * out
    return calls, outputs


def _replay(model, calls, caches, dtype):
    return [model(**{k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                         else v) for k, v in call.items()}, **caches) for call in calls]


@torch.no_grad()
def test_graph_replay_equals_eager():
    eager_model = build_model("universal", torch.float32, "cuda", cls=OptimizedCausalWanModel)
    graphed = copy.deepcopy(eager_model)
    graphed.enable_cuda_graphs()
    calls, expected = _record_stream(eager_model, make_caches(eager_model, preset="universal"))
    first_caches = make_caches(graphed, preset="universal")  # kept alive: fresh ones differ
    got = _replay(graphed, calls, first_caches, torch.float32)
    assert len(graphed._graphs) >= 2  # one per phase: window filling, then full
    # a new video in new dicts (as upstream's pipeline does): the old storage's graphs are dropped
    fresh = make_caches(graphed, preset="universal")
    again = _replay(graphed, calls[:4], fresh, torch.float32)  # one block: one phase
    assert len(graphed._graphs) == 1 and rel_err(again[-1], expected[3]) <= 1e-6
    worst = max(rel_err(g, e) for g, e in zip(got, expected))
    print(f"graph vs eager, fp32, {len(calls)} calls: max relative error {worst:.2e}")
    assert worst <= 1e-6


@torch.no_grad()
def test_bf16_error_is_within_125_percent_of_the_reference():
    """Each bf16 model sees the float32 reference's inputs (its own caches), 10 blocks."""
    oracle = build_model("universal", torch.float32, "cuda")
    calls, expected = _record_stream(oracle, make_caches(oracle, preset="universal"))
    reference_bf16 = copy.deepcopy(oracle).to(torch.bfloat16)
    optimized = build_model("universal", torch.bfloat16, "cuda", cls=OptimizedCausalWanModel,
                            cuda_graphs=True)
    errors = {}
    for name, model in (("reference", reference_bf16), ("optimized", optimized)):
        got = _replay(model, calls, make_caches(model, preset="universal"), torch.bfloat16)
        diffs = [(g.double() - e.double()).abs() for g, e in zip(got, expected)]
        errors[name] = {"rel": max(rel_err(g, e) for g, e in zip(got, expected)),
                        "max_abs": max(d.max().item() for d in diffs),
                        "mean_abs": sum(d.mean().item() for d in diffs) / len(diffs)}
    print("bf16 vs fp32 reference:", errors, optimized.backend_report())
    assert errors["optimized"]["rel"] <= 1.25 * errors["reference"]["rel"]


ATTENTION_SHAPES = {  # (q shape, k/v shape) as the model calls them, plus awkward sizes
    "self_attention": ([(1, 2640, 12, 128), (1, 5280, 12, 128)], [(2, 97, 3, 64), (2, 300, 3, 64)]),
    "cross_attention": ([(1, 2640, 12, 128), (1, 257, 12, 128)], [(1, 33, 2, 128), (1, 257, 2, 128)]),
    "mouse_attention": ([(880, 3, 16, 64), (880, 6, 16, 64)], [(17, 3, 2, 64), (17, 5, 2, 64)]),
    "keyboard_attention": ([(1, 2640, 16, 64), (1, 6, 16, 64)], [(2, 129, 2, 64), (2, 4, 2, 64)]),
}


@pytest.mark.parametrize("op", registry.ATTENTION_OPS)
@pytest.mark.parametrize("shape_set", [0, 1], ids=["real", "awkward"])
def test_flash_attention_matches_its_eager_twin(op, shape_set):
    q_shape, kv_shape = ATTENTION_SHAPES[op][shape_set]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(s, generator=gen, device="cuda", dtype=torch.bfloat16)
               for s in (q_shape, kv_shape, kv_shape))
    exact = eager.attention(q.double(), k.double(), v.double())
    _, flash = registry.resolve(op, "flash", torch.device("cuda"), torch.bfloat16, q.shape[-1])
    flash_err = rel_err(flash(q, k, v), exact)
    eager_err = rel_err(eager.attention(q, k, v), exact)
    print(f"{op} {q_shape}x{kv_shape}: flash {flash_err:.2e}, eager bf16 {eager_err:.2e}")
    assert flash_err <= max(2 * eager_err, 1e-2)
