"""Issue 35 on one device call: where the DiT's bf16 error comes from, and what the decoder's
start-up costs (with and without its conv search cache).

    python benchmarks/startup_and_error.py                     # GPU: universal, both parts
    python benchmarks/startup_and_error.py --parts trees --trees .bisect   # commit bisect
    python benchmarks/startup_and_error.py --preset tiny --device cpu      # CPU check

Part `error` (one process, this repository only: no diffusers/omegaconf). The reference
CausalWanModel in float32 (TF32 off, exact attention) is the oracle. Every model streams the same
video as upstream's pipeline does: per block of 3 latent frames, 3 denoising calls on the warped
flow-matching steps (t in float32), x0 = x - sigma * flow, re-noised with the same pre-drawn noise
(each model follows its own trajectory, as in the pipeline), then the t=0 cache update (a full
forward, as upstream's pipeline calls it); upstream-style cache dicts. Error = ||latents -
oracle|| / ||oracle|| over the whole video (and per block). `ratio` = a model's error / the
reference model's own in bf16 (upstream's math: the issue's "upstream bf16"). The optimized model
runs in bf16 with no option set (`default`), then with each numerics-relevant switch turned off
alone (the residual add inside the cross-attention's output GEMM, fused q/k/v, the GELU in the
GEMM's epilogue, the fused LayerNorm/residual kernels, the fused RMS norm + RoPE kernels, the
attention kernels, the action module's fused GELU, the t=0 update as `cache_update_only`, CUDA
graphs) and with all of them off; and a benchmark-only prototype of a fix (the cross-attention's
bias added ahead to the unrounded gated sum: `sum_bias_unrounded(prototype)`, against the same
op as it is, `gated_residual_ln=eager`). With `--frames` the frames too: the oracle's latents
decoded by the reference decoder in float32 against each run's own latents decoded in fp16
(the reference decoder for the reference model, the optimized decoder, with its defaults but
the conv search off (engine choice only), for the optimized one), and the decoders alone on
the oracle's latents.

Part `trees` (the commit bisect): the optimized model of older commits of this repository (each
a `wan/` folder under --trees, made here by `--export-trees COMMITS`, which runs `git archive`;
carry that folder to the device) streams the same video in a child process each, with their
defaults and graphs off; same error and ratio.

Part `startup` (the decoder, universal latent 44 x 80, fp16, each run in a fresh process of its
own, so torch holds no plan from an earlier one): process start to decoder ready (build, load,
`compile()`: its conv search and graphs), then every block of a stream (CUDA events: first,
second, steady), for: (1) a first start-up with no cache file (`search:all`, writes the entry);
(2) a second start-up reading that entry; (3) `calibrate_conv_search()` (heuristic, search:3,
search:10, search:all, each in a child) and (4) a start-up with the calibrated entry; (5) each
uniform strategy alone (heuristic = conv_search off, search:3, search:10) for its start-up cost
and its steady block. Upstream's scripts then move the decoder (`pipeline.to`), which drops the
graphs: the runs do it too (the first block captures again, searches nothing).

Writes $OUT/startup_and_error.json (or --out DIR) with the device, torch version, date and
command, and prints a short table last. Budget: --budget-s (default 470 s); parts not reached are
marked skipped. Self-checks (printed as CHECK lines, and in the JSON): graphs on/off give the same
latents; the optimized default's frames' and latents' ratios against 1.05; no search and no
capture in any steady block of the start-up runs; the second start-up read the cache.
"""
import argparse
import contextlib
import datetime
import inspect
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LATENT = {"universal": (44, 80), "tiny": (8, 16)}
NORM_OPS = ("layer_norm_modulate", "layer_norm", "gated_residual",
            "gated_residual_layer_norm_modulate", "gated_residual_layer_norm")
ATTENTION_OPS = ("self_attention", "cross_attention", "mouse_attention", "keyboard_attention")
# name: (constructor options, backend override {op: name}, forward kwargs of the t=0 update)
VARIANTS = {
    "default": ({}, {}, {}),
    "graphs_on": ({"cuda_graphs": True}, {}, {}),
    "residual_in_gemm=0": ({"residual_in_gemm": False}, {}, {}),
    "fused_qkv=0": ({"fused_qkv": False}, {}, {}),
    "gelu_epilogue=eager": ({}, {"linear_gelu": "eager"}, {}),
    "fused_norms=eager": ({}, {op: "eager" for op in NORM_OPS}, {}),
    "norm_rope=eager": ({}, {"norm_rope_store": "eager", "qkv_norm_rope_store": "eager"}, {}),
    "attention=eager": ({}, {op: "eager" for op in ATTENTION_OPS}, {}),
    "frame_bias_gelu=eager": ({}, {"frame_bias_gelu": "eager"}, {}),
    "cache_update_only": ({}, {}, {"cache_update_only": True}),
    "all_off": ({"residual_in_gemm": False, "fused_qkv": False}, "eager", {}),
    # the op that adds the cross-attention's bias ahead (residual_in_gemm), as it is (its eager
    # twin) and as a prototype that adds the bias to the unrounded gated sum (see PROTOTYPES)
    "gated_residual_ln=eager": ({}, {"gated_residual_layer_norm": "eager"}, {}),
    "sum_bias_unrounded(prototype)": ({}, {"gated_residual_layer_norm": "eager"}, {}),
}


