"""Issue 32: what a new user tried on a CPU, each of which must be a clear error (the exception's
type and a message naming the thing and the fix, raised before any state changes, after which the
next valid call gives what a fresh object gives) or the right result (the reference model's, by
relative error with a tolerance a wrong result fails by orders of magnitude).

Tiny configs, random weights, float32, CPU. In float32 the optimized model agrees with the
reference to ~3e-7 (a kept old weight or image was 5e-2 .. 5e-1 off)."""
import copy
import logging
import os
import random
import subprocess

import pytest
import torch
import torch.nn as nn

from helpers import build_model, make_caches, make_inputs, rel_err, same_nested
from wan import CausalWanModel
from wan.modules.checkpoint import CheckpointFileError, save_safetensors_checkpoint
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.presets import model_config
from wan.kernels.registry import OPS, load_selection
from wan.runtime.options import parse_switch
from wan.runtime.options import FastOptions
from wan.runtime.stream_cache import DICT_TAG
from wan.runtime.weight_watch import ParameterWatch

TOKENS = 32               # tiny preset: 8 x 16 latent, patch 2 x 2
LATENT = (8, 16)
MODELS = {"reference": CausalWanModel, "optimized": OptimizedCausalWanModel}
AGREE = 1e-5              # optimized vs reference (float32): ~3e-7 measured
SAME = 1e-6               # two runs of the same model class on the same weights


