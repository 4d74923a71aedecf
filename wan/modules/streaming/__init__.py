"""OptimizedCausalWanModel's streaming forward, in two files read in this order:

* `call.py`: everything a call does around the math (input checks, the ring caches over the
  caller's dicts or the model's own streams, stream positions, the ops and plan per device, the
  image context's keys/values, CUDA graphs, warm-up);
* `blocks.py`: the math itself, top to bottom (a call, a transformer block, an action module, the
  GEMMs with their epilogues), device work only.

The model's class (optimized_causal_model.py) holds what a user calls; its forward hands a
streaming call to `call.StreamingForward`, which runs `blocks.compute`. Calls go one way, down to
wan/runtime (caches, plan, graphs) and wan/kernels (the ops).
"""
