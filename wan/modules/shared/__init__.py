"""Math the reference models (causal_model.py, action_module.py, rope.py, ...) and the optimized
ones both import, so that each piece has one source: the timestep sinusoid, attention windows and
action-condition windows (`conditioning`), rotary angles of any position (`rope_tables`), every
forward's input checks (`input_checks`) and upstream's zeroed cache dicts (`upstream_caches`).
`python -m wan.integrate` copies this package into a Matrix-Game-2 checkout with the optimized
DiT."""
