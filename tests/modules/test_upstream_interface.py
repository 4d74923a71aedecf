"""What a Matrix-Game-2 checkout relies on from the models, without one: the constructor signature
that diffusers' from_config reads, options from config.json and the environment, the decoder in
upstream's scripts, t of shape [B, 1], longer cache lists. (`python -m wan.integrate` itself:
tests/tools/test_integrate.py; against a real checkout: tests/tools/test_matrix_game_checkout.py.)"""
import functools
import gc
import inspect
import logging
import warnings
from copy import deepcopy

import pytest
import torch

from helpers import build_model, make_caches, make_inputs, rel_err
from wan import CausalWanModel
from wan.runtime.options import cuda_graphs_on
from wan.runtime.options import publish_model_options
from wan.kernels.registry import BackendUnavailableError
from wan.modules import optimized_vae_decoder
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.modules.vae_decoder import VAEDecoderWrapper
from wan.modules.random_init import randomize_decoder_weights_
from wan.modules.optimized_causal_model import OptimizedCausalWanModel, _constructor_signature
from wan.modules.presets import model_config


# ---------------------------------------------------------------------- constructor signature
def _config_mixin_style_from_config(cls, config: dict):
    """What diffusers' ConfigMixin.from_config does with a config: the keys the constructor's
    signature names are passed, the others are warned about ("will be ignored")."""
    expected = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    ignored = sorted(set(public) - expected)
    if ignored:
        warnings.warn(f"The config attributes {ignored} were passed to {cls.__name__}, but are not "
                      f"expected and will be ignored")
    return cls(**{k: v for k, v in public.items() if k in expected})


