"""Bad inputs against the models, the stream API, the constructors, checkpoint loading and the
decoders (issue 24). Every row is a user error that must raise an exception of the right type
(TypeError: wrong type or dtype; ValueError: wrong value, shape, device or position;
FileNotFoundError / CheckpointFileError / CheckpointMismatchError for files), whose message names
the argument, file or key, before any state changes: after it, the next valid call gives exactly
what a fresh object gives (tiny configs, random weights, CPU). The streaming call's shape and
position checks on both models (a section of their own) assert the caller's caches untouched and
the two legal positions (repeat the latest block, advance to the next)."""
import copy
from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
import torch
from safetensors.torch import save_file

from helpers import (assert_close_elementwise, build_decoder, build_model, decoder_weights,
                     make_caches, make_inputs, rel_err, same_nested)
from wan import CausalWanModel
from wan.modules.checkpoint import CheckpointFileError, CheckpointMismatchError
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.modules.presets import model_config, tiny_variant_config
from wan.modules.rolling_cache import new_stream_caches
from wan.modules.vae_decoder import VAEDecoderWrapper, load_decoder_weights
from wan.modules.shared.input_checks import check_warm_up_inputs, non_finite
from wan.runtime.stream_cache import DICT_TAG

TOKENS = 32               # tiny preset: 8 x 16 latent, patch 2 x 2
NEXT = 3 * TOKENS         # current_start of the second block
LATENT = (8, 16)
MODELS = {"reference": CausalWanModel, "optimized": OptimizedCausalWanModel}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread is ~20x faster than two fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Row:
    name: str
    act: Callable          # act(model_or_decoder, valid_call_kwargs_or_args) does the bad thing
    error: type
    match: str             # regex searched in the message
    modes: Tuple[str, ...] = ("stream", "cachefree", "owned")


def _call(**changes):
    """A forward with some of the valid call's keywords replaced."""
    def act(model, call):
        bad = dict(call)
        for key, change in changes.items():
            bad[key] = change(call) if callable(change) else change
        return model(**bad)
    return act


def _each_cache(name, change):
    """The valid call with every entry of the cache list `name` replaced by change(entry)."""
    return _call(**{name: lambda c: [change(e) for e in c[name]]})


