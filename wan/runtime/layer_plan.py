"""The streaming forward's plan: what each block's fused ops read from the module tree, gathered
once (as gpt-fast's model reads its weights once) instead of on every forward.

Building the plan also packs parameters that one launch reads together into one tensor:

* each layer's q, k and v weights and biases, so the self-attention projects with one GEMM
  (`fused_qkv=False`, or WAN_FUSED_QKV=0: three GEMMs, parameters left alone);
* every block's `modulation`, so all blocks' adaLN factors come from one add.

With `precision="fp8"` the plan also holds e4m3 copies (one scale per output channel) of the
weights of the GEMMs chosen to run in FP8 (`Gemm`; options.DEFAULT_FP8_GEMMS, or WAN_FP8_GEMMS):
they are quantized here, so again after every load or move, and the model's own weights stay as they were.

The parameters stay what they were (the same objects, names, values and state dict), but their
`.data` becomes a view of the packed tensor: no weight is held twice, and in-place loading
(`load_state_dict`) writes through the views into it. The model forgets its plan (and the CUDA
graphs that read the old storage) whenever its parameters may have new storage or be new objects:
after `.to()`/`.half()`/`.cuda()` (its `_apply`) and after `load_state_dict` (`assign=True` puts new
parameter objects in place). `is_current()` is the cheap safety net for the rest (e.g. a submodule
moved on its own). Replacing a submodule is not noticed: call `model.set_backend(...)` afterwards.

Only the module tree's attribute names are read here (no import of wan.modules), so the plan
also works over upstream Matrix-Game-2's CausalWanModel.
"""
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

import torch
import torch.nn as nn

from ..kernels.fp8 import quantize_weight

class Packed:
    """Parameters whose `.data` are views of one tensor (`tensor`), concatenated along dim 0 or
    stacked along a new dim 0."""

    def __init__(self, params: List[nn.Parameter], stack: bool = False):
        with torch.no_grad():
            parts = [p.detach() for p in params]
            self.tensor = torch.stack(parts) if stack else torch.cat(parts)
            offset = 0
            for p in params:
                rows = 1 if stack else p.shape[0]
                view = self.tensor[offset:offset + rows]
                p.data = view[0] if stack else view
                offset += rows
        self.params = list(params)

    def intact(self) -> bool:
        """False once the parameters have storage of their own again (`.to()` moves all of a
        module's parameters, so the first one tells)."""
        return self.params[0].data_ptr() == self.tensor.data_ptr()


def _pack_biases(biases) -> Optional[Packed]:
    """The q/k/v biases packed, or None when the projections have none."""
    if all(b is None for b in biases):
        return None
    if any(b is None for b in biases):
        raise ValueError("q, k and v must all have a bias or none")
    return Packed(biases)


def _norm_weight(norm) -> Optional[torch.Tensor]:
    """The weight of an RMS norm, None when qk_norm is off (nn.Identity)."""
    return None if isinstance(norm, nn.Identity) else norm.weight


def _norm_eps(norm) -> Optional[float]:
    return None if isinstance(norm, nn.Identity) else norm.eps


def _shared_eps(q_norm, k_norm, owner: str) -> Optional[float]:
    """The eps of a q/k pair of RMS norms (None when qk_norm is off): the fused ops take one."""
    eps = {_norm_eps(q_norm), _norm_eps(k_norm)}
    if len(eps) != 1:
        raise ValueError(f"{owner}: the q and k norms differ (eps {sorted(map(str, eps))})")
    return eps.pop()


def _layers_of(sequence, kinds, name):
    """The modules of an nn.Sequential, which must match `kinds` (a GELU must be the tanh form, as
    upstream's): the fused ops replace them by their math."""
    ok = len(sequence) == len(kinds) and all(
        isinstance(m, kind) and (kind is not nn.GELU or m.approximate == "tanh")
        for m, kind in zip(sequence, kinds))
    if not ok:
        expected = ", ".join("GELU(approximate='tanh')" if k is nn.GELU else k.__name__
                             for k in kinds)
        raise ValueError(f"expected {name} of {expected}; got {sequence}")
    return list(sequence)


class Gemm:
    """What one GEMM of the streaming forward, x @ weight^T + bias, reads: the weight and bias,
    and the weight's FP8 copy when the plan runs it in FP8 (`fp8`). The GEMM itself (and its
    epilogues) is wan/modules/streaming/blocks.py's `linear`."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], fp8: bool):
        if fp8 and (weight.shape[0] % 16 or weight.shape[1] % 16):
            raise ValueError(f"FP8 GEMMs need weights whose dims are multiples of 16 (as "
                             f"torch._scaled_mm does), got {tuple(weight.shape)}")
        self.weight, self.bias = weight, bias
        self.fp8 = quantize_weight(weight) if fp8 else None

    @property
    def takes_fp8(self) -> bool:
        """Whether the op producing x should hand it over quantized."""
        return self.fp8 is not None


@dataclass
class ActionPlan:
    """One layer's action module, as the fused ops take it."""
    module: nn.Module
    heads: int
    mouse: bool
    keyboard: bool
    mouse_first: Optional[nn.Linear]   # mouse MLP: [tokens, mouse window] -> hidden (split at use)
    mouse_second: Optional[nn.Linear]  # its GELU runs inside the `frame_bias_gelu` op
    mouse_norm: Optional[nn.LayerNorm]
    mouse_eps: Optional[float]         # q/k RMS norms of the mouse attention
    keyboard_eps: Optional[float]      # ... and of the keyboard attention


