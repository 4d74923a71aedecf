"""The optimized models' options, resolved once into one object.

`FastOptions` holds what the optimized DiT and decoder may be told: the backend selection, CUDA
graphs, the precision, the set of GEMMs FP8 runs, fused q/k/v, the cross-attention's residual
add inside its output GEMM and the graphs of a stream in the caller's dicts captured at its first
call (the DiT), cuDNN's full engine search for the convolutions (the decoder). Each option is resolved once, when
the model is built (or when a setter changes it), strongest first:

1. the constructor's keyword, which is also how a key of the model's config.json arrives
   (`from_config`, this library's or diffusers', passes config keys as keywords);
2. the environment: WAN_BACKEND, WAN_CUDA_GRAPHS, WAN_PRECISION, WAN_FP8_GEMMS, WAN_FUSED_QKV,
   WAN_RESIDUAL_IN_GEMM, WAN_FIRST_CALL_WARM_UP, WAN_CONV_SEARCH, read here only, from the one mapping `resolve` is
   given (os.environ unless a test passes its own); WAN_BACKEND's value is handed to the
   registry's `layer_selection`, which reads no environment;
3. the defaults: backend `auto` for every op, CUDA graphs on wherever the model runs on CUDA,
   precision `native`, FP8 (when asked for) on the default GEMM set, q/k/v fused, the residual
   in the GEMM, the first-call warm-up on, the conv search on.

The model keeps the object (`model.options`), builds its plan from it and reports it
(`options_report()`, the start-up log line), so what is reported is what runs.

Whoever needs an option is handed this object (the DiT's plan and ops, the decoder's ops and
graphs); nothing reads the environment again. This module imports no implementation: the
constants the options name (the FP8 GEMMs) and the switch parser live here, and the models import
them from here.

The decoder, the one hand-off between objects: upstream's scripts build it with no arguments
(`VAEDecoderWrapper()`, in an integrated checkout our OptimizedVAEDecoderWrapper) while the user
sets options in the DiT's config.json. So `OptimizedCausalWanModel.__init__` records what its
keywords gave (`publish_model_options`: backend and cuda_graphs only), and
`OptimizedVAEDecoderWrapper._resolved_options` (its first call) reads that record
(`model_options`) as `inherited=` of `FastOptions.resolve`: the decoder's keyword, then the DiT's,
then the environment, then the defaults. The last DiT built wins. Nothing else writes or reads it.
"""
import os
from dataclasses import dataclass, field, replace
from typing import FrozenSet, Mapping, Optional

import torch

from ..kernels.fp8 import PRECISIONS
from ..kernels.registry import layer_selection

# the block GEMMs FP8 can take: self-attention q/k/v and output, cross-attention query and
# output, FFN in and out. The rest (patch embedding, time embedding and projection, modulation,
# head, the image context's k/v once per stream, the action modules) stays in the model's dtype.
FP8_GEMMS = ("qkv", "self_out", "cross_q", "cross_out", "ffn_in", "ffn_out")
# those that gain, measured on an H200 (OPTIMIZATION_GUIDE.md, step 28): the two big GEMMs whose
# inputs come quantized from a fused LayerNorm kernel. The attention outputs and the FFN's hidden
# activation need a quantization pass of their own, which costs about what FP8 saves in their
# GEMM; the cross-attention's output projection also costs the most accuracy (1.65x bf16's error
# alone), and its small query projection gains nothing
DEFAULT_FP8_GEMMS = ("qkv", "ffn_in")

ENVIRONMENT = {"backend": "WAN_BACKEND", "cuda_graphs": "WAN_CUDA_GRAPHS",
               "precision": "WAN_PRECISION", "fp8_gemms": "WAN_FP8_GEMMS",
               "fused_qkv": "WAN_FUSED_QKV", "residual_in_gemm": "WAN_RESIDUAL_IN_GEMM",
               "first_call_warm_up": "WAN_FIRST_CALL_WARM_UP", "conv_search": "WAN_CONV_SEARCH"}
OPTION_NAMES = tuple(ENVIRONMENT)


