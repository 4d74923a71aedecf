"""Shared test helpers: models and decoders with random weights, random inputs, fresh caches,
error metrics (whole-tensor relative norm, elementwise atol + rtol)."""
import functools

import pytest
import torch

from wan import CausalWanModel
from wan.modules.rolling_cache import new_stream_caches
from wan.modules.vae_decoder import VAEDecoderWrapper
from wan.modules.presets import LATENT_SIZE, model_config, tokens_per_frame
from wan.modules.random_init import random_inputs, randomize_decoder_weights_, randomize_weights_

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run on the device)")



def build_model(preset="tiny", dtype=torch.float64, device="cpu", seed=0, cls=CausalWanModel,
                config=None, **overrides):
    """A model with realistic random weights, frames-per-block 3 as the pipeline sets it."""
    with torch.device(device):
        model = cls.from_config(config or model_config(preset), **overrides)
    randomize_weights_(model, seed)
    model.num_frame_per_block = 3
    return model.to(dtype=dtype).eval()


def graphed_and_eager_streams(dtype=torch.bfloat16):
    """Two optimized tiny models with the same weights on CUDA, one replaying CUDA graphs and one
    eager, each with an owned stream started (the GPU tests' graphs-equal-eager pair)."""
    from wan.modules.optimized_causal_model import OptimizedCausalWanModel
    pair = [build_model(cls=OptimizedCausalWanModel, dtype=dtype, device="cuda", cuda_graphs=on)
            for on in (True, False)]
    for model in pair:
        model.start_stream(latent_size=LATENT_SIZE["tiny"])
    return pair


def make_inputs(model, frames=3, start_frame=0, batch=1, preset="tiny", seed=1):
    """Random inputs for a call covering frames [start_frame, start_frame + frames)."""
    return random_inputs(model, LATENT_SIZE[preset], frames, start_frame, batch, seed)


def make_caches(model, batch=1, cache_frames=6, preset="tiny"):
    return new_stream_caches(model, batch, cache_frames, tokens_per_frame(preset))


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


# elementwise tolerances (atol, rtol) per dtype of the tensor under test: 8 units in the last
# place for the half types (a few roundings of an O(1) output, with room), looser than float32's
# rounding for sums over thousands of channels; float64 results must be essentially exact
ELEMENTWISE_TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
                         torch.float16: (8e-3, 8e-3), torch.bfloat16: (6.25e-2, 6.25e-2)}


def assert_close_elementwise(got, expected, dtype=None, atol=None, rtol=None, twin=None,
                             what="output"):
    """Every element: |got - expected| <= atol + rtol * |expected| (defaults: got's dtype in
    ELEMENTWISE_TOLERANCE). With `twin` (the eager twin's result for the same inputs) atol grows to
    twice the twin's worst excess over rtol * |expected|: the kernel may be as wrong as 2x the
    twin, no worse. A whole-tensor norm lets one bad row of thousands pass; this does not. On
    failure: how many elements fail, the worst one's index and both values."""
    assert got.shape == expected.shape, (what, tuple(got.shape), tuple(expected.shape))
    default_atol, default_rtol = ELEMENTWISE_TOLERANCE[dtype or got.dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    g, e = got.detach().double(), expected.detach().double()
    if twin is not None:
        twin_excess = (twin.detach().double() - e).abs() - rtol * e.abs()
        atol = max(atol, 2 * twin_excess.max().item())
    diff = torch.where(torch.isnan(g) != torch.isnan(e), torch.full_like(g, float("inf")),
                       (g - e).abs().nan_to_num(0.0))
    allowed = atol + rtol * e.abs()
    bad = diff > allowed
    if bad.any():
        flat = int((diff - allowed).argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), g.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {g.numel()} elements off by more than atol {atol:.3g} + "
            f"rtol {rtol:.3g} * |expected|; worst at index {index}: got {g[index].item():.6g}, "
            f"expected {e[index].item():.6g} (|diff| {diff[index].item():.3g}, allowed "
            f"{allowed[index].item():.3g})")


def run_stream(model, blocks, batch=1, preset="tiny", caches=None, steps=(1000.0, 500.0), seed=10,
               update_kwargs=None, after_block=None):
    """The pipeline's call pattern: per block of 3 frames, one call per denoising step (feeding
    0.5 * x + 0.5 * output on) and a cache update at t=0 (called with `update_kwargs`, e.g.
    {"cache_update_only": True}). caches: upstream dicts, or None for a model whose own stream
    was started. `after_block()` is called after each block's update. Returns every call's
    output (the update's too)."""
    frame_tokens = tokens_per_frame(preset)
    outputs = []
    for block in range(blocks):
        s = 3 * block
        inputs = make_inputs(model, 3, s, batch, preset, seed=seed + block)
        for t in (*steps, 0.0):
            inputs["t"] = torch.full_like(inputs["t"], t)
            extra = {} if t else (update_kwargs or {})
            out = model(**inputs, **(caches or {}), current_start=s * frame_tokens, **extra)
            outputs.append(out)
            if t:
                inputs["x"] = 0.5 * inputs["x"] + 0.5 * out
        if after_block is not None:
            after_block()
    return outputs