@dataclass
class BlockPlan:
    """What one transformer block's streaming forward reads, in the order it runs."""

    index: int
    heads: int
    qkv: Tuple[Gemm, ...]              # one GEMM over the packed [3C, C] q/k/v, or three
    q_norm: Optional[torch.Tensor]     # RMS-norm weights of q and k (None: qk_norm off)
    k_norm: Optional[torch.Tensor]
    qk_eps: Optional[float]
    self_out: Gemm
    cross_norm: Optional[nn.LayerNorm]  # norm3 (None: cross_attn_norm off)
    cross_q: Gemm
    cross_q_norm: tuple                # (weight, eps), (None, None) without qk_norm
    cross_out: Gemm
    # the cross-attention's residual add runs inside cross_out's GEMM (its bias added ahead, to
    # the residual stream, by the gated residual + LayerNorm kernel before)
    cross_residual_in_gemm: bool
    cross_k: nn.Linear                 # the image context's keys and values (once per stream)
    cross_k_norm: tuple
    cross_v: nn.Linear
    action: Optional[ActionPlan]
    ffn_norm_eps: float
    ffn_in: Gemm                       # the FFN's first layer (its GELU: blocks.py ffn_hidden)
    ffn_out: Gemm


def _action_plan(action) -> Optional[ActionPlan]:
    if action is None:
        return None
    first = second = norm = None
    if action.enable_mouse:
        first, _, second, norm = _layers_of(
            action.mouse_mlp, (nn.Linear, nn.GELU, nn.Linear, nn.LayerNorm), "a mouse MLP")
    return ActionPlan(
        module=action, heads=action.heads_num, mouse=action.enable_mouse,
        keyboard=action.enable_keyboard, mouse_first=first, mouse_second=second, mouse_norm=norm,
        mouse_eps=(_shared_eps(action.img_attn_q_norm, action.img_attn_k_norm, "mouse attention")
                   if action.enable_mouse else None),
        keyboard_eps=(_shared_eps(action.key_attn_q_norm, action.key_attn_k_norm,
                                  "keyboard attention") if action.enable_keyboard else None))


def _block_plan(index: int, block, fuse_qkv: bool, fp8: FrozenSet[str],
                packed: List[Packed], residual_in_gemm: bool = True) -> BlockPlan:
    """One block's plan; the tensors it packs are appended to `packed`."""
    attn, cross = block.self_attn, block.cross_attn
    ffn_in, _, ffn_out = _layers_of(block.ffn, (nn.Linear, nn.GELU, nn.Linear), "an FFN")

    def gemm(linear, name):
        return Gemm(linear.weight, linear.bias, name in fp8)

    projections = (attn.q, attn.k, attn.v)
    if fuse_qkv:
        weights = Packed([p.weight for p in projections])
        biases = _pack_biases([p.bias for p in projections])
        packed += [p for p in (weights, biases) if p is not None]
        qkv = (Gemm(weights.tensor, biases and biases.tensor, "qkv" in fp8),)
    else:
        qkv = tuple(gemm(p, "qkv") for p in projections)
    cross_norm = block.norm3 if isinstance(block.norm3, nn.LayerNorm) else None
    return BlockPlan(
        index=index, heads=attn.num_heads, qkv=qkv,
        q_norm=_norm_weight(attn.norm_q), k_norm=_norm_weight(attn.norm_k),
        qk_eps=_shared_eps(attn.norm_q, attn.norm_k, "self-attention"),
        self_out=gemm(attn.o, "self_out"),
        cross_norm=cross_norm, cross_q=gemm(cross.q, "cross_q"),
        cross_q_norm=(_norm_weight(cross.norm_q), _norm_eps(cross.norm_q)),
        cross_out=gemm(cross.o, "cross_out"),
        # needs the norm's kernel to add the bias ahead (without it the stream is the normed
        # input itself) and a GEMM in the model's dtype
        cross_residual_in_gemm=(residual_in_gemm and cross_norm is not None
                                and "cross_out" not in fp8),
        cross_k=cross.k,
        cross_k_norm=(_norm_weight(cross.norm_k), _norm_eps(cross.norm_k)), cross_v=cross.v,
        action=_action_plan(block.action_model),
        ffn_norm_eps=block.norm2.eps, ffn_in=gemm(ffn_in, "ffn_in"),
        ffn_out=gemm(ffn_out, "ffn_out"))


class ModelPlan:
    """The plan of a whole model: its blocks' plans and every block's modulation packed into one
    [L, 1, 6, C] tensor. `fp8`: the names (of FP8_GEMMS) of the GEMMs to run in FP8;
    `residual_in_gemm`: the cross-attention's residual add inside its output GEMM."""

    def __init__(self, model, fp8: FrozenSet[str] = frozenset(), fuse_qkv: bool = True,
                 residual_in_gemm: bool = True):
        self.fp8 = frozenset(fp8)
        self.modulations = Packed([block.modulation for block in model.blocks], stack=True)
        self._packed = [self.modulations]
        self.blocks = [_block_plan(i, block, fuse_qkv, self.fp8, self._packed, residual_in_gemm)
                       for i, block in enumerate(model.blocks)]

    def is_current(self) -> bool:
        """False once a packed parameter got storage of its own (`.to()`, `.half()`, ...)."""
        return all(p.intact() for p in self._packed)
