"""Config loading and safetensors checkpoints: round trips, prefixes, and mismatch reports."""
import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import build_model
from wan import CausalWanModel
from wan.modules.checkpoint import CheckpointMismatchError, save_safetensors_checkpoint
from wan.modules.presets import CONFIG_ROOT, model_config


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("prefix", ["", "model."])
def test_round_trip(tmp_path, prefix):
    source = build_model(seed=3)
    path = tmp_path / "weights.safetensors"
    save_safetensors_checkpoint(source, path, prefix=prefix)
    target = build_model(seed=4)
    assert not _same_weights(source, target)
    target.load_checkpoint(path)
    assert _same_weights(source, target)


def test_directory_of_shards(tmp_path):
    source = build_model(seed=5)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, str(tmp_path / "part-0.safetensors"))
    save_file({k: state[k] for k in keys[1::2]}, str(tmp_path / "part-1.safetensors"))
    target = build_model(seed=6)
    target.load_checkpoint(tmp_path)
    assert _same_weights(source, target)


def test_mismatch_lists_missing_unexpected_and_misshaped(tmp_path):
    state = {k: v.contiguous() for k, v in build_model().state_dict().items()}
    del state["head.head.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    state["patch_embedding.bias"] = torch.zeros(7, dtype=torch.float64)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    model = build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        model.load_checkpoint(path)
    message = str(err.value)
    assert "missing" in message and "head.head.bias" in message
    assert "unexpected" in message and "blocks.0.extra.weight" in message
    assert "mis-shaped" in message and "patch_embedding.bias" in message and "(7,)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_strict_ignores_missing_keys_but_not_shapes(tmp_path):
    source = build_model(seed=7)
    state = {k: v.contiguous() for k, v in source.state_dict().items() if k.startswith("head.")}
    path = tmp_path / "head.safetensors"
    save_file(state, str(path))
    target = build_model(seed=8)
    target.load_checkpoint(path, strict=False)
    assert torch.equal(target.head.head.weight, source.head.head.weight)
    save_file({"head.head.bias": torch.zeros(3, dtype=torch.float64)}, str(path))
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        target.load_checkpoint(path, strict=False)


def test_only_safetensors_files(tmp_path):
    pickle_path = tmp_path / "weights.pt"
    pickle_path.write_bytes(b"not used")
    with pytest.raises(ValueError, match="safetensors"):
        build_model().load_checkpoint(pickle_path)
    with pytest.raises(FileNotFoundError):
        build_model().load_checkpoint(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("variant", ["universal", "gta_drive", "templerun"])
def test_upstream_configs_build_the_upstream_parameter_count(variant):
    # the meta device builds the 1.6e9-parameter structure without allocating it
    with torch.device("meta"):
        model = CausalWanModel.from_config(CONFIG_ROOT / variant)
    params = sum(p.numel() for p in model.parameters())
    assert 1.5e9 < params < 1.75e9
    action = model.blocks[0].action_model
    assert action.enable_mouse == (variant != "templerun")
    assert [b.action_model is not None for b in model.blocks] == [i < 15 for i in range(30)]
    assert model.local_attn_size == (4 if variant == "gta_drive" else 6)


def test_from_config_accepts_dir_file_and_dict_and_rejects_unknown_keys(tmp_path):
    config = model_config("tiny")
    config["_class_name"] = "CausalWanModel"
    config["inject_sample_info"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    for source in (tmp_path, tmp_path / "config.json", config):
        model = CausalWanModel.from_config(source)
        assert model.dim == 64 and model.num_layers == 2
    config["num_layerz"] = 3
    with pytest.raises(ValueError, match="num_layerz"):
        CausalWanModel.from_config(config)
