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
from wan.kernels import eager  # noqa: E402
from wan.modules.random_init import random_action_attention_args  # noqa: E402

# q shape, k/v shape, as OptimizedCausalWanModel calls each op (universal, batch 1, full window)
SHAPES = {
    "self_attention": ((1, 2640, 12, 128), (1, 5280, 12, 128)),
    "cross_attention": ((1, 2640, 12, 128), (1, 257, 12, 128)),
}
# the action ops (raw q/k/v, norm + RoPE + cache store inside): random_action_attention_args cases
ACTION_CASES = {
    "mouse_attention": (880, 3, 1, 16, 64, 6, (3, 4, 5), 6),
    "keyboard_attention": (1, 3, 880, 16, 64, 6, (0, 1, 2), 6),
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

    def measure(op, args, exact_args, eager_fn):
        exact = eager_fn(*exact_args)
        for name, backend in registry.BACKENDS.items():
            if backend.problem(op, device, dtype, args[0].shape[-1]) is None:
                fn = backend.ops()[op]
                out = fn(*args)
                err = ((out.double() - exact).norm() / exact.norm()).item()
                rows.append({"op": op, "backend": name, "ms": time_ms(lambda: fn(*args)),
                             "rel_err": err})

    for op, (q_shape, kv_shape) in SHAPES.items():
        q, k, v = (torch.randn(s, generator=gen, device=device, dtype=dtype)
                   for s in (q_shape, kv_shape, kv_shape))
        measure(op, (q, k, v), (q.double(), k.double(), v.double()), eager.attention)
    for op, case in ACTION_CASES.items():
        q, k, v, cache, slots, attended, cos, sin = random_action_attention_args(case, dtype, device)
        wide = cache.double()
        measure(op, (q, k, v, cache[0], cache[1], slots, attended, cos, sin, 1e-6),
                (q.double(), k.double(), v.double(), wide[0], wide[1], slots, attended,
                 cos.double(), sin.double(), 1e-6), eager.action_attention)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"{'op':<20}{'backend':<9}{'ms':>9}{'rel err':>10}")
    for r in rows:
        print(f"{r['op']:<20}{r['backend']:<9}{r['ms']:>9.4f}{r['rel_err']:>10.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                              "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