@pytest.fixture(scope="module", autouse=True)
def _quiet_and_one_thread():
    """Tiny shapes: one intra-op thread is much faster than two fighting over a shared CPU; the
    start-up lines of every model built here are not what these tests read."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logger = logging.getLogger("wan.fast")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)
    torch.set_num_threads(threads)


def _tiny(cls=OptimizedCausalWanModel, **overrides):
    return build_model("tiny", torch.float32, cls=cls, **overrides)


def _stream(model, caches, start_frame=0, seed=1, **changes):
    """One block of the caller's-dicts stream (frames start_frame..+3) with `changes` to the
    cache keywords."""
    with torch.no_grad():
        return model(**make_inputs(model, start_frame=start_frame, seed=seed),
                     **dict(caches, **changes), current_start=start_frame * TOKENS)


def _two_blocks(model, seed=1):
    caches = make_caches(model)
    _stream(model, caches, 0, seed)
    _stream(model, caches, 3, seed + 1)
    return caches


# ------------------------------------------------------------------ weights replaced after the plan
def _new_tensor(like, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=gen, dtype=like.dtype) * like.detach().std()


def _set_data(get):
    def act(model):
        param = get(model)
        param.data = _new_tensor(param, 11)
    return act


def _set_parameter(owner, name):
    def act(model):
        module = owner(model)
        setattr(module, name, nn.Parameter(_new_tensor(getattr(module, name), 12)))
    return act


def _set_module(owner, name):
    def act(model):
        module = owner(model)
        old = getattr(module, name)
        new = nn.Linear(old.in_features, old.out_features)
        with torch.no_grad():
            new.weight.copy_(_new_tensor(old.weight, 13))
            new.bias.copy_(_new_tensor(old.bias, 14))
        setattr(module, name, new)
    return act


REPLACEMENTS = {
    # the two: the second parameter of the packed q/k/v group, an FFN weight
    "self_attn.k.weight.data = new": _set_data(lambda m: m.blocks[0].self_attn.k.weight),
    "ffn[0].weight = nn.Parameter(new)": _set_parameter(lambda m: m.blocks[0].ffn[0], "weight"),
    # the last of the packed q/k/v biases, and a block's modulation (all stacked into one)
    "self_attn.v.bias = nn.Parameter(new)": _set_parameter(lambda m: m.blocks[1].self_attn.v,
                                                           "bias"),
    "blocks[1].modulation.data = new": _set_data(lambda m: m.blocks[1].modulation),
    # a whole submodule, and a parameter read from the action module
    "ffn[2] = nn.Linear(...)": _set_module(lambda m: m.blocks[1].ffn, "2"),
    "action t_qkv.weight.data = new": _set_data(lambda m: m.blocks[0].action_model.t_qkv.weight),
}


@pytest.mark.parametrize("how", REPLACEMENTS)
def test_a_weight_replaced_after_the_first_forward_is_used(how):
    """The plan packed the weights at the first forward; any parameter replaced afterwards (not
    just the first of a packed group) is used by the next one, as by the reference."""
    model = _tiny()
    _two_blocks(model)
    REPLACEMENTS[how](model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference, fresh = _tiny(CausalWanModel), _tiny()
    reference.load_state_dict(state)
    fresh.load_state_dict(state)
    got = _stream(model, make_caches(model))
    expected = _stream(reference, make_caches(reference))
    assert rel_err(got, expected) < AGREE
    assert rel_err(got, _stream(fresh, make_caches(fresh))) < SAME
    # and the weights stay what the user set (packing again keeps the values)
    assert same_nested(dict(model.state_dict()), state)


def test_the_plan_is_kept_while_nothing_changed():
    """The watch costs no re-pack of its own: the same plan serves every call."""
    model = _tiny()
    caches = make_caches(model)
    _stream(model, caches)
    plan = model._runtime.plan
    _stream(model, caches, 3, 2)
    _stream(model, caches, 3, 2)
    assert model._runtime.plan is plan


def test_parameter_watch_names_what_changed():
    model = _tiny()
    watch = ParameterWatch(model)
    assert watch.changed() is None
    with torch.no_grad():
        model.blocks[0].ffn[0].weight.add_(1.0)  # in place: unseen without `values`
    assert watch.changed() is None
    valued = ParameterWatch(model, values=True)
    with torch.no_grad():
        model.blocks[0].ffn[0].weight.add_(1.0)
    assert "blocks.0.ffn.0.weight (written in place)" in valued.changed()
    model.blocks[1].self_attn.q.weight.data = model.blocks[1].self_attn.q.weight.data.clone()
    assert "blocks.1.self_attn.q.weight (its data replaced)" in watch.changed()
    watch = ParameterWatch(model)
    model.blocks[1].ffn[2] = nn.Linear(model.ffn_dim, model.dim)
    assert watch.changed() == "blocks.1.ffn.2 (a submodule replaced)"


# ------------------------------------------------------------------ cross-attention cache dicts
def _pair():
    return {name: _tiny(cls) for name, cls in MODELS.items()}


def _wrap(dicts, is_init):
    return [{"k": d["k"], "v": d["v"], "is_init": is_init} for d in dicts]


def test_new_cross_dicts_around_the_same_tensors():
    """The issue's two: a restart with a new image in new dicts around the old tensors
    (is_init=False) must project the new image; then the original dicts (is_init=True) still
    hold the old image, as upstream replaces a dict's tensors instead of writing into them."""
    models = _pair()
    caches = {name: make_caches(m) for name, m in models.items()}
    steps = [
        ("first image", lambda c: {}, 0, 1),
        ("new image, new dicts around the same tensors, is_init=False",
         lambda c: {"crossattn_cache": _wrap(c["crossattn_cache"], False)}, 0, 7),
        ("retry with the originals (is_init=True: the first image)", lambda c: {}, 0, 7),
        ("new dicts around the same tensors, is_init=True", lambda c: {
            "crossattn_cache": _wrap(c["crossattn_cache"], True)}, 3, 5),
        ("the originals again, next block", lambda c: {}, 3, 5),
    ]
    for what, changes, start, seed in steps:
        out = {name: _stream(m, caches[name], start, seed, **changes(caches[name]))
               for name, m in models.items()}
        assert rel_err(out["optimized"], out["reference"]) < AGREE, what