def _gated_residual_layer_norm_unrounded(x, y, gate, weight, bias, eps, quantize=False,
                                         sum_bias=None):
    """The eager twin of gated_residual_layer_norm, except that with `sum_bias` the stream is
    round(x + y * gate + sum_bias) from the unrounded sum (one rounding, as without the bias),
    not round(round(x + y * gate) + sum_bias); the LayerNorm still of the rounded sum."""
    from wan.kernels import eager
    total = eager.gated_residual(x, y, gate)
    normed = eager._maybe_quantized(eager.layer_norm(total, weight, bias, eps), quantize)
    if sum_bias is None:
        return total, normed
    frames = gate.shape[1]
    exact = (x.float().unflatten(1, (frames, -1))
             + y.float().unflatten(1, (frames, -1)) * gate.float()).flatten(1, 2)
    return (exact + sum_bias.float()).to(x.dtype), normed


# benchmark-only prototypes: {variant: {eager op: replacement}} while that variant runs
PROTOTYPES = {"sum_bias_unrounded(prototype)": {
    "gated_residual_layer_norm": _gated_residual_layer_norm_unrounded}}
BISECT_COMMITS = ("6aff1f5", "c21fe54", "5b0b9a7", "795f5b9", "238bd44", "5e192da", "3d82027")
STRATEGY_RUNS = ("heuristic", "search:3", "search:10")


def log(message):
    print(message, file=sys.stderr, flush=True)


def header(args) -> dict:
    cuda = args.device == "cuda"
    return {"benchmark": "startup_and_error", "issue": 35,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": (torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                      else None),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
            "preset": args.preset, "blocks": args.blocks}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------- the stream (any tree)
