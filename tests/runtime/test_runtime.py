"""The optimized models' runtime: the options object (resolved once, reported as it runs), the
explicit warm-up, and the two calls that used to be silently wrong (an image that changes without a
crossattn_cache; a decoder call repeated with an earlier cache)."""
import pytest
import torch

from helpers import (build_decoder, build_model, graphed_and_eager_streams, make_caches,
                     make_inputs, rel_err, run_stream)
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.modules.presets import model_config
from wan.modules.vae_decoder import VAEDecoderWrapper
from wan.runtime.cuda_graphs import EagerGraphRunner
from wan.runtime.options import DEFAULT_FP8_GEMMS, FP8_GEMMS
from wan.runtime.options import FastOptions, publish_model_options

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("given, environ, expected, source", [
    ({}, {}, None, "default"),
    ({}, {"WAN_CUDA_GRAPHS": "off"}, False, "WAN_CUDA_GRAPHS=off"),
    ({"cuda_graphs": True}, {"WAN_CUDA_GRAPHS": "0"}, True, "cuda_graphs=True"),
])
def test_an_option_comes_from_the_keyword_then_the_environment_then_the_default(
        given, environ, expected, source):
    options = FastOptions.resolve(given, environ=environ)
    assert options.cuda_graphs is expected
    assert options.sources["cuda_graphs"].startswith(source)


def test_every_option_has_its_default():
    options = FastOptions.resolve(environ={})
    assert set(options.backend.values()) == {"auto"}
    assert (options.cuda_graphs, options.precision, options.fused_qkv) == (None, "native", True)
    assert options.fp8_gemms == frozenset()  # native: no GEMM in FP8
    fp8 = FastOptions.resolve({"precision": "fp8"}, environ={})
    assert fp8.fp8_gemms == frozenset(DEFAULT_FP8_GEMMS)
    assert FastOptions.resolve({"precision": "fp8", "fp8_gemms": "all"},
                               environ={}).fp8_gemms == frozenset(FP8_GEMMS)


@pytest.mark.parametrize("given, environ, message", [
    ({"precision": "fp4"}, {}, "precision='fp4'.*native, fp8"),
    ({}, {"WAN_CUDA_GRAPHS": "maybe"}, "WAN_CUDA_GRAPHS=maybe"),
    ({"precision": "fp8"}, {"WAN_FP8_GEMMS": "ffn,qkv"}, "WAN_FP8_GEMMS.*ffn"),
    ({}, {"WAN_FUSED_QKV": "2"}, "WAN_FUSED_QKV=2"),
])
def test_a_bad_option_names_where_it_came_from(given, environ, message):
    with pytest.raises(ValueError, match=message):
        FastOptions.resolve(given, environ=environ)


def test_an_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unknown option.*graphs"):
        FastOptions.resolve({"graphs": True})


def test_the_model_reports_what_it_runs_and_keeps_it(monkeypatch):
    """Resolved once, at construction: the environment changing later does not change what the
    model runs or reports (it used to re-read WAN_FP8_GEMMS at every plan build)."""
    monkeypatch.setenv("WAN_FP8_GEMMS", "ffn_in")
    model = build_model(cls=OptimizedCausalWanModel, precision="fp8", dtype=torch.float32)
    monkeypatch.setenv("WAN_FP8_GEMMS", "all")
    report = model.options_report()
    assert report["precision"] == "fp8" and report["fp8_gemms"] == ["ffn_in"]
    assert report["sources"]["fp8_gemms"] == "WAN_FP8_GEMMS=ffn_in"
    assert model.precision_report()["fp8_gemms"] == ["ffn_in"]
    # a setter resolves again: now the environment says all
    model.set_precision("fp8")
    assert model.precision_report()["fp8_gemms"] == list(FP8_GEMMS)


def test_the_config_json_value_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("WAN_PRECISION", "native")
    model = OptimizedCausalWanModel.from_config({**model_config("tiny"), "precision": "fp8",
                                                 "fused_qkv": False})
    assert model.precision == "fp8" and model.options.fused_qkv is False
    assert model.options_report()["sources"]["precision"].startswith("precision='fp8'")


def test_the_decoder_follows_the_dits_options_unless_given_its_own(monkeypatch):
    monkeypatch.delenv("WAN_CUDA_GRAPHS", raising=False)
    publish_model_options(cuda_graphs=False)
    follows, own = OptimizedVAEDecoderWrapper(), OptimizedVAEDecoderWrapper(cuda_graphs=True)
    assert follows.cuda_graphs is False and own.cuda_graphs is True
    assert follows.options.sources["cuda_graphs"] == "the DiT's cuda_graphs=False"


