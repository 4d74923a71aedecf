"""The optimized DiT's streaming math, top to bottom: a call (`compute`), a transformer block
(`block`), an action module (`action_module`), what the action conditions and the image context give
(`condition_projections`, `project_image_context`), then the GEMMs with their epilogues.

Device work only: no host sync, shapes fixed by the inputs and the phase, so that a call can be
captured into a CUDA graph and replayed. Everything around it (input checks, caches, stream
positions, the ops chosen per device, the plan of packed weights, the graphs) is streaming/call.py,
which calls in here and is never called from here. The ops are the backend registry's
(wan/kernels/registry.py); the per-layer weights are read from the plan (wan/runtime/layer_plan.py).
"""
import contextlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from ...kernels.eager import gelu_tanh
from ...kernels.fp8 import Fp8Rows
from ...runtime.layer_plan import ActionPlan, BlockPlan, Gemm
from ...runtime.stream_cache import StreamCache
from ..shared.conditioning import frame_windows, sinusoidal_embedding_1d
from ..shared.rope_tables import angles, self_attention_angles


@dataclass
class _Step:
    """What every block of one streaming call shares (inside the captured part)."""
    ops: SimpleNamespace
    cache: StreamCache
    attended_self: int          # cache slots the self-attention reads (the phase)
    attended_action: int        # ... and the action modules
    self_slots: torch.Tensor    # this call's frames' slots in the self-attention ring
    action_slots: torch.Tensor
    rope: tuple                 # (cos, sin) per token, self-attention
    action_rope: Optional[tuple]  # (cos, sin) per frame, action modules
    rope_dtype: torch.dtype
    frames: int
    conditions: dict            # layer -> the action conditions' projections (+ ready event)


def compute(model, x, t, cond_concat, mouse_window=None, keyboard_window=None, *, cache,
             phase, state, plan, cache_update_only: bool = False):
    """Device work only (no host sync, shapes fixed by the inputs and `phase`). With
    `cache_update_only` only the cache writes matter: the last block stops after its own and
    no output is made (returns None)."""
    ops = state.ops
    b = x.shape[0]
    tokens = model.patch_embedding(torch.cat([x, cond_concat], dim=1))
    _, c, frames, h, w = tokens.shape
    tokens = tokens.flatten(2).transpose(1, 2).contiguous()  # channels-last from here on
    e = model.time_embedding(
        sinusoidal_embedding_1d(model.freq_dim, t.flatten()).to(tokens.dtype))
    e0 = model.time_projection(e).unflatten(1, (6, c)).unflatten(0, (b, frames))

    frame_ids = state.start_frame + torch.arange(frames, device=x.device)
    # RoPE angles of the absolute positions, computed on the device (no table: any frame)
    rope = _cos_sin(self_attention_angles(frame_ids, h, w, model.dim // model.num_heads),
                    state.rope_dtype)
    action_rope = None
    if state.action_inv_freq is not None:  # float32 whatever the model's dtype, as upstream
        action_rope = _cos_sin(angles(frame_ids, state.action_inv_freq), torch.float32)
    step = _Step(ops=ops, cache=cache, attended_self=phase[0], attended_action=phase[1],
                 self_slots=cache.self_layout.slot_of(frame_ids),
                 action_slots=cache.action_layout.slot_of(frame_ids), rope=rope,
                 action_rope=action_rope, rope_dtype=state.rope_dtype, frames=frames,
                 conditions=condition_projections(model, plan, mouse_window, keyboard_window,
                                                  frames, state.side_stream))
    # every block's adaLN factors in one add (the modulations are packed): [L, B, F, 6, C]
    modulations = plan.modulations.tensor[:, None] + e0
    head_shift, head_scale = (model.head.modulation.unsqueeze(1)
                              + e.unflatten(0, (b, frames)).unsqueeze(2)).chunk(2, dim=2)
    # (shift, scale, eps, quantize) of the LayerNorm + modulation that opens each block (its
    # output quantized when the q/k/v GEMM runs in FP8), then the head's
    opening_norms = [(m[:, :, 0:1], m[:, :, 1:2], block.norm1.eps, layer.qkv[0].takes_fp8)
                     for m, block, layer in zip(modulations, model.blocks, plan.blocks)]
    opening_norms.append((head_shift, head_scale, model.head.norm.eps, False))
    # each block ends with its FFN's gated residual fused with the next opening norm, so a block
    # gets its input normalised already
    shift, scale, eps, quantize = opening_norms[0]
    normed = ops.layer_norm_modulate(tokens, shift, scale, eps, quantize=quantize)
    last = plan.blocks[-1].index
    for layer in plan.blocks:
        if cache_update_only and layer.index == last:
            # nothing after the last block's cache writes is read by a later call
            block(layer, tokens, normed, modulations[layer.index], step, None,
                  cache_writes_only=True)
            return None
        tokens, normed = block(layer, tokens, normed, modulations[layer.index], step,
                               opening_norms[layer.index + 1])
    out = model.head.head(normed)
    pt, ph, pw = model.patch_size
    out = out.view(b, frames, h, w, pt, ph, pw, model.out_dim)
    return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
        b, model.out_dim, frames * pt, h * ph, w * pw)


