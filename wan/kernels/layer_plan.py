"""The streaming forward's plan: what each block's fused ops read from the module tree, gathered
once (as gpt-fast's model reads its weights once) instead of on every forward.

Building the plan also packs parameters that one launch reads together into one tensor:

* each layer's q, k and v weights and biases, so the self-attention projects with one GEMM
  (`WAN_FUSED_QKV=0` in the environment turns this off: three GEMMs, parameters left alone);
* every block's `modulation`, so all blocks' adaLN factors come from one add.

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
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    qkv: Optional[Packed]              # self-attention q/k/v weights [3C, C] (one GEMM)
    qkv_bias: Optional[Packed]
    q: nn.Linear                       # the three projections, when not fused
    k: nn.Linear
    v: nn.Linear
    q_norm: Optional[torch.Tensor]     # RMS-norm weights of q and k (None: qk_norm off)
    k_norm: Optional[torch.Tensor]
    qk_eps: Optional[float]
    self_out: nn.Linear
    cross_norm: Optional[nn.LayerNorm]  # norm3 (None: cross_attn_norm off)
    cross_q: nn.Linear
    cross_q_norm: tuple                # (weight, eps), (None, None) without qk_norm
    cross_out: nn.Linear
    cross_k: nn.Linear                 # the image context's keys and values (once per stream)
    cross_k_norm: tuple
    cross_v: nn.Linear
    action: Optional[ActionPlan]
    ffn_norm_eps: float
    ffn_in: nn.Linear                  # the FFN's first layer; its GELU runs in `linear_gelu`
    ffn_out: nn.Linear

    def project_qkv(self, x):
        """The self-attention's q, k, v of x: one GEMM when packed (views of its output)."""
        if self.qkv is None:
            return self.q(x), self.k(x), self.v(x)
        return F.linear(x, self.qkv.tensor, self.qkv_bias and self.qkv_bias.tensor).chunk(3, dim=-1)


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


def fused_qkv_setting() -> bool:
    """WAN_FUSED_QKV: 1 (default) packs q/k/v for one GEMM, 0 keeps three."""
    value = os.environ.get("WAN_FUSED_QKV", "1").strip().lower()
    if value not in ("0", "1"):
        raise ValueError(f"WAN_FUSED_QKV={value!r}: use 1 or 0")
    return value == "1"


def _block_plan(index: int, block, fuse_qkv: bool) -> BlockPlan:
    attn, cross = block.self_attn, block.cross_attn
    ffn_in, _, ffn_out = _layers_of(block.ffn, (nn.Linear, nn.GELU, nn.Linear), "an FFN")
    projections = (attn.q, attn.k, attn.v)
    return BlockPlan(
        index=index, heads=attn.num_heads,
        qkv=Packed([p.weight for p in projections]) if fuse_qkv else None,
        qkv_bias=_pack_biases([p.bias for p in projections]) if fuse_qkv else None,
        q=attn.q, k=attn.k, v=attn.v,
        q_norm=_norm_weight(attn.norm_q), k_norm=_norm_weight(attn.norm_k),
        qk_eps=_shared_eps(attn.norm_q, attn.norm_k, "self-attention"),
        self_out=attn.o,
        cross_norm=block.norm3 if isinstance(block.norm3, nn.LayerNorm) else None,
        cross_q=cross.q, cross_q_norm=(_norm_weight(cross.norm_q), _norm_eps(cross.norm_q)),
        cross_out=cross.o, cross_k=cross.k,
        cross_k_norm=(_norm_weight(cross.norm_k), _norm_eps(cross.norm_k)), cross_v=cross.v,
        action=_action_plan(block.action_model),
        ffn_norm_eps=block.norm2.eps, ffn_in=ffn_in, ffn_out=ffn_out)


class ModelPlan:
    """The plan of a whole model: its blocks' plans and every block's modulation packed into one
    [L, 1, 6, C] tensor."""

    def __init__(self, model):
        fuse_qkv = fused_qkv_setting()
        self.blocks = [_block_plan(i, block, fuse_qkv) for i, block in enumerate(model.blocks)]
        self.modulations = Packed([block.modulation for block in model.blocks], stack=True)
        self._packed = [self.modulations] + [p for b in self.blocks
                                             for p in (b.qkv, b.qkv_bias) if p is not None]

    def is_current(self) -> bool:
        """False once a packed parameter got storage of its own (`.to()`, `.half()`, ...)."""
        return all(p.intact() for p in self._packed)
