"""What the optimized models run on, between their forward and the ops (wan/kernels).

* `stream_cache.py` (the ring-buffer caches, over the model's own storage or the caller's
  upstream-style dicts: `upstream_caches.py`), `layer_plan.py` (per-layer packed weights and the
  GEMM plan, FP8 copies), `cuda_graphs.py` (capture and replay), `weight_watch.py` (derived state
  forgotten when the weights change), `options.py` (the options object, resolved once), `log.py`;
* shared with the reference models in wan/modules: `input_checks.py` (every forward's input
  checks), `rope_tables.py` (rotary angles of any position), `conditioning.py` (timestep
  sinusoid, attention window, action-condition windows, tokens per frame).

Imports point down: wan/modules imports from here and from wan/kernels; this package imports only
wan/kernels. So these two packages plus wan/modules/optimized_causal_model.py can be copied into an
upstream Matrix-Game-2 tree (`python -m wan.integrate`) and run over upstream's own CausalWanModel.
"""