def block(layer: BlockPlan, tokens, hn, modulation, step, next_norm,
          cache_writes_only: bool = False):
    """tokens and hn (their opening LayerNorm + modulation) -> this block's output and the
    output normalised by `next_norm` (shift, scale, eps, quantize). With `cache_writes_only`
    the block stops once it has written its caches (its self-attention k/v, and its action
    module's keys when it has one) and returns None."""
    ops, cache, i = step.ops, step.cache, layer.index
    _, _, gate_msa, shift_ffn, scale_ffn, gate_ffn = modulation.chunk(6, dim=2)

    # self-attention over this block and the cached frames: q/k/v in one GEMM, then RMS norm +
    # RoPE of q and k and the writes of k and v into their cache slots in one op
    q = ops.qkv_norm_rope_store(
        *project_qkv(layer, hn, ops), layer.q_norm, layer.k_norm, layer.qk_eps, *step.rope,
        layer.heads, cache.self_k[i], cache.self_v[i], step.self_slots, step.rope_dtype)
    if cache_writes_only and layer.action is None:
        return None
    y = ops.self_attention(q, *cache.self_window(i, step.attended_self))
    update = linear(layer.self_out, y.flatten(2), ops)
    # the gated residual (per frame), with the cross-attention's pre-norm in the same pass
    norm = layer.cross_norm
    in_gemm = layer.cross_residual_in_gemm
    if norm is not None:
        # with the cross residual in its GEMM, the stream gets that GEMM's bias here
        tokens, normed = ops.gated_residual_layer_norm(
            tokens, update, gate_msa, norm.weight, norm.bias, norm.eps,
            quantize=layer.cross_q.takes_fp8,
            sum_bias=layer.cross_out.bias if in_gemm else None)
    else:
        tokens = normed = ops.gated_residual(tokens, update, gate_msa)

    # cross-attention to the image context (keys/values projected once per stream)
    q = ops.norm_rope_store(linear(layer.cross_q, normed, ops), *layer.cross_q_norm, cos=None,
                            sin=None, heads=layer.heads)
    y = ops.cross_attention(q, cache.cross[i]["k"], cache.cross[i]["v"])
    if in_gemm:  # tokens is the fresh sum from the kernel above: accumulated into in place
        tokens = accumulate_into(layer.cross_out, tokens, y.flatten(2))
    else:
        tokens = tokens + linear(layer.cross_out, y.flatten(2), ops)

    if layer.action is not None:
        tokens = action_module(layer.action, i, tokens, step)
        if cache_writes_only:  # its keys are in the action caches now; the FFN is not read
            return None

    hn = ops.layer_norm_modulate(tokens, shift_ffn, scale_ffn, layer.ffn_norm_eps,
                                 quantize=layer.ffn_in.takes_fp8)
    hidden = ffn_hidden(layer, hn, ops)
    shift, scale, eps, quantize = next_norm
    return ops.gated_residual_layer_norm_modulate(tokens, linear(layer.ffn_out, hidden, ops),
                                                  gate_ffn, shift, scale, eps, quantize=quantize)