@dataclass(frozen=True)
class FastOptions:
    backend: Mapping[str, str]        # op -> backend name or 'auto'
    cuda_graphs: Optional[bool]       # None: on wherever the module runs on CUDA
    precision: str                    # 'native' or 'fp8'
    fp8_gemms: FrozenSet[str]         # the GEMMs precision='fp8' runs in FP8
    fused_qkv: bool                   # q, k and v of self-attention in one GEMM
    residual_in_gemm: bool            # the cross-attention's residual add inside its out GEMM
    first_call_warm_up: bool          # a stream in new caller dicts: every graph at its first call
    conv_search: bool                 # the decoder: cuDNN's full engine search for its convs
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)  # option -> origin
    given: Mapping = field(default_factory=dict, compare=False)      # what the keywords said
    inherited: Mapping = field(default_factory=dict, compare=False)  # what the DiT was given
    given_as: str = field(default=": keyword or config.json", compare=False)

    @classmethod
    def resolve(cls, given: Optional[Mapping] = None, inherited: Optional[Mapping] = None,
                environ: Optional[Mapping[str, str]] = None,
                given_as: str = ": keyword or config.json") -> "FastOptions":
        """`given`: {option: value} from the keywords (None values: not given); `inherited`: the
        same from the DiT, for a decoder; `environ`: os.environ unless given (tests); `given_as`:
        how the report names a given value's origin (after `name=value`)."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        inherited = {k: v for k, v in (inherited or {}).items() if v is not None}
        unknown = sorted(set(given) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; options are {list(OPTION_NAMES)}")
        values, sources = {}, {}
        for name in OPTION_NAMES:
            values[name], sources[name] = _resolve_one(name, given, inherited, environ, given_as)
        if values["precision"] != "fp8":
            values["fp8_gemms"] = frozenset()
        return cls(**values, sources=sources, given=given, inherited=inherited, given_as=given_as)

    def with_option(self, name: str, value, environ: Optional[Mapping[str, str]] = None,
                    origin: Optional[str] = None):
        """The same options with one given value changed (None: not given, so the environment,
        then the default) and everything resolved again, as the models' setters need
        (`set_backend`, `set_precision`, `enable_cuda_graphs`). `origin`: what the report names
        as that value's source (e.g. "compile()") instead of the keyword."""
        if name not in OPTION_NAMES:
            raise TypeError(f"unknown option {name!r}; options are {list(OPTION_NAMES)}")
        resolved = FastOptions.resolve(dict(self.given, **{name: value}), self.inherited, environ,
                                       self.given_as)
        if origin is None:
            return resolved
        return replace(resolved, sources={**resolved.sources, name: origin})

    def graphs_on(self, device) -> bool:
        """Whether graphs replay for work on `device`: never off CUDA; on CUDA unless turned off."""
        return cuda_graphs_on(self.cuda_graphs, device)

    def describe_graphs(self, device) -> str:
        """'CUDA graphs on (default on CUDA)', 'CUDA graphs off (WAN_CUDA_GRAPHS=0)', ..."""
        on = self.graphs_on(device)
        origin = self.sources.get("cuda_graphs", "default")
        if origin == "default":
            origin = "default on CUDA" if on else "not on CUDA"
        elif self.cuda_graphs and not on:
            origin += "; not on CUDA"
        return f"CUDA graphs {'on' if on else 'off'} ({origin})"

    def report(self) -> dict:
        """The options as plain values, with where each came from."""
        return {"backend": dict(self.backend), "cuda_graphs": self.cuda_graphs,
                "precision": self.precision, "fp8_gemms": sorted(self.fp8_gemms, key=FP8_GEMMS.index),
                "fused_qkv": self.fused_qkv, "residual_in_gemm": self.residual_in_gemm,
                "first_call_warm_up": self.first_call_warm_up, "conv_search": self.conv_search,
                "sources": dict(self.sources)}


def cuda_graphs_on(setting: Optional[bool], device) -> bool:
    """Graphs replay for work on `device` when `setting` (True, False or None: the default) says
    so: never off CUDA; on CUDA unless turned off."""
    return torch.device(device).type == "cuda" and setting is not False


def resolve_option(name: str, value=None, environ: Optional[Mapping[str, str]] = None):
    """One option alone: `value` when given, else its environment variable, else its default."""
    return _resolve_one(name, {name: value} if value is not None else {}, {}, environ, "")[0]


