"""What the optimized models run on, between their forward and the ops (wan/kernels).

* `stream_cache.py` (the ring-buffer caches, over the model's own storage or the caller's
  upstream-style dicts), `layer_plan.py` (per-layer packed weights and FP8 copies: what each
  GEMM reads), `cuda_graphs.py` (capture and replay), `weight_watch.py` (derived state forgotten
  when the weights change), `conv_search_cache.py` (the decoder's cuDNN engine choices), `log.py`;
* `options.py`: the options object (FastOptions), resolved once from keyword/config.json, the
  environment and the defaults, and handed to whoever needs it. It imports no implementation.

Imports point down: wan/modules imports from here and from wan/kernels; this package imports only
wan/kernels. The math the reference and optimized models share is wan/modules/shared/, the
optimized DiT's streaming call and math wan/modules/streaming/; `python -m wan.integrate` copies
those, this package and wan/kernels into an upstream Matrix-Game-2 tree.
"""
