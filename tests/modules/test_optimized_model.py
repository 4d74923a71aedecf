"""OptimizedCausalWanModel against the reference: golden vectors, long streams with eviction,
sinks, batches, resets, and the caller's upstream dicts as storage (CPU, float64)."""
import pytest
import torch

from golden_runner import VARIANTS, golden_model, load_variant, run_streaming, run_train
from helpers import build_model, make_caches, make_inputs, max_rel_err, rel_err, run_stream
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.presets import tiny_variant_config, tokens_per_frame

STREAM_TOLERANCE = 1e-6
BLOCKS = 10


def _pair(variant="universal", **overrides):
    config = tiny_variant_config(variant)
    return (build_model(config=config, **overrides),
            build_model(config=config, cls=OptimizedCausalWanModel, **overrides))


@pytest.mark.parametrize("owned", [False, True], ids=["upstream-dicts", "owned-cache"])
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_optimized_reproduces_golden(variant, owned):
    meta, weights, inputs, expected = load_variant(variant)
    model = golden_model(OptimizedCausalWanModel, meta, weights)
    if owned:
        model.start_stream(batch=1, latent_size=inputs["noise"].shape[-2:])
        outputs = run_streaming(model, meta, inputs, caches={})
        model.end_stream()
    else:
        outputs = run_streaming(model, meta, inputs)
    outputs["output.train"] = run_train(model, meta, inputs)
    errors = {name: rel_err(outputs[name], expected[name]) for name in expected}
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("sink", [0, 1])
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_long_stream_matches_reference(variant, sink):
    """10 blocks: the window (6 or 4 frames) fills and evicts many times; sink frames stay."""
    reference, optimized = _pair(variant, sink_size=sink)
    window = reference.local_attn_size
    expected = run_stream(reference, BLOCKS, caches=make_caches(reference, cache_frames=window))
    optimized.start_stream(batch=1, latent_size=(8, 16))
    assert max_rel_err(run_stream(optimized, BLOCKS), expected) <= STREAM_TOLERANCE


@pytest.mark.parametrize("cache_frames,sink", [(6, 0), (15, 0), (15, 1)])
@torch.no_grad()
def test_upstream_dict_caches_match_reference(cache_frames, sink):
    """The caller's dicts as ring storage: the pipeline's 6-frame caches and the seed's 15-frame
    ones (a cache longer than the 6-frame window: upstream then never attends to the sink)."""
    reference, optimized = _pair(sink_size=sink)
    expected = run_stream(reference, BLOCKS, caches=make_caches(reference, cache_frames=cache_frames))
    got = run_stream(optimized, BLOCKS, caches=make_caches(optimized, cache_frames=cache_frames))
    assert max_rel_err(got, expected) <= STREAM_TOLERANCE


@torch.no_grad()
def test_batch_of_two_equals_two_streams():
    reference, optimized = _pair()
    streams = [run_stream(reference, BLOCKS, caches=make_caches(reference), seed=s) for s in (10, 50)]
    optimized.start_stream(batch=2, latent_size=(8, 16))
    both = []
    for block in range(BLOCKS):  # two players in lockstep: their inputs stacked along the batch
        players = [make_inputs(reference, 3, 3 * block, seed=s + block) for s in (10, 50)]
        inputs = {k: torch.cat([p[k] for p in players]) for k in players[0]}
        for t in (1000.0, 500.0, 0.0):
            inputs["t"] = torch.full_like(inputs["t"], t)
            out = optimized(**inputs, current_start=3 * block * 32)
            both.append(out)
            if t:
                inputs["x"] = 0.5 * inputs["x"] + 0.5 * out
    for player in (0, 1):
        assert max_rel_err([o[player:player + 1] for o in both], streams[player]) <= STREAM_TOLERANCE


@torch.no_grad()
def test_reset_in_the_middle_starts_a_fresh_stream():
    reference, optimized = _pair()
    expected = run_stream(reference, 4, caches=make_caches(reference))
    optimized.start_stream(batch=1, latent_size=(8, 16))
    run_stream(optimized, 5, seed=99)          # an unrelated stream, then rewind
    optimized.reset_stream()
    assert max_rel_err(run_stream(optimized, 4), expected) <= STREAM_TOLERANCE
    with pytest.raises(ValueError, match="Going backwards"):
        run_stream(optimized, 1, seed=10)       # frame 0 again without a reset


def test_partly_visible_sink_layout_is_refused():
    _, optimized = _pair(sink_size=2)
    caches = make_caches(optimized, cache_frames=7)  # 7-frame cache, 6-frame window, 2 sink
    with pytest.raises(ValueError, match="part of the sink"):
        run_stream(optimized, 1, caches=caches)


def test_training_path_is_the_parents():
    reference, optimized = _pair()
    inputs = make_inputs(reference, frames=6)
    with torch.no_grad():
        assert torch.equal(optimized(**inputs), reference(**inputs))


def test_cuda_graphs_fall_back_on_cpu_said_once():
    """Graphs asked for on a CPU: the forward runs eagerly (the reference's numbers), and says so
    once: in the device's start-up log line when graphs were asked for before the first forward
    (no warning repeating it), with a warning when they are turned on after it."""
    import logging
    import warnings
    reference, optimized = _pair()
    optimized.enable_cuda_graphs()
    optimized.start_stream(latent_size=(8, 16))
    handler = logging.Handler()
    records = []
    handler.emit = records.append
    logger = logging.getLogger("wan")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a repeated warning fails here
            got = run_stream(optimized, 2)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert any("CUDA graphs off" in r.getMessage() and "not on CUDA" in r.getMessage()
               for r in records), [r.getMessage() for r in records]
    assert max_rel_err(got, run_stream(reference, 2, caches=make_caches(reference))) <= 1e-6
    # turned on after the first forward (the log line said off): a warning, once
    late = _pair()[1]
    late.start_stream(latent_size=(8, 16))
    run_stream(late, 1)
    late.enable_cuda_graphs()
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        run_stream(late, 1)


@torch.no_grad()
def test_cache_checks_run_again_when_a_dict_tensor_changes():
    """The per-layer cache checks run once per storage; a tensor swapped into a dict (here a view
    at the same address with the wrong shape) is a new storage and is checked again."""
    model = build_model(config=tiny_variant_config(), cls=OptimizedCausalWanModel)
    caches = make_caches(model)
    tokens = tokens_per_frame("tiny")
    model(**make_inputs(model), **caches, current_start=0)
    following = make_inputs(model, start_frame=3, seed=2)
    model(**following, **caches, current_start=3 * tokens)  # same storage: checks skipped
    caches["kv_cache"][1]["k"] = caches["kv_cache"][1]["k"][:, :, :1]
    with pytest.raises(ValueError, match=r"kv_cache\[1\]\['k'\] has shape"):
        model(**following, **caches, current_start=3 * tokens)
