"""The streaming forward's per-layer plan (wan/runtime/layer_plan.py): packing q/k/v and the
modulations into one tensor changes no value, name or state dict; loading in place writes through;
new storage (`.to()`, assign loads) is noticed and the plan rebuilt; results stay the reference's."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import build_model, make_caches, max_rel_err, run_stream
from wan.modules.presets import tiny_variant_config
from wan.runtime.layer_plan import ModelPlan, Packed
from wan.modules.optimized_causal_model import OptimizedCausalWanModel


def _pair(variant="universal", dtype=torch.float64):
    config = tiny_variant_config(variant)
    return (build_model(config=config, dtype=dtype),
            build_model(config=config, dtype=dtype, cls=OptimizedCausalWanModel))


def _stream(model, blocks=3):
    return run_stream(model, blocks, caches=make_caches(model))


def test_packing_keeps_parameters_values_and_names():
    _, model = _pair()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = {name: id(p) for name, p in model.named_parameters()}
    plan = ModelPlan(model)
    after = dict(model.named_parameters())
    assert {name: id(p) for name, p in after.items()} == ids
    assert all(torch.equal(after[name], value) for name, value in before.items())
    attn = model.blocks[1].self_attn
    (gemm,) = plan.blocks[1].qkv
    fused = gemm.weight
    assert torch.equal(fused, torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
    assert attn.k.weight.data_ptr() == fused[attn.q.weight.shape[0]:].data_ptr()  # a view
    assert plan.modulations.tensor.shape == (len(model.blocks), *model.blocks[0].modulation.shape)
    assert plan.is_current()


def test_load_state_dict_writes_through_the_packed_tensor():
    reference, model = _pair()
    plan = ModelPlan(model)
    other = build_model(config=tiny_variant_config("universal"), seed=7)
    model.load_state_dict(other.state_dict())
    assert plan.is_current()
    attn = other.blocks[0].self_attn
    assert torch.equal(plan.blocks[0].qkv[0].weight,
                       torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
    assert torch.equal(plan.modulations.tensor[-1], other.blocks[-1].modulation.detach())


@torch.no_grad()
def test_new_storage_rebuilds_the_plan_and_results_follow_the_weights():
    reference, model = _pair()
    expected = _stream(reference)
    assert max_rel_err(_stream(model), expected) <= 1e-6
    plan = model._runtime.plan
    model.float().double()  # every parameter gets storage of its own again
    assert not plan.is_current()
    assert max_rel_err(_stream(model), expected) <= 1e-6
    assert model._runtime.plan is not plan and model._runtime.plan.is_current()
    # an assign-load gives new tensors too: the next forward must read them, not the old pack
    other = build_model(config=tiny_variant_config("universal"), seed=7)
    model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    assert max_rel_err(_stream(model), _stream(other)) <= 1e-6


def test_state_dict_of_a_packed_model_saves_and_loads(tmp_path):
    reference, model = _pair()
    ModelPlan(model)
    path = tmp_path / "packed.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_file(str(path))
    reference.load_state_dict(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_packed_rejects_mixed_bias():
    from wan.runtime.layer_plan import _pack_biases
    with pytest.raises(ValueError, match="bias"):
        _pack_biases([torch.nn.Parameter(torch.zeros(2)), None, None])


def test_packed_notices_a_moved_module():
    """The safety net for what the model's own hooks do not see: a submodule converted alone."""
    linears = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    packed = Packed([linear.weight for linear in linears])
    assert packed.intact()
    linears.double()
    assert not packed.intact()


def test_model_forgets_its_plan_on_conversion_and_load():
    _, model = _pair()
    _stream(model, blocks=1)
    assert model._runtime.plan is not None
    model.to(torch.float64)
    assert model._runtime.plan is None
    _stream(model, blocks=1)
    model.load_state_dict(model.state_dict())
    assert model._runtime.plan is None


def _qkv_fused(model, on: bool):
    """One q/k/v GEMM over packed parameters, or three over parameters of their own."""
    assert len(model._runtime.plan.blocks[0].qkv) == (1 if on else 3)
    q = model.blocks[0].self_attn.q.weight
    own_storage = q.untyped_storage().nbytes() == q.numel() * q.element_size()
    assert own_storage is not on


def _cross_residual_in_gemm(model, on: bool):
    assert [block.cross_residual_in_gemm for block in model._runtime.plan.blocks] == \
        [on] * len(model._runtime.plan.blocks)


# option: (its environment variable, what the plan looks like with it on / off)
OFF_SWITCHES = {"fused_qkv": ("WAN_FUSED_QKV", _qkv_fused),
                "residual_in_gemm": ("WAN_RESIDUAL_IN_GEMM", _cross_residual_in_gemm)}


@pytest.mark.parametrize("option", OFF_SWITCHES)
@torch.no_grad()
def test_an_off_switch_gives_the_same_stream(option, monkeypatch):
    """fused_qkv=False / WAN_FUSED_QKV=0 (three GEMMs, parameters not packed) and
    residual_in_gemm=False / WAN_RESIDUAL_IN_GEMM=0 (the cross-attention's residual add on its
    own again), read when the model is built: the stream is the same as with the option on, and
    both are the reference's (float64); a bad environment value is refused by name."""
    variable, plan_is = OFF_SWITCHES[option]
    reference, default = _pair()
    expected = _stream(reference)
    assert default.options_report()[option] is True
    assert max_rel_err(_stream(default), expected) <= 1e-6
    plan_is(default, on=True)
    for how in ("keyword", "environment"):
        if how == "environment":
            monkeypatch.setenv(variable, "0")
            model = _pair()[1]
        else:
            model = build_model(config=tiny_variant_config("universal"), dtype=torch.float64,
                                cls=OptimizedCausalWanModel, **{option: False})
        assert model.options_report()[option] is False
        assert max_rel_err(_stream(model), expected) <= 1e-6
        plan_is(model, on=False)
    monkeypatch.setenv(variable, "maybe")
    with pytest.raises(ValueError, match=variable):
        _pair()


def test_the_cross_residual_stays_outside_an_fp8_gemm_or_without_the_norm():
    """Inside the GEMM needs the norm kernel (which adds the bias ahead) and a GEMM in the
    model's dtype: an FP8 cross_out or cross_attn_norm=False keeps the separate add."""
    config = tiny_variant_config("universal")
    config["cross_attn_norm"] = False
    model = build_model(config=config, dtype=torch.float64, cls=OptimizedCausalWanModel)
    _stream(model, blocks=1)
    assert not any(block.cross_residual_in_gemm for block in model._runtime.plan.blocks)
    plan = ModelPlan(_pair()[1], fp8=frozenset({"cross_out"}))
    assert not any(block.cross_residual_in_gemm for block in plan.blocks)