def test_upstream_config_reaches_the_constructor_without_ignored_keys():
    config = {**model_config("universal"), "_class_name": "CausalWanModel", "cuda_graphs": True,
              "backend": "eager"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "will be ignored" warning fails the test
        with torch.device("meta"):
            model = _config_mixin_style_from_config(OptimizedCausalWanModel, config)
    assert (model.local_attn_size, model.num_layers, model.model_type) == (6, 30, "i2v")
    assert model.cuda_graphs is True and set(model.backend.values()) == {"eager"}
    assert len(model.blocks[14].action_model.mouse_mlp) == 4 and model.blocks[15].action_model is None


def test_signature_follows_a_config_mixin_style_parent():
    """Over a parent whose __init__ is wrapped (diffusers' @register_to_config uses functools.wraps),
    the optimized class's signature is the parent's named parameters plus its own options."""

    def register_to_config(init):
        @functools.wraps(init)
        def wrapped(self, *args, **kwargs):
            self.registered = dict(kwargs)
            init(self, *args, **kwargs)
        return wrapped

    class Parent:
        @register_to_config
        def __init__(self, model_type="t2v", dim=1536, action_config={}, eps=1e-6):
            self.dim = dim

    class Child(Parent):
        def __init__(self, *args, backend=None, cuda_graphs=None, **kwargs):
            super().__init__(*args, **kwargs)

    Child.__init__.__signature__ = _constructor_signature(Parent.__init__, Child.__init__)
    names = list(inspect.signature(Child.__init__).parameters)
    assert names == ["self", "model_type", "dim", "action_config", "eps", "backend", "cuda_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        child = _config_mixin_style_from_config(Child, {"dim": 64, "eps": 1e-5, "backend": "eager"})
    assert child.dim == 64 and child.registered == {"dim": 64, "eps": 1e-5}


def test_from_config_rejects_unknown_keys_and_takes_the_options():
    config = model_config("tiny")
    with pytest.raises(ValueError, match="unknown config keys"):
        OptimizedCausalWanModel.from_config({**config, "nonsense": 1})
    model = OptimizedCausalWanModel.from_config({**config, "inject_sample_info": False},
                                                cuda_graphs=True)
    assert model.cuda_graphs is True


@pytest.mark.parametrize("value,expected", [("1", True), ("on", True), ("0", False), ("", None)])
def test_cuda_graphs_from_the_environment(monkeypatch, value, expected):
    """None is the default: on wherever the model runs on CUDA, decided when the device is known."""
    monkeypatch.setenv("WAN_CUDA_GRAPHS", value)
    model = OptimizedCausalWanModel.from_config(model_config("tiny"))
    assert model.cuda_graphs is expected
    assert cuda_graphs_on(model.cuda_graphs, "cuda") is (expected is not False)
    assert cuda_graphs_on(model.cuda_graphs, "cpu") is False
    # a value in the config (or a keyword) wins over the environment
    for given in (True, False):
        assert OptimizedCausalWanModel.from_config(model_config("tiny"),
                                                   cuda_graphs=given).cuda_graphs is given


@pytest.mark.parametrize("env,config,line", [
    ("", None, "CUDA graphs off (not on CUDA)"),
    ("0", None, "CUDA graphs off (WAN_CUDA_GRAPHS=0)"),
    ("1", False, "CUDA graphs off (cuda_graphs=False: keyword or config.json)"),
    ("", True, "CUDA graphs off (cuda_graphs=True: keyword or config.json; not on CUDA)")])
@torch.no_grad()
def test_start_up_line_says_whether_graphs_are_on_and_why(monkeypatch, caplog, env, config, line):
    monkeypatch.setenv("WAN_CUDA_GRAPHS", env)
    model = build_model(cls=OptimizedCausalWanModel, cuda_graphs=config)
    with caplog.at_level(logging.INFO, logger="wan.fast"), warnings.catch_warnings():
        warnings.simplefilter("ignore" if config else "error")  # the default warns of nothing
        model(**make_inputs(model), **make_caches(model), current_start=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "wan.fast"]
    assert len(lines) == 1 and f"OptimizedCausalWanModel on cpu in torch.float64, {line}:" \
        in lines[0], lines


def test_cuda_graphs_environment_typo_is_an_error(monkeypatch):
    monkeypatch.setenv("WAN_CUDA_GRAPHS", "ture")
    with pytest.raises(ValueError, match="WAN_CUDA_GRAPHS"):
        OptimizedCausalWanModel.from_config(model_config("tiny"))


# ---------------------------------------------------------------------- the decoder in upstream's scripts
def _random_decoder_state(small=True) -> dict:
    """A decoder state dict as upstream's scripts cut it out of Wan2.1_VAE.pth (keys holding
    'decoder.' or 'conv2'), with the encoder's keys beside it that the cut drops."""
    weights = randomize_decoder_weights_(VAEDecoderWrapper().double()).state_dict()
    vae = {**weights, "encoder.conv1.weight": torch.zeros(1), "conv1.bias": torch.zeros(1)}
    return {k: v for k, v in vae.items() if "decoder." in k or "conv2" in k}


def _upstream_style_build(cls, state):
    """What inference.py / inference_streaming.py do with their decoder, on a CPU in float64."""
    decoder = cls()
    decoder.load_state_dict(state)
    decoder.to("cpu", torch.float64)
    decoder.requires_grad_(False)
    decoder.eval()
    return decoder


def _no_torch_compile(*args, **kwargs):
    raise AssertionError("torch.compile was called")


@torch.no_grad()
def test_decoder_compile_starts_no_torch_compile_and_turns_its_graphs_on(monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", _no_torch_compile)
    monkeypatch.setattr(optimized_vae_decoder, "_compile_noted", False)
    monkeypatch.delenv("WAN_CUDA_GRAPHS", raising=False)
    publish_model_options()  # no DiT options in this process
    state = _random_decoder_state()
    reference = _upstream_style_build(VAEDecoderWrapper, state)
    decoder = _upstream_style_build(OptimizedVAEDecoderWrapper, state)
    with caplog.at_level(logging.INFO, logger="wan.fast"):
        assert decoder.compile(mode="max-autotune-no-cudagraphs") is None
        decoder.compile(mode="max-autotune-no-cudagraphs")
    notes = [r.getMessage() for r in caplog.records if "compile(" in r.getMessage()]
    assert len(notes) == 1 and "not running torch.compile" in notes[0]
    assert decoder._compiled_call_impl is None and decoder.cuda_graphs is True
    # what upstream does after compile keeps working: a move, a load of decoder./conv2 keys
    decoder.to("cpu", torch.float64).requires_grad_(False).eval()
    decoder.load_state_dict(state)
    reference.load_state_dict(state)  # float64 now (the first load rounded to float32)
    z = torch.randn(1, 3, 16, 2, 3, dtype=torch.float64)
    want, _ = reference(z, *([None] * 32))
    got, _ = decoder(z, *([None] * 32))
    assert rel_err(got, want) <= 1e-10
    off = OptimizedVAEDecoderWrapper(cuda_graphs=False)
    off.compile(mode="max-autotune-no-cudagraphs")
    assert off.cuda_graphs is False  # turned off stays off


def _pickle_globals(path) -> set:
    """The globals a torch.save file's pickle names (read without unpickling)."""
    from checkout.pickle_names import pickle_globals
    return set(pickle_globals(path))


def test_decoder_torch_save_writes_a_marker_and_torch_load_gives_the_built_decoder(tmp_path):
    """The fork's --vae_compile_mode path: torch.save(decoder), later torch.load(weights_only=False)
    right after building the decoder again. The file holds no module and no weights."""
    state = _random_decoder_state()
    first = _upstream_style_build(OptimizedVAEDecoderWrapper, state)
    first.compile(mode="max-autotune-no-cudagraphs")
    path = tmp_path / "compiled_vae_decoder.pt"
    torch.save(first, path)
    assert path.stat().st_size < 4096  # 73 M parameters would be 290 MB
    assert _pickle_globals(path) == {"wan.modules.optimized_vae_decoder _resume_decoder"}
    second = _upstream_style_build(OptimizedVAEDecoderWrapper, state)  # the next run builds again
    assert torch.load(path, map_location="cpu", weights_only=False) is second
    copy = deepcopy(second)  # deepcopy is a real copy, not the marker's
    assert copy is not second and all(torch.equal(a, b) for a, b in zip(
        copy.state_dict().values(), second.state_dict().values()))
    del first, second, copy
    gc.collect()
    with pytest.raises(RuntimeError, match="holds no module and no weights"):
        torch.load(path, weights_only=False)


@torch.no_grad()
def test_decoder_options_follow_the_dit_then_the_environment(monkeypatch, caplog):
    monkeypatch.setenv("WAN_CUDA_GRAPHS", "1")
    z = torch.randn(1, 3, 16, 2, 3, dtype=torch.float64)
    build_model(cls=OptimizedCausalWanModel, cuda_graphs=False, backend="eager")  # its config.json
    decoder = _upstream_style_build(OptimizedVAEDecoderWrapper, _random_decoder_state())
    with caplog.at_level(logging.INFO, logger="wan.fast"):
        decoder(z, *([None] * 32))
    assert decoder.cuda_graphs is False and set(decoder.backend.values()) == {"eager"}
    line = [r.getMessage() for r in caplog.records if "OptimizedVAEDecoderWrapper on" in
            r.getMessage()]
    assert len(line) == 1 and "CUDA graphs off (the DiT's cuda_graphs=False)" in line[0], line
    assert "backend from the DiT's backend='eager'" in line[0]
    own = OptimizedVAEDecoderWrapper(cuda_graphs=True).double()  # its own keyword wins
    own(z, *([None] * 32))
    assert own.cuda_graphs is True
    # a DiT backend that cannot run the decoder here (Triton has no float64): not followed, said
    publish_model_options(backend="triton")
    fallback = OptimizedVAEDecoderWrapper().double()
    with caplog.at_level(logging.INFO, logger="wan.fast"):
        got, _ = fallback(z, *([None] * 32))
    assert any("not following the DiT's backend='triton'" in r.getMessage() for r in caplog.records)
    assert set(fallback.backend.values()) == {"auto"}
    with pytest.raises(BackendUnavailableError):  # asked for by the decoder itself: an error
        OptimizedVAEDecoderWrapper(backend="triton").double()(z, *([None] * 32))
    publish_model_options()  # no DiT options: the environment
    monkeypatch.setenv("WAN_CUDA_GRAPHS", "0")
    assert OptimizedVAEDecoderWrapper().cuda_graphs is False
    monkeypatch.setenv("WAN_CUDA_GRAPHS", "")
    assert OptimizedVAEDecoderWrapper().cuda_graphs is None  # default: on wherever on CUDA


# ---------------------------------------------------------------------- inputs upstream accepts
@pytest.mark.parametrize("cls", [CausalWanModel, OptimizedCausalWanModel])
@torch.no_grad()
def test_t_of_shape_b_by_1_is_broadcast_over_the_frames(cls):
    """Upstream's video-extension path calls with t [B, 1] for a 3-frame block."""
    model = build_model(cls=cls)
    inputs = make_inputs(model)
    full = model(**inputs, **make_caches(model), current_start=0)
    inputs["t"] = inputs["t"][:, :1]
    assert torch.equal(model(**inputs, **make_caches(model), current_start=0), full)
    assert torch.equal(model(**inputs), model(**dict(inputs, t=inputs["t"].expand(1, 3))))


@pytest.mark.parametrize("cls", [CausalWanModel, OptimizedCausalWanModel])
@torch.no_grad()
def test_cache_lists_longer_than_the_model_are_accepted(cls):
    """Upstream's pipeline always makes 30 cache entries, whatever the model's depth; the entries
    past the model's layers are left untouched."""
    model = build_model(cls=cls)
    reference = build_model()
    expected = reference(**make_inputs(reference), **make_caches(reference), current_start=0)
    caches = make_caches(model)
    spare = {name: [dict(c) for c in make_caches(model)[name][:1]] for name in caches
             if caches[name] is not None}
    longer = {name: (caches[name] + spare[name] if caches[name] is not None else None)
              for name in caches}
    out = model(**make_inputs(model), **longer, current_start=0)
    assert rel_err(out, expected) <= 1e-10
    assert spare["kv_cache"][0]["k"].abs().max() == 0 and not spare["crossattn_cache"][0]["is_init"]
