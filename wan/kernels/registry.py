"""The backend registry: which implementation runs each op of OptimizedCausalWanModel.

Ops (one signature each, every backend implements a subset):

    self_attention(q, k, v)      q [B, Lq, H, D] over the cache window k, v [B, Lk, H, D]
    cross_attention(q, k, v)     video tokens over the 257 image tokens
    mouse_attention(q, k, v, k_cache, v_cache, slots, attended, cos, sin, eps)
                                 the action module's attention from raw q/k/v: q/k RMS norm +
                                 RoPE, this call's k/v stored into their ring slots, attention over
                                 the first `attended` slots. mouse: B*880 sequences of 3 frames
    keyboard_attention(same)     every token over the <= window key frames (keys shared, not copied)
    layer_norm_modulate(x, shift, scale, eps)   LayerNorm(x) * (1 + scale) + shift, per frame
    layer_norm(x, weight, bias, eps)            LayerNorm(x) [* weight + bias]
    gated_residual(x, y, gate)                  x + y * gate, per frame
    gated_residual_layer_norm_modulate(x, y, gate, shift, scale, eps)
    gated_residual_layer_norm(x, y, gate, weight, bias, eps, sum_bias=None)
                                                (s, the LayerNorm of s) for s = x + y * gate
    frame_bias_gelu(x, bias)                    gelu_tanh(x + bias), bias per frame
    norm_rope_store(x, weight, eps, cos, sin, heads, dest, slots, rope_dtype)
                                                RMS norm + RoPE of q/k (and v's store) in one
                                                pass, written into the cache slots
    qkv_norm_rope_store(q, k, v, q_weight, k_weight, eps, cos, sin, heads, k_cache, v_cache, slots,
                        rope_dtype)             the self-attention's three norm_rope_store calls
                                                (q returned, k/v into their slots) in one
    linear_gelu(x, weight, bias)                gelu_tanh(x @ weight^T + bias) (the FFN's first half)
    quantize_fp8(x, gelu=False)                 x (or gelu_tanh(x)) as e4m3 with a scale per row
    linear_fp8(x, weight, bias)                 x @ weight^T + bias from FP8 operands (Fp8Rows,
                                                Fp8Weight: wan/kernels/fp8.py)
    rms_norm_silu(x, gamma, out, bias)          the VAE decoder's channel RMS norm + SiLU on
                                                channels-last [B, C, T, H, W] (after the previous
                                                conv's bias), into `out`
    bias_residual_add(h, bias, residual)        (h + bias) + residual: a decoder conv's bias and
                                                its residual block's shortcut in one pass
    bias_residual_add_rms_norm_silu(h, bias, residual, gamma, out)
                                                the same sum (returned) and the next block's
                                                rms_norm_silu of it into `out`, in one pass
    upsample_conv2d(x, weight, bias)            the decoder's resample: a 3x3 conv (padding 1) of
                                                x's nearest 2x upsampling (triton: a 2x2 conv of x
                                                with 4 * Cout outputs + an interleave, 4/9 of the
                                                work, the upsampled frames never written)
    conv3d_narrow(x, weight, bias)              a decoder conv with few outputs (the head, 96 -> 3,
                                                3x3x3) over its window [B, Cin, 2 + T, H, W]
                                                (channels-last; valid in time, padded in H/W):
                                                one GEMM over the pixels + the 27-tap shifted sum

The LayerNorm ops also take `quantize=True` (their output as Fp8Rows for an FP8 GEMM). The two FP8
ops (FP8_OPS) are resolved only by a model in `precision="fp8"`.

Backends: `eager` (plain torch, every op, any device), `flash` (attention: FlashAttention 3/2/4 when
importable, else torch SDPA's cuDNN/flash kernels; CUDA, fp16/bf16), `triton` (fused kernels),
`cublas` (GEMMs with a cuBLASLt epilogue, FP8 GEMMs; CUDA).
`auto` takes, per op, the first of triton, flash, cublas, eager that can run it (never Triton's CPU
interpreter, which only an explicit `triton` selection uses, and never eager's emulated FP8 GEMM,
which is for tests: select it by name); eager runs every other op on any device in any floating
dtype, so `auto` fails only for a non-floating dtype or an FP8 GEMM where there are no FP8 tensor
cores (an error listing every backend and why it refused).

Selection, strongest first: the `backend=` keyword of the model, the WAN_BACKEND environment
variable, then `auto`. Each is a backend name (for the ops that backend implements; the others stay
on `auto`), a {op: name} mapping, or the path of an omegaconf YAML (configs/backends/*.yaml) with
`default:` and optional `ops:` entries. A requested backend that cannot run is an error; so is,
when the selection is read (the model's construction), an unknown op, backend or YAML key (with
the close match, if any), an empty (null) value or one that is not a name: the error names the
file, or WAN_BACKEND.
"""
import difflib
import importlib
import importlib.util
import os
from typing import Callable, Dict, Mapping, Optional, Union

