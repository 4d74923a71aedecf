"""Backend registry and kernels for OptimizedCausalWanModel.

Empty for now: the registry (eager / flash / triton / auto) lands with OptimizedCausalWanModel.
The reference model in wan.modules never imports from here.
"""
