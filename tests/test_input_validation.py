"""Bad input is a clear error naming the problem, raised before any cache is touched."""
import copy

import pytest
import torch

from helpers import build_model, make_caches, make_inputs
from wan import CausalWanModel
from wan.runtime.stream_cache import DICT_TAG
from wan.modules.optimized_causal_model import OptimizedCausalWanModel

TOKENS_PER_FRAME = 32  # tiny preset: 8 x 16 latent, patch 2 x 2


def _snapshot(caches):
    return copy.deepcopy(caches)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):  # the optimized model's tag of the dicts (their ring cache) aside
        keys = a.keys() - {DICT_TAG}
        return keys == b.keys() - {DICT_TAG} and all(_same(a[k], b[k]) for k in keys)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


MODELS = [CausalWanModel, OptimizedCausalWanModel]


@pytest.fixture(scope="module", params=MODELS, ids=[m.__name__ for m in MODELS])
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
        ("start not frame aligned", {"current_start": 3 * TOKENS_PER_FRAME + 5}, "multiple"),
        # the reference reads the position from the dicts first; the optimized model checks the
        # action histories first (they do not fit frames 9-11 either)
        ("start skips ahead", {"current_start": 9 * TOKENS_PER_FRAME},
         "must start at|must hold the whole history"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_bad_input_raises_and_leaves_caches_untouched(model, streamed, case):
    caches, inputs = streamed
    description, changes, message = _bad_inputs(model, inputs)[case]
    call = dict(inputs, **caches, current_start=3 * TOKENS_PER_FRAME)
    call.update(changes)
    before = _snapshot(caches)
    with pytest.raises((ValueError, TypeError), match=message):
        model(**call)
    assert _same(before, caches), description


def test_going_backwards_is_refused(model, streamed):
    """Frames 6-8 streamed, then frames 3-5 again. (current_start=0 is not "backwards" for the
    optimized model: it starts a new stream in the same dicts, as upstream's pipeline does.)"""
    caches, inputs = streamed
    with torch.no_grad():
        model(**inputs, **caches, current_start=3 * TOKENS_PER_FRAME)
        model(**make_inputs(model, start_frame=6, seed=3), **caches, current_start=6 * TOKENS_PER_FRAME)
    before = _snapshot(caches)
    with pytest.raises(ValueError, match="Going backwards"):
        model(**inputs, **caches, current_start=3 * TOKENS_PER_FRAME)
    assert _same(before, caches)


def test_bad_cache_lists(model, streamed):
    caches, inputs = streamed
    call = dict(inputs, current_start=3 * TOKENS_PER_FRAME)
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


@pytest.mark.parametrize("cls", MODELS, ids=[m.__name__ for m in MODELS])
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
        out = model(**inputs, **caches, current_start=3 * TOKENS_PER_FRAME)
        repeat = model(**inputs, **caches, current_start=3 * TOKENS_PER_FRAME)
    assert torch.equal(out, repeat)