import torch

from .fp8 import fp8_gemm_problem

ATTENTION_OPS = ("self_attention", "cross_attention", "mouse_attention", "keyboard_attention")
OPS = ATTENTION_OPS + ("layer_norm_modulate", "layer_norm", "gated_residual",
                       "gated_residual_layer_norm_modulate", "gated_residual_layer_norm",
                       "frame_bias_gelu", "norm_rope_store", "qkv_norm_rope_store", "linear_gelu",
                       "rms_norm_silu", "bias_residual_add", "bias_residual_add_rms_norm_silu",
                       "upsample_conv2d", "conv3d_narrow", "quantize_fp8", "linear_fp8")
FP8_OPS = ("quantize_fp8", "linear_fp8")
# ops whose eager implementation emulates hardware (float32 math): never picked by `auto`
EMULATED_BY_EAGER = ("linear_fp8",)
AUTO_ORDER = ("triton", "flash", "cublas", "eager")
ENV_VAR = "WAN_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run an op here."""


class Backend:
    """A named set of op implementations that can say why it cannot run."""
    name = ""
    module = ""          # imported lazily, only when the backend is used
    install_hint = ""

    def ops(self) -> Dict[str, Callable]:
        return importlib.import_module(self.module, __package__).OPS

    def implements(self, op: str) -> bool:
        return op in OPS

    def auto_may_pick(self, op: str, device) -> bool:
        """Whether `auto` may pick this backend for `op` on `device` (an interpreter or an
        emulation is not)."""
        return True

    def problem(self, op: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
        """None when `op` can run for these inputs, else the reason it cannot."""
        raise NotImplementedError


def _cuda_problem(device) -> Optional[str]:
    """Why `device` is not a usable CUDA device, or None."""
    if torch.device(device).type != "cuda":
        return f"needs a CUDA device, got {device}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


class EagerBackend(Backend):
    name = "eager"
    module = ".eager"

    def auto_may_pick(self, op, device):
        return op not in EMULATED_BY_EAGER

    def problem(self, op, device, dtype, head_dim):
        if not dtype.is_floating_point:
            return f"{dtype} is not a floating-point dtype"
        return None


class FlashBackend(Backend):
    name = "flash"
    module = ".flash"
    install_hint = ("install FlashAttention (`pip install wan[flash]`: FA2 `flash_attn`, FA3 "
                    "`flash_attn_interface`, FA4 `flash_attn.cute`) or use a CUDA build of torch "
                    "for its SDPA kernels")

    def implements(self, op):
        return op in ATTENTION_OPS

    def problem(self, op, device, dtype, head_dim):
        if op not in ATTENTION_OPS:
            return "implements attention only"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"needs float16 or bfloat16, got {dtype}"
        if head_dim % 8 or head_dim > 256:
            return f"head_dim {head_dim} must be a multiple of 8 and at most 256"
        return _cuda_problem(device)


class TritonBackend(Backend):
    name = "triton"
    module = ".triton"
    install_hint = "install Triton (`pip install wan[triton]`); on a CPU set TRITON_INTERPRET=1"

    def implements(self, op):
        return importlib.util.find_spec("triton") is not None and op in self.ops()

    def auto_may_pick(self, op, device):
        return torch.device(device).type == "cuda"  # TRITON_INTERPRET=1 on a CPU is for tests

    def problem(self, op, device, dtype, head_dim):
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if torch.device(device).type != "cuda" and not interpret:
            return f"needs a CUDA device (or TRITON_INTERPRET=1 on a CPU), got {device}"
        if op not in self.ops():
            return "no Triton kernel for this op yet"
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"needs float16, bfloat16 or float32, got {dtype}"
        if op in ATTENTION_OPS and (head_dim & (head_dim - 1) or head_dim < 16):
            return f"head_dim {head_dim} must be a power of two >= 16"
        if op.endswith("norm_rope_store") and (head_dim & (head_dim - 1) or head_dim < 2):
            return f"head_dim {head_dim} must be a power of two"
        if op == "quantize_fp8" and torch.device(device).type != "cuda":
            return "Triton's CPU interpreter rounds float8 wrongly (it drops carries into the exponent)"
        return None


class CublasBackend(Backend):
    name = "cublas"
    module = ".cublas"
    install_hint = "use a CUDA build of torch"

    def implements(self, op):
        return op in self.ops()

    def problem(self, op, device, dtype, head_dim):
        if op not in self.ops():
            return "implements GEMMs only (linear_gelu, linear_fp8)"
        if op == "linear_fp8":
            return fp8_gemm_problem(device, dtype)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"needs float16, bfloat16 or float32, got {dtype}"
        return _cuda_problem(device)  # (torch's CPU path uses the exact GELU)


BACKENDS: Dict[str, Backend] = {b.name: b for b in (EagerBackend(), FlashBackend(), TritonBackend(),
                                                   CublasBackend())}

Selection = Dict[str, str]


def load_selection(spec: Union[None, str, os.PathLike, Mapping[str, str]] = None,
                   environ: Optional[Mapping[str, str]] = None) -> Selection:
    """`layer_selection(spec, WAN_BACKEND)` with WAN_BACKEND read from `environ` (os.environ unless
    given): for the command line (`python -m wan.kernels`) and tests. The models never call it:
    FastOptions (wan/runtime/options.py) reads the environment once, like every other option, and
    hands WAN_BACKEND's value to `layer_selection` itself."""
    environ = os.environ if environ is None else environ
    return layer_selection(spec, str(environ.get(ENV_VAR, "") or ""))


def layer_selection(spec: Union[None, str, os.PathLike, Mapping[str, str]] = None,
                    below: str = "") -> Selection:
    """{op: backend name or 'auto'} for every op. `spec` (a name, {op: name} or YAML path; None
    or a blank string: not given) is laid over `below` (WAN_BACKEND's value as the caller read
    it, same forms; '' for none), which is laid over `auto`: ops `spec` leaves out keep theirs.
    The keyword wins: when `spec` names every op `below` is not read at all, and a bad `below` is
    an error (naming WAN_BACKEND) only where it decides some op. Reads no environment."""
    selection = {op: "auto" for op in OPS}
    chosen = _parse_selection(spec) if _given(spec) else {}
    env = below.strip()
    if env and len(chosen) < len(OPS):
        try:
            selection.update(_parse_selection(env, where=f"{ENV_VAR}={env!r}"))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} (from the environment: fix or unset {ENV_VAR})") \
                from None
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (from the environment: fix or unset {ENV_VAR})") from None
    selection.update(chosen)
    return selection


