"""The triton backend's kernels (registered in OPS; the registry imports this module only when the
backend is considered, and it needs the triton package)."""
from .action_attention import action_attention
from .modulation import gated_residual, layer_norm_modulate
from .norm_rope import norm_rope_store

OPS = {
    "mouse_attention": action_attention,
    "keyboard_attention": action_attention,
    "layer_norm_modulate": layer_norm_modulate,
    "gated_residual": gated_residual,
    "norm_rope_store": norm_rope_store,
}
