"""Where a bf16 stream's error against float32 comes from (GPU; the issue-9 question of a
well-conditioned random init). Answered since (OPTIMIZATION_GUIDE.md, step 28): the bf16 replay
below rounds t to bf16 with the other inputs (666 -> 664, 333 -> 332), which is what moved those
calls by 13-26%; upstream passes t in float32, and then bf16 is ~1.6% from float32 on every call
(`python -m wan.compare`). Kept as the record of the question.

The reference model streams 10 blocks in float32 (the pipeline's pattern: 3 denoising calls with
x <- 0.5 x + 0.5 out, then the t=0 cache update); its bf16 twin replays exactly those calls. Per
call it prints the relative error, for variants that remove one suspect at a time:

* `stream`: as above (caches carry every earlier block);
* `isolated`: every call in fresh caches at frame 0 (one forward's own rounding, no history);
* `no-action`: the same stream with no action modules.

    python benchmarks/bf16_drift.py --out results.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from wan import CausalWanModel  # noqa: E402
from wan.modules.rolling_cache import new_stream_caches  # noqa: E402
from wan.modules.presets import model_config  # noqa: E402
from wan.modules.random_init import random_inputs, randomize_weights_  # noqa: E402

TOKENS, LATENT, BLOCKS, STEPS = 880, (44, 80), 10, (1000.0, 666.0, 333.0)


def build(config, dtype):
    with torch.device("cuda"):
        model = CausalWanModel.from_config(config)
    randomize_weights_(model, 0)
    model.num_frame_per_block = 3
    return model.to(dtype).eval()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.no_grad()
def errors(config, isolated: bool):
    ref, half = build(config, torch.float32), build(config, torch.bfloat16)
    caches = {m: new_stream_caches(m, 1, 6, TOKENS) for m in (ref, half)}
    out = []
    for block in range(BLOCKS):
        inputs = random_inputs(ref, LATENT, 3, 0 if isolated else 3 * block, seed=block)
        for t in (*STEPS, 0.0):
            inputs["t"] = torch.full_like(inputs["t"], t)
            start = 0 if isolated else 3 * block * TOKENS
            if isolated:
                caches = {m: new_stream_caches(m, 1, 6, TOKENS) for m in (ref, half)}
            expected = ref(**inputs, **caches[ref], current_start=start)
            got = half(**{k: (v.bfloat16() if isinstance(v, torch.Tensor) else v)
                          for k, v in inputs.items()}, **caches[half], current_start=start)
            out.append(rel(got, expected))
            if t:
                inputs["x"] = 0.5 * inputs["x"] + 0.5 * expected
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    universal = model_config("universal")
    no_action = dict(universal, action_config={})
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "variants": {}}
    for name, config, isolated in (("stream", universal, False), ("isolated", universal, True),
                                   ("no-action", no_action, False)):
        errs = errors(config, isolated)
        report["variants"][name] = errs
        per_block = [max(errs[i:i + 4]) for i in range(0, len(errs), 4)]
        print(f"{name:10s} worst per block: " + " ".join(f"{e:.3f}" for e in per_block), flush=True)
        print(f"{'':10s} block 0 by t {(*STEPS, 0.0)}: " + " ".join(f"{e:.3f}" for e in errs[:4]),
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
