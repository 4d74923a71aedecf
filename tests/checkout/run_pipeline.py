"""Upstream's own CausalInferencePipeline, run with upstream's CausalWanModel and with the
OptimizedCausalWanModel that `python -m wan.integrate` put into the same checkout.

Run it with the integrated Matrix-Game-2 folder as the working directory (its `wan` package, not
this repository's, is the one imported):

    cd PATH/TO/Matrix-Game-2
    python /path/to/wan/tests/checkout/run_pipeline.py --out result.json [--device cuda --dtype bf16
        --config universal --blocks 10 --decoder integrated]

`--decoder integrated`: upstream's run decodes with upstream's VAEDecoderWrapper
(demo_utils/vae_block3.py), the optimized run with the OptimizedVAEDecoderWrapper that the
integrated scripts import under that name; same random weights, `--decoder-dtype` (fp16 as the
pipeline runs it; fp32 for the frames comparison: the pipeline hands the decoder `latents.half()`,
which the harness casts to the decoder's dtype for both). `--decode-crop 8x16` decodes only the
top-left 8 x 16 of each block's latents, in both runs (what a CPU can decode in float32; upstream's
DiT itself asserts 44 x 80).

Both generators are built the way upstream builds them (`WanDiffusionWrapper(model_config=...)`):
the integrated one must come out as OptimizedCausalWanModel, the other is built with the name
`CausalWanModel` in utils/wan_wrapper.py pointed back at upstream's class. Same random weights,
same noise, two videos through one pipeline each (so the pipeline's caches are made twice).
`--oracle` adds a float32 run of upstream's model with exact attention (upstream's attention casts
to bf16 even in float32), and reports each model's latents' error against it. Writes JSON.

`--compile`: the integrated decoder's start-up as upstream's scripts make it: `compile(mode=
"max-autotune-no-cudagraphs")` after the load and move (the optimized decoder warms up there: its
conv search and graphs), then the move again that `pipeline.to(device, dtype)` makes (which drops
the graphs: the first block captures again). `--count-startup` records the optimized decoder's
counters (captures, conv searches, warm-ups) at compile() and per block, and the optimized DiT's
graphs captured per block (`dit_captures`); on a CPU it also lets the decoder and the DiT treat
the CPU as a device for graphs (a stand-in that replays eagerly) and the decoder for the conv
search, so the counters move as on a GPU. `--conv-search-cache PATH` names the search cache file.
Every block's time is kept (`block_ms`, per video: from one block's decode to the next's).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())                      # the checkout's packages
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the stand-ins
import standins  # noqa: E402

standins.install()

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import utils.wan_wrapper as wan_wrapper  # noqa: E402
from pipeline import CausalInferencePipeline  # noqa: E402
from wan.modules.causal_model import CausalWanModel as UpstreamCausalWanModel  # noqa: E402
from wan.modules.shared.conditioning import history_steps  # noqa: E402
from wan.runtime.cuda_graphs import EagerGraphRunner  # noqa: E402
from wan.runtime.options import cuda_graphs_on  # noqa: E402
from wan.kernels.dtypes import DTYPES  # noqa: E402
from wan.modules.random_init import randomize_weights_  # noqa: E402

LATENT = (44, 80)
# what upstream's pipeline hard-codes (12 x 128 self-attention heads, 16 x 64 action heads, 30
# cache entries) at a size a CPU runs: 2 layers, a narrow FFN
SMALL = {"num_layers": 2, "ffn_dim": 256}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--config", default="small", choices=["small", "universal"])
    p.add_argument("--blocks", type=int, default=6, help="blocks of 3 latent frames per video")
    p.add_argument("--videos", type=int, default=2)
    p.add_argument("--decoder", default="none", choices=["none", "upstream", "integrated"],
                   help="none: a stand-in that returns the latents (for the latent comparison); "
                        "upstream: demo_utils' VAEDecoderWrapper in both runs; integrated: "
                        "upstream's in upstream's run, OptimizedVAEDecoderWrapper in the other")
    p.add_argument("--decoder-dtype", default="fp16", choices=list(DTYPES))
    p.add_argument("--upstream-dit-only", action="store_true",
                   help="both runs with upstream's DiT (so only the decoders differ)")
    p.add_argument("--decode-crop", default=None, help="HxW: decode only that much of the latents")
    p.add_argument("--graphs", default="default", choices=["default", "on", "off"],
                   help="the optimized model's config.json cuda_graphs: absent (default: on "
                        "wherever it runs on CUDA), true or false")
    p.add_argument("--oracle", action="store_true", help="also a float32 exact-attention run")
    p.add_argument("--compile", action="store_true",
                   help="call the integrated decoder's compile() at start-up, as upstream's "
                        "scripts do (then move it again, as their pipeline.to does)")
    p.add_argument("--count-startup", action="store_true",
                   help="record the integrated decoder's counters at compile() and per block "
                        "(on a CPU with stand-ins for graphs and the conv search)")
    p.add_argument("--conv-search-cache", default=None,
                   help="the integrated decoder's conv search cache file (default: its own)")
    p.add_argument("--out", required=True)
    return p.parse_args()


def model_config_dirs(name: str, workdir: Path, graphs: bool):
    """(config folder for upstream's model, config folder for the optimized one): the optimized
    model's `cuda_graphs` comes from its config.json, as a Matrix-Game-2 user would set it."""
    config = json.loads(Path("configs/distilled_model/universal/config.json").read_text())
    if name == "small":
        config.update(SMALL)
        config["action_config"]["blocks"] = list(range(SMALL["num_layers"]))
    folders = []
    given = {} if graphs == "default" else {"cuda_graphs": graphs == "on"}
    for label, extra in (("upstream", {}), ("optimized", given)):
        (workdir / label).mkdir()
        (workdir / label / "config.json").write_text(json.dumps({**config, **extra}))
        folders.append(str(workdir / label))
    return folders


def build_generator(model_class, config_dir, weights, device, dtype):
    """A WanDiffusionWrapper as upstream builds it (on `device`), with `CausalWanModel` in
    utils/wan_wrapper.py bound to `model_class` for the time of the construction (None: the
    checkout's own binding)."""
    bound = wan_wrapper.CausalWanModel
    if model_class is not None:
        wan_wrapper.CausalWanModel = model_class
    try:
        with torch.device(device):
            generator = wan_wrapper.WanDiffusionWrapper(model_config=config_dir,
                                                        timestep_shift=5.0, is_causal=True)
    finally:
        wan_wrapper.CausalWanModel = bound
    generator.model.load_state_dict(weights)
    return generator.to(device=device, dtype=dtype)


def decoder_weights():
    """Random weights for upstream's decoder (seeded: both decoders get the same)."""
    from demo_utils.vae_block3 import VAEDecoderWrapper
    from wan.modules.random_init import randomize_decoder_weights_
    torch.manual_seed(0)
    return randomize_decoder_weights_(VAEDecoderWrapper()).state_dict()


class Decoders:
    """The pipeline's `vae_decoder`: upstream's VAEDecoderWrapper, the integrated
    OptimizedVAEDecoderWrapper, or a stand-in returning the latents; keeps the frames and records
    a CUDA event after each block's decode (the end of a block)."""

    def __init__(self, kind, device, dtype=torch.float16, weights=None, crop=None, args=None):
        self.device, self.dtype = device, dtype
        self.crop = tuple(int(n) for n in crop.split("x")) if crop else None
        self.decoder = None
        self.startup = None  # the integrated decoder's start-up: counters at compile(), per block
        if kind in ("upstream", "integrated"):
            if kind == "upstream":
                from demo_utils.vae_block3 import VAEDecoderWrapper
            else:  # the class the integrated scripts import under upstream's name
                from wan.modules.optimized_vae_decoder import \
                    OptimizedVAEDecoderWrapper as VAEDecoderWrapper
            decoder = VAEDecoderWrapper()
            decoder.load_state_dict(weights)  # as the scripts do: load, move, freeze, eval
            decoder.to(device, dtype)
            decoder.requires_grad_(False)
            decoder.eval()
            self.decoder = decoder
            if kind == "integrated" and args is not None:
                self._integrated_startup(args)
        self.block_ends, self.frames, self.video_start = [], [], None
        self.decodes = []  # (start, end) marks of each block's decoder call
        self.dit_calls = [[]]  # per block: (start, end) marks of the DiT's calls (count_dit)
        self.dit = None  # the optimized DiT, whose captures per block --count-startup records
        self._dit_captures = 0

    def count_dit(self, model):
        """Record `model`'s (the optimized DiT's) graphs captured per block too; on a CPU give it
        the stand-ins for graphs first."""
        if self.device.type == "cpu":
            model._runtime.graph_device_types = ("cuda", "cpu")
            model._runtime.graphs = EagerGraphRunner()
        self.dit = model
        # each call's marks (CUDA events on a GPU): the DiT's own time per block, apart from the
        # decoder's and from the gaps where the GPU waits for the host
        # (top-level calls only: the first call's warm-up calls the model from inside its call)
        depth = [0]

        def before(*_):
            depth[0] += 1
            if depth[0] == 1:
                self.dit_calls[-1].append([self._mark()])

        def after(*_):
            depth[0] -= 1
            if depth[0] == 0:
                self.dit_calls[-1][-1].append(self._mark())

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)

    def _integrated_startup(self, args):
        """--conv-search-cache, --count-startup, --compile for the integrated decoder."""
        decoder = self.decoder
        if args.conv_search_cache:
            decoder.conv_search_cache = args.conv_search_cache
        if self.crop:  # what the stream decodes: compile() warms up at that shape
            decoder.startup_shape = (1, 3, *self.crop)
        if args.count_startup and self.device.type == "cpu":
            install_cpu_startup_standins(decoder)
        self.startup = {"per_block": [], "at_compile": None, "compile_s": None}
        if args.compile:
            before = decoder.counters
            begin = time.perf_counter()
            decoder.compile(mode="max-autotune-no-cudagraphs")
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.startup["compile_s"] = time.perf_counter() - begin
            self.startup["at_compile"] = counter_delta(decoder.counters, before)
            # upstream's scripts then move the pipeline (the decoder with it) and the decoder
            decoder.to(self.device, self.dtype)
        self.startup["conv_search_report"] = decoder.conv_search_report

    def new_video(self):
        """A video starts now: its first block's time counts from here."""
        self.block_ends.clear()
        self.decodes.clear()
        self.dit_calls = [[]]
        self.frames.clear()
        self.video_start = self._mark()
        if self.startup is not None:
            self.startup["per_block"].append([])
        if self.dit is not None:
            self._dit_captures = self.dit.counters["captures"]

    @torch.no_grad()
    def __call__(self, z, *cache):
        if self.decoder is None:
            video, cache = z.float(), list(cache)
        else:  # the pipeline passes z.half(): in the decoder's dtype (the same for both runs)
            if self.crop:
                z = z[..., :self.crop[0], :self.crop[1]]
            before = self.decoder.counters if self.startup is not None else None
            begin = self._mark()
            video, cache = self.decoder(z.to(self.dtype), *cache)
            self.decodes.append((begin, self._mark()))
            self.dit_calls.append([])
            if before is not None:
                counts = counter_delta(self.decoder.counters, before)
                if self.dit is not None:  # the DiT's since the last block's decode
                    now = self.dit.counters["captures"]
                    counts["dit_captures"], self._dit_captures = now - self._dit_captures, now
                self.startup["per_block"][-1].append(counts)
            self.frames.append(video.cpu())
        self.block_ends.append(self._mark())
        return video, cache

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _ms(self, a, b):
        return a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3

    def block_ms(self):
        """Milliseconds between consecutive block ends (block 1 on)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return [self._ms(a, b) for a, b in zip(self.block_ends, self.block_ends[1:])]

    def decode_ms(self):
        """Milliseconds of each block's decoder call (the rest of a block is the DiT's and the
        pipeline's)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return [self._ms(a, b) for a, b in self.decodes]

    def dit_ms(self):
        """Milliseconds of the DiT's calls in each block (summed; `count_dit` only)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        blocks = self.dit_calls[:len(self.decodes)]  # (the calls after the last decode: none)
        return [sum(self._ms(a, b) for a, b in calls) for calls in blocks]

    def first_block_ms(self):
        """Milliseconds from the video's start (the pipeline's inference call) to its first
        block's end."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return self._ms(self.video_start, self.block_ends[0]) if self.block_ends else None