@pytest.mark.parametrize("trial", range(6))
def test_cross_dict_sequences_match_the_reference(trial):
    """Random sequences of what a caller may do with the dicts (the same ones, reset ones, new
    dicts around old tensors with either flag, older dict sets again, none at all; restarts in
    reset or new stream dicts), compared call by call with the reference."""
    rng = random.Random(trial)
    models = _pair()
    state = {name: {"caches": make_caches(m)} for name, m in models.items()}
    for s in state.values():
        s["sets"] = [s["caches"]["crossattn_cache"]]
    end = 0
    for step in range(7):
        start = rng.choice([0, end, max(end - 3, 0)]) if end else 0
        kind = rng.choice(["same", "same", "reset", "wrap False", "wrap True", "older", "none"])
        pick, seed, restart = rng.randrange(100), rng.choice([1, 7]), rng.choice(["zero", "new"])
        out = {}
        for name, model in models.items():
            s = state[name]
            if start == 0 and end:  # a new stream: index tensors zeroed, or new stream dicts
                if restart == "zero":
                    for key in ("kv_cache", "kv_cache_mouse", "kv_cache_keyboard"):
                        for d in s["caches"][key]:
                            d["global_end_index"].zero_()
                            d["local_end_index"].zero_()
                else:
                    fresh = make_caches(model)
                    s["caches"].update({k: fresh[k] for k in ("kv_cache", "kv_cache_mouse",
                                                              "kv_cache_keyboard")})
            cross = s["sets"][0]
            if kind == "reset":
                for d in cross:
                    d["is_init"] = False
            elif kind.startswith("wrap"):
                base = s["sets"][pick % len(s["sets"])]
                cross = [{"k": d["k"], "v": d["v"], "is_init": kind == "wrap True" and d["is_init"]}
                         for d in base]
                s["sets"].append(cross)
            elif kind == "older":
                cross = s["sets"][pick % len(s["sets"])]
            elif kind == "none":
                cross = None
            out[name] = _stream(model, s["caches"], start, seed, crossattn_cache=cross)
        assert rel_err(out["optimized"], out["reference"]) < AGREE, (trial, step, kind, start)
        end = start + 3 if start == 0 else max(end, start + 3)


def test_no_crossattn_cache_at_block_1_of_a_dict_stream():
    """Was: 'the cache holds the stream up to frames 0' (false). The reference reads the image
    at every call without a cache: so does the optimized model, in the same stream."""
    models = _pair()
    caches = {name: make_caches(m) for name, m in models.items()}
    for name, model in models.items():
        _stream(model, caches[name])
    out = {name: _stream(m, caches[name], 3, 2, crossattn_cache=None)
           for name, m in models.items()}
    assert rel_err(out["optimized"], out["reference"]) < AGREE
    out = {name: _stream(m, caches[name], 6, 3) for name, m in models.items()}  # the dicts again
    assert rel_err(out["optimized"], out["reference"]) < AGREE


def test_mixed_is_init_flags_project_only_the_layers_asked():
    models = _pair()
    caches = {name: make_caches(m) for name, m in models.items()}
    for name, model in models.items():
        _stream(model, caches[name], 0, 1)
        caches[name]["crossattn_cache"][1]["is_init"] = False  # layer 1 only: the new image
    out = {name: _stream(m, caches[name], 3, 7) for name, m in models.items()}
    assert rel_err(out["optimized"], out["reference"]) < AGREE


def test_new_stream_dicts_mid_stream_are_refused_with_a_true_message():
    model = _tiny()
    caches = make_caches(model)
    _stream(model, caches)
    other = make_caches(model)  # never streamed into: which frames they hold is unknown
    before = copy.deepcopy(other)
    with pytest.raises(ValueError, match="has not streamed into these kv_cache.* starts at frame "
                                         r"0 \(current_start=0\)"):
        _stream(model, dict(other), 3, 2)
    assert same_nested(before, other, ignore_keys=(DICT_TAG,))
    fresh = _tiny()
    fresh_caches = make_caches(fresh)
    _stream(fresh, fresh_caches)
    assert torch.equal(_stream(model, caches, 3, 2), _stream(fresh, fresh_caches, 3, 2))


