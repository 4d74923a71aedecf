"""What a Matrix-Game-2 checkout relies on, without one: the constructor signature that diffusers'
from_config reads, options from config.json and the environment, t of shape [B, 1], longer cache
lists, and `python -m wan.integrate` on a tree it recognises (apply, idempotent, exact undo) or
does not (refusal)."""
import functools
import hashlib
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import build_model, make_caches, make_inputs, rel_err
from wan import CausalWanModel
from wan.integrate import OPTIMIZED_IMPORT, RECOGNISED_BY, UPSTREAM_IMPORT, install, undo
from wan.modules.optimized_causal_model import OptimizedCausalWanModel, _constructor_signature
from wan.presets import model_config

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize("value,expected", [("1", True), ("on", True), ("0", False), ("", False)])
def test_cuda_graphs_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("WAN_CUDA_GRAPHS", value)
    assert OptimizedCausalWanModel.from_config(model_config("tiny")).cuda_graphs is expected
    # a value in the config (or a keyword) wins over the environment
    assert OptimizedCausalWanModel.from_config(model_config("tiny"),
                                               cuda_graphs=not expected).cuda_graphs is not expected


def test_cuda_graphs_environment_typo_is_an_error(monkeypatch):
    monkeypatch.setenv("WAN_CUDA_GRAPHS", "ture")
    with pytest.raises(ValueError, match="WAN_CUDA_GRAPHS"):
        OptimizedCausalWanModel.from_config(model_config("tiny"))


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


# ---------------------------------------------------------------------- python -m wan.integrate
def _fake_checkout(root: Path) -> Path:
    """The files the command recognises a Matrix-Game-2 tree by (nothing runnable)."""
    for relative, marker in RECOGNISED_BY.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(f"{marker}:\n    pass\n")
    wrapper = root / "utils" / "wan_wrapper.py"
    wrapper.write_text(f"import torch\n{UPSTREAM_IMPORT}\n\n\n{wrapper.read_text()}")
    (root / "wan" / "modules" / "optimized_causal_model.py").write_text("# the fork's template\n")
    (root / "tests").mkdir()
    (root / "tests" / "baseline_performance.txt").write_text("Mean: 166.60 ms\n")
    return root


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_integrate_applies_is_idempotent_and_undoes_exactly(tmp_path):
    root = _fake_checkout(tmp_path / "Matrix-Game-2")
    before = _tree(root)
    lines = []
    written = install(root, out=lines.append)
    assert "wan/kernels/registry.py" in written and "tests/test_causal_wan_model.py" in written
    assert OPTIMIZED_IMPORT in (root / "utils" / "wan_wrapper.py").read_text()
    assert any(line.startswith("--- a/utils/wan_wrapper.py") for line in lines)  # the diff shown
    assert (root / "tests" / "run_tests.sh").stat().st_mode & 0o111
    assert install(root, out=lines.append) == []  # again: nothing to do
    (root / "tests" / "baseline_performance.txt").write_text("Mean: 20.00 ms\n")  # the suite ran
    undo(root, out=lines.append)
    assert _tree(root) == before


def test_integrate_refuses_an_edited_install_on_undo(tmp_path):
    root = _fake_checkout(tmp_path / "Matrix-Game-2")
    install(root, out=lambda line: None)
    (root / "wan" / "kernels" / "registry.py").write_text("# edited\n")
    with pytest.raises(SystemExit, match="edited"):
        undo(root, out=lambda line: None)


def test_integrate_refuses_a_tree_it_does_not_recognise(tmp_path):
    (tmp_path / "Matrix-Game-2").mkdir()
    result = subprocess.run([sys.executable, "-m", "wan.integrate", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "is not a Matrix-Game-2 checkout" in result.stderr
    assert "wan/modules/causal_model.py is missing" in result.stderr
    assert "did you mean" in result.stderr and "Matrix-Game-2" in result.stderr
    assert list(tmp_path.rglob("*")) == [tmp_path / "Matrix-Game-2"]  # nothing written


def test_integrate_refuses_a_wrapper_it_does_not_recognise(tmp_path):
    root = _fake_checkout(tmp_path / "Matrix-Game-2")
    wrapper = root / "utils" / "wan_wrapper.py"
    wrapper.write_text(wrapper.read_text().replace(UPSTREAM_IMPORT, "from x import CausalWanModel"))
    before = _tree(root)
    with pytest.raises(SystemExit, match="exactly once"):
        install(root, out=lambda line: None)
    assert _tree(root) == before