def new_caches(model, tokens: int, frames: int, dtype, device) -> dict:
    """Zeroed upstream-style cache dicts (what upstream's pipeline allocates per video), written
    here so that an older tree's model gets the same ones."""
    heads, head_dim = model.num_heads, model.dim // model.num_heads

    def cache(rows, h, d, batch=1):
        return {"k": torch.zeros(batch, rows, h, d, dtype=dtype, device=device),
                "v": torch.zeros(batch, rows, h, d, dtype=dtype, device=device),
                "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                "local_end_index": torch.tensor([0], dtype=torch.long, device=device)}

    caches = {"kv_cache": [cache(frames * tokens, heads, head_dim) for _ in model.blocks],
              "crossattn_cache": [{"k": torch.zeros(1, 257, heads, head_dim, dtype=dtype,
                                                    device=device),
                                   "v": torch.zeros(1, 257, heads, head_dim, dtype=dtype,
                                                    device=device),
                                   "is_init": False} for _ in model.blocks],
              "kv_cache_mouse": None, "kv_cache_keyboard": None}
    action = next((b.action_model for b in model.blocks if b.action_model is not None), None)
    if action is not None:
        a_heads = action.heads_num
        if action.enable_mouse:
            caches["kv_cache_mouse"] = [cache(frames, a_heads, action.t_qkv.in_features // a_heads,
                                              batch=tokens) for _ in model.blocks]
        if action.enable_keyboard:
            caches["kv_cache_keyboard"] = [
                cache(frames, a_heads, action.mouse_attn_q.out_features // a_heads)
                for _ in model.blocks]
    return caches


@torch.no_grad()
def run_stream(model, data, meta, dtype, device, update_kwargs=None) -> torch.Tensor:
    """The pipeline's stream of `meta['blocks']` blocks: latents [1, 16, 3 * blocks, h, w]
    float32 on the CPU."""
    update_kwargs = dict(update_kwargs or {})
    if update_kwargs and not all(k in inspect.signature(model.forward).parameters
                                 for k in update_kwargs):
        raise ValueError(f"{type(model).__name__}.forward takes no {sorted(update_kwargs)}")
    tokens, frames = meta["tokens"], meta["window_frames"]
    caches = new_caches(model, tokens, frames, dtype, device)
    sigmas, timesteps = meta["sigmas"], meta["timesteps"]

    def to(t):
        return t.to(device=device, dtype=dtype)

    context = to(data["visual_context"])
    out = []
    for block in range(meta["blocks"]):
        first = 3 * block
        steps = 1 + 4 * (first + 2)  # the action history up to the block's last frame
        call = dict(visual_context=context,
                    cond_concat=to(data["cond_concat"][:, :, first:first + 3]),
                    mouse_cond=to(data["mouse_cond"][:, :steps]) if "mouse_cond" in data
                    else None,
                    keyboard_cond=to(data["keyboard_cond"][:, :steps]) if "keyboard_cond" in data
                    else None, current_start=first * tokens, **caches)
        x = to(data["noise"][block])
        for step, (t, sigma) in enumerate(zip(timesteps, sigmas)):
            flow = model(x, torch.full((1, 3), t, dtype=torch.float32, device=device), **call)
            x0 = (x.double() - sigma * flow.double()).to(dtype)
            if step + 1 < len(sigmas):
                nxt = sigmas[step + 1]
                renoise = data["renoise"][block, step].to(device=device, dtype=torch.float64)
                x = ((1 - nxt) * x0.double() + nxt * renoise).to(dtype)
        model(x0, torch.zeros((1, 3), dtype=torch.float32, device=device), **call,
              **update_kwargs)
        out.append(x0.float().cpu())
    return torch.cat(out, dim=2)


def make_data(model, meta, seed=0) -> dict:
    """Noise, re-noise and conditions of one video (CPU, float32)."""
    gen = torch.Generator().manual_seed(seed)
    blocks, (h, w) = meta["blocks"], meta["latent"]
    frames = 3 * blocks
    steps = 1 + 4 * (frames - 1)
    data = {"noise": torch.randn(blocks, 1, 16, 3, h, w, generator=gen),
            "renoise": torch.randn(blocks, len(meta["sigmas"]), 1, 16, 3, h, w, generator=gen),
            "visual_context": torch.randn(1, 257, 1280, generator=gen),
            "cond_concat": torch.randn(1, 20, frames, h, w, generator=gen)}
    action = next((b.action_model for b in model.blocks if b.action_model is not None), None)
    if action is not None and action.enable_mouse:
        data["mouse_cond"] = 0.1 * torch.randn(1, steps, 2, generator=gen)
    if action is not None and action.enable_keyboard:
        width = action.keyboard_embed[0].in_features
        data["keyboard_cond"] = (torch.randn(1, steps, width, generator=gen) > 0).float()
    return data


def per_block(latents, oracle):
    return [rel(latents[:, :, i:i + 3], oracle[:, :, i:i + 3])
            for i in range(0, oracle.shape[2], 3)]


def score(runs, oracles, references) -> dict:
    """A model's error over the seeds' videos: per video, its mean, and the ratio to the
    reference in bf16 (per video and of the means)."""
    errs = [rel(r, o) for r, o in zip(runs, oracles)]
    bases = [rel(r, o) for r, o in zip(references, oracles)]
    mean, base = sum(errs) / len(errs), sum(bases) / len(bases)
    return {"rel_err": mean, "ratio": mean / base, "per_video": errs,
            "ratio_per_video": [e / b for e, b in zip(errs, bases)],
            "per_block": per_block(runs[0], oracles[0])}


# ---------------------------------------------------------------------- part: error
class Budget:
    def __init__(self, seconds):
        self.end = time.perf_counter() + seconds

    def left(self):
        return self.end - time.perf_counter()


def oracle_and_reference(args, budget):
    """(config, meta, per seed the video's data, weights (CPU, float32), per seed the oracle's
    latents, per seed the reference's latents in bf16; plus the control: the reference in bf16
    with cuBLAS's reduced-precision bf16 reductions switched (an equally exact bf16 run whose
    ratio shows how far two bf16 implementations' errors differ by rounding alone))."""
    sys.path.insert(0, str(ROOT))
    from wan.modules.causal_model import CausalWanModel
    from wan.modules.presets import model_config
    from wan.modules.random_init import randomize_weights_
    from wan.modules.shared.conditioning import attention_window_frames, frame_tokens
    from wan.serving.runner import FlowMatchSchedule

    device = args.device
    config = model_config(args.preset)
    latent = LATENT[args.preset]
    if args.layers:  # a shallower model of the preset's width (CPU exploration)
        config["num_layers"] = args.layers
        if config.get("action_config"):
            config["action_config"]["blocks"] = [
                b for b in config["action_config"]["blocks"] if b < args.layers]
    if args.latent:
        latent = tuple(int(n) for n in args.latent.split("x"))
    schedule = FlowMatchSchedule()
    with torch.device(device):
        oracle = CausalWanModel.from_config(config)
    randomize_weights_(oracle, seed=0)
    oracle.num_frame_per_block = 3
    oracle.eval()
    meta = {"blocks": args.blocks, "latent": list(latent), "config": config,
            "tokens": frame_tokens(*latent, patch_size=oracle.patch_size),
            "window_frames": attention_window_frames(oracle.local_attn_size),
            "sigmas": list(schedule.sigmas), "timesteps": list(schedule.timesteps)}
    datas = [make_data(oracle, meta, seed) for seed in range(args.seeds)]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    begin = time.perf_counter()
    try:
        oracles = [run_stream(oracle, data, meta, torch.float32, device) for data in datas]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    log(f"oracle (float32), {args.seeds} video(s): {time.perf_counter() - begin:.1f} s")
    weights = {k: v.detach().cpu() for k, v in oracle.state_dict().items()}
    oracle.to(torch.bfloat16)
    begin = time.perf_counter()
    references = [run_stream(oracle, data, meta, torch.bfloat16, device) for data in datas]
    log(f"reference in bf16: {time.perf_counter() - begin:.1f} s")
    matmul = torch.backends.cuda.matmul
    reduced = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = not reduced
    try:
        control = [run_stream(oracle, data, meta, torch.bfloat16, device) for data in datas]
    finally:
        matmul.allow_bf16_reduced_precision_reduction = reduced
    meta["control"] = (f"the reference in bf16 with allow_bf16_reduced_precision_reduction="
                       f"{not reduced}")
    del oracle
    if device == "cuda":
        torch.cuda.empty_cache()
    return config, meta, datas, weights, oracles, references, control


@contextlib.contextmanager
def prototype(name):
    """The eager ops a prototype variant replaces, replaced while it runs."""
    from wan.kernels import eager
    saved = {op: eager.OPS[op] for op in PROTOTYPES.get(name, {})}
    eager.OPS.update(PROTOTYPES.get(name, {}))
    try:
        yield
    finally:
        eager.OPS.update(saved)


def optimized_variant(name, config, weights, args):
    from wan.modules.optimized_causal_model import OptimizedCausalWanModel
    options, backend, _ = VARIANTS[name]
    options = dict(options)
    options.setdefault("cuda_graphs", False)  # numerics only: graphs_on checks they change none
    if backend:
        options["backend"] = backend
    with torch.device(args.device):
        model = OptimizedCausalWanModel.from_config(config, **options)
    model.load_state_dict(weights)
    model.to(torch.bfloat16).eval()
    model.num_frame_per_block = 3
    return model


def error_part(args, budget, report):
    shared = oracle_and_reference(args, budget)
    config, meta, datas, weights, oracles, references, control = shared
    section = report["error"] = {
        "oracle": "reference CausalWanModel, float32, TF32 off (SDPA in float32)",
        "videos": args.seeds,
        "reference_bf16": score(references, oracles, references),
        "control": dict(score(control, oracles, references), what=meta["control"]),
        "variants": {}}
    log(f"control ({meta['control']}): {section['control']['ratio']:.3f}x "
        f"(per video {', '.join(f'{r:.3f}' for r in section['control']['ratio_per_video'])})")
    latents = {}
    for name in args.variants:
        if budget.left() < 20:
            section["variants"][name] = {"skipped": "budget"}
            continue
        begin = time.perf_counter()
        try:
            with prototype(name):
                model = optimized_variant(name, config, weights, args)
                runs = [run_stream(model, data, meta, torch.bfloat16, args.device,
                                   VARIANTS[name][2]) for data in datas]
        except Exception as err:  # noqa: BLE001 (a variant this device cannot run: said)
            section["variants"][name] = {"error": f"{type(err).__name__}: {err}"}
            log(f"{name}: {type(err).__name__}: {err}")
            continue
        latents[name] = runs
        entry = dict(score(runs, oracles, references), seconds=time.perf_counter() - begin)
        if "default" in latents and name != "default":
            entry["rel_diff_vs_default"] = rel(runs[0], latents["default"][0])
        section["variants"][name] = entry
        log(f"{name}: error {entry['rel_err']:.5f} = {entry['ratio']:.3f}x the reference's in "
            f"bf16 (per video {', '.join(f'{r:.3f}' for r in entry['ratio_per_video'])}; "
            f"{entry['seconds']:.1f} s)")
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if "graphs_on" in latents and "default" in latents:
        section["graphs_change_nothing"] = all(
            torch.equal(a, b) for a, b in zip(latents["graphs_on"], latents["default"]))
    if args.frames and budget.left() > 30 and "default" in latents:
        section["frames"] = frames_part(args, oracles[0], references[0], latents["default"][0])
    report["_shared"] = shared


@torch.no_grad()
def decode_all(decoder, latents, dtype, device):
    """latents [1, 16, T, h, w] -> frames [1, T', 3, H, W] float32 (CPU), 3-frame blocks."""
    z = latents.transpose(1, 2).to(device=device, dtype=dtype)
    cache, out = [None] * 32, []
    for i in range(0, z.shape[1], 3):
        frames, cache = decoder(z[:, i:i + 3], *cache)
        out.append(frames.float().cpu())
    return torch.cat(out, dim=1)


def frames_part(args, oracle, reference, optimized):
    """The frames' error against the oracle's latents decoded in float32: each run's latents
    through its own decoder in fp16 (the pipeline rounds latents to fp16); and the decoders alone
    on the oracle's latents."""
    from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
    from wan.modules.random_init import randomize_decoder_weights_
    from wan.modules.vae_decoder import VAEDecoderWrapper
    from wan.runtime.options import publish_model_options
    publish_model_options()  # the decoder's own defaults, not the last DiT variant's options
    device = args.device
    half = torch.float16 if device == "cuda" else torch.float32
    begin = time.perf_counter()
    weights = randomize_decoder_weights_(VAEDecoderWrapper()).state_dict()
    reference_decoder = VAEDecoderWrapper()
    reference_decoder.load_state_dict(weights)
    reference_decoder.to(device, torch.float32).eval()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        truth = decode_all(reference_decoder, oracle, torch.float32, device)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    reference_decoder.to(half)
    upstream = decode_all(reference_decoder, reference.half().float(), half, device)
    upstream_own = decode_all(reference_decoder, oracle.half().float(), half, device)
    del reference_decoder
    ours_decoder = OptimizedVAEDecoderWrapper(conv_search=False)
    ours_decoder.conv_search_cache = False
    ours_decoder.load_state_dict(weights)
    ours_decoder.to(device, half).eval()
    ours = decode_all(ours_decoder, optimized.half().float(), half, device)
    ours_own = decode_all(ours_decoder, oracle.half().float(), half, device)
    up, op = rel(upstream, truth), rel(ours, truth)
    dec_up, dec_op = rel(upstream_own, truth), rel(ours_own, truth)
    result = {"reference_pipeline_rel_err": up, "optimized_pipeline_rel_err": op,
              "ratio": op / up, "decoder_alone_reference_rel_err": dec_up,
              "decoder_alone_optimized_rel_err": dec_op, "decoder_alone_ratio": dec_op / dec_up,
              "decoder_dtype": str(half), "seconds": time.perf_counter() - begin}
    log(f"frames: {op:.5f} vs {up:.5f} ({op / up:.3f}x); decoders alone on the oracle's "
        f"latents {dec_op:.5f} vs {dec_up:.5f} ({dec_op / dec_up:.3f}x)")
    return result


# ---------------------------------------------------------------------- part: trees (bisect)
def export_trees(commits, folder):
    """`git archive` of each commit's wan/ into folder/<commit>/ (run where .git is)."""
    folder = Path(folder)
    for commit in commits:
        target = folder / commit
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit, "wan"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        stamp, subtitle = subprocess.run(
            ["git", "log", "-1", "--format=%ct%n%h %cs %s", commit], cwd=ROOT, check=True,
            capture_output=True, text=True).stdout.strip().split("\n", 1)
        (target / "COMMIT").write_text(subtitle + "\n")
        (target / "COMMIT_TIME").write_text(stamp + "\n")  # the bisect runs them in this order
        log(f"exported {subtitle[:100]} -> {target}")


def tree_worker(tree, data_path, result_path, device):
    """In a child: the optimized model of `tree` (its defaults, graphs off) streams the video."""
    sys.path.insert(0, str(Path(tree).resolve()))
    os.environ["WAN_CUDA_GRAPHS"] = "0"
    payload = torch.load(data_path, weights_only=True)
    meta = json.loads(Path(str(data_path) + ".json").read_text())
    from wan.modules.optimized_causal_model import OptimizedCausalWanModel
    import wan
    if not str(Path(wan.__file__).resolve()).startswith(str(Path(tree).resolve())):
        raise SystemExit(f"imported {wan.__file__}, not the tree's")
    config = {k: v for k, v in meta["config"].items() if not k.startswith("_")}
    with torch.device(device):
        if hasattr(OptimizedCausalWanModel, "from_config"):
            model = OptimizedCausalWanModel.from_config(meta["config"])
        else:
            model = OptimizedCausalWanModel(**config)
    model.load_state_dict(payload["weights"])
    model.to(torch.bfloat16).eval()
    model.num_frame_per_block = 3
    begin = time.perf_counter()
    latents = [run_stream(model, data, meta, torch.bfloat16, device) for data in payload["data"]]
    torch.save({"latents": latents, "seconds": time.perf_counter() - begin}, result_path)


def trees_part(args, budget, report):
    if "_shared" not in report:
        report["_shared"] = oracle_and_reference(args, budget)
    config, meta, datas, weights, oracles, references, _ = report["_shared"]
    trees = sorted((p for p in Path(args.trees).iterdir() if (p / "wan").is_dir()),
                   key=lambda p: ((p / "COMMIT_TIME").read_text().strip()
                                  if (p / "COMMIT_TIME").exists() else "", p.name))
    section = report["trees"] = {"reference_bf16": score(references, oracles, references),
                                 "trees": {}}
    work = Path(tempfile.mkdtemp())
    data_path = work / "data.pt"
    torch.save({"weights": {k: v.to(torch.bfloat16) for k, v in weights.items()},
                "data": datas}, data_path)
    Path(str(data_path) + ".json").write_text(json.dumps(meta))
    for tree in trees:
        label = (tree / "COMMIT").read_text().strip() if (tree / "COMMIT").exists() else tree.name
        if budget.left() < 45:
            section["trees"][label] = {"skipped": "budget"}
            continue
        result = work / f"{tree.name}.pt"
        begin = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, "--tree-worker", str(tree),
                                "--data", str(data_path), "--result", str(result),
                                "--device", args.device], capture_output=True, text=True,
                               timeout=max(30, budget.left() - 10))
        if child.returncode != 0:
            section["trees"][label] = {"error": child.stderr.strip()[-1500:]}
            log(f"{label}: failed ({child.stderr.strip()[-300:]})")
            continue
        runs = torch.load(result, weights_only=True)["latents"]
        entry = dict(score(runs, oracles, references), seconds=time.perf_counter() - begin)
        section["trees"][label] = entry
        log(f"{label[:60]}: {entry['rel_err']:.5f} = {entry['ratio']:.3f}x")