def max_rel_err(outputs, references) -> float:
    assert len(outputs) == len(references)
    return max(rel_err(o, r) for o, r in zip(outputs, references))


@functools.lru_cache(maxsize=None)
def decoder_weights():
    """One random state dict of the VAE decoder (float64), shared by every test's decoders."""
    return randomize_decoder_weights_(VAEDecoderWrapper().double()).state_dict()


def tiny_play_decoder(cls, device="cpu", dtype=torch.float32):
    """A decoder of class `cls` with the play server's tiny decoder inside (quick on a CPU), its
    weights random from seed 3."""
    from wan.modules.vae_decoder import VAEDecoder3d
    decoder = cls()
    decoder.decoder = VAEDecoder3d(dim=16)
    torch.manual_seed(3)
    randomize_decoder_weights_(decoder)
    return decoder.to(device, dtype).eval()


def play_batches(engine, count: int, seed=None, timeout_s: float = 300.0,
                 play_mode: str = "continuous") -> list:
    """Start `engine` (a play GameEngine) with one player (its noise seed `seed` when given),
    collect the frame batches it is sent until there are `count`, stop it; fails when the
    engine's worker failed or fewer came within `timeout_s`. An on-input player presses "w"
    once its previous block's frames came."""
    import time
    batches = []
    player = engine.add_player(play_mode, batches.append)
    if seed is not None:
        player.seed = seed
    engine.start()
    try:
        deadline = time.perf_counter() + timeout_s
        pressed = 0
        while len(batches) < count and time.perf_counter() < deadline and engine.failure is None:
            if play_mode == "on-input" and pressed == len(batches):
                pressed += 1
                player.input.tap("w", pressed, time.perf_counter())
                engine.press(player)
            time.sleep(0.05)
    finally:
        engine.stop()
    assert engine.failure is None and len(batches) >= count, (engine.failure, len(batches))
    return batches


def build_decoder(cls, dtype=torch.float64):
    """A decoder of class `cls` (VAEDecoderWrapper or the optimized one) with decoder_weights()."""
    decoder = cls().to(dtype)
    decoder.load_state_dict(decoder_weights())
    return decoder.eval()


class PlayServerThread:
    """The play server (wan.play) over `engine` (default: a new CPU tiny one) on a free loopback
    port: `with PlayServerThread(max_players=2) as s:` gives `s.http`, `s.ws`, `s.port`,
    `s.engine`, `s.server`."""

    def __init__(self, engine=None, token=None, play_mode="continuous", idle_timeout_s=600.0,
                 linger_s=0.0, **engine_config):
        from wan.play.engine import EngineConfig, GameEngine
        from wan.play.metrics import PlayMetrics
        from wan.play.server import PlayServer
        self.metrics = PlayMetrics()
        engine_config.setdefault("device", "cpu")
        self.engine = engine or GameEngine(EngineConfig(**engine_config))
        self.engine.metrics = self.metrics
        self.server = PlayServer(self.engine, self.metrics, token=token, play_mode=play_mode,
                                 idle_timeout_s=idle_timeout_s, linger_s=linger_s)

    def __enter__(self):
        from wan.play.server import ServerThread
        self.running = ServerThread(self.server).__enter__()
        self.http, self.ws, self.port = self.running.http, self.running.ws, self.running.port
        return self

    def __exit__(self, *exc):
        self.running.__exit__(*exc)


def same_nested(a, b, ignore_keys=()) -> bool:
    """Bitwise equality of nested lists/tuples/dicts of tensors and plain values (dict keys in
    `ignore_keys` aside, e.g. the optimized model's tag of the caller's cache dicts)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b)
    if isinstance(a, dict):
        keys = a.keys() - set(ignore_keys)
        return (isinstance(b, dict) and keys == b.keys() - set(ignore_keys)
                and all(same_nested(a[k], b[k], ignore_keys) for k in keys))
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(same_nested(x, y, ignore_keys) for x, y in zip(a, b)))
    return a == b


def wait_until(condition, timeout=30.0, what="condition", every=0.05):
    """Poll `condition()` until it is true; AssertionError naming `what` after `timeout` s."""
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