# ------------------------------------------------------------------ model forward and stream API
FORWARD_ROWS = [
    Row("x list", _call(x=lambda c: [c["x"]]), TypeError, "x must be a torch.Tensor, got list"),
    Row("x None", _call(x=None), TypeError, "x must be a torch.Tensor, got NoneType"),
    Row("x numpy", _call(x=lambda c: c["x"].numpy()), TypeError, "x must be a torch.Tensor"),
    Row("x zero frames", _call(x=lambda c: c["x"][:, :, :0], cond_concat=lambda c: c["cond_concat"][:, :, :0],
                               t=lambda c: c["t"][:, :0]), ValueError, r"x \(1, 16, 0, 8, 16\) is empty"),
    Row("x zero height", _call(x=lambda c: c["x"][:, :, :, :0], cond_concat=lambda c: c["cond_concat"][:, :, :, :0]),
        ValueError, "is empty"),
    Row("batch 0", _call(**{k: (lambda c, k=k: c[k][:0]) for k in
                            ("x", "t", "visual_context", "cond_concat", "mouse_cond", "keyboard_cond")}),
        ValueError, "is empty"),
    Row("x float64", _call(x=lambda c: c["x"].double()), TypeError, "x has dtype torch.float64"),
    Row("x on another device", _call(x=lambda c: c["x"].to("meta")), ValueError, "x is on meta"),
    Row("t bool", _call(t=lambda c: c["t"] > 0), TypeError, "t has dtype torch.bool"),
    Row("t complex", _call(t=lambda c: c["t"].to(torch.complex64)), TypeError, "t has dtype torch.complex64"),
    Row("t list", _call(t=[500.0, 500.0, 500.0]), TypeError, "t must be a torch.Tensor, got list"),
    Row("t 1-D", _call(t=lambda c: c["t"][0]), ValueError, r"t must be a tensor of shape \[batch, frames\]"),
    Row("t on another device", _call(t=lambda c: c["t"].to("meta")), ValueError, "t is on meta"),
    Row("visual_context None", _call(visual_context=None), TypeError, "visual_context must be a torch.Tensor"),
    Row("visual_context no tokens", _call(visual_context=lambda c: c["visual_context"][:, :0]),
        ValueError, "visual_context holds no tokens"),
    Row("cond_concat None", _call(cond_concat=None), TypeError, "cond_concat must be a torch.Tensor"),
    Row("mouse_cond list", _call(mouse_cond=lambda c: c["mouse_cond"].tolist()), TypeError,
        "mouse_cond must be a torch.Tensor, got list"),
    Row("keyboard_cond bool", _call(keyboard_cond=lambda c: c["keyboard_cond"] > 0), TypeError,
        "keyboard_cond has dtype torch.bool"),
    Row("keyboard_cond on another device", _call(keyboard_cond=lambda c: c["keyboard_cond"].to("meta")),
        ValueError, "keyboard_cond is on meta"),
    Row("num_frame_per_block 0", lambda m, c: _with_attribute(m, "num_frame_per_block", 0, c),
        ValueError, "num_frame_per_block must be a positive int"),
    Row("current_start float", _call(current_start=float(NEXT)), TypeError,
        "current_start must be a non-negative int.*float", ("stream", "owned")),
    Row("current_start tensor", _call(current_start=torch.tensor(NEXT)), TypeError,
        "current_start must be a non-negative int.*Tensor", ("stream", "owned")),
    Row("current_start bool", _call(current_start=True), TypeError, "current_start .* bool",
        ("stream", "owned")),
    Row("current_start negative", _call(current_start=-NEXT), ValueError,
        "current_start must be a non-negative int, got -96", ("stream", "owned")),
    Row("kv_cache of tensors", _each_cache("kv_cache", lambda e: e["k"]), TypeError,
        r"kv_cache\[0\] must be a dict", ("stream",)),
    Row("kv_cache of None", _each_cache("kv_cache", lambda e: None), TypeError,
        r"kv_cache\[0\] must be a dict .* got NoneType", ("stream",)),
    Row("kv_cache[1] without 'v'", _call(kv_cache=lambda c: [c["kv_cache"][0], {
        k: v for k, v in c["kv_cache"][1].items() if k != "v"}]), ValueError,
        r"kv_cache\[1\] lacks the keys \['v'\]", ("stream",)),
    Row("kv_cache on another device", _each_cache("kv_cache", lambda e: dict(e, k=e["k"].to("meta"))),
        ValueError, r"kv_cache\[0\]\['k'\] is on meta", ("stream",)),
    Row("kv_cache_mouse a dict", _call(kv_cache_mouse=lambda c: c["kv_cache_mouse"][0]), TypeError,
        "kv_cache_mouse must be a list", ("stream",)),
    Row("crossattn_cache of None", _each_cache("crossattn_cache", lambda e: None), TypeError,
        r"crossattn_cache\[0\] must be a dict", ("stream",)),
    Row("crossattn_cache k of another batch", _each_cache(
        "crossattn_cache", lambda e: dict(e, k=torch.cat([e["k"]] * 2), is_init=True)), ValueError,
        r"crossattn_cache\[0\]\['k'\] has shape \(2,", ("stream",)),
    # issue 32: index entries as Python ints (the reference crashed in `.item()`), k and v of
    # different lengths (passed the checks, failed at block 1), a non-bool is_init
    Row("kv_cache index an int", _each_cache("kv_cache", lambda e: dict(e, global_end_index=0)),
        TypeError, r"kv_cache\[0\]\['global_end_index'\] must be a torch.Tensor holding one integer",
        ("stream",)),
    Row("kv_cache_mouse index an int", _each_cache(
        "kv_cache_mouse", lambda e: dict(e, local_end_index=3)), TypeError,
        r"kv_cache_mouse\[0\]\['local_end_index'\] must be a torch.Tensor", ("stream",)),
    Row("kv_cache index a float tensor", _each_cache(
        "kv_cache", lambda e: dict(e, global_end_index=e["global_end_index"].double())),
        ValueError, r"kv_cache\[0\]\['global_end_index'\] must hold one integer", ("stream",)),
    Row("kv_cache v shorter than k", _each_cache(
        "kv_cache", lambda e: dict(e, v=e["v"][:, :-TOKENS])), ValueError,
        r"kv_cache\[0\]: 'k' \(1, 192, 2, 32\) and 'v' \(1, 160, 2, 32\) must have the same shape",
        ("stream",)),
    Row("kv_cache_keyboard v shorter than k", _each_cache(
        "kv_cache_keyboard", lambda e: dict(e, v=e["v"][:, :-1])), ValueError,
        r"kv_cache_keyboard\[0\]: 'k' .* and 'v' .* must have the same shape", ("stream",)),
    Row("crossattn_cache v shorter than k", _each_cache(
        "crossattn_cache", lambda e: dict(e, v=e["v"][:, :-1])), ValueError,
        r"crossattn_cache\[0\]: 'k' .* and 'v' .* must have the same shape", ("stream",)),
    Row("crossattn_cache is_init a str", _each_cache(
        "crossattn_cache", lambda e: dict(e, is_init="yes")), TypeError,
        r"crossattn_cache\[0\]\['is_init'\] must be True or False, got str", ("stream",)),
    # the stream API (the optimized model's own caches); refused before any stream is touched
    *(Row(f"start_stream{args}", lambda m, c, args=args: m.start_stream(*args), error, match,
          ("owned", "cachefree-optimized"))
      for args, error, match in [
          ((0, LATENT), ValueError, "batch must be at least 1, got 0"),
          ((-1, LATENT), ValueError, "batch must be at least 1, got -1"),
          (("1", LATENT), TypeError, "batch must be an int, got str"),
          ((True, LATENT), TypeError, "batch must be an int, got bool"),
          ((1.0, LATENT), TypeError, "batch must be an int, got float"),
          ((1, (0, 0)), ValueError, r"latent_size \(0, 0\) must be positive"),
          ((1, (-2, 16)), ValueError, r"latent_size \(-2, 16\) must be positive"),
          ((1, (7, 16)), ValueError, r"divisible by the patch size \(2, 2\)"),
          ((1, "ab"), TypeError, "latent_size must be \\(height, width\\).*'ab'"),
          ((1, (8,)), TypeError, "latent_size must be"),
          ((1, (8.0, 16)), TypeError, "latent_size must be"),
          ((1, None), TypeError, "latent_size must be"),
      ]),
    Row("use_stream(foreign)", lambda m, c: m.use_stream(object()), ValueError,
        "not a stream of this model", ("owned", "cachefree-optimized")),
    Row("reset_stream without a stream", lambda m, c: m.reset_stream(), RuntimeError,
        "no stream was started", ("cachefree-optimized",)),
]

