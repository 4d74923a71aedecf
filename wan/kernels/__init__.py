"""What OptimizedCausalWanModel runs on, and the pieces both models share.

* `registry.py` and the backends (`eager.py`, `flash.py`, `triton/`, `cublas.py`): each op's
  implementations and how one is chosen (`python -m wan.kernels` shows what runs here);
* `stream_cache.py` (the ring-buffer caches) and `cuda_graphs.py` (capture and replay);
* shared with the reference model in wan/modules: `input_checks.py` (every forward's input
  checks), `rope_tables.py` (rotary angles of any position), `conditioning.py` (timestep
  sinusoid, attention window, action-condition windows).

Dependencies point one way: wan/modules imports from here, never the reverse, so this package plus
wan/modules/optimized_causal_model.py can be copied into an upstream Matrix-Game-2 tree
(`python -m wan.integrate`) and run over upstream's own CausalWanModel.
"""