# ---------------------------------------------------------------------- part: startup
def startup_child(spec: dict) -> dict:
    """In a fresh process: build the decoder, compile() (its warm-up), move it as upstream's
    pipeline.to does, stream `blocks` blocks; times and counters."""
    process_start = spec["process_start"]
    sys.path.insert(0, str(ROOT))
    from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    imported = time.time() - process_start
    torch.manual_seed(0)
    decoder = OptimizedVAEDecoderWrapper(conv_search=spec["conv_search"])
    decoder.conv_search_cache = spec["cache"]
    decoder.startup_shape = tuple(spec["startup_shape"])
    if spec.get("cpu_standins"):
        _cpu_standins(decoder)
    decoder.to(device, dtype).eval()
    begin = time.perf_counter()
    decoder.compile(mode="max-autotune-no-cudagraphs")
    sync(device)
    compile_s = time.perf_counter() - begin
    at_compile = decoder.counters
    decoder.to(device, dtype)  # upstream's pipeline.to(...) and vae_decoder.to(...)
    ready = time.time() - process_start
    b, t, h, w = spec["startup_shape"]
    gen = torch.Generator().manual_seed(1)
    cache, block_ms, deltas = [None] * 32, [], []
    with torch.no_grad():
        for _ in range(spec["blocks"]):
            z = torch.randn(b, t, 16, h, w, generator=gen).to(device, dtype)
            before = decoder.counters
            if device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                start.record()
                _, cache = decoder(z, *cache)
                end.record()
                end.synchronize()
                block_ms.append(start.elapsed_time(end))
            else:
                tick = time.perf_counter()
                _, cache = decoder(z, *cache)
                block_ms.append((time.perf_counter() - tick) * 1e3)
            after = decoder.counters
            deltas.append({k: after[k] - before[k] for k in ("captures", "searches")})
    steady = block_ms[2:] or block_ms[1:]
    report = decoder.conv_search_report or {}
    return {"import_s": imported, "compile_s": compile_s, "ready_s": ready,
            "at_compile": {k: at_compile[k] for k in ("captures", "searches", "search_s")},
            "block_ms": block_ms, "first_block_ms": block_ms[0],
            "second_block_ms": block_ms[1] if len(block_ms) > 1 else None,
            "steady_block_ms": statistics.median(steady) if steady else None,
            "per_block": deltas,
            "cache": report.get("cache"), "cache_written": report.get("cache_written"),
            "problems": report.get("problems"), "strategies": _count(report.get("strategies"))}


