"""The optimized decoder's start-up (issue 35) and its cache semantics (issue 32), on a CPU.

Graphs and cuDNN's search are CUDA's; here the decoder is told to treat the CPU as a device for
both (its `_graph_device_types` / `_conv_search_device_types` seams) with a stand-in GraphRunner
whose "graph" replays the captured function eagerly, so the counters move exactly as on a GPU:

* `compile()` warms up both phases at `startup_shape` (the steady block's conv search, then the
  graphs of a later block and of a stream's first block); a stream's blocks then capture and
  search nothing; without compile() the first call does it all, the second none;
* after `.to()` (upstream's `pipeline.to(...)` after compile()) the first call captures again but
  searches nothing (torch keeps this process's plans); other shapes are warmed up at their first
  call, counted;
* a cache edited in place by the caller, or one returned two calls ago, decodes as the reference
  decoder does with the same cache (graphs or not).

The checkout test (MATRIX_GAME_DIR; skipped without it): upstream's own CausalInferencePipeline
with the integrated DiT and decoder, compile() called first as upstream's scripts do: the first
steady block of each video does no search and no capture, the decoder's nor the DiT's
(tests/checkout/run_pipeline.py --count-startup).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import build_decoder, rel_err
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.modules.vae_decoder import VAEDecoderWrapper
from wan.runtime import conv_search_cache
from wan.runtime.cuda_graphs import EagerGraphRunner

ROOT = Path(__file__).resolve().parents[2]
HW = (1, 2)  # latent h, w: the decoder is fully convolutional
TOL = 1e-5  # both decoders in float32 (rounding apart: ~1e-7)


@pytest.fixture(autouse=True)
def _fresh_process_plans():
    """Each test starts as a new process would: no conv problem run yet (torch's plans are the
    process's; conv_search_cache remembers which it ran)."""
    conv_search_cache._done.clear()
    yield
    conv_search_cache._done.clear()


def _decoder(tmp_path, graphs=True, search=True, dtype=torch.float32):
    decoder = build_decoder(OptimizedVAEDecoderWrapper, dtype)
    if graphs:
        decoder._graph_device_types = ("cuda", "cpu")
        decoder._graphs = EagerGraphRunner()
    if search:
        decoder._conv_search_device_types = ("cuda", "cpu")
    decoder.startup_shape = (1, 3, *HW)
    decoder.conv_search_cache = str(tmp_path / "conv_search.json")
    return decoder


def _latents(frames, hw=HW, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, 16, *hw, generator=gen, dtype=torch.float64).to(dtype)


def _delta(after, before):
    return {k: after[k] - before[k] for k in ("captures", "searches", "warm_ups")}


@torch.no_grad()
def _stream_with_counters(decoder, latents, blocks=3):
    """Decode `blocks` blocks of 3 frames; per block the counters' change and the frames."""
    cache, deltas, outs = [None] * 32, [], []
    for block in range(blocks):
        before = decoder.counters
        out, cache = decoder(latents[:, 3 * block:3 * block + 3], *cache)
        deltas.append(_delta(decoder.counters, before))
        outs.append(out)
    return deltas, torch.cat(outs, dim=1)


@torch.no_grad()
def _reference(latents, blocks=3):
    decoder, cache, outs = build_decoder(VAEDecoderWrapper, torch.float32), [None] * 32, []
    for block in range(blocks):
        out, cache = decoder(latents[:, 3 * block:3 * block + 3], *cache)
        outs.append(out)
    return torch.cat(outs, dim=1)


def test_compile_pays_search_and_both_phases_so_no_block_does(tmp_path):
    decoder = _decoder(tmp_path)
    assert decoder.counters == {"captures": 0, "searches": 0, "search_s": 0.0, "warm_ups": 0,
                                "history_copies": 0}
    assert decoder.compile(mode="max-autotune-no-cudagraphs") is None
    counters = decoder.counters
    # a later block's graph and the first block's two (its first frame alone, then the rest)
    assert counters["captures"] == 3 and counters["warm_ups"] == 1
    problems = decoder.conv_search_report["problems"]
    assert counters["searches"] == problems > 10  # every distinct conv of a steady block
    assert decoder.conv_search_report["cache"] == "missing"
    assert decoder.conv_search_report["cache_written"]
    latents = _latents(9)
    deltas, frames = _stream_with_counters(decoder, latents)
    assert deltas == [{"captures": 0, "searches": 0, "warm_ups": 0}] * 3
    assert rel_err(frames, _reference(latents)) <= TOL


def test_graphs_warmed_on_one_thread_replay_on_another_with_no_search(tmp_path):
    """A server warms up on one thread and plays on another (its GPU worker): the captured
    graphs replay the engines searched before their capture, so the worker's first blocks
    search nothing and capture nothing (torch's plans are per thread, graphs are not)."""
    import threading
    decoder = _decoder(tmp_path)
    decoder.compile()
    latents = _latents(9)
    result = {}

    def worker():
        result["deltas"], result["frames"] = _stream_with_counters(decoder, latents)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert result["deltas"] == [{"captures": 0, "searches": 0, "warm_ups": 0}] * 3
    assert rel_err(result["frames"], _reference(latents)) <= TOL


def test_without_compile_the_first_block_pays_and_the_second_nothing(tmp_path):
    decoder = _decoder(tmp_path)
    latents = _latents(6)
    deltas, frames = _stream_with_counters(decoder, latents, blocks=2)
    assert deltas[0]["captures"] == 3 and deltas[0]["searches"] > 10
    assert deltas[0]["warm_ups"] == 1
    assert deltas[1] == {"captures": 0, "searches": 0, "warm_ups": 0}
    assert rel_err(frames, _reference(latents, blocks=2)) <= TOL
    # a second video (new stream, same shapes) pays nothing at all
    again, _ = _stream_with_counters(decoder, _latents(6, seed=1), blocks=2)
    assert again == [{"captures": 0, "searches": 0, "warm_ups": 0}] * 2


def test_after_to_the_first_call_captures_again_but_searches_nothing(tmp_path):
    """Upstream's scripts compile(), then `pipeline.to(device, dtype)` moves the decoder (graphs
    dropped): its first block captures again; the searched plans are this process's still."""
    decoder = _decoder(tmp_path)
    decoder.compile()
    searched = decoder.counters["searches"]
    decoder.to(torch.float32)
    deltas, _ = _stream_with_counters(decoder, _latents(6), blocks=2)
    assert deltas[0] == {"captures": 3, "searches": 0, "warm_ups": 1}
    assert deltas[1] == {"captures": 0, "searches": 0, "warm_ups": 0}
    assert decoder.counters["searches"] == searched


def test_other_shapes_are_warmed_up_at_their_first_call_and_counted(tmp_path):
    decoder = _decoder(tmp_path)
    decoder.compile()
    deltas, _ = _stream_with_counters(decoder, _latents(6, hw=(2, 2)), blocks=2)
    assert deltas[0]["captures"] == 3 and deltas[0]["searches"] > 0
    assert deltas[1] == {"captures": 0, "searches": 0, "warm_ups": 0}


def test_on_a_cpu_compile_and_the_first_call_do_nothing_extra(tmp_path):
    """Without graphs or a search (a CPU as it is), compile() warms nothing up."""
    decoder = _decoder(tmp_path, graphs=False, search=False)
    decoder.compile()
    deltas, frames = _stream_with_counters(decoder, _latents(6), blocks=2)
    assert decoder.counters["warm_ups"] == 0 and decoder.counters["captures"] == 0
    assert deltas == [{"captures": 0, "searches": 0, "warm_ups": 0}] * 2
    assert not (tmp_path / "conv_search.json").exists()
    assert rel_err(frames, _reference(_latents(6), blocks=2)) <= TOL


# ------------------------------------------------------------------ issue 32: the caller's cache
@torch.no_grad()
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("edit", ["first", "middle_and_last"])
def test_an_in_place_edit_of_the_returned_cache_is_decoded(tmp_path, graphs, edit):
    decoder = _decoder(tmp_path, graphs=graphs, search=False)
    reference = build_decoder(VAEDecoderWrapper, torch.float32)
    latents = _latents(6)
    _, cache = decoder(latents[:, :3], *[None] * 32)
    _, ref_cache = reference(latents[:, :3], *[None] * 32)
    entries = {"first": [0], "middle_and_last": [7, 20, 31]}[edit]
    for i in entries:
        for tensors in (cache, ref_cache):
            if tensors[i].numel():
                tensors[i].mul_(0.5).add_(0.25)  # in place: the same tensor objects
    copies = decoder.counters["history_copies"]
    out, _ = decoder(latents[:, 3:], *cache)
    expected, _ = reference(latents[:, 3:], *ref_cache)
    assert decoder.counters["history_copies"] == copies + 1  # the edit was copied in
    assert rel_err(out, expected) <= TOL
    # an unedited cache passed back is not copied again (the fast path stays)
    _, again = decoder(latents[:, 3:], *cache)
    copies = decoder.counters["history_copies"]
    decoder(latents[:, :3], *again)
    assert decoder.counters["history_copies"] == copies


@torch.no_grad()
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_a_cache_returned_two_calls_ago_decodes_as_the_reference(tmp_path, graphs):
    """The re-make of a block passes the decoder's history of two calls ago again."""
    decoder = _decoder(tmp_path, graphs=graphs, search=False)
    reference = build_decoder(VAEDecoderWrapper, torch.float32)
    latents = _latents(12)
    caches, ref_caches = [[None] * 32], [[None] * 32]
    for block in range(3):
        z = latents[:, 3 * block:3 * block + 3]
        caches.append(decoder(z, *caches[-1])[1])
        ref_caches.append(reference(z, *ref_caches[-1])[1])
    # after block 2, block 2 again from the cache of block 1 (returned two calls ago), with
    # other latents (a re-made block), then the stream goes on from it
    remade = latents[:, 9:12]
    out, cache = decoder(remade, *caches[2])
    expected, ref_cache = reference(remade, *ref_caches[2])
    assert rel_err(out, expected) <= TOL
    out, _ = decoder(latents[:, 6:9], *cache)
    expected, _ = reference(latents[:, 6:9], *ref_cache)
    assert rel_err(out, expected) <= TOL
    # the oldest one (after block 0) too, and the caches passed are left as they were
    before = [t.clone() for t in caches[1]]
    out, _ = decoder(latents[:, 3:6], *caches[1])
    expected, _ = reference(latents[:, 3:6], *ref_caches[1])
    assert rel_err(out, expected) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(before, caches[1]))