def counter_delta(after, before):
    return {k: after[k] - before[k] for k in ("captures", "searches", "warm_ups")}


def install_cpu_startup_standins(decoder):
    """On a CPU, let the optimized decoder capture "graphs" (a GraphRunner whose capture keeps the
    function and whose replay runs it eagerly) and run its conv search pass, so that its counters
    move as on a GPU (the seams `_graph_device_types` / `_conv_search_device_types`)."""
    decoder._graph_device_types = ("cuda", "cpu")
    decoder._conv_search_device_types = ("cuda", "cpu")
    decoder._graphs = EagerGraphRunner()


def conditions(frames, device, dtype, seed, latent=LATENT):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    steps = history_steps(frames - 1)
    return {"cond_concat": randn(1, 20, frames, *latent), "visual_context": randn(1, 257, 1280),
            "mouse_cond": 0.1 * randn(1, steps, 2),
            "keyboard_cond": (randn(1, steps, 4) > 0).to(dtype)}


def run_videos(generator, args, device, dtype, decoder_kind, decoder_dtype=None, weights=None):
    config = OmegaConf.load("configs/inference_yaml/inference_universal.yaml")
    decoders = Decoders(decoder_kind, device, decoder_dtype or DTYPES[args.decoder_dtype], weights,
                        args.decode_crop, args)
    if args.count_startup and decoders.startup is not None and hasattr(generator.model,
                                                                       "counters"):
        decoders.count_dit(generator.model)
    pipe = CausalInferencePipeline(config, device=str(device), generator=generator,
                                   vae_decoder=decoders)
    latent = LATENT
    frames = 3 * args.blocks
    latents, block_ms, video_ms, videos, first_ms, decode_ms, dit_ms = [], [], [], [], [], [], []
    for video in range(args.videos):
        torch.manual_seed(100 + video)  # the pipeline's re-noising draws from the global generator
        noise = torch.randn(1, 16, frames, *latent, generator=torch.Generator().manual_seed(video))
        decoders.new_video()
        begin = time.perf_counter()
        with torch.no_grad():
            out = pipe.inference(noise.to(device, dtype),
                                 conditions(frames, device, dtype, seed=10 + video, latent=latent),
                                 return_latents=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        video_ms.append((time.perf_counter() - begin) * 1e3)
        latents.append(out.float().cpu())
        block_ms.append(decoders.block_ms())
        first_ms.append(decoders.first_block_ms())
        decode_ms.append(decoders.decode_ms())
        if decoders.dit is not None:
            dit_ms.append(decoders.dit_ms())
        if decoders.frames:
            videos.append(torch.cat(decoders.frames, dim=1))
    decoder_class = type(decoders.decoder).__name__ if decoders.decoder is not None else None
    graphs = getattr(decoders.decoder, "cuda_graphs", None)
    return (latents, block_ms, video_ms, videos, decoder_class, graphs, decoders.startup,
            first_ms, decode_ms, dit_ms)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    args = parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    upstream_config, optimized_config = model_config_dirs(args.config, Path(tempfile.mkdtemp()),
                                                          args.graphs)
    with torch.device(device):
        seed_model = UpstreamCausalWanModel.from_config(upstream_config)
    randomize_weights_(seed_model, seed=0)
    weights = seed_model.state_dict()
    del seed_model

    weights_vae = decoder_weights() if args.decoder != "none" else None
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": " ".join(sys.argv), "checkout": os.getcwd(), "config": args.config,
              "dtype": args.dtype, "blocks": args.blocks, "videos": args.videos,
              "decoder": args.decoder, "decoder_dtype": args.decoder_dtype,
              "decode_crop": args.decode_crop, "graphs_option": args.graphs}
    runs = {}
    second = UpstreamCausalWanModel if args.upstream_dit_only else None
    for name, model_class, config_dir in (("upstream", UpstreamCausalWanModel, upstream_config),
                                          ("optimized", second, optimized_config)):
        print(f"{name} run: building", flush=True)
        generator = build_generator(model_class, config_dir, weights, device, dtype)
        built = type(generator.model).__name__
        if name == "optimized" and second is None and built != "OptimizedCausalWanModel":
            raise SystemExit(f"utils/wan_wrapper.py builds {built}: is the checkout integrated "
                             f"(python -m wan.integrate)?")
        kind = "integrated" if args.decoder == "integrated" and name == "optimized" else (
            "upstream" if args.decoder != "none" else "none")
        (latents, block_ms, video_ms, videos, decoder_class, decoder_graphs, startup, first_ms,
         decode_ms, dit_ms) = run_videos(generator, args, device, dtype, kind, weights=weights_vae)
        steady = [ms for video in block_ms for ms in video[2:]]  # blocks 0-1: windows filling
        print(f"{name} run: every block's ms {[[f, *rest] for f, rest in zip(first_ms, block_ms)]}",
              flush=True)
        runs[name] = {"model_class": built, "latents": latents, "videos": videos,
                      "decoder_startup": startup,
                      "decoder_class": decoder_class,
                      "decoder_cuda_graphs": None if decoder_graphs is None else
                      cuda_graphs_on(decoder_graphs, device),
                      "cuda_graphs": cuda_graphs_on(getattr(generator.model, "cuda_graphs", False),
                                                    device),
                      "block_ms_median": statistics.median(steady) if steady else None,
                      "block_ms": block_ms, "first_block_ms": first_ms,
                      # every block of each video: the first, then the rest
                      "every_block_ms": [[f, *rest] for f, rest in zip(first_ms, block_ms)],
                      # each block's decoder call, every block of each video
                      "decode_ms": decode_ms,
                      # the optimized DiT's calls per block, summed (--count-startup)
                      "dit_ms": dit_ms,
                      "video_ms": video_ms}
        del generator
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.oracle:
        print("float32 oracle run: building", flush=True)
        generator = build_generator(UpstreamCausalWanModel, upstream_config, weights, device,
                                    torch.float32)
        with standins.upstream_attention_exact():
            kind = "upstream" if args.decoder != "none" else "none"
            out = run_videos(generator, args, device, torch.float32, kind, torch.float32,
                             weights_vae)
            runs["oracle"] = {"latents": out[0], "videos": out[3]}

    up, opt = runs["upstream"]["latents"], runs["optimized"]["latents"]
    report["optimized_vs_upstream_rel_err"] = [rel_err(o, u) for o, u in zip(opt, up)]
    if args.oracle:
        oracle = runs["oracle"]["latents"]
        report["upstream_vs_oracle_rel_err"] = [rel_err(u, o) for u, o in zip(up, oracle)]
        report["optimized_vs_oracle_rel_err"] = [rel_err(p, o) for p, o in zip(opt, oracle)]
    if runs["upstream"]["videos"]:
        up, opt = runs["upstream"]["videos"], runs["optimized"]["videos"]
        report["frames_optimized_vs_upstream_rel_err"] = [rel_err(o, u) for o, u in zip(opt, up)]
        if args.oracle:
            oracle = runs["oracle"]["videos"]
            report["frames_upstream_vs_oracle_rel_err"] = [rel_err(u, o) for u, o in zip(up, oracle)]
            report["frames_optimized_vs_oracle_rel_err"] = [rel_err(p, o)
                                                            for p, o in zip(opt, oracle)]
    for name in ("upstream", "optimized"):
        run = runs[name]
        report[name] = {k: v for k, v in run.items() if k not in ("latents", "videos")}
    if runs["optimized"]["block_ms_median"] and runs["upstream"]["block_ms_median"]:
        report["speedup"] = runs["upstream"]["block_ms_median"] / runs["optimized"]["block_ms_median"]
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, dict)}, indent=1))
    for name in ("upstream", "optimized"):
        print(f"{name:>9}: {report[name]['model_class']}, per block (steady, median) "
              f"{report[name]['block_ms_median']} ms, per video {report[name]['video_ms']}")


if __name__ == "__main__":
    main()
