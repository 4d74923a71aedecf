"""Several players through one model and one decoder: streams interleaved block by block give
outputs identical to each stream run alone (owned streams, alternating upstream dict sets, decoder
streams), and a stream's storage goes when its caller drops it."""
import gc
import weakref

import pytest
import torch

from helpers import build_model, make_caches, make_inputs, requires_cuda
from wan.runtime.stream_cache import DICT_TAG
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.modules.vae_decoder import VAEDecoderWrapper
from wan.modules.random_init import randomize_decoder_weights_

TOKENS_PER_FRAME = 32  # tiny preset: 8 x 16 latent
PLAYERS, BLOCKS, STEPS = 3, 3, (1000.0, 500.0, 0.0)


def _player_calls(model, player: int):
    """Every call of one player's stream: per block, one call per step, each input its own."""
    calls = []
    for block in range(BLOCKS):
        inputs = make_inputs(model, 3, 3 * block, seed=100 * player + block)
        if block:  # one image per stream
            inputs["visual_context"] = calls[0]["visual_context"]
        for step, t in enumerate(STEPS):
            noise = make_inputs(model, 3, 3 * block, seed=1000 * player + 10 * block + step)["x"]
            calls.append(dict(inputs, x=noise, t=torch.full_like(inputs["t"], t),
                              current_start=3 * block * TOKENS_PER_FRAME))
    return calls


@torch.no_grad()
def _alone(model, calls, caches):
    """One player's outputs with nothing else using the model."""
    if caches is None:
        model.start_stream(latent_size=(8, 16))
    return [model(**call, **(caches or {})) for call in calls]


@torch.no_grad()
def _interleaved(model, calls_per_player, caches_per_player):
    """The players' blocks in turn (A's block, B's block, ...), each block's calls together."""
    outs = [[] for _ in calls_per_player]
    per_block = len(STEPS)
    for block in range(BLOCKS):
        for player, calls in enumerate(calls_per_player):
            caches = caches_per_player[player]
            if caches is None:
                model.use_stream(model.streams[player])
            for call in calls[block * per_block:(block + 1) * per_block]:
                outs[player].append(model(**call, **(caches or {})))
    return outs


@pytest.mark.parametrize("storage", ["owned", "upstream_dicts"])
def test_interleaved_players_equal_each_player_alone(storage):
    model = build_model(cls=OptimizedCausalWanModel)
    calls = [_player_calls(model, p) for p in range(PLAYERS)]
    if storage == "owned":
        expected = [_alone(model, c, None) for c in calls]
        for _ in range(PLAYERS):
            model.start_stream(latent_size=(8, 16), new=True)
        assert len(model.streams) == PLAYERS + 1  # the one used alone, then one per player
        model.end_stream(model.streams[0])
        caches = [None] * PLAYERS
    else:
        expected = [_alone(model, c, make_caches(model)) for c in calls]
        caches = [make_caches(model) for _ in range(PLAYERS)]
    got = _interleaved(model, calls, caches)
    for player in range(PLAYERS):
        assert all(torch.equal(g, e) for g, e in zip(got[player], expected[player])), player


def test_upstream_reference_alternates_dict_sets_the_same_way():
    """Upstream keeps each stream's position in its dicts; the optimized model in its tag of them:
    both serve alternating dict sets, with the same results."""
    reference = build_model()
    optimized = build_model(cls=OptimizedCausalWanModel)
    calls = [_player_calls(reference, p) for p in range(2)]
    expected = _interleaved(reference, calls, [make_caches(reference) for _ in range(2)])
    got = _interleaved(optimized, calls, [make_caches(optimized) for _ in range(2)])
    for g_player, e_player in zip(got, expected):
        assert max(((g - e).norm() / e.norm()).item() for g, e in zip(g_player, e_player)) < 1e-10


@torch.no_grad()
def test_dropped_dicts_take_their_ring_cache_with_them():
    model = build_model(cls=OptimizedCausalWanModel)
    caches = make_caches(model)
    model(**_player_calls(model, 0)[0], **caches)
    ring = weakref.ref(caches["kv_cache"][0][DICT_TAG])
    del caches
    gc.collect()
    assert ring() is None


def test_use_stream_refuses_a_foreign_or_ended_stream():
    model, other = build_model(cls=OptimizedCausalWanModel), build_model(cls=OptimizedCausalWanModel)
    stream = model.start_stream(latent_size=(8, 16), new=True)
    with pytest.raises(ValueError, match="not a stream of this model"):
        model.use_stream(other.start_stream(latent_size=(8, 16)))
    model.end_stream(stream)
    with pytest.raises(ValueError, match="not a stream of this model"):
        model.use_stream(stream)