def _count(strategies):
    if not strategies:
        return None
    counts = {}
    for strategy in strategies.values():
        counts[strategy] = counts.get(strategy, 0) + 1
    return counts


def _cpu_standins(decoder):
    """On a CPU, graphs (replayed eagerly) and the conv search pass, so that the flow runs."""
    from wan.runtime.cuda_graphs import EagerGraphRunner

    decoder._graph_device_types = ("cuda", "cpu")
    decoder._conv_search_device_types = ("cuda", "cpu")
    decoder._graphs = EagerGraphRunner()


def run_startup_child(spec, budget):
    spec = dict(spec, process_start=time.time())
    child = subprocess.run([sys.executable, __file__, "--startup-child", json.dumps(spec)],
                           capture_output=True, text=True, timeout=max(30, budget.left() - 5))
    if child.returncode != 0:
        return {"error": child.stderr.strip()[-2000:]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def uniform_entry(path, strategy, spec):
    """Rewrite the cache file's entry (of the first start-up) with one strategy everywhere."""
    sys.path.insert(0, str(ROOT))
    from wan.runtime import conv_search_cache
    data = json.loads(Path(path).read_text())
    entry = data["entries"][-1]
    entry["strategies"] = {name: strategy for name in entry["strategies"]}
    entry["calibrated"] = False
    out = Path(path).with_name(f"uniform_{strategy.replace(':', '_')}.json")
    out.write_text(json.dumps(data))
    conv_search_cache.SearchCache(out)._read()  # still valid
    return str(out)


def startup_part(args, budget, report):
    sys.path.insert(0, str(ROOT))
    cpu = args.device == "cpu"
    folder = Path(tempfile.mkdtemp())
    cache = folder / "conv_search.json"
    latent = tuple(int(n) for n in args.decoder_latent.split("x"))
    spec = {"device": args.device, "dtype": "float32" if cpu else "float16",
            "startup_shape": [1, 3, *latent], "blocks": args.decoder_blocks,
            "conv_search": True, "cache": str(cache), "cpu_standins": cpu}
    section = report["startup"] = {"latent": list(latent), "dtype": spec["dtype"],
                                   "cache_file": str(cache), "runs": {}}
    runs = section["runs"]

    def run(name, **changes):
        if budget.left() < 40:
            runs[name] = {"skipped": "budget"}
            return runs[name]
        log(f"start-up run {name} ...")
        runs[name] = run_startup_child(dict(spec, **changes), budget)
        r = runs[name]
        if "error" in r:
            log(f"  {name}: failed: {r['error'][-400:]}")
        else:
            log(f"  {name}: ready after {r['ready_s']:.1f} s (compile {r['compile_s']:.1f} s, "
                f"search {r['at_compile']['search_s']:.1f} s), blocks "
                + ", ".join(f"{ms:.0f}" for ms in r["block_ms"]) + f" ms; cache {r['cache']}")
        return r

    run("first_start_no_cache")
    if cache.exists():
        run("second_start_recorded_cache")
        if budget.left() > 120 and not args.skip_calibrate:
            from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
            log("calibrating (each strategy in a child) ...")
            decoder = OptimizedVAEDecoderWrapper()
            decoder.conv_search_cache = str(folder / "calibrated.json")
            decoder.startup_shape = tuple(spec["startup_shape"])
            decoder.to(args.device, getattr(torch, spec["dtype"])).eval()
            begin = time.perf_counter()
            try:
                result = decoder.calibrate_conv_search(strategies=args.calibrate)
                section["calibration"] = {
                    "seconds": time.perf_counter() - begin, "children_s": result["children"],
                    "search_s": result["search_s"], "conv_ms_per_block": result["conv_ms"],
                    "chosen": _count(result["strategies"]), "measured": result["measured"]}
                run("second_start_calibrated_cache", cache=str(folder / "calibrated.json"))
            except Exception as err:  # noqa: BLE001 (said in the report)
                section["calibration"] = {"error": f"{type(err).__name__}: {err}"}
                log(f"calibration failed: {err}")
            del decoder
        for strategy in args.strategy_runs:
            if strategy == "heuristic":
                run("uniform_heuristic (conv_search off)", conv_search=False, cache=False)
            else:
                run(f"uniform_{strategy}", cache=uniform_entry(cache, strategy, spec))


# ---------------------------------------------------------------------- checks and the table
def checks(report, args) -> list:
    out = []
    error = report.get("error", {})
    variants = error.get("variants", {})
    if "graphs_change_nothing" in error:
        out.append(("graphs on/off give the same latents", error["graphs_change_nothing"]))
    default = variants.get("default", {})
    if "ratio" in default:
        out.append((f"DiT latents' error <= 1.05x the reference's in bf16 "
                    f"({default['ratio']:.3f}x)", default["ratio"] <= 1.05))
    frames = error.get("frames")
    if frames:
        out.append((f"frames' error <= 1.05x the reference pipeline's ({frames['ratio']:.3f}x)",
                    frames["ratio"] <= 1.05))
    for name, run in report.get("startup", {}).get("runs", {}).items():
        if "per_block" in run:
            steady = run["per_block"][1:]
            out.append((f"{name}: no search or capture after the first block",
                        all(d["searches"] == 0 and d["captures"] == 0 for d in steady)))
            if run["second_block_ms"] and run["steady_block_ms"]:
                ratio = run["second_block_ms"] / run["steady_block_ms"]
                out.append((f"{name}: second block {run['second_block_ms']:.1f} ms <= 2x steady "
                            f"{run['steady_block_ms']:.1f}", ratio <= 2.0))
    second = report.get("startup", {}).get("runs", {}).get("second_start_recorded_cache", {})
    if "cache" in second:
        out.append(("second start-up read the cache file", second["cache"] == "hit"))
    return out


def print_table(report):
    print()
    print(f"{report['device']}, torch {report['torch']}, {report['date']}")
    print(report["command"])
    error = report.get("error")
    if error:
        print(f"\nDiT latents' error vs float32 ({report['preset']}, {report['blocks']} blocks x "
              f"{error['videos']} videos); reference in bf16: "
              f"{error['reference_bf16']['rel_err']:.5f}; ratio = error / the reference's")
        print(f"{'variant':<30}{'rel err':>10}{'ratio':>8}{'per video':>18}{'vs default':>12}")
        rows = {"control (rounding only)": error["control"], **error["variants"]}
        for name, v in rows.items():
            if "rel_err" in v:
                diff = v.get("rel_diff_vs_default")
                videos = " ".join(f"{r:.3f}" for r in v["ratio_per_video"])
                print(f"{name:<30}{v['rel_err']:>10.5f}{v['ratio']:>8.3f}{videos:>18}"
                      f"{'' if diff is None else f'{diff:>12.2e}'}")
            else:
                print(f"{name:<30}  {v.get('skipped') or v.get('error', '')[:60]}")
        f = error.get("frames")
        if f:
            print(f"frames: optimized {f['optimized_pipeline_rel_err']:.5f} vs reference "
                  f"{f['reference_pipeline_rel_err']:.5f} = {f['ratio']:.3f}x; decoders alone "
                  f"{f['decoder_alone_ratio']:.3f}x")
    trees = report.get("trees")
    if trees:
        print("\ncommit bisect (optimized model's defaults, graphs off)")
        for label, v in trees["trees"].items():
            value = f"{v['rel_err']:.5f} {v['ratio']:.3f}x" if "rel_err" in v else (
                v.get("skipped") or "failed")
            print(f"  {label[:70]:<72}{value}")
    startup = report.get("startup")
    if startup:
        print(f"\ndecoder start-up ({startup['dtype']}, latent {startup['latent']}): seconds from "
              f"process start to ready; ms per block (first, second, steady)")
        print(f"{'run':<40}{'ready':>7}{'compile':>8}{'search':>8}{'1st':>8}{'2nd':>8}"
              f"{'steady':>8}  cache")
        for name, r in startup["runs"].items():
            if "ready_s" not in r:
                print(f"{name:<40}  {r.get('skipped') or r.get('error', '')[-80:]}")
                continue
            print(f"{name:<40}{r['ready_s']:>7.1f}{r['compile_s']:>8.1f}"
                  f"{r['at_compile']['search_s']:>8.1f}{r['first_block_ms']:>8.1f}"
                  f"{(r['second_block_ms'] or 0):>8.1f}{(r['steady_block_ms'] or 0):>8.1f}  "
                  f"{r['cache']}")
        c = startup.get("calibration")
        if c and "search_s" in c:
            print("calibration (per-problem sums): search s "
                  + ", ".join(f"{k} {v:.1f}" for k, v in c["search_s"].items())
                  + "; conv ms per block " + ", ".join(f"{k} {v:.1f}"
                                                      for k, v in c["conv_ms_per_block"].items())
                  + f"; chosen {c['chosen']}")
    for text, ok in report.get("checks", []):
        print(f"CHECK {'ok  ' if ok else 'FAIL'} {text}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="error,startup",
                   help="comma list of error, trees, startup")
    p.add_argument("--preset", default="universal", choices=["universal", "tiny"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--blocks", type=int, default=8, help="blocks of the error part's video")
    p.add_argument("--layers", type=int, default=None,
                   help="the preset with this many layers (exploring on a CPU)")
    p.add_argument("--latent", default=None, help="HxW latent of the error part's video")
    p.add_argument("--seeds", type=int, default=2,
                   help="videos (noise, conditions) the error part averages over")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-frames", dest="frames", action="store_false")
    p.add_argument("--trees", default=None, help="folder of exported trees (part trees)")
    p.add_argument("--export-trees", default=None,
                   help=f"comma list of commits to export into --trees (git archive), e.g. "
                        f"{','.join(BISECT_COMMITS)}; then exits")
    p.add_argument("--decoder-latent", default=None, help="HxW (default 44x80; tiny: 2x3)")
    p.add_argument("--decoder-blocks", type=int, default=6)
    p.add_argument("--calibrate", default="heuristic,search:3,search:10,search:all")
    p.add_argument("--strategy-runs", default=",".join(STRATEGY_RUNS))
    p.add_argument("--skip-calibrate", action="store_true")
    p.add_argument("--budget-s", type=float, default=470.0)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    # children
    p.add_argument("--tree-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--startup-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tree_worker:
        tree_worker(args.tree_worker, args.data, args.result, args.device)
        return
    if args.startup_child:
        print(json.dumps(startup_child(json.loads(args.startup_child))))
        return
    if args.export_trees:
        if not args.trees:
            p.error("--export-trees needs --trees FOLDER")
        export_trees([c.strip() for c in args.export_trees.split(",") if c.strip()], args.trees)
        return
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(parts) - {"error", "trees", "startup"}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}")
    if "trees" in parts and not args.trees:
        p.error("part trees needs --trees FOLDER (made by --export-trees)")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if args.device == "cpu":
        args.variants = [v for v in args.variants if v != "graphs_on"]
    args.calibrate = [s.strip() for s in args.calibrate.split(",") if s.strip()]
    args.strategy_runs = [s.strip() for s in args.strategy_runs.split(",") if s.strip()]
    if args.decoder_latent is None:
        args.decoder_latent = "2x3" if args.preset == "tiny" else "44x80"
    budget = Budget(args.budget_s)
    report = header(args)
    report["parts"] = parts
    if "error" in parts:
        error_part(args, budget, report)
    if "trees" in parts:
        trees_part(args, budget, report)
    if "startup" in parts:
        startup_part(args, budget, report)
    report.pop("_shared", None)
    report["checks"] = checks(report, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup_and_error.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {out / 'startup_and_error.json'}")
    print_table(report)


if __name__ == "__main__":
    main()
