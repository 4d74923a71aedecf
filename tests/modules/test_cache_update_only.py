"""`forward(..., cache_update_only=True)`: the t=0 update of a clean block made for its cache
writes alone (the last block stops after its own, no head). The caches it leaves must be exactly
those of the full call, whatever the cache (owned stream or upstream dicts) and whether the last
block has an action module; the runner's frames must not move; bad use is a clear error."""
import pytest
import torch

from helpers import (build_decoder, build_model, graphed_and_eager_streams, make_caches,
                     make_inputs, rel_err, requires_cuda, run_stream)
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.modules.presets import model_config
from wan.modules.random_init import random_inputs
from wan.serving.runner import StreamingBlockRunner



def _config(last_block_has_actions: bool) -> dict:
    config = model_config("tiny")
    if last_block_has_actions:  # the tiny model has 2 blocks; upstream's last one has none
        config["action_config"]["blocks"] = [0, 1]
    return config


def _stream(model, blocks, caches, update_only):
    """The pipeline's calls (helpers.run_stream), the update with `cache_update_only` as given:
    (the denoising calls' outputs, the update calls' results, the caches after each block)."""
    snapshots = []
    outputs = run_stream(model, blocks, caches=caches,
                         update_kwargs={"cache_update_only": update_only},
                         after_block=lambda: snapshots.append(_cache_tensors(model, caches)))
    calls = len(outputs) // blocks  # the denoising steps and the update, per block
    denoising = [out for i, out in enumerate(outputs) if i % calls != calls - 1]
    return denoising, outputs[calls - 1::calls], snapshots


def _cache_tensors(model, caches):
    """Every cache tensor the stream holds, copied (the ring storage both kinds of cache use)."""
    if caches is not None:
        dicts = [d for name in ("kv_cache", "kv_cache_mouse", "kv_cache_keyboard")
                 for d in caches[name] or ()]
        return [v.clone() for d in dicts for k, v in sorted(d.items())
                if isinstance(v, torch.Tensor) and k in ("k", "v")]
    stream = model._runtime.current
    return [t.clone() for t in stream.buffers() if t.is_floating_point()]


@pytest.mark.parametrize("dicts", [False, True], ids=["owned_stream", "upstream_dicts"])
@pytest.mark.parametrize("last_block_has_actions", [False, True], ids=["plain_last", "action_last"])
@torch.no_grad()
def test_the_caches_come_out_exactly_as_from_the_full_call(dicts, last_block_has_actions):
    config = _config(last_block_has_actions)
    full = build_model(cls=OptimizedCausalWanModel, config=config)
    lean = build_model(cls=OptimizedCausalWanModel, config=config)
    results = []
    for model, update_only in ((full, False), (lean, True)):
        caches = make_caches(model) if dicts else None
        if not dicts:
            model.start_stream(latent_size=(8, 16))
        results.append(_stream(model, 4, caches, update_only))  # fills and then wraps the window
    (outs_full, updates_full, caches_full), (outs_lean, updates_lean, caches_lean) = results
    assert all(u is not None for u in updates_full) and all(u is None for u in updates_lean)
    for block, (a, b) in enumerate(zip(caches_full, caches_lean)):
        assert len(a) == len(b) > 0
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"caches differ after block {block}"
    # and so every later call gives the same output (float64, same ops: bitwise)
    assert all(torch.equal(x, y) for x, y in zip(outs_full, outs_lean))


@torch.no_grad()
def test_the_runner_skips_the_update_output_and_its_frames_do_not_move():
    def frames(cache_update_only):
        dit = build_model(cls=OptimizedCausalWanModel)
        decoder = build_decoder(OptimizedVAEDecoderWrapper, dtype=torch.float32)
        runner = StreamingBlockRunner(dit, decoder, latent_hw=(8, 16),
                                      cache_update_only=cache_update_only)
        assert runner.update_kwargs == ({"cache_update_only": True} if cache_update_only else {})
        runner.start(random_inputs(dit, (8, 16), 3, 0, seed=1)["visual_context"])
        runner.generator = torch.Generator().manual_seed(3)
        out = []
        for block in range(2):  # the second block reads what the first one's update wrote
            inputs = random_inputs(dit, (8, 16), 3, 3 * block, seed=2 + block)
            out.append(runner.block(inputs["cond_concat"], inputs["mouse_cond"],
                                    inputs["keyboard_cond"])[0])
        return out

    for lean, full in zip(frames(True), frames(False)):
        assert torch.equal(lean, full)


def test_the_reference_model_is_called_without_the_keyword():
    dit = build_model()  # upstream's CausalWanModel: no cache_update_only
    runner = StreamingBlockRunner(dit, build_decoder(OptimizedVAEDecoderWrapper), latent_hw=(8, 16))
    assert runner.update_kwargs == {}


@torch.no_grad()
def test_bad_use_is_a_clear_error():
    model = build_model(cls=OptimizedCausalWanModel, dtype=torch.float32)
    inputs = make_inputs(model)
    with pytest.raises(ValueError, match="cache_update_only=True needs a stream"):
        model(**inputs, cache_update_only=True)  # the cache-free forward has nothing to write
    with pytest.raises(TypeError, match="cache_update_only must be True or False"):
        model(**inputs, **make_caches(model), cache_update_only=1)


@requires_cuda
@torch.no_grad()
def test_graphs_of_update_calls_are_captured_by_warm_up_and_replay_as_eager():
    """On CUDA: warm_up(cache_update_only=True) captures the update calls' graphs too, so the real
    stream captures nothing; the caches after graphed lean updates equal eager full updates'."""
    graphed, eager = graphed_and_eager_streams()
    inputs = make_inputs(graphed)  # on the model's device
    assert graphed.warm_up(inputs["visual_context"], inputs["cond_concat"], inputs["mouse_cond"],
                           inputs["keyboard_cond"], t_dtype=inputs["t"].dtype,
                           cache_update_only=True) >= 5  # + the image context's
    captured = graphed._runtime.graphs.captures
    got = _stream(graphed, 4, None, True)
    expected = _stream(eager, 4, None, False)
    assert graphed._runtime.graphs.captures == captured
    assert max(rel_err(g, e) for g, e in zip(got[0], expected[0])) <= 1e-2
    for a, b in zip(got[2][-1], expected[2][-1]):
        assert rel_err(a, b) <= 1e-2