def action_module(action: ActionPlan, i: int, tokens, step):
    """The action module of layer i: mouse and keyboard attention added to the tokens."""
    ops, cache = step.ops, step.cache
    n_action, slots = step.attended_action, step.action_slots
    cos, sin = step.action_rope
    frames = step.frames
    b, length, c = tokens.shape
    spatial = length // frames
    heads, module = action.heads, action.module
    mouse_bias, keyboard_k, keyboard_v, ready = step.conditions[i]
    if ready is not None:
        torch.cuda.current_stream().wait_event(ready)

    # the attention ops take the raw projections: q/k norm, RoPE and the cache writes of k/v
    # happen inside them (wan/kernels/registry.py)
    if action.mouse:
        # attention per spatial token over frames. The MLP runs in the tokens' own frame-major
        # layout, and its first layer is split: the mouse window is shared by all tokens of a
        # frame, so it is projected once per frame instead of concatenated to 880 tokens
        h = ops.frame_bias_gelu(F.linear(tokens, action.mouse_first.weight[:, :c]), mouse_bias)
        norm = action.mouse_norm
        h = ops.layer_norm(action.mouse_second(h), norm.weight, norm.bias, norm.eps)
        qkv = module.t_qkv(h).view(b, frames, spatial, 3, heads, -1)
        # [B*S, F, H, D] sequence views of the projection (a copy only when B > 1)
        q, k, v = qkv.transpose(1, 2).reshape(b * spatial, frames, 3, heads, -1).unbind(2)
        y = ops.mouse_attention(q, k, v, cache.mouse_k[i], cache.mouse_v[i], slots, n_action, cos,
                                sin, action.mouse_eps)
        y = y.reshape(b, spatial, frames, -1).transpose(1, 2).reshape(b, length, -1)
        tokens = _add_projection(tokens, y, module.proj_mouse)

    if action.keyboard:
        # every token attends to the few key frames directly: the keys are never repeated
        q = module.mouse_attn_q(tokens).view(b, length, heads, -1)
        y = ops.keyboard_attention(q, keyboard_k, keyboard_v, cache.keyboard_k[i],
                                   cache.keyboard_v[i], slots, n_action, cos, sin,
                                   action.keyboard_eps)
        tokens = _add_projection(tokens, y.flatten(2), module.proj_keyboard)
    return tokens


def condition_projections(model, plan, mouse_window, keyboard_window, frames, side_stream):
    """{layer: (mouse window's share of the mouse MLP's first layer [B, F, 1, C], keyboard
    keys, keyboard values, ready event)}: what the action modules compute from the conditions
    alone. ~7 tiny launches per action layer; on CUDA they run on a side stream beside the
    backbone, layer by layer, and each action module waits only for its own layer's event.
    (The side stream first waits for the main one, so its memory, freed to its own pool, is
    never reused while the main stream still reads it.)"""
    if side_stream is not None:
        side_stream.wait_stream(torch.cuda.current_stream())
    projections = {}
    on_side = (torch.cuda.stream(side_stream) if side_stream is not None
               else contextlib.nullcontext())
    with on_side:
        for layer in plan.blocks:
            action = layer.action
            if action is None:
                continue
            mouse = keyboard_k = keyboard_v = None
            if action.mouse:  # the first layer's input is [tokens, mouse window]
                first = action.mouse_first
                mouse = F.linear(_frame_windows(action.module, mouse_window),
                                 first.weight[:, model.dim:], first.bias)[:, :, None]
            if action.keyboard:
                module = action.module
                embedded = module.keyboard_embed(keyboard_window)
                keyboard_k, keyboard_v = module.keyboard_attn_kv(
                    _frame_windows(module, embedded)).view(
                        embedded.shape[0], frames, 2, action.heads, -1).unbind(2)
            ready = None
            if side_stream is not None:
                ready = torch.cuda.Event()
                ready.record(side_stream)
            projections[layer.index] = (mouse, keyboard_k, keyboard_v, ready)
    return projections