# rows that were expected to fail until a check was wired in (none left: the streaming call checks
# its tensor arguments first, before it reads x.shape to find the caller's dicts' ring cache)
NEEDS_WIRING = set()


def _with_attribute(model, name, value, call):
    old = getattr(model, name)
    setattr(model, name, value)
    try:
        return model(**call)
    finally:
        setattr(model, name, old)


class ForwardState:
    """A model in one mode, its valid next call, and that call's output from a fresh model:
    'stream': the caller's dicts after the first block, the call is the second block; 'owned': the
    same in the optimized model's own stream; 'cachefree': the cache-free forward. Repeating the
    latest block is legal, so the same valid call serves after every row."""

    def __init__(self, model_name, mode):
        self.mode = mode
        self.model, self.caches = self._prepared(MODELS[model_name])
        fresh, fresh_caches = self._prepared(MODELS[model_name])
        with torch.no_grad():
            self.expected = fresh(**self.call(fresh, fresh_caches))

    def _prepared(self, cls):
        model = build_model("tiny", torch.float32, cls=cls)
        first, caches = make_inputs(model), {}
        with torch.no_grad():
            if self.mode == "stream":
                caches = make_caches(model)
                model(**first, **caches, current_start=0)
            elif self.mode == "owned":
                model.start_stream(1, LATENT)
                model(**first, current_start=0)
        return model, caches

    def call(self, model=None, caches=None):
        model = model or self.model
        if self.mode == "cachefree":
            return make_inputs(model)
        caches = self.caches if caches is None else caches
        return dict(make_inputs(model, start_frame=3, seed=2), **caches, current_start=NEXT)

    def snapshot(self):
        if self.mode == "stream":
            return copy.deepcopy(self.caches)
        if self.mode == "owned":
            return [b.clone() for b in self.model.streams[0].buffers()], list(self.model.streams)
        return None

    def intact(self, before) -> bool:
        if self.mode == "stream":
            return same_nested(before, self.caches, ignore_keys=(DICT_TAG,))
        if self.mode == "owned":
            buffers, streams = before
            return (len(self.model.streams) == len(streams)
                    and all(a is b for a, b in zip(self.model.streams, streams))
                    and all(torch.equal(a, b) for a, b in zip(buffers, streams[0].buffers())))
        # cache-free: a refused start_stream made no stream
        return getattr(self.model, "streams", []) == []


@pytest.fixture(scope="module")
def forward_states():
    made = {}

    def get(model_name, mode):
        if (model_name, mode) not in made:
            made[model_name, mode] = ForwardState(model_name, mode)
        return made[model_name, mode]
    return get


def _forward_cases():
    for row in FORWARD_ROWS:
        for model_name in MODELS:
            for mode in row.modes:
                if (mode in ("owned", "cachefree-optimized")) and model_name != "optimized":
                    continue
                if mode == "cachefree-optimized":
                    mode_id = "cachefree"
                else:
                    mode_id = mode
                marks = ()
                if (model_name, mode, row.name) in NEEDS_WIRING:
                    marks = pytest.mark.xfail(raises=AttributeError, strict=False,
                                              reason="the lead wires check_tensor_arguments first")
                yield pytest.param(row, model_name, mode, marks=marks,
                                   id=f"{model_name}-{mode_id}-{row.name}")


@pytest.mark.parametrize("row,model_name,mode", list(_forward_cases()))
def test_forward_and_stream_api(forward_states, row, model_name, mode):
    state = forward_states(model_name, mode.split("-")[0])
    call = state.call()
    before = state.snapshot()
    with torch.no_grad(), pytest.raises(row.error, match=row.match):
        row.act(state.model, call)
    assert state.intact(before), "a refused call changed the caches"
    with torch.no_grad():
        assert torch.equal(state.model(**state.call()), state.expected)


def _warm_up_args(c, **changes):
    args = {k: c[k] for k in ("visual_context", "cond_concat", "mouse_cond", "keyboard_cond")}
    args.update({k: change(args) if callable(change) else change for k, change in changes.items()})
    return args


WARM_UP_ROWS = [  # warm_up(visual_context, cond_concat, mouse_cond, keyboard_cond) of the owned stream
    ("cond_concat None", dict(cond_concat=None), TypeError, "cond_concat must be a torch.Tensor"),
    ("cond_concat 4-D", dict(cond_concat=lambda a: a["cond_concat"][0]), ValueError,
     r"warm_up: cond_concat must be one block's \[B, C, F, H, W\]"),
    ("cond_concat float64", dict(cond_concat=lambda a: a["cond_concat"].double()), TypeError,
     "cond_concat has dtype torch.float64"),
    ("cond_concat channels", dict(cond_concat=lambda a: a["cond_concat"][:, :5]), ValueError,
     "cond_concat 5; together they must make the model's in_dim 36"),
    ("visual_context width", dict(visual_context=lambda a: a["visual_context"][..., :10]), ValueError,
     r"visual_context has shape \(1, 257, 10\)"),
    ("mouse_cond missing", dict(mouse_cond=None), ValueError, "warm_up: the model has mouse actions"),
    ("mouse_cond list", dict(mouse_cond=[0.0, 0.0]), TypeError, "mouse_cond must be a torch.Tensor"),
    ("keyboard_cond width", dict(keyboard_cond=lambda a: a["keyboard_cond"][..., :2]), ValueError,
     r"keyboard_cond has shape \(1, \d+, 2\), expected \[1, steps, 4\]"),
    ("another latent size", dict(cond_concat=lambda a: a["cond_concat"][..., :8]), ValueError,
     "warm_up: the stream was started for batch 1 and 32 tokens per frame"),
]


