"""Stand-ins for what a Matrix-Game-2 checkout needs but a test machine cannot install.

Only these, nothing of the model:
* `flash_attn` (not installable without its CUDA build; upstream's action module imports it
  unconditionally): `flash_attn_func` / `flash_attn_varlen_func` through torch SDPA in the inputs'
  dtype (upstream's own `flash_attention` still casts to bf16 first, as it does with FlashAttention);
* on a machine without CUDA: `torch.cuda.current_device()` answers "cpu" (upstream builds its action
  RoPE tables and some defaults on it), and upstream's self- and cross-attention entry points
  (`wan.modules.causal_model.attention`, `wan.modules.model.flash_attention`, which assert a CUDA
  device) become exact SDPA in the inputs' dtype;
* `torchvision` when its build does not match the installed torch (CPU torch 2.13 here): an empty
  module tree, enough for upstream's imports (the latent path never calls it).

`exact_attention()` is also what a float32 oracle run needs on a GPU: upstream's attention casts
q/k/v to bf16 even in a float32 model.

Use: `install()` before importing upstream's modules, or `-p standins` as a pytest plugin (with
this folder on PYTHONPATH), which installs them when pytest starts.
"""
import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import torch
import torch.nn.functional as F


def _sdpa(q, k, v, softmax_scale=None, causal=False):
    """[B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=softmax_scale, is_causal=causal)
    return out.transpose(1, 2)


def _uniform_lengths(cu_seqlens, max_len):
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if any(n != max_len for n in lengths):
        raise NotImplementedError(f"stand-in flash_attn: sequences of unequal length {lengths}")
    return len(lengths)


def _flash_attn_module():
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        if dropout_p:
            raise NotImplementedError("stand-in flash_attn: no dropout")
        return _sdpa(q, k, v, softmax_scale, causal)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), **_):
        if dropout_p or tuple(window_size) != (-1, -1):
            raise NotImplementedError("stand-in flash_attn: no dropout or window")
        b = _uniform_lengths(cu_seqlens_q, max_seqlen_q)
        _uniform_lengths(cu_seqlens_k, max_seqlen_k)
        out = _sdpa(q.unflatten(0, (b, max_seqlen_q)), k.unflatten(0, (b, max_seqlen_k)),
                    v.unflatten(0, (b, max_seqlen_k)), softmax_scale, causal)
        return out.flatten(0, 1)

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def _torchvision_usable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision.transforms.functional")
        return True
    except Exception:  # a build for another torch fails while registering its operators
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def _empty_torchvision():
    # diffusers and transformers look torchvision up when first imported: let them find none
    from diffusers.loaders import FromOriginalModelMixin, PeftAdapterMixin  # noqa: F401
    from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
             "torchvision.transforms.v2", "torchvision.io")
    for name in names:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
    for name in names[1:]:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])
    sys.modules["torchvision.transforms"].InterpolationMode = type("InterpolationMode", (), {})


def exact_attention(q, k, v, *args, **kwargs):
    """Upstream's `attention`/`flash_attention` signature, exact in the inputs' dtype (no padding
    masks: upstream's streaming and cross-attention calls pass none)."""
    return _sdpa(q, k, v)


def _swap_upstream_attention(functions):
    """Set (causal_model.attention, model.flash_attention) of the checkout; returns the old pair."""
    causal_model = importlib.import_module("wan.modules.causal_model")
    model = importlib.import_module("wan.modules.model")
    saved = causal_model.attention, model.flash_attention
    causal_model.attention, model.flash_attention = functions
    return saved


@contextlib.contextmanager
def upstream_attention_exact():
    """Route upstream's self- and cross-attention through exact SDPA in the inputs' dtype."""
    saved = _swap_upstream_attention((exact_attention, exact_attention))
    try:
        yield
    finally:
        _swap_upstream_attention(saved)


def install() -> list:
    """Install the stand-ins this machine needs (call before importing upstream's modules, with
    the checkout's root on sys.path); returns what it stood in for, in words."""
    used = []
    if importlib.util.find_spec("flash_attn") is None:
        sys.modules["flash_attn"] = _flash_attn_module()
        used.append("flash_attn (torch SDPA)")
    if not _torchvision_usable():
        _empty_torchvision()
        used.append("torchvision (empty modules: its build does not fit this torch)")
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"
        _swap_upstream_attention((exact_attention, exact_attention))  # upstream's asserts CUDA
        used.append("no CUDA: torch.cuda.current_device and upstream's attention (exact SDPA)")
    return used


def pytest_configure(config):
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    install()