def _given(spec) -> bool:
    """Whether a selection was given: None and a blank string (an unset variable) are not."""
    return spec is not None and not (isinstance(spec, str) and not spec.strip())


SELECTION_FILE_KEYS = ("default", "ops")


def _read_selection_file(path: str):
    """(default, {op: name}) of a YAML selection (`default:` and `ops:`); a file that is missing,
    does not parse, is not such a mapping or holds other keys is refused by name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backend selection {path}: no such file")
    from omegaconf import OmegaConf
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:  # yaml's and omegaconf's parse errors share no base class
        raise ValueError(f"backend selection {path}: not readable YAML ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    ops = cfg.get("ops") if isinstance(cfg, dict) else None
    if not isinstance(cfg, dict) or not isinstance(ops or {}, dict):
        raise ValueError(f"backend selection {path}: must be a mapping with `default:` and/or "
                         f"`ops:` (op: backend) entries")
    unknown = [key for key in cfg if key not in SELECTION_FILE_KEYS]
    if unknown:
        key = unknown[0]
        raise ValueError(f"backend selection {path}: unknown key {key!r}"
                         f"{_close(key, SELECTION_FILE_KEYS)}; a selection holds only `default:` "
                         f"(a backend) and `ops:` (op: backend entries)")
    if "default" in cfg and cfg["default"] is None:
        raise ValueError(f"backend selection {path}: `default:` is empty (null); name a backend "
                         f"(auto, {', '.join(BACKENDS)}) or leave the key out")
    if "ops" in cfg and cfg["ops"] is None:
        raise ValueError(f"backend selection {path}: `ops:` is empty (null); list op: backend "
                         f"entries or leave the key out")
    return cfg.get("default"), dict(ops or {})


def _close(name, choices) -> str:
    """' (did you mean 'x'?)' for a near miss among `choices`, else ''."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _parse_selection(spec, where: Optional[str] = None) -> Dict[str, str]:
    """The ops a spec names: a backend name covers the ops that backend implements. `where`: how
    errors name the spec's origin (a file names itself)."""
    default, per_op = None, {}
    if isinstance(spec, Mapping):
        per_op = dict(spec)
        where = where or f"backend {per_op!r}"
    elif isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text.endswith((".yaml", ".yml")):
            default, per_op = _read_selection_file(text)
            where = where or f"backend selection {text}"
        else:
            default = text.strip()
    else:
        raise TypeError(f"backend must be a backend name (auto, {', '.join(BACKENDS)}), an "
                        f"{{op: backend}} mapping or the path of a YAML selection; got "
                        f"{type(spec).__name__} {spec!r}")
    prefix = f"{where}: " if where else ""
    unknown_ops = [op for op in per_op if op not in OPS]
    if unknown_ops:
        raise ValueError(f"{prefix}unknown op(s) {unknown_ops}{_close(unknown_ops[0], OPS)}; "
                         f"ops are {list(OPS)}")
    for op, name in [("(default)", default), *per_op.items()]:
        if name is None and op == "(default)":
            continue
        if name is None:
            raise ValueError(f"{prefix}op {op!r} has no backend (None/null): name one (auto, "
                             f"{', '.join(BACKENDS)}) or leave the op out")
        if not isinstance(name, str):
            what = "`default:`" if op == "(default)" else f"op {op!r}"
            raise TypeError(f"{prefix}{what} must name one backend (a string: auto, "
                            f"{', '.join(BACKENDS)}), got {type(name).__name__} {name!r}")
        if name != "auto" and name not in BACKENDS:
            raise ValueError(f"{prefix}unknown backend {name!r} for {op}"
                             f"{_close(name, ('auto', *BACKENDS))}; choose from auto, "
                             f"{', '.join(BACKENDS)}")
    chosen = {}
    if default is not None:
        chosen = {op: default for op in OPS
                  if default == "auto" or BACKENDS[default].implements(op)}
    chosen.update(per_op)
    return chosen


