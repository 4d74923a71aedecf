"""The old name of what is now two packages: wan/ops (the op registry, its backends and the Triton
kernels) and wan/runtime (what the optimized models run on). Kept for the command `python -m
wan.kernels` (wan/tools/backends.py), which lists every op's backends and what runs here."""