# ------------------------------------------------------------------ the integrated checkout
CHECKOUT = os.environ.get("MATRIX_GAME_DIR")


@pytest.mark.skipif(not CHECKOUT, reason="set MATRIX_GAME_DIR to a Matrix-Game-2 checkout")
@pytest.mark.parametrize("compile_first", [True, False], ids=["compile", "no_compile"])
def test_upstream_pipeline_first_steady_block_neither_searches_nor_captures(tmp_path,
                                                                           compile_first):
    source = Path(CHECKOUT).resolve()
    if (source / "Matrix-Game-2").is_dir():
        source = source / "Matrix-Game-2"
    checkout = tmp_path / "Matrix-Game-2"
    shutil.copytree(source, checkout, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.mp4", "*.pdf", "*.safetensors", "*.pth"))
    result = subprocess.run([sys.executable, "-m", "wan.integrate", str(checkout)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "pipeline.json"
    flags = ["--compile"] if compile_first else []
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "checkout" / "run_pipeline.py"), "--out", str(out),
         "--blocks", "3", "--videos", "2", "--decoder", "integrated", "--decoder-dtype", "fp32",
         "--decode-crop", "8x16", "--count-startup", "--conv-search-cache",
         str(tmp_path / "conv_search.json"), *flags],
        cwd=checkout, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    startup = report["optimized"]["decoder_startup"]
    per_video = startup["per_block"]
    assert len(per_video) == 2 and all(len(blocks) == 3 for blocks in per_video)
    if compile_first:  # compile() searched and captured; the scripts' .to() dropped the graphs
        assert startup["at_compile"]["searches"] > 10
        assert startup["at_compile"]["captures"] == 3
        assert per_video[0][0]["searches"] == 0 and per_video[0][0]["captures"] == 3
    else:
        assert per_video[0][0]["searches"] > 10 and per_video[0][0]["captures"] == 3
    for video in per_video:
        # the DiT: every graph of the video's new cache dicts in its first block (its first
        # call's warm-up: the image context, the window filling and full), none later
        assert video[0]["dit_captures"] >= 3, per_video
        for block in video[1:]:  # the first steady block and every later one
            assert block["searches"] == block["captures"] == block["dit_captures"] == 0, per_video
    assert {k: per_video[1][0][k] for k in ("captures", "searches", "warm_ups")} == \
        {"captures": 0, "searches": 0, "warm_ups": 0}
    assert max(report["frames_optimized_vs_upstream_rel_err"]) <= 1e-4