@pytest.mark.parametrize("name,changes,error,match", WARM_UP_ROWS, ids=[r[0] for r in WARM_UP_ROWS])
def test_warm_up_checks(forward_states, name, changes, error, match):
    """check_warm_up_inputs (wan/modules/shared/input_checks.py): the lead calls it first in warm_up."""
    state = forward_states("optimized", "owned")
    with pytest.raises(error, match=match):
        check_warm_up_inputs(state.model, **_warm_up_args(state.call(), **changes),
                             stream=state.model.streams[0])


@pytest.mark.parametrize("name,changes,error,match", WARM_UP_ROWS, ids=[r[0] for r in WARM_UP_ROWS])
def test_warm_up_refuses_before_rewinding(forward_states, name, changes, error, match):
    state = forward_states("optimized", "owned")
    before = state.snapshot()
    with torch.no_grad(), pytest.raises(error, match=match):
        state.model.warm_up(**_warm_up_args(state.call(), **changes))
    assert state.intact(before)
    with torch.no_grad():
        assert torch.equal(state.model(**state.call()), state.expected)


@pytest.mark.parametrize("model_name", MODELS)
def test_non_finite_inputs_propagate_until_the_stream_restarts(model_name):
    """What the module docstring of wan/modules/shared/input_checks.py documents: the model does not check
    NaN/inf (no host sync); they propagate into the output and, through the caches, into later
    blocks; a stream started again at frame 0 is clean (equal to a fresh model's)."""
    model = build_model("tiny", torch.float32, cls=MODELS[model_name])
    fresh = build_model("tiny", torch.float32, cls=MODELS[model_name])
    caches = make_caches(model)
    blocks = [make_inputs(model, start_frame=3 * b, seed=b) for b in range(3)]
    blocks[1]["x"] = blocks[1]["x"].clone()
    blocks[1]["x"][0, 0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        outs = [model(**blocks[b], **caches, current_start=b * NEXT) for b in range(3)]
        assert non_finite(block0=outs[0], block1=outs[1], block2=outs[2]) == ["block1", "block2"]
        restarted = model(**blocks[0], **make_caches(model), current_start=0)
        assert torch.equal(restarted, fresh(**blocks[0], **make_caches(fresh), current_start=0))
        assert non_finite(x=blocks[1]["x"], t=blocks[1]["t"], none=None) == ["x"]
        if model_name == "optimized":  # its own stream: reset_stream clears it too
            model.start_stream(1, LATENT)
            model(**blocks[0], current_start=0)
            assert non_finite(out=model(**blocks[1], current_start=NEXT)) == ["out"]
            model.reset_stream()
            fresh.start_stream(1, LATENT)
            assert torch.equal(model(**blocks[0], current_start=0),
                               fresh(**blocks[0], current_start=0))


def test_optimized_takes_action_caches_with_none_for_layers_without_actions():
    """`new_stream_caches(..., action_layers_only=True)` leaves None in the action caches of
    layers without an action module; the reference took them, the optimized model raised a
    TypeError from inside (its cache lookup). Both give what the full dicts give now."""
    outputs = {}
    for name, cls in MODELS.items():
        model = build_model("tiny", torch.float32, cls=cls)
        for layout in ("full", "action layers only"):
            caches = new_stream_caches(model, 1, 6, TOKENS, action_layers_only=layout != "full")
            assert (caches["kv_cache_mouse"][1] is None) == (layout != "full")
            with torch.no_grad():
                for b in range(2):
                    out = model(**make_inputs(model, start_frame=3 * b, seed=b), **caches,
                                current_start=b * NEXT)
            outputs[name, layout] = out
        assert torch.equal(outputs[name, "full"], outputs[name, "action layers only"])
    assert rel_err(outputs["optimized", "full"], outputs["reference", "full"]) < 1e-5


# ------------------------------------------------------------------ the streaming call's shapes and positions
# (formerly tests/test_input_validation.py) each case on both models in the caller's dicts, after
# one full block: a clear error naming the problem, raised before any cache is touched
MODEL_CLASSES = list(MODELS.values())


@pytest.fixture(scope="module", params=MODEL_CLASSES, ids=[m.__name__ for m in MODEL_CLASSES])
def model(request):
    """Each case runs on both models: the optimized one checks on its own path (and remembers the
    caller's caches, so a second call with the same storage skips the per-layer checks)."""
    return build_model("tiny", torch.float32, cls=request.param)


@pytest.fixture
def streamed(model):
    """Caches after one full block (frames 0-2), and inputs for the next block (frames 3-5)."""
    caches = make_caches(model)
    with torch.no_grad():
        model(**make_inputs(model), **caches, current_start=0)
    return caches, make_inputs(model, start_frame=3, seed=2)


def _untouched(before, caches) -> bool:
    """The caches equal their snapshot, the optimized model's tag of the dicts (their ring cache)
    aside."""
    return same_nested(before, caches, ignore_keys=(DICT_TAG,))


def _bad_inputs(model, inputs):
    """(description, changes to the call, expected message fragment)."""
    x, cond = inputs["x"], inputs["cond_concat"]
    return [
        ("channels", {"x": x[:, :15]}, "channels"),
        ("latent size", {"x": x[..., :15], "cond_concat": cond[..., :15]}, "not divisible"),
        ("latent size vs cache", {"x": x[..., :10], "cond_concat": cond[..., :10]}, "latent size"),
        ("x vs cond", {"cond_concat": cond[:, :, :2]}, "must agree"),
        ("keyboard length", {"keyboard_cond": inputs["keyboard_cond"][:, :-1]}, r"1 \+ 4 \* 5 = 21"),
        ("mouse length", {"mouse_cond": torch.cat([inputs["mouse_cond"]] * 2, 1)}, "steps"),
        ("missing mouse", {"mouse_cond": None}, "mouse_cond is required"),
        ("missing keyboard", {"keyboard_cond": None}, "keyboard_cond is required"),
        ("keyboard width", {"keyboard_cond": inputs["keyboard_cond"][..., :3]}, "keyboard_cond"),
        ("x dtype", {"x": x.double()}, "dtype"),
        ("visual dtype", {"visual_context": inputs["visual_context"].half()}, "dtype"),
        ("t shape", {"t": inputs["t"][:, :2]}, "t must be"),
        ("visual shape", {"visual_context": inputs["visual_context"][..., :100]}, "visual_context"),
        ("start not frame aligned", {"current_start": 3 * TOKENS + 5}, "multiple"),
        # the reference reads the position from the dicts first; the optimized model checks the
        # action histories first (they do not fit frames 9-11 either)
        ("start skips ahead", {"current_start": 9 * TOKENS},
         "must start at|must hold the whole history"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_bad_input_raises_and_leaves_caches_untouched(model, streamed, case):
    caches, inputs = streamed
    description, changes, message = _bad_inputs(model, inputs)[case]
    call = dict(inputs, **caches, current_start=NEXT)
    call.update(changes)
    before = copy.deepcopy(caches)
    with pytest.raises((ValueError, TypeError), match=message):
        model(**call)
    assert _untouched(before, caches), description


def test_going_backwards_is_refused(model, streamed):
    """Frames 6-8 streamed, then frames 3-5 again. (current_start=0 is not "backwards" for the
    optimized model: it starts a new stream in the same dicts, as upstream's pipeline does.)"""
    caches, inputs = streamed
    with torch.no_grad():
        model(**inputs, **caches, current_start=NEXT)
        model(**make_inputs(model, start_frame=6, seed=3), **caches, current_start=6 * TOKENS)
    before = copy.deepcopy(caches)
    with pytest.raises(ValueError, match="Going backwards"):
        model(**inputs, **caches, current_start=NEXT)
    assert _untouched(before, caches)


def test_bad_cache_lists(model, streamed):
    caches, inputs = streamed
    call = dict(inputs, current_start=NEXT)
    short = dict(caches, kv_cache=caches["kv_cache"][:1])
    with pytest.raises(ValueError, match="1 entries but the model has 2 layers"):
        model(**call, **short)
    with pytest.raises(ValueError, match="kv_cache_mouse is required"):
        model(**call, **dict(caches, kv_cache_mouse=None))
    wrong_dtype = copy.deepcopy(caches)
    wrong_dtype["kv_cache"][1]["k"] = wrong_dtype["kv_cache"][1]["k"].double()
    with pytest.raises(TypeError, match=r"kv_cache\[1\]\['k'\]"):
        model(**call, **wrong_dtype)
    mouse_rows = copy.deepcopy(caches)
    mouse_rows["kv_cache_mouse"][0]["k"] = mouse_rows["kv_cache_mouse"][0]["k"][:10]
    with pytest.raises(ValueError, match="kv_cache_mouse"):
        model(**call, **mouse_rows)


@pytest.mark.parametrize("cls", MODEL_CLASSES, ids=[m.__name__ for m in MODEL_CLASSES])
def test_actions_rejected_for_models_without_them(cls):
    plain = build_model("tiny", torch.float32, cls=cls, action_config={})
    inputs = make_inputs(model=build_model("tiny", torch.float32))
    with pytest.raises(ValueError, match="no action module"):
        plain(**inputs, **make_caches(plain), current_start=0)
    no_mouse = build_model("tiny", torch.float32, cls=cls)
    for block in no_mouse.blocks:
        if block.action_model is not None:
            block.action_model.enable_mouse = False
    with pytest.raises(ValueError, match="no mouse branch"):
        no_mouse(**inputs, **make_caches(no_mouse), current_start=0)


def test_valid_calls_pass(model, streamed):
    """The two legal positions: repeating the latest block and advancing to the next."""
    caches, inputs = streamed
    with torch.no_grad():
        out = model(**inputs, **caches, current_start=NEXT)
        repeat = model(**inputs, **caches, current_start=NEXT)
    assert torch.equal(out, repeat)


# ------------------------------------------------------------------ constructors and configs
def _config(**changes):
    config = model_config("tiny")
    action = changes.pop("action", None)
    if action:
        config["action_config"].update(action)
    config.update(changes)
    return config


CONFIG_ROWS = [
    ("num_layers 0", _config(num_layers=0), ValueError, "num_layers must be at least 1, got 0"),
    ("num_layers str", _config(num_layers="2"), TypeError, "num_layers must be an int, got str"),
    ("num_heads 0", _config(num_heads=0), ValueError, "num_heads must be at least 1"),
    ("dim negative", _config(dim=-64), ValueError, "dim must be at least 1, got -64"),
    ("odd head size", _config(dim=66), ValueError, "dim 66 / num_heads 2 must give an even head"),
    ("freq_dim odd", _config(freq_dim=255), ValueError, "freq_dim must be even"),
    ("patch_size of 2", _config(patch_size=[1, 2]), TypeError, "patch_size must be"),
    ("patch_size 0", _config(patch_size=[0, 2, 2]), ValueError, r"patch_size\[0\] must be at least 1"),
    ("local_attn_size 0", _config(local_attn_size=0), ValueError, "local_attn_size must be -1"),
    ("sink_size negative", _config(sink_size=-1), ValueError, "sink_size must be at least 0"),
    ("eps negative", _config(eps=-1.0), ValueError, "eps must be"),
    ("eps str", _config(eps="1e-6"), TypeError, "eps must be a number"),
    ("action blocks past the layers", _config(action={"blocks": [0, 5]}), ValueError,
     r"action_config\['blocks'\] names layers \[5\]"),
    ("action blocks missing", {**_config(), "action_config": {"enable_mouse": True}}, ValueError,
     r"action_config\['blocks'\] must list"),
    ("action heads_num 0", _config(action={"heads_num": 0}), ValueError, "heads_num must be at least 1"),
    ("action windows_size 0", _config(action={"windows_size": 0}), ValueError, "windows_size must be at least 1"),
    ("action img_hidden_size", _config(action={"img_hidden_size": 32}), ValueError,
     "img_hidden_size.* must equal dim 64"),
    ("action_config a list", _config(action_config=[0]), TypeError, "action_config must be a dict"),
    ("unknown key", _config(num_layerz=2), ValueError, "num_layerz"),
    ("config None", None, TypeError, "config must be a config dir"),
    ("config int", 3, TypeError, "config must be a config dir"),
]


@pytest.mark.parametrize("cls", MODELS.values(), ids=MODELS)
@pytest.mark.parametrize("name,config,error,match", CONFIG_ROWS, ids=[r[0] for r in CONFIG_ROWS])
def test_constructor_refuses_bad_configs(cls, name, config, error, match):
    """Nothing is built, so there is no state to keep: the row asserts type and message."""
    with pytest.raises(error, match=match):
        cls.from_config(config)


@pytest.mark.parametrize("content,error,match", [
    ("{not json", ValueError, r"config.json is not valid JSON"),
    ("[1, 2]", ValueError, r"config.json holds a JSON list"),
    (None, FileNotFoundError, r"model config not found: .*config.json"),
], ids=["not JSON", "JSON list", "missing"])
def test_config_files(tmp_path, content, error, match):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(error, match=match):
        CausalWanModel.from_config(tmp_path)
    assert CausalWanModel.from_config(tiny_variant_config()).num_layers == 2


# ------------------------------------------------------------------ checkpoints
def _tiny_state():
    return {k: v.contiguous() for k, v in build_model("tiny", torch.float32, seed=11).state_dict().items()}


def _write_checkpoints(root):
    """{row name: path} of the bad checkpoints."""
    state = _tiny_state()
    paths = {}
    (root / "dup").mkdir()
    save_file(state, str(root / "dup" / "a.safetensors"))
    save_file({"head.head.bias": state["head.head.bias"]}, str(root / "dup" / "b.safetensors"))
    paths["key in two shards"] = root / "dup"
    for name, dtype in (("int32", torch.int32), ("bool", torch.bool), ("int64", torch.int64)):
        cast = dict(state)
        cast["head.head.weight"] = state["head.head.weight"].to(dtype)
        save_file(cast, str(root / f"{name}.safetensors"))
        paths[f"{name} tensor"] = root / f"{name}.safetensors"
    good = root / "good.safetensors"
    save_file(state, str(good))
    raw = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(raw[:len(raw) // 2])
    paths["truncated"] = root / "truncated.safetensors"
    (root / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    paths["not safetensors"] = root / "junk.safetensors"
    (root / "empty.safetensors").write_bytes(b"")
    paths["empty file"] = root / "empty.safetensors"
    (root / "header.safetensors").write_bytes((64).to_bytes(8, "little") + b"{" * 64)
    paths["corrupt header"] = root / "header.safetensors"
    torch.save(state, root / "pickled.safetensors")
    paths["a torch.save file named .safetensors"] = root / "pickled.safetensors"
    (root / "nested").mkdir()
    (root / "nested" / "shard.safetensors").mkdir()
    paths["shard that is a directory"] = root / "nested"
    (root / "none").mkdir()
    paths["directory without shards"] = root / "none"
    paths["missing file"] = root / "absent.safetensors"
    (root / "weights.pt").write_bytes(b"not used")
    paths["a .pt file"] = root / "weights.pt"
    return paths


CHECKPOINT_ROWS = [  # (row, strict, error, message)
    ("key in two shards", True, CheckpointFileError, r"'head.head.bias' is in two shards, a.safetensors and b.safetensors"),
    ("key in two shards", False, CheckpointFileError, r"'head.head.bias' is in two shards"),
    ("int32 tensor", True, CheckpointMismatchError, r"mis-typed.*\n    head.head.weight: checkpoint torch.int32"),
    ("int32 tensor", False, CheckpointMismatchError, r"head.head.weight: checkpoint torch.int32 vs model torch.float32"),
    ("int64 tensor", True, CheckpointMismatchError, r"head.head.weight: checkpoint torch.int64 vs model torch.float32"),
    ("bool tensor", True, CheckpointMismatchError, r"head.head.weight: checkpoint torch.bool"),
    ("truncated", True, CheckpointFileError, r"truncated.safetensors is not a readable safetensors file"),
    ("not safetensors", True, CheckpointFileError, r"junk.safetensors is not a readable safetensors file"),
    ("empty file", True, CheckpointFileError, r"empty.safetensors is not a readable"),
    ("corrupt header", True, CheckpointFileError, r"header.safetensors is not a readable"),
    ("a torch.save file named .safetensors", True, CheckpointFileError, r"pickled.safetensors is not a readable"),
    ("shard that is a directory", True, CheckpointFileError, r"shard.safetensors in the checkpoint directory is not a file"),
    ("directory without shards", True, FileNotFoundError, r"no .safetensors files in directory .*none"),
    ("missing file", True, FileNotFoundError, r"checkpoint not found: .*absent.safetensors"),
    ("a .pt file", True, ValueError, r"only .safetensors checkpoints are supported, got .*weights.pt"),
    ("path None", True, TypeError, "checkpoint path must be a str or os.PathLike, got NoneType"),
    ("path int", True, TypeError, "checkpoint path must be a str or os.PathLike, got int"),
]


@pytest.fixture(scope="module")
def checkpoint_paths(tmp_path_factory):
    return _write_checkpoints(tmp_path_factory.mktemp("checkpoints"))


def _streamed(model, inputs):
    with torch.no_grad():  # a new stream in new dicts: exercises the optimized model's plan
        return model(**inputs, **make_caches(model), current_start=0)


@pytest.fixture(scope="module")
def loaded_models():
    """Each model after a first streaming forward (the optimized one has packed its plan), and
    the output a fresh one gives."""
    made = {}
    for name, cls in MODELS.items():
        model, fresh = (build_model("tiny", torch.float32, cls=cls) for _ in range(2))
        inputs = make_inputs(model)
        _streamed(model, inputs)
        made[name] = model, inputs, _streamed(fresh, inputs), fresh.state_dict()
    return made


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("name,strict,error,match", CHECKPOINT_ROWS,
                         ids=[f"{r[0]}{'' if r[1] else ' (strict=False)'}" for r in CHECKPOINT_ROWS])
def test_checkpoint_loading(checkpoint_paths, loaded_models, model_name, name, strict, error, match):
    model, inputs, expected, fresh_state = loaded_models[model_name]
    path = {"path None": None, "path int": 3}.get(name, checkpoint_paths.get(name))
    with pytest.raises(error, match=match):
        model.load_checkpoint(path, strict=strict)
    assert same_nested(dict(model.state_dict()), dict(fresh_state))
    assert torch.equal(_streamed(model, inputs), expected)


def test_float_checkpoints_of_another_precision_are_cast(tmp_path):
    """Kept as before (as torch's load_state_dict does): a float64 or bfloat16 checkpoint loads
    into a float32 model, cast per parameter."""
    state = _tiny_state()
    for dtype in (torch.float64, torch.bfloat16):
        path = tmp_path / f"{dtype}.safetensors".replace("torch.", "")
        save_file({k: v.to(dtype) for k, v in state.items()}, str(path))
        model = build_model("tiny", torch.float32, seed=3)
        model.load_checkpoint(path)
        assert all(torch.equal(v, state[k].to(dtype).float()) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ decoder weights
def _write_decoder_files(root):
    conv = "decoder.conv1.weight"
    shape = decoder_weights()[conv].shape
    sentinel = root / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    files = {
        "values that are floats": {conv: 1.0, "decoder.conv1.bias": 0.0},
        "values that are strings": {conv: "weights"},
        "a list": [torch.zeros(3)],
        "a tensor": torch.zeros(3),
        "state_dict an int": {"state_dict": 3},
        "integer tensor": {conv: torch.zeros(shape, dtype=torch.int64)},
        "non-str keys": {1: torch.zeros(3)},
        "a pickled object": {conv: Payload()},
    }
    paths = {}
    for i, (name, payload) in enumerate(files.items()):
        paths[name] = root / f"vae{i}.pth"
        torch.save(payload, paths[name])
    raw = paths["integer tensor"].read_bytes()
    (root / "truncated.pth").write_bytes(raw[:len(raw) // 2])
    paths["truncated"] = root / "truncated.pth"
    (root / "junk.pth").write_bytes(b"garbage")
    paths["not a torch file"] = root / "junk.pth"
    (root / "junk.safetensors").write_bytes(b"garbage")
    paths["not a safetensors file"] = root / "junk.safetensors"
    paths["missing"] = root / "Wan2.1_VAE.pth"
    paths["a directory"] = root
    paths["sentinel"] = sentinel
    return paths


DECODER_FILE_ROWS = [
    ("values that are floats", CheckpointFileError, r"vae0.pth: 'decoder.conv1.weight' holds a float, not a tensor"),
    ("values that are strings", CheckpointFileError, r"vae1.pth: 'decoder.conv1.weight' holds a str"),
    ("a list", CheckpointFileError, r"vae2.pth holds a list, not a state dict"),
    ("a tensor", CheckpointFileError, r"vae3.pth holds a Tensor, not a state dict"),
    ("state_dict an int", CheckpointFileError, r"vae4.pth holds a int"),
    ("integer tensor", CheckpointMismatchError, r"decoder.conv1.weight: checkpoint torch.int64 vs model torch.float32"),
    ("non-str keys", CheckpointMismatchError, r"vae6.pth does not match .*\n.*missing"),
    ("a pickled object", CheckpointFileError, r"vae7.pth is not a plain state dict: .*nothing was unpickled"),
    ("truncated", CheckpointFileError, r"truncated.pth cannot be read as a PyTorch checkpoint"),
    ("not a torch file", CheckpointFileError, r"junk.pth is not a plain state dict"),
    ("not a safetensors file", CheckpointFileError, r"junk.safetensors is not a readable safetensors file"),
    ("missing", FileNotFoundError, r"checkpoint not found: .*Wan2.1_VAE.pth"),
    ("a directory", CheckpointFileError, r"is a directory; expected a state dict file"),
    ("path None", TypeError, r"checkpoint path must be a str or os.PathLike, got NoneType"),
]


@pytest.fixture(scope="module")
def decoder_files(tmp_path_factory):
    return _write_decoder_files(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def decoders():
    return {"reference": build_decoder(VAEDecoderWrapper, torch.float32),
            "optimized": build_decoder(OptimizedVAEDecoderWrapper, torch.float32)}


@pytest.mark.parametrize("name,error,match", DECODER_FILE_ROWS, ids=[r[0] for r in DECODER_FILE_ROWS])
def test_decoder_weights(decoder_files, decoders, name, error, match):
    """The loader is shared by both decoders; run against the reference (weights checked after
    every row; the decoder's next call after all rows: test_decoder_call's rows)."""
    decoder = decoders["reference"]
    path = None if name == "path None" else decoder_files[name]
    with pytest.raises(error, match=match):
        load_decoder_weights(decoder, path)
    assert not decoder_files["sentinel"].exists(), "the .pth payload was unpickled"
    weights = decoder_weights()
    assert all(torch.equal(v, weights[k].float()) for k, v in decoder.state_dict().items())


# ------------------------------------------------------------------ decoder calls
Z_HW = (1, 2)    # latent h, w: the decoder is fully convolutional; small is fast


def _latents(frames, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, 16, *Z_HW, generator=gen)


def _replace(i, change):
    return lambda z, cache: (z, [change(e) if j == i else e for j, e in enumerate(cache)])


DECODER_CALL_ROWS = [
    ("cache entry float64", _replace(3, lambda e: e.double()), ValueError,
     r"cache entry 3 is torch.float64 on cpu but the decoder's weights are torch.float32"),
    ("cache entry on another device", _replace(5, lambda e: e.to("meta")), ValueError,
     r"cache entry 5 is torch.float32 on meta"),
    ("cache entry 'Rep'", _replace(3, lambda e: "Rep"), TypeError, r"cache entry 3 must be None or a .* got str"),
    ("cache entry 4-D", _replace(0, lambda e: e[0]), ValueError, r"cache entry 0 must be None or a \[B, C, frames, H, W\]"),
    ("cache not unpacked", lambda z, cache: (z, [list(cache)]), ValueError, r"got 1 \(a list was passed as one argument"),
    ("cache of 33", lambda z, cache: (z, list(cache) + [None]), ValueError, "cache of 32 entries.*got 33"),
    ("z None", lambda z, cache: (None, cache), TypeError, "z must be a tensor of latents"),
    ("z list", lambda z, cache: ([z], cache), TypeError, "z must be a tensor of latents.*got list"),
    ("z int64", lambda z, cache: (z.long(), cache), ValueError, "z is torch.int64"),
    ("z batch 0", lambda z, cache: (z[:0], cache), ValueError, r"z \(0, 1, 16, 1, 2\) is empty"),
    ("z width 0", lambda z, cache: (z[..., :0], cache), ValueError, "is empty"),
    ("z no frames", lambda z, cache: (z[:, :0], cache), ValueError, "z holds no latent frames"),
    ("z channels last", lambda z, cache: (z.transpose(2, 4), cache), ValueError, r"z must be \[batch, frames, 16, h, w\]"),
]

@pytest.fixture(scope="module")
def decoder_streams(decoders):
    """Per decoder: its cache after a first block and the next block's frames from a fresh
    reference decoder (both decoders return a new cache per call: the same next call serves after
    every row)."""
    fresh = build_decoder(VAEDecoderWrapper, torch.float32)
    head, tail = _latents(1, 0), _latents(1, 1)
    with torch.no_grad():
        expected, _ = fresh(tail, *fresh(head, *[None] * 32)[1])
        return {name: (decoder, decoder(head, *[None] * 32)[1], tail, expected)
                for name, decoder in decoders.items()}


def _decoder_cases():
    for row in DECODER_CALL_ROWS:
        for name in ("reference", "optimized"):
            yield pytest.param(name, *row, id=f"{name}-{row[0]}")


@pytest.mark.parametrize("decoder_name,name,make_bad,error,match", list(_decoder_cases()))
def test_decoder_call(decoder_streams, decoder_name, name, make_bad, error, match):
    decoder, cache, tail, expected = decoder_streams[decoder_name]
    kept = [entry.clone() for entry in cache]
    z, bad_cache = make_bad(tail, cache)
    with torch.no_grad(), pytest.raises(error, match=match):
        decoder(z, *bad_cache)
    assert all(torch.equal(a, b) for a, b in zip(cache, kept)), "a refused call changed the cache"
    with torch.no_grad():
        frames, _ = decoder(tail, *cache)
    if decoder_name == "reference":
        assert torch.equal(frames, expected)
    else:
        assert_close_elementwise(frames, expected)
