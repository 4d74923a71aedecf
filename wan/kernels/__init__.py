"""The old name of what is now two packages: wan/ops (the op registry, its backends and the Triton
kernels) and wan/runtime (what the optimized models run on). Kept for `python -m wan.kernels`, which
lists the ops and their backends as `python -m wan.ops` does."""
