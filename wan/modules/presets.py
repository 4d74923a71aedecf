"""Named model configurations: the three upstream ones (read from configs/) and a tiny CPU one."""
import copy
import json
from pathlib import Path

from .shared.conditioning import frame_tokens

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs" / "distilled_model"
UPSTREAM_VARIANTS = ("universal", "gta_drive", "templerun")

# The real structure (action modules, mouse + keyboard, 6-frame window) at a size a CPU runs in
# a fraction of a second. Action heads stay 64 wide: the action RoPE table is built for 64.
TINY_CONFIG = {
    "model_type": "i2v", "patch_size": [1, 2, 2], "in_dim": 36, "dim": 64, "ffn_dim": 128,
    "freq_dim": 256, "out_dim": 16, "num_heads": 2, "num_layers": 2, "local_attn_size": 6,
    "sink_size": 0, "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
    "action_config": {
        "blocks": [0], "enable_keyboard": True, "enable_mouse": True, "heads_num": 1,
        "hidden_size": 8, "img_hidden_size": 64, "keyboard_dim_in": 4, "keyboard_hidden_dim": 64,
        "mouse_dim_in": 2, "mouse_hidden_dim": 64, "mouse_qk_dim_list": [8, 28, 28],
        "patch_size": [1, 2, 2], "qk_norm": True, "qkv_bias": False, "rope_dim_list": [8, 28, 28],
        "rope_theta": 256, "vae_time_compression_ratio": 4, "windows_size": 3},
}
# latent (H, W) each preset is meant to run at: 880 tokens per frame for the real model
LATENT_SIZE = {"tiny": (8, 16), **{name: (44, 80) for name in UPSTREAM_VARIANTS}}


def model_config(name: str) -> dict:
    """A fresh copy of a preset's constructor config ('tiny', 'universal', 'gta_drive', 'templerun')."""
    if name == "tiny":
        return copy.deepcopy(TINY_CONFIG)
    if name not in UPSTREAM_VARIANTS:
        raise ValueError(f"unknown preset {name!r}; choose from tiny, {', '.join(UPSTREAM_VARIANTS)}")
    with open(CONFIG_ROOT / name / "config.json") as f:
        return json.load(f)


def tiny_variant_config(variant: str = "universal") -> dict:
    """The tiny preset shaped like one upstream variant's action space and window: gta_drive
    (keyboard 2, 4-frame window), templerun (keyboard 7, no mouse) or universal."""
    config = model_config("tiny")
    if variant == "gta_drive":
        config["local_attn_size"] = 4
        config["action_config"]["keyboard_dim_in"] = 2
    elif variant == "templerun":
        config["action_config"]["keyboard_dim_in"] = 7
        config["action_config"]["enable_mouse"] = False
    elif variant != "universal":
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(UPSTREAM_VARIANTS)}")
    return config


def tokens_per_frame(name: str) -> int:
    """Tokens of one latent frame at a preset's latent size (patch 2 x 2): 880 for the real model."""
    return frame_tokens(*LATENT_SIZE[name], patch_size=(1, 2, 2))