def test_decoder_compile_turns_graphs_on_and_names_itself_without_touching_the_old_options():
    """upstream's scripts call decoder.compile(...): graphs on unless turned off, reported as
    coming from compile(); the options object held before stays as it was (a new one is made)."""
    publish_model_options()  # no DiT options in play
    decoder = OptimizedVAEDecoderWrapper()
    before = decoder._resolved_options()
    decoder.compile(mode="max-autotune-no-cudagraphs")
    assert decoder.options.cuda_graphs is True
    assert decoder.options.sources["cuda_graphs"] == "compile()"
    assert before.cuda_graphs is None and before.sources["cuda_graphs"] == "default"


# ---------------------------------------------------------------------- warm-up
@torch.no_grad()
def test_warm_up_leaves_the_stream_as_a_fresh_one():
    """warm_up runs the stream's blocks on zeros and rewinds it: the real stream that follows is
    the same as on a model that never warmed up (CPU: no graphs, 0 captured)."""
    plain = build_model(cls=OptimizedCausalWanModel, dtype=torch.float64)
    warmed = build_model(cls=OptimizedCausalWanModel, dtype=torch.float64)
    for model in (plain, warmed):
        model.start_stream(latent_size=(8, 16))
    inputs = make_inputs(warmed)
    assert warmed.warm_up(inputs["visual_context"], inputs["cond_concat"],
                          inputs["mouse_cond"], inputs["keyboard_cond"]) == 0
    expected = run_stream(plain, 3)
    got = run_stream(warmed, 3)
    assert max(rel_err(g, e) for g, e in zip(got, expected)) == 0.0


@torch.no_grad()
def test_warm_up_over_the_callers_dicts_leaves_them_as_fresh_ones():
    plain = build_model(cls=OptimizedCausalWanModel, dtype=torch.float64)
    warmed = build_model(cls=OptimizedCausalWanModel, dtype=torch.float64)
    caches = make_caches(warmed)
    inputs = make_inputs(warmed)
    assert warmed.warm_up(inputs["visual_context"], inputs["cond_concat"], inputs["mouse_cond"],
                          inputs["keyboard_cond"], caches=caches) == 0
    assert not any(slot["is_init"] for slot in caches["crossattn_cache"])
    expected = run_stream(plain, 3, caches=make_caches(plain))
    got = run_stream(warmed, 3, caches=caches)
    assert max(rel_err(g, e) for g, e in zip(got, expected)) == 0.0


def _graphs_on_cpu(model):
    """The model replays "graphs" on this CPU (the seam and the stand-in runner that capture and
    replay the function eagerly), so captures are counted as on a GPU."""
    model._runtime.graph_device_types = ("cuda", "cpu")
    model._runtime.graphs = EagerGraphRunner()
    return model


@pytest.mark.parametrize("update_only", [False, True], ids=["full_update", "cache_update_only"])
@torch.no_grad()
def test_a_stream_in_new_dicts_captures_every_graph_in_its_first_call(update_only):
    """Upstream's pipeline makes new cache dicts for every video and never calls warm_up: with
    graphs, a stream's first call warms up over its dicts first, so every graph is captured in the
    first block and none later (the window filling, then full, then the next video's), and the
    outputs are a never-warmed eager model's, bit for bit (the warm-up left the dicts fresh)."""
    eager = build_model(cls=OptimizedCausalWanModel, dtype=torch.float64, cuda_graphs=False)
    graphed = _graphs_on_cpu(build_model(cls=OptimizedCausalWanModel, dtype=torch.float64))
    extra = {"cache_update_only": True} if update_only else None
    for video in range(2):
        captures = []

        def count():
            captures.append(graphed.counters["captures"] - sum(captures) - before)

        before = graphed.counters["captures"]
        got = run_stream(graphed, 4, caches=make_caches(graphed), seed=20 * video,
                         update_kwargs=extra, after_block=count)
        expected = run_stream(eager, 4, caches=make_caches(eager), seed=20 * video,
                              update_kwargs=extra)
        # (an update-only call returns None; what it wrote, the next block's outputs read)
        assert all(g is e is None or torch.equal(g, e) for g, e in zip(got, expected))
        # the image context, the window filling and full, per kind of call (a full one, an
        # update-only one); the first block's shorter condition history is a shape of its own
        assert captures[0] >= (5 if update_only else 3) and captures[1:] == [0, 0, 0], captures


