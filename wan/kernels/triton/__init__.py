"""The triton backend's kernels (registered in OPS; the registry imports this module only when the
backend is considered, and it needs the triton package)."""
from .modulation import gated_residual, layer_norm_modulate
from .norm_rope import norm_rope_store
from .short_attention import short_attention

OPS = {
    "mouse_attention": short_attention,
    "keyboard_attention": short_attention,
    "layer_norm_modulate": layer_norm_modulate,
    "gated_residual": gated_residual,
    "norm_rope_store": norm_rope_store,
}