def project_image_context(model, visual_context, *, cache: StreamCache, ops, plan, layers):
    """Cross-attention keys/values of the image context for `layers`, written into the storage
    `_cross_storage` (streaming/call.py) prepared (device work only: it may be captured)."""
    context = model.img_emb(visual_context)
    b = context.shape[0]
    for i in layers:
        layer, slot = plan.blocks[i], cache.cross[i]
        ops.norm_rope_store(layer.cross_k(context), *layer.cross_k_norm, cos=None, sin=None,
                            heads=layer.heads, dest=slot["k"])
        slot["v"].copy_(layer.cross_v(context).view(b, -1, layer.heads, slot["v"].shape[-1]))


# ---------------------------------------------------------------------- the GEMMs
def linear(gemm: Gemm, x, ops):
    """x @ weight^T + bias: in the model's dtype, or in FP8 when the plan quantized the weight (x
    may arrive already quantized, Fp8Rows from a fused norm; otherwise it is quantized here, one
    scale per token)."""
    if gemm.fp8 is None:
        return F.linear(x, gemm.weight, gemm.bias)
    if not isinstance(x, Fp8Rows):
        x = ops.quantize_fp8(x)
    return ops.linear_fp8(x, gemm.fp8, gemm.bias)


def accumulate_into(gemm: Gemm, into: torch.Tensor, x) -> torch.Tensor:
    """into += x @ weight^T inside the GEMM (beta = 1: one rounding), in place, without the
    bias (the caller added it to `into` ahead). Only in the model's dtype: `into` must be a
    fresh contiguous tensor nothing else reads."""
    if gemm.fp8 is not None:
        raise ValueError("an FP8 GEMM cannot accumulate into its output")
    return _addmm_into(into, x, gemm.weight)


def project_qkv(layer: BlockPlan, x, ops):
    """The self-attention's q, k, v of x: one GEMM when packed (views of its output)."""
    if len(layer.qkv) == 3:
        return tuple(linear(gemm, x, ops) for gemm in layer.qkv)
    return linear(layer.qkv[0], x, ops).chunk(3, dim=-1)


def ffn_hidden(layer: BlockPlan, x, ops):
    """gelu_tanh of the FFN's first layer: in the model's dtype the GELU runs in cuBLASLt's
    epilogue (`linear_gelu`); after an FP8 GEMM it runs in the kernel that quantizes the
    hidden activation for an FP8 second layer (or alone, for a second layer that is not)."""
    gemm = layer.ffn_in
    if gemm.fp8 is None:
        return ops.linear_gelu(x, gemm.weight, gemm.bias)
    if layer.ffn_out.takes_fp8:
        return ops.quantize_fp8(linear(gemm, x, ops), gelu=True)
    return gelu_tanh(linear(gemm, x, ops))


def _add_projection(tokens, y, layer):
    """tokens + layer(y) for an action module's nn.Linear. A bias-free layer accumulates into
    `tokens` inside its GEMM (beta = 1), in place: callers pass a `tokens` that nothing else holds
    (each block's residual stream is a fresh tensor from the cross-attention's residual add, or
    from the gated residual kernel that its output GEMM then accumulated into)."""
    if layer.bias is not None:
        return tokens + layer(y)
    return _addmm_into(tokens, y, layer.weight)


def _addmm_into(into: torch.Tensor, x, weight) -> torch.Tensor:
    """into += x @ weight^T in one GEMM, in place (into: contiguous [..., out])."""
    into.view(-1, into.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return into


def _frame_windows(action, steps):
    """[B, steps, C] -> [B, frames, window * C] per-frame windows (inside the graphs)."""
    return frame_windows(steps, action.vae_time_compression_ratio, action.windows_size)


def _cos_sin(angle, dtype):
    return angle.cos().to(dtype), angle.sin().to(dtype)