@torch.no_grad()
def test_first_call_warm_up_can_be_turned_off_and_an_explicit_warm_up_is_not_repeated():
    off = _graphs_on_cpu(build_model(cls=OptimizedCausalWanModel, dtype=torch.float64,
                                     first_call_warm_up=False))
    assert off.options_report()["first_call_warm_up"] is False
    captures = []
    run_stream(off, 3, caches=make_caches(off),
               after_block=lambda: captures.append(off.counters["captures"]))
    assert captures[0] < captures[-1]  # captured phase by phase, as the stream went on
    warmed = _graphs_on_cpu(build_model(cls=OptimizedCausalWanModel, dtype=torch.float64))
    caches, inputs = make_caches(warmed), make_inputs(warmed)
    captured = warmed.warm_up(inputs["visual_context"], inputs["cond_concat"],
                              inputs["mouse_cond"], inputs["keyboard_cond"], caches=caches,
                              t_dtype=inputs["t"].dtype)
    assert captured >= 3
    run_stream(warmed, 3, caches=caches)
    assert warmed.counters["captures"] == captured  # the first call found the dicts warmed


def test_warm_up_without_a_stream_or_conditions_is_a_clear_error():
    model = build_model(cls=OptimizedCausalWanModel, dtype=torch.float32)
    inputs = make_inputs(model)
    with pytest.raises(RuntimeError, match="start_stream"):
        model.warm_up(inputs["visual_context"], inputs["cond_concat"])
    model.start_stream(latent_size=(8, 16))
    with pytest.raises(ValueError, match="pass mouse_cond"):
        model.warm_up(inputs["visual_context"], inputs["cond_concat"])


@requires_cuda
@torch.no_grad()
def test_after_warm_up_real_calls_capture_nothing_and_match_eager():
    graphed, eager = graphed_and_eager_streams()
    inputs = make_inputs(graphed)
    assert graphed.warm_up(inputs["visual_context"], inputs["cond_concat"],
                           inputs["mouse_cond"], inputs["keyboard_cond"],
                           t_dtype=inputs["t"].dtype) >= 3
    captured = graphed._runtime.graphs.captures
    got, expected = run_stream(graphed, 5), run_stream(eager, 5)
    assert graphed._runtime.graphs.captures == captured
    assert max(rel_err(g, e) for g, e in zip(got, expected)) <= 1e-2


@requires_cuda
@torch.no_grad()
def test_decoder_warm_up_captures_before_the_first_block():
    decoder = build_decoder(OptimizedVAEDecoderWrapper, dtype=torch.float16).cuda()
    decoder.cuda_graphs = True
    z = torch.randn(1, 3, 16, 8, 12, device="cuda", dtype=torch.float16)
    assert decoder.warm_up(z) == 3  # first frame alone, the rest of the first block, a block
    captured = decoder._graphs.captures
    cache = [None] * len(decoder.decoder.cached_layers)
    for _ in range(3):
        _, cache = decoder(z, *cache)
    assert decoder._graphs.captures == captured


# ---------------------------------------------------------------------- formerly silently wrong
@torch.no_grad()
def test_without_crossattn_cache_a_new_image_is_used_as_the_reference_does():
    reference = build_model(dtype=torch.float64)
    model = build_model(cls=OptimizedCausalWanModel, dtype=torch.float64)
    caches = {name: make_caches(m) for name, m in (("reference", reference), ("model", model))}
    for block in range(2):
        inputs = make_inputs(reference, start_frame=3 * block, seed=20 + block)  # a new image
        start = 3 * block * 32
        outs = []
        for name, m in (("reference", reference), ("model", model)):
            dicts = dict(caches[name], crossattn_cache=None)
            outs.append(m(**inputs, **dicts, current_start=start))
        assert rel_err(outs[1], outs[0]) <= 1e-6, block


@torch.no_grad()
@pytest.mark.parametrize("cls", [VAEDecoderWrapper, OptimizedVAEDecoderWrapper])
def test_a_decoder_call_repeated_with_an_earlier_cache_gives_the_same_frames(cls):
    decoder = build_decoder(cls)
    gen = torch.Generator().manual_seed(3)
    z = [torch.randn(1, 3, 16, 4, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    _, cache = decoder(z[0], *[None] * len(decoder.decoder.cached_layers))
    first, after = decoder(z[1], *cache)
    retry, _ = decoder(z[1], *cache)
    assert torch.equal(first, retry)
    assert all(a is not b for a, b in zip(after, cache))
