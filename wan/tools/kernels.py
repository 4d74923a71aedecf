"""`python -m wan.kernels`: for every op, the backends that implement it, whether each can run here
(or why not), and what the selection (default: WAN_BACKEND, else auto) picks.

Options: --device (default: cuda when available, else cpu), --dtype (bf16, fp16, fp32, fp64;
default bf16 on cuda, else fp32), --backend (a selection to resolve, as the model's `backend=`: a
name or a YAML path).
"""

import torch

from ..kernels.dtypes import DTYPES, default_dtype_name
from ..kernels.registry import BACKENDS, OPS, BackendUnavailableError, load_selection, resolve
from . import cli

PROG = "python -m wan.kernels"

# head sizes the model calls the ops with: the action modules' heads are 64 wide, the rest 128
HEAD_DIMS = {"mouse_attention": 64, "keyboard_attention": 64}
HEAD_DIM_DEPENDENT = ("attention", "norm_rope_store")


def main(argv=None):
    return cli.run(PROG, _main, argv)


def parse_args(argv=None):
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=cli.device,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="the dtype the ops are checked for (default: bf16 on cuda, else fp32)")
    p.add_argument("--backend", default=None,
                   help="selection to resolve, as the model's backend=: a name or a YAML path "
                   "(default: WAN_BACKEND, else auto)")
    return p.parse_args(argv)


def _main(argv=None):
    args = parse_args(argv)
    device = args.device
    dtype = DTYPES[args.dtype or default_dtype_name(device)]
    selection = load_selection(args.backend)
    print(f"device {device}, dtype {dtype}, torch {torch.__version__}")
    for op in OPS:
        head_dim = HEAD_DIMS.get(op, 128)
        shown = f" (head_dim {head_dim})" if op.endswith(HEAD_DIM_DEPENDENT) else ""
        print(f"\n{op}{shown}")
        for name, backend in BACKENDS.items():
            if not backend.implements(op):
                continue
            reason = backend.problem(op, device, dtype, head_dim)
            label = name
            if name == "flash" and reason is None:
                from ..kernels.flash import IMPLEMENTATION
                label = f"flash ({IMPLEMENTATION})"
            print(f"  {label:<7} {'available' if reason is None else 'unavailable: ' + reason}")
        try:
            chosen, _ = resolve(op, selection[op], device, dtype, head_dim)
            print(f"  -> {selection[op]} picks {chosen}")
        except BackendUnavailableError as err:
            print(f"  -> {selection[op]} fails: {err}")


if __name__ == "__main__":
    raise SystemExit(main())
