"""`python -m wan.kernels`: every op, every backend, available or why not, and what `auto` picks.

Options: --device (default: cuda when available, else cpu), --dtype (default bf16 on cuda, else
float32), --backend (a selection to resolve, as the model's `backend=`: name, or YAML path).
"""
import argparse

import torch

from .registry import BACKENDS, OPS, BackendUnavailableError, load_selection, resolve

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32,
          "float64": torch.float64}
HEAD_DIMS = {"mouse_attention": 64, "keyboard_attention": 64}  # action heads; the rest are 128


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m wan.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--backend", default=None, help="selection to resolve (default: WAN_BACKEND or auto)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "float32")]
    selection = load_selection(args.backend)
    print(f"device {device}, dtype {dtype}, torch {torch.__version__}")
    flash_note = ""
    if BACKENDS["flash"].problem("self_attention", device, dtype, 128) is None:
        from .flash import IMPLEMENTATION
        flash_note = f" (flash uses {IMPLEMENTATION})"
    for op in OPS:
        head_dim = HEAD_DIMS.get(op, 128)
        print(f"\n{op} (head_dim {head_dim})")
        for name, backend in BACKENDS.items():
            reason = backend.problem(op, device, dtype, head_dim)
            print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
        try:
            chosen, _ = resolve(op, selection[op], device, dtype, head_dim)
            print(f"  -> {selection[op]} picks {chosen}")
        except BackendUnavailableError as err:
            print(f"  -> {selection[op]} fails: {err}")
    print(flash_note.strip())


if __name__ == "__main__":
    main()