# ------------------------------------------------------------------ the decoder
def _decoder_streams(decoder, latents_per_player, interleave: bool):
    caches = [[None] * 32 for _ in latents_per_player]
    outs = [[] for _ in latents_per_player]
    order = ([(b, p) for b in range(BLOCKS) for p in range(len(latents_per_player))] if interleave
             else [(b, p) for p in range(len(latents_per_player)) for b in range(BLOCKS)])
    with torch.no_grad():
        for block, player in order:
            out, caches[player] = decoder(latents_per_player[player][:, 3 * block:3 * block + 3],
                                          *caches[player])
            outs[player].append(out)
    return [torch.cat(o, dim=1) for o in outs]


def test_decoder_streams_interleaved_equal_each_alone():
    weights = randomize_decoder_weights_(VAEDecoderWrapper().double()).state_dict()
    decoder = OptimizedVAEDecoderWrapper().double().eval()
    decoder.load_state_dict(weights)
    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 3 * BLOCKS, 16, 2, 3, generator=gen, dtype=torch.float64)
               for _ in range(PLAYERS)]
    alone = _decoder_streams(decoder, latents, interleave=False)
    together = _decoder_streams(decoder, latents, interleave=True)
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    reference = VAEDecoderWrapper().double().eval()
    reference.load_state_dict(weights)
    expected = _decoder_streams(reference, latents, interleave=True)
    assert all(((a - e).norm() / e.norm()).item() < 1e-10 for a, e in zip(together, expected))


@requires_cuda
@torch.no_grad()
def test_per_stream_graphs_replay_eager_results_and_stop_capturing():
    """Three players' dict sets alternating through one graphed model on the GPU: the same outputs
    as the eager model, and after each player's first blocks (every phase seen) no capture."""
    eager = build_model(cls=OptimizedCausalWanModel, device="cuda", dtype=torch.bfloat16,
                        cuda_graphs=False)
    graphed = build_model(cls=OptimizedCausalWanModel, device="cuda", dtype=torch.bfloat16,
                          cuda_graphs=True)
    calls = [_player_calls(eager, p) for p in range(PLAYERS)]
    expected = _interleaved(eager, calls, [make_caches(eager) for _ in range(PLAYERS)])
    caches = [make_caches(graphed) for _ in range(PLAYERS)]
    got = _interleaved(graphed, calls, caches)
    for player in range(PLAYERS):
        assert all(torch.equal(g, e) for g, e in zip(got[player], expected[player]))
    captured = graphed._runtime.graphs.captures
    # the same players go on (later blocks: the phase with a full window, captured already)
    more = [[dict(call, current_start=call["current_start"] + 3 * BLOCKS * TOKENS_PER_FRAME)
             for call in player_calls] for player_calls in calls]
    for block in range(BLOCKS):
        for player in range(PLAYERS):
            for call in more[player][block * len(STEPS):(block + 1) * len(STEPS)]:
                graphed(**_shifted_actions(call, 3 * BLOCKS), **caches[player])
    assert graphed._runtime.graphs.captures == captured


def _shifted_actions(call, frames: int):
    """The call moved `frames` latent frames later: action histories extended to match."""
    out = dict(call)
    for name in ("mouse_cond", "keyboard_cond"):
        if out[name] is not None:
            steps = out[name].shape[1] + 4 * frames
            out[name] = out[name][:, -1:].expand(-1, steps, -1).contiguous()
    return out


@requires_cuda
@torch.no_grad()
def test_a_new_video_after_the_last_one_was_dropped_captures_into_a_new_pool():
    """Upstream's pipeline drops a video's dicts before the next: their graphs go, and with them
    the last user of the memory pool; the next video's capture must not reuse the freed pool."""
    model = build_model(cls=OptimizedCausalWanModel, device="cuda", dtype=torch.bfloat16,
                        cuda_graphs=True)
    calls = _player_calls(model, 0)
    expected = None
    for _ in range(2):
        caches = make_caches(model)
        got = [model(**call, **caches) for call in calls[:len(STEPS)]]
        expected = expected or got
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
        del caches
        gc.collect()
        assert len(model._runtime.graphs) == 0 and model._runtime.graphs.pool is None
