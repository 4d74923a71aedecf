"""The triton backend's kernels (registered in OPS; the registry imports this module only when the
backend is considered, and it needs the triton package)."""
from .action_attention import action_attention
from .channel_norm import bias_residual_add, bias_residual_add_rms_norm_silu, rms_norm_silu
from .conv3d import conv3d_narrow
from .fp8_rows import quantize_fp8
from .modulation import (frame_bias_gelu, gated_residual, gated_residual_layer_norm,
                         gated_residual_layer_norm_modulate, layer_norm, layer_norm_modulate)
from .norm_rope import norm_rope_store, qkv_norm_rope_store
from .upsample_conv import upsample_conv2d

OPS = {
    "mouse_attention": action_attention,
    "keyboard_attention": action_attention,
    "layer_norm_modulate": layer_norm_modulate,
    "layer_norm": layer_norm,
    "gated_residual": gated_residual,
    "gated_residual_layer_norm_modulate": gated_residual_layer_norm_modulate,
    "gated_residual_layer_norm": gated_residual_layer_norm,
    "frame_bias_gelu": frame_bias_gelu,
    "norm_rope_store": norm_rope_store,
    "qkv_norm_rope_store": qkv_norm_rope_store,
    "quantize_fp8": quantize_fp8,
    "rms_norm_silu": rms_norm_silu,
    "bias_residual_add": bias_residual_add,
    "bias_residual_add_rms_norm_silu": bias_residual_add_rms_norm_silu,
    "upsample_conv2d": upsample_conv2d,
    "conv3d_narrow": conv3d_narrow,
}
