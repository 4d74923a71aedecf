"""The ops the optimized models call, and their implementations.

* `registry.py`: every op, the backends that implement it, what each can run (device, dtype, head
  size) and how one is chosen (`python -m wan.kernels` shows what runs here);
* the backends: `eager.py` (PyTorch, the reference twin of every op), `flash.py` (FlashAttention),
  `cublas.py` (FP8 GEMMs through torch._scaled_mm), `triton/` (the fused kernels);
* `fp8.py` (the e4m3 quantization math), `dtypes.py` (dtype names).

The bottom of the library: nothing here imports from the models, the runtime or above.
"""
