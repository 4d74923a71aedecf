"""Math the Triton kernels share, written once as `@triton.jit` helpers. Each has one eager twin
(the reference it is tested against, tests/kernels/test_triton_kernels.py and tests/kernels/test_fp8.py):

* `gelu_tanh`: torch's `F.gelu(x, approximate="tanh")` (wan/kernels/eager.py);
* `e4m3_row_scale`: `row_scales` in wan/kernels/fp8.py; the kernels take E4M3_MAX and MIN_SCALE
  from there as `tl.constexpr` arguments (no literal here);
* `rotate_pairs`: the complex multiply of `rope` in wan/kernels/eager.py.
"""
import triton
import triton.language as tl


@triton.jit
def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) of float32 x, in float32."""
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    tanh = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
    return 0.5 * x * (1.0 + tanh)


@triton.jit
def e4m3_row_scale(amax, E4M3_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """A row's float32 FP8 scale from its largest magnitude: amax / E4M3_MAX (correctly rounded,
    as torch divides), at least MIN_SCALE (an all-zero row)."""
    return tl.maximum(tl.math.div_rn(amax, E4M3_MAX), MIN_SCALE)


@triton.jit
def rotate_pairs(x, cos, sin, HEAD_DIM: tl.constexpr):
    """Rows x [R, HEAD_DIM] (float32) with channel pairs (2i, 2i+1) rotated by angles whose cos and
    sin broadcast to [R, HEAD_DIM // 2]: (even cos - odd sin, even sin + odd cos)."""
    even, odd = tl.split(tl.reshape(x, [x.shape[0], HEAD_DIM // 2, 2]))
    return tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos),
                      [x.shape[0], HEAD_DIM])
