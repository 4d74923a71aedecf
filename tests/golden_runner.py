"""Replays the call sequence of tests/golden (see its README) on a model."""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wan.modules.shared.conditioning import frame_tokens, history_steps
from wan.modules.rolling_cache import new_stream_caches

GOLDEN_DIR = Path(__file__).parent / "golden"
VARIANTS = ("universal", "gta_drive", "templerun")


def load_variant(variant: str):
    """-> (meta dict, weights state dict, inputs dict, expected outputs dict)."""
    inputs_path = GOLDEN_DIR / f"{variant}_inputs.safetensors"
    with safe_open(str(inputs_path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    tensors = load_file(str(inputs_path))
    weights = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
    inputs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
    outputs = load_file(str(GOLDEN_DIR / f"{variant}_outputs.safetensors"))
    return meta, weights, inputs, outputs


def golden_model(model_cls, meta, weights, dtype=torch.float64):
    model = model_cls.from_config(meta["config"])
    model.load_state_dict(weights, strict=True)
    model.num_frame_per_block = meta["num_frame_per_block"]
    return model.to(dtype).eval()


def block_conditions(inputs, block: int, frames_per_block: int, dtype):
    s = frames_per_block * block
    steps = history_steps(s + frames_per_block - 1)
    cond = {"cond_concat": inputs["cond_concat"][:, :, s:s + frames_per_block].to(dtype),
            "visual_context": inputs["visual_context"].to(dtype),
            "keyboard_cond": inputs["keyboard_cond"][:, :steps].to(dtype),
            "mouse_cond": None}
    if "mouse_cond" in inputs:
        cond["mouse_cond"] = inputs["mouse_cond"][:, :steps].to(dtype)
    return cond


def run_streaming(model, meta, inputs, dtype=torch.float64, caches=None):
    """Every call of the sequence; returns {output name: tensor} for the stored ones."""
    nfpb = meta["num_frame_per_block"]
    h, w = inputs["noise"].shape[-2:]
    tokens_per_frame = frame_tokens(h, w, model.patch_size)
    if caches is None:
        caches = new_stream_caches(model, 1, meta["window_frames"], tokens_per_frame, dtype=dtype)
    results = {}
    x = None
    for call in meta["calls"]:
        block, s = call["block"], call["start_frame"]
        if x is None or call["t"] == meta["denoise_timesteps"][0]:
            x = inputs["noise"][:, :, s:s + nfpb].to(dtype)
        t = torch.full((1, nfpb), float(call["t"]), dtype=dtype)
        out = model(x, t, **block_conditions(inputs, block, nfpb, dtype), **caches,
                    current_start=call["current_start"])
        if call["output"]:
            results[call["output"]] = out
        if call["t"] != 0:
            x = 0.5 * x + 0.5 * out
    return results


def run_train(model, meta, inputs, dtype=torch.float64):
    frames = meta["train"]["frames"]
    t = torch.full((1, frames), float(meta["train"]["t"]), dtype=dtype)
    return model(inputs["noise"][:, :, :frames].to(dtype), t,
                 **block_conditions(inputs, 0, frames, dtype))
