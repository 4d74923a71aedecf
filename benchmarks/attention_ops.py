"""Times every attention op of the streaming forward on each backend that can run it, at the real
universal shapes (bf16, steady state: 6-frame window), checks it against float64 math, and prints a
table. The measurements behind the registry's `auto` order. GPU only.

    python benchmarks/attention_ops.py [--out attention.json]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wan.kernels import registry  # noqa: E402
from wan.kernels.eager import attention as exact_attention  # noqa: E402

# q shape, k/v shape, as OptimizedCausalWanModel calls each op (universal, batch 1, full window)
SHAPES = {
    "self_attention": ((1, 2640, 12, 128), (1, 5280, 12, 128)),
    "cross_attention": ((1, 2640, 12, 128), (1, 257, 12, 128)),
    "mouse_attention": ((880, 3, 16, 64), (880, 6, 16, 64)),
    "keyboard_attention": ((1, 2640, 16, 64), (1, 6, 16, 64)),
}


def time_ms(fn, runs=30, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for op, (q_shape, kv_shape) in SHAPES.items():
        q, k, v = (torch.randn(s, generator=gen, device=device, dtype=dtype)
                   for s in (q_shape, kv_shape, kv_shape))
        exact = exact_attention(q.double(), k.double(), v.double())
        for name, backend in registry.BACKENDS.items():
            if backend.problem(op, device, dtype, q_shape[-1]) is not None:
                continue
            fn = backend.ops()[op]
            out = fn(q, k, v)
            err = ((out.double() - exact).norm() / exact.norm()).item()
            rows.append({"op": op, "backend": name, "ms": time_ms(lambda: fn(q, k, v)),
                         "rel_err": err})
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"{'op':<20}{'backend':<9}{'ms':>9}{'rel err':>10}")
    for r in rows:
        print(f"{r['op']:<20}{r['backend']:<9}{r['ms']:>9.4f}{r['rel_err']:>10.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                              "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
