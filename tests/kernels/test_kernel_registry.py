"""Backend selection: names, mappings, YAML, environment; clear errors; `auto` finds a backend for
every op in every floating dtype."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import build_model, make_inputs
from wan.modules.presets import tiny_variant_config
from wan.kernels import eager
from wan.kernels.registry import (OPS, BackendUnavailableError, load_selection, resolve,
                                  resolve_all)
from wan.modules.optimized_causal_model import OptimizedCausalWanModel

ROOT = Path(__file__).resolve().parents[2]


def test_auto_resolves_every_op_on_cpu_to_eager():
    resolved = resolve_all(load_selection("auto"), torch.device("cpu"), torch.float32, {})
    assert {name for name, _ in resolved.values()} == {"eager"}
    assert resolved["norm_rope_store"][1] is eager.norm_rope_store


def test_a_backend_name_covers_the_ops_it_implements():
    selection = load_selection("flash")
    assert {selection[op] for op in OPS if op.endswith("attention")} == {"flash"}
    assert selection["norm_rope_store"] == selection["gated_residual"] == "auto"


def test_explicit_backend_that_cannot_run_says_why_and_what_to_install():
    with pytest.raises(BackendUnavailableError) as err:
        resolve("self_attention", "flash", torch.device("cpu"), torch.bfloat16, 128)
    message = str(err.value)
    assert "needs a CUDA device" in message and "pip install wan[flash]" in message
    assert "eager: available" in message


def test_cublas_refuses_a_cpu_whose_gelu_differs():
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        resolve("linear_gelu", "cublas", torch.device("cpu"), torch.float32, 0)
    with pytest.raises(BackendUnavailableError, match="linear_gelu"):
        resolve("self_attention", "cublas", torch.device("cuda"), torch.bfloat16, 128)
    assert load_selection("cublas")["linear_gelu"] == "cublas"


def test_flash_refuses_float32_and_other_ops():
    with pytest.raises(BackendUnavailableError, match="float16 or bfloat16"):
        resolve("self_attention", "flash", torch.device("cuda"), torch.float32, 128)
    with pytest.raises(BackendUnavailableError, match="attention only"):
        resolve("norm_rope_store", "flash", torch.device("cuda"), torch.bfloat16, 128)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        load_selection("fast")
    with pytest.raises(ValueError, match="unknown op"):
        load_selection({"softmax": "eager"})


def test_yaml_and_environment(monkeypatch):
    selection = load_selection(ROOT / "configs" / "backends" / "eager.yaml")
    assert set(selection.values()) == {"eager"}
    selection = load_selection(str(ROOT / "configs" / "backends" / "flash.yaml"))
    assert selection["mouse_attention"] == "flash" and selection["norm_rope_store"] == "auto"
    monkeypatch.setenv("WAN_BACKEND", "eager")
    assert set(load_selection().values()) == {"eager"}
    model = OptimizedCausalWanModel.from_config(tiny_variant_config(), backend={"norm_rope_store": "eager"})
    assert model.backend["norm_rope_store"] == "eager" and model.backend["self_attention"] == "eager"


def test_model_with_an_unrunnable_backend_fails_at_its_first_stream_call():
    model = build_model(config=tiny_variant_config(), cls=OptimizedCausalWanModel,
                        dtype=torch.float32, backend="flash")
    model.start_stream(latent_size=(8, 16))
    with pytest.raises(BackendUnavailableError, match="flash"):
        model(**make_inputs(model), current_start=0)


def test_cli_lists_every_op_and_backend():
    out = subprocess.run([sys.executable, "-m", "wan.kernels"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for op in OPS:
        assert op in out
    if torch.cuda.is_available():
        assert out.count("auto picks") == len(OPS)
    else:  # every op but the FP8 GEMM has an implementation `auto` picks; that one says why not
        assert out.count("auto picks") == len(OPS) - 1
        assert "FP8 tensor cores" in out
    assert "triton" in out and "flash" in out and "eager" in out


@pytest.mark.parametrize("text, message", [("- eager\n- flash\n", "must be a mapping"),
                                           ("default: [\n", "not readable YAML"),
                                           ("ops: [eager]\n", "must be a mapping")])
def test_a_bad_selection_file_is_refused_by_name(tmp_path, text, message):
    path = tmp_path / "selection.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        load_selection(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml: no such file"):
        load_selection(tmp_path / "missing.yaml")