def test_the_pipelines_reset_writes_in_place():
    """What keeps the CUDA graphs' storage: the pipeline's own dicts, reset (is_init=False), get
    the new image in their own tensors; a tensor something else still holds is left alone."""
    model = _tiny()
    caches = make_caches(model)
    cross = caches["crossattn_cache"]
    ids = [(id(d["k"]), id(d["v"])) for d in cross]  # ids only: holding them would share them
    _stream(model, caches)
    assert [(id(d["k"]), id(d["v"])) for d in cross] == ids  # the first image, in place
    for d in cross:
        d["is_init"] = False
    _stream(model, caches, seed=7)
    assert [(id(d["k"]), id(d["v"])) for d in cross] == ids  # the reset, in place
    kept = cross[0]["k"]
    kept_values = kept.clone()
    for d in cross:
        d["is_init"] = False
    _stream(model, caches, seed=1)
    assert cross[0]["k"] is not kept and torch.equal(kept, kept_values)
    assert (id(cross[1]["k"]), id(cross[1]["v"])) == ids[1]


# ------------------------------------------------------------------ on/off options
@pytest.mark.parametrize("cls", MODELS.values(), ids=MODELS)
@pytest.mark.parametrize("key,value", [("qk_norm", "false"), ("cross_attn_norm", "False"),
                                       ("enable_mouse", "false"), ("enable_keyboard", " off "),
                                       ("qk_norm", 0), ("qkv_bias", "yes")])
def test_switches_from_a_config_are_parsed_not_taken_by_truthiness(cls, key, value):
    """`"false"` builds the model that `False` builds (was: the feature on)."""
    def config(v):
        c = model_config("tiny")
        action_key = key in ("enable_mouse", "enable_keyboard", "qkv_bias")
        (c["action_config"] if action_key else c)[key] = v
        return c
    expected = parse_switch(value, key)
    built, plain = cls.from_config(config(value)), cls.from_config(config(expected))
    assert built.state_dict().keys() == plain.state_dict().keys()
    assert built.state_dict().keys() != cls.from_config(config(not expected)).state_dict().keys()
    action = built.blocks[0].action_model
    if key in ("qk_norm", "cross_attn_norm"):
        assert getattr(built, key) is expected
    elif key == "qkv_bias":
        assert (action.t_qkv.bias is not None) is expected
    else:
        assert getattr(action, key) is expected


@pytest.mark.parametrize("cls", MODELS.values(), ids=MODELS)
@pytest.mark.parametrize("key,value,error,match", [
    ("qk_norm", "maybe", ValueError, r"qk_norm must be true or false.*'maybe'"),
    ("cross_attn_norm", 2, ValueError, r"cross_attn_norm must be true or false \(or 1/0\), got 2"),
    ("qk_norm", None, TypeError, "qk_norm must be true or false .a bool., got NoneType"),
    ("enable_mouse", "nope", ValueError, r"action_config\['enable_mouse'\] must be true or false"),
    ("enable_keyboard", [True], TypeError, r"action_config\['enable_keyboard'\] must be true"),
])
def test_bad_switches_are_refused_naming_the_key(cls, key, value, error, match):
    config = model_config("tiny")
    (config["action_config"] if key.startswith("enable") else config)[key] = value
    with pytest.raises(error, match=match):
        cls.from_config(config)