def resolve(op: str, choice: str, device, dtype, head_dim: int):
    """(backend name, implementation) for one op; raises BackendUnavailableError for an explicit
    choice that cannot run, listing the reason and what to install."""
    if choice == "auto":
        for name in AUTO_ORDER:
            if (BACKENDS[name].auto_may_pick(op, device)
                    and BACKENDS[name].problem(op, device, dtype, head_dim) is None):
                return name, BACKENDS[name].ops()[op]
        raise BackendUnavailableError(f"no backend can run {op} for {dtype} on {device}: "
                                      + explain(op, device, dtype, head_dim))
    backend = BACKENDS[choice]
    reason = backend.problem(op, device, dtype, head_dim)
    if reason is not None:
        hint = f" ({backend.install_hint})" if backend.install_hint else ""
        raise BackendUnavailableError(
            f"backend {choice!r} cannot run {op} for {dtype} on {device}: {reason}{hint}. "
            f"Other backends: " + explain(op, device, dtype, head_dim, skip=choice))
    return choice, backend.ops()[op]


def explain(op, device, dtype, head_dim, skip=None) -> str:
    parts = []
    for name, backend in BACKENDS.items():
        if name != skip:
            reason = backend.problem(op, device, dtype, head_dim)
            if reason is None and not backend.auto_may_pick(op, device):
                reason = "an emulation for tests, used only when selected by name"
            parts.append(f"{name}: {reason or 'available'}")
    return "; ".join(parts)


def resolve_all(selection: Selection, device, dtype, head_dims: Mapping[str, int]):
    """{op: (backend name, implementation)} for every op but the FP8 ones (which only a model in
    `precision="fp8"` resolves)."""
    return {op: resolve(op, selection[op], device, dtype, head_dims.get(op, 128)) for op in OPS
            if op not in FP8_OPS}


def describe_resolved(resolved) -> str:
    """One line of which backend runs which ops, e.g. 'flash (torch SDPA ...): self_attention, ...;
    triton: ...', for a {op: (backend name, implementation)} mapping."""
    by_backend: Dict[str, list] = {}
    for op, (name, _) in resolved.items():
        by_backend.setdefault(name, []).append(op)
    parts = []
    for name, ops in by_backend.items():
        label = name
        if name == "flash":
            label += f" ({importlib.import_module('.flash', __package__).IMPLEMENTATION})"
        parts.append(f"{label}: {', '.join(ops)}")
    return "; ".join(parts)
