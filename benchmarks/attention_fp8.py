"""FP8 self-attention at the real shape (2640 queries over 5280 keys, 12 heads of 128, bf16):
cuDNN's bf16 kernel (what runs now) against our Triton kernel (benchmarks/attention_fp8_kernel.py)
with no FP8, FP8 QK^T, and FP8 QK^T + P V, each over several tile configs, each alone and with
its quantization passes, timed inside CUDA graphs; errors against float64 on random inputs
(plain, sharper scores, outlier channels); graph replay against eager; and whether the compiled
kernel's tensor-core instructions really are FP8. GPU only.

    python benchmarks/attention_fp8.py [--out attention_fp8.json]
"""
import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import run_header  # noqa: E402
from wan.kernels import flash  # noqa: E402
from benchmarks import attention_fp8_kernel as fa8  # noqa: E402

SHAPE = (1, 2640, 5280, 12, 128)  # B, Lq, Lk, H, D
CONFIGS = {
    "none": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
    "qk": [(128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 4, 3), (64, 128, 4, 3), (128, 64, 8, 4)],
    "qk+pv": [(128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 4, 3), (64, 128, 4, 3),
              (128, 64, 8, 4)],
}


def graph_ms(fn, calls=10, reps=7):
    """Median ms per call of fn replayed in a CUDA graph of `calls` calls; and fn's output of the
    replay (to compare with eager)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times), (out.clone() if torch.is_tensor(out) else None)


def inputs(case, gen):
    b, lq, lk, h, d = SHAPE
    q = torch.randn(b, lq, h, d, device="cuda", generator=gen)
    k = torch.randn(b, lk, h, d, device="cuda", generator=gen)
    v = torch.randn(b, lk, h, d, device="cuda", generator=gen)
    if case == "sharp":  # scores ~3x wider: a peakier softmax
        q = q * 3
    if case == "outliers":  # a few channels 20x larger in k and v (as real projections have)
        k[..., :4] *= 20
        v[..., 5:9] *= 20
    return [t.bfloat16() for t in (q, k, v)]


def exact(q, k, v):
    """float64 attention, head by head (the scores of all heads at once would take 2.7 GB)."""
    out = torch.empty(q.shape, device=q.device, dtype=torch.float64)
    scale = 1 / math.sqrt(q.shape[-1])
    for h in range(q.shape[2]):
        s = torch.einsum("bld,bmd->blm", q[:, :, h].double(), k[:, :, h].double()) * scale
        out[:, :, h] = torch.softmax(s, -1) @ v[:, :, h].double()
    return out


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def tensor_core_instructions():
    """Per compiled variant of the attention kernel (its QK_FP8 / PV_FP8 constants), the kinds of
    Hopper tensor-core instruction (wgmma) in its PTX: e4m3 ones for the FP8 products."""
    found = {}
    for entry in getattr(fa8._attention_kernel, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for key, kernel in getattr(cache, "items", lambda: [])():
            ptx = getattr(kernel, "asm", {}).get("ptx", "")
            kinds = sorted(set(re.findall(r"wgmma\.mma_async\.[\w.]+", ptx)))
            found[str(key)[-120:]] = kinds
    return found


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    report = {**run_header(torch.device("cuda")), "shape_b_lq_lk_h_d": list(SHAPE), "rows": []}
    b, lq, lk, h, d = SHAPE
    flops = 4 * b * lq * lk * h * d

    q, k, v = inputs("plain", gen)
    rows = report["rows"]
    ms, out = graph_ms(lambda: flash.attention(q, k, v))
    eager = flash.attention(q, k, v)
    rows.append({"variant": "cudnn bf16", "config": None, "ms": ms,
                 "tflops": flops / ms / 1e9, "replay_equals_eager": bool(torch.equal(out, eager))})
    # quantization passes alone
    ms_qk, _ = graph_ms(lambda: [fa8.quantize_qk(q), fa8.quantize_qk(k)] and None)
    ms_v, _ = graph_ms(lambda: fa8.quantize_v(v) and None)
    report["quantize_ms"] = {"q_and_k": ms_qk, "v": ms_v}
    for fp8, configs in CONFIGS.items():
        for config in configs:
            try:
                ms, out = graph_ms(lambda: fa8.attention_fp8(q, k, v, fp8, config))
            except Exception as error:  # a config that does not compile / fit: say so, go on
                rows.append({"variant": f"triton {fp8}", "config": list(config),
                             "error": f"{type(error).__name__}: {str(error)[:200]}"})
                continue
            eager = fa8.attention_fp8(q, k, v, fp8, config)
            rows.append({"variant": f"triton {fp8}", "config": list(config), "ms": ms,
                         "tflops": flops / ms / 1e9,
                         "replay_equals_eager": bool(torch.equal(out, eager))})
    report["tensor_core_instructions"] = tensor_core_instructions()

    # errors against float64 per input case, each variant at its default config
    errors = {}
    for case in ("plain", "sharp", "outliers"):
        q, k, v = inputs(case, gen)
        ref = exact(q, k, v)
        errors[case] = {"cudnn bf16": rel(flash.attention(q, k, v), ref)}
        for fp8 in CONFIGS:
            errors[case][f"triton {fp8}"] = rel(fa8.attention_fp8(q, k, v, fp8), ref)
            errors[case][f"twin {fp8}"] = rel(fa8.attention_fp8_reference(q, k, v, fp8), ref)
        del ref
    report["rel_error_vs_float64"] = errors

    best = {}
    for row in rows:
        if "ms" in row and (row["variant"] not in best or row["ms"] < best[row["variant"]]["ms"]):
            best[row["variant"]] = row
    report["best"] = best
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{'variant':<16}{'config':<20}{'ms':>8}{'TFLOP/s':>9}{'replay=eager':>14}")
    for row in rows:
        if "ms" in row:
            print(f"{row['variant']:<16}{str(row['config']):<20}{row['ms']:>8.4f}"
                  f"{row['tflops']:>9.0f}{str(row['replay_equals_eager']):>14}")
        else:
            print(f"{row['variant']:<16}{str(row['config']):<20} {row['error']}")
    print(f"quantize passes per call: q and k {ms_qk:.4f} ms, v {ms_v:.4f} ms")
    for key, kinds in report["tensor_core_instructions"].items():
        print("wgmma kinds:", kinds)
    print(f"{'rel error vs float64':<22}" + "".join(f"{c:>12}" for c in errors))
    for name in errors["plain"]:
        print(f"{name:<22}" + "".join(f"{errors[c][name]:>12.2e}" for c in errors))


if __name__ == "__main__":
    main()