def test_enable_cuda_graphs_parses_its_argument():
    model = _tiny()
    model.enable_cuda_graphs("false")
    assert model.cuda_graphs is False and model.options.cuda_graphs is False
    model.enable_cuda_graphs("ON")
    assert model.cuda_graphs is True
    options = model.options
    for bad, error in (("nah", ValueError), (None, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match=r"enable_cuda_graphs\(enabled\)"):
            model.enable_cuda_graphs(bad)
        assert model.options is options
    model.enable_cuda_graphs(False)
    assert model.cuda_graphs is False


def test_option_switches_from_config_json_strings():
    built = OptimizedCausalWanModel.from_config(model_config("tiny"), cuda_graphs="false",
                                                fused_qkv="0", residual_in_gemm="Off")
    assert (built.cuda_graphs, built.options.fused_qkv, built.options.residual_in_gemm) == \
        (False, False, False)
    with pytest.raises(ValueError, match="fused_qkv='sometimes'"):
        FastOptions.resolve({"fused_qkv": "sometimes"}, environ={})


def test_fp8_gemms_of_a_wrong_type_is_a_clear_error():
    """Was: TypeError 'int object is not iterable', even with precision native."""
    for precision in ("native", "fp8"):
        with pytest.raises(TypeError, match=r"fp8_gemms=5.*must be GEMM names"):
            FastOptions.resolve({"fp8_gemms": 5, "precision": precision}, environ={})
    with pytest.raises(TypeError, match="fp8_gemms=5"):
        _tiny(fp8_gemms=5)
    with pytest.raises(TypeError, match="precision must be a string"):
        FastOptions.resolve({"precision": 8}, environ={})
    model = _tiny()
    options = model.options
    with pytest.raises(TypeError, match="fp8_gemms"):
        model.options.with_option("fp8_gemms", 5)
    assert model.options is options


# ------------------------------------------------------------------ backend selections
def _yaml(tmp_path, text, name="selection.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,error,match", [
    ("defualt: eager\n", ValueError, r"unknown key 'defualt' \(did you mean 'default'\?\)"),
    ("default: eager\nopss:\n  self_attention: eager\n", ValueError,
     r"unknown key 'opss' \(did you mean 'ops'\?\)"),
    ("default: [eager]\n", TypeError, r"`default:` must name one backend .*list \['eager'\]"),
    ("default: null\n", ValueError, r"`default:` is empty \(null\)"),
    ("ops:\n  self_attention: null\n", ValueError, r"op 'self_attention' has no backend"),
    ("ops:\n  self_atention: eager\n", ValueError,
     r"unknown op\(s\) \['self_atention'\] \(did you mean 'self_attention'\?\)"),
    ("ops:\n  self_attention: [eager]\n", TypeError, r"op 'self_attention' must name one backend"),
])
def test_bad_selection_files_are_refused_naming_file_and_key(tmp_path, monkeypatch, text, error,
                                                             match):
    monkeypatch.delenv("WAN_BACKEND", raising=False)
    path = _yaml(tmp_path, text)
    with pytest.raises(error, match=f"{path}.*{match}"):
        load_selection(path)
    with pytest.raises(error, match=match):  # at construction, not at the first forward
        _tiny(backend=str(path))
    assert set(load_selection(_yaml(tmp_path, "default: eager\n", "good.yaml")).values()) == \
        {"eager"}


@pytest.mark.parametrize("spec,error,match", [
    ({"self_attention": None}, ValueError, r"op 'self_attention' has no backend \(None/null\)"),
    ({"self_attention": ["eager"]}, TypeError, r"op 'self_attention' must name one backend"),
    ({"softmax": "eager"}, ValueError, r"unknown op\(s\) \['softmax'\]"),
    (5, TypeError, "backend must be a backend name"),
    ("eagre", ValueError, r"unknown backend 'eagre' .*did you mean 'eager'"),
])
def test_bad_backend_keywords_fail_at_construction(monkeypatch, spec, error, match):
    """Was (None): KeyError: None at the first forward."""
    monkeypatch.delenv("WAN_BACKEND", raising=False)
    with pytest.raises(error, match=match):
        _tiny(backend=spec)
    model = _tiny()
    options = model.options
    with pytest.raises(error, match=match):
        model.set_backend(spec)
    assert model.options is options
    fresh = _tiny()
    caches, fresh_caches = make_caches(model), make_caches(fresh)
    assert torch.equal(_stream(model, caches), _stream(fresh, fresh_caches))


def test_wan_backend_environment(monkeypatch):
    """An explicit keyword wins over WAN_BACKEND; a bad WAN_BACKEND that decides some op is an
    error naming the variable; blanks are unset, as for every other variable."""
    monkeypatch.setenv("WAN_BACKEND", "nonsense")
    model = _tiny(backend="eager")  # covers every op: the environment is not read
    assert set(model.backend.values()) == {"eager"}
    for kwargs in ({}, {"backend": "flash"}, {"backend": {"self_attention": "eager"}}):
        with pytest.raises(ValueError, match=r"WAN_BACKEND='nonsense'.*unknown backend "
                                             r"'nonsense'.*fix or unset WAN_BACKEND"):
            _tiny(**kwargs)
    monkeypatch.setenv("WAN_BACKEND", "   ")
    assert set(_tiny().backend.values()) == {"auto"}
    assert set(load_selection().values()) == {"auto"}
    monkeypatch.setenv("WAN_BACKEND", " eager ")
    assert set(_tiny().backend.values()) == {"eager"}
    assert _tiny(backend={"norm_rope_store": "auto"}).backend["self_attention"] == "eager"
    # the options' own environ is the one read (tests and tools pass theirs)
    monkeypatch.delenv("WAN_BACKEND")
    resolved = FastOptions.resolve({}, environ={"WAN_BACKEND": "eager"})
    assert set(resolved.backend.values()) == {"eager"}
    assert set(resolved.backend) == set(OPS)


# ------------------------------------------------------------------ autograd and the caches
def test_reference_stream_outside_no_grad_keeps_no_graph_in_its_caches():
    """Was: every cache write kept its autograd graph (memory grew every block)."""
    model, fresh = _tiny(CausalWanModel), _tiny(CausalWanModel)
    caches, fresh_caches = make_caches(model), make_caches(fresh)
    for block in range(3):
        out = model(**make_inputs(model, start_frame=3 * block, seed=block), **caches,
                    current_start=3 * block * TOKENS)
        assert out.requires_grad
        for key in ("kv_cache", "kv_cache_mouse", "kv_cache_keyboard", "crossattn_cache"):
            for d in caches[key]:
                assert not d["k"].requires_grad and not d["v"].requires_grad, (block, key)
                assert d["k"].grad_fn is None and d["v"].grad_fn is None
        expected = _stream(fresh, fresh_caches, 3 * block, block)
        assert rel_err(out.detach(), expected) < SAME


def test_reference_stream_still_differentiates_through_its_own_block():
    """The cache writes are detached, not the call: the first block of a stream (which sees only
    its own frames) has the cache-free forward's gradient."""
    model = _tiny(CausalWanModel)
    inputs = make_inputs(model)
    model(**inputs, **make_caches(model), current_start=0).square().sum().backward()
    streamed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(**inputs).square().sum().backward()
    cache_free = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert streamed.keys() == cache_free.keys() and len(streamed) > 10
    for name in streamed:
        assert rel_err(streamed[name], cache_free[name]) < 1e-4, name


# ------------------------------------------------------------------ checkpoints
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("cls", MODELS.values(), ids=MODELS)
def test_load_checkpoint_refuses_a_fifo_instead_of_hanging(tmp_path, cls):
    """Was: a hang (reading a FIFO waits for a writer, with the GIL held). A writer process waits
    on the FIFO, so that a load that opens it anyway reads an empty file and fails (with another
    error) instead of hanging the suite."""
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", 'exec 3>"$0"', str(fifo)])
    model = _tiny(cls)
    state = copy.deepcopy(dict(model.state_dict()))
    try:
        with pytest.raises(CheckpointFileError, match=f"{fifo} is not a regular file"):
            model.load_checkpoint(fifo)
    finally:
        writer.kill()
        writer.wait()
    assert same_nested(dict(model.state_dict()), state)
    good = tmp_path / "good.safetensors"
    other = _tiny(cls, seed=3)
    save_safetensors_checkpoint(other, good)
    model.load_checkpoint(good)
    assert torch.equal(_stream(model, make_caches(model)), _stream(other, make_caches(other)))