def _resolve_one(name, given, inherited, environ, given_as):
    """(value, where it came from) of one option."""
    environ = os.environ if environ is None else environ
    env = str(environ.get(ENVIRONMENT[name], "") or "").strip()
    spec = None  # the backend selection given (the registry lays it over WAN_BACKEND's)
    if given.get(name) is not None:
        raw = spec = given[name]
        origin = f"{name}={given[name]!r}{given_as}"
    elif inherited.get(name) is not None:
        raw = spec = inherited[name]
        origin = f"the DiT's {name}={inherited[name]!r}"
    elif env:
        raw, origin = env, f"{ENVIRONMENT[name]}={env}"
    else:
        raw, origin = None, "default"
    if name == "backend":  # a selection given here is laid over WAN_BACKEND's, op by op
        return layer_selection(spec, env), origin
    return _PARSERS[name](raw, origin), origin


# ---------------------------------------------------------------------- one parser per option
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_switch(value, name: str) -> bool:
    """An on/off value, parsed one way everywhere (constructor and config keys, options,
    setters): a bool; the ints 0 and 1; or, as a config.json, YAML file or environment variable
    may carry them, the strings true/false, 1/0, yes/no, on/off (any case, surrounding spaces
    ignored). Anything else is an error naming `name`: TypeError for another type, ValueError for
    another string or int. (`bool("false")` is True: a string is never taken by truthiness.)"""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_" and hasattr(value, "item"):  # numpy's bool scalar
        return bool(value.item())
    if isinstance(value, int):
        if value in (0, 1):
            return bool(value)
        raise ValueError(f"{name} must be true or false (or 1/0), got {value!r}")
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f"{name} must be true or false: use a bool or one of the strings "
                         f"true/false, 1/0, yes/no, on/off; got {value!r}")
    raise TypeError(f"{name} must be true or false (a bool), got {type(value).__name__} "
                    f"{value!r}")


def _switch(raw, origin):
    """An on/off option, parsed as every switch is (`parse_switch`: a bool, 0/1, or the strings
    true/false, 1/0, yes/no, on/off from a config file or the environment); None stays None (not
    given). Anything else: TypeError/ValueError naming where the value came from."""
    if raw is None:
        return raw
    return parse_switch(raw, origin)


def _precision(raw, origin):
    if raw is not None and not isinstance(raw, str):
        raise TypeError(f"{origin}: precision must be a string, one of {', '.join(PRECISIONS)}")
    value = "native" if raw is None else raw.strip().lower()
    if value not in PRECISIONS:
        raise ValueError(f"{origin}: choose from {', '.join(PRECISIONS)}")
    return value


def _fp8_gemms(raw, origin):
    if raw is None:
        return frozenset(DEFAULT_FP8_GEMMS)
    if isinstance(raw, str):
        names = {n.strip() for n in raw.split(",") if n.strip()}
    elif isinstance(raw, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in raw):
        names = set(raw)
    else:
        raise TypeError(f"{origin}: fp8_gemms must be GEMM names (of {list(FP8_GEMMS)}): a list "
                        f"of them, a comma-separated string or 'all'; got {type(raw).__name__}")
    if names == {"all"}:
        return frozenset(FP8_GEMMS)
    unknown = sorted(names - set(FP8_GEMMS))
    if unknown or not names:
        raise ValueError(f"{origin}: unknown GEMM(s) {unknown}; choose from {list(FP8_GEMMS)} "
                         f"or 'all'")
    return frozenset(names)


def _switch_on_by_default(raw, origin):
    value = _switch(raw, origin)
    return True if value is None else value


_PARSERS = {"cuda_graphs": _switch, "precision": _precision,
            "fp8_gemms": _fp8_gemms, "fused_qkv": _switch_on_by_default,
            "residual_in_gemm": _switch_on_by_default,
            "first_call_warm_up": _switch_on_by_default, "conv_search": _switch_on_by_default}


# ---------------------------------------------------------------------- the DiT -> decoder hand-off
# (see the module's docstring): the only state this module keeps, written by one constructor and
# read by one method, because upstream's no-argument VAEDecoderWrapper() has no other way to learn
# the DiT's config.json options
_dit_given = {"cuda_graphs": None, "backend": None}


def publish_model_options(cuda_graphs: Optional[bool] = None, backend=None) -> None:
    """Record what the DiT's keywords (its config.json) gave (None: nothing; a decoder given no
    options then follows the environment and defaults). Tests call it with no arguments to start
    as a fresh process."""
    _dit_given["cuda_graphs"] = cuda_graphs
    _dit_given["backend"] = backend


def model_options() -> dict:
    """{'cuda_graphs': ..., 'backend': ...} as the last optimized DiT built was given them."""
    return dict(_dit_given)
