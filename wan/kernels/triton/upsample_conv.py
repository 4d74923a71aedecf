"""The decoder's resample: nearest 2x upsampling followed by a 3x3 convolution (padding 1), as a
2x2 convolution over the small frames and an interleave.

After nearest upsampling every output pixel's 3x3 window sees only a 2x2 block of input pixels,
which ones depending on the output's row and column parity (a, b): for even rows (a = 0) the
kernel's rows 1 and 2 fall on the same input row, for odd rows (a = 1) its rows 0 and 1 do. So
each parity class is a 2x2 convolution of the input with summed taps, and all four classes are
one convolution with 4 * Cout output channels:

1. y = conv2d(x, W4, padding=1): x [N, Cin, H, W] -> y [N, 4 * Cout, H + 1, W + 1], where W4's
   group g = 2a + b holds class (a, b)'s 2x2 kernel (cuDNN; 4 / 9 of the upsampled conv's work,
   and the upsampled frames are never written);
2. out[n, c, 2i + a, 2j + b] = y[n, g * Cout + c, i + a, j + b] (+ bias[c]): a Triton kernel.

Class a's rows: (kernel row 0, rows 1 + 2) at input rows (i - 1, i) for a = 0, (rows 0 + 1, row 2)
at (i, i + 1) for a = 1; the padding row of y's output (index 0 or H) is where those fall off the
frame, as the upsampled frame's zero padding does. The same for columns. The summed taps are
rounded once to the weight's dtype (one rounding more than the upsampled conv's products, at the
same level as its accumulation error).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..eager import check_upsample_conv

def _combine(w: torch.Tensor, dim: int, parity: int) -> torch.Tensor:
    """The 3 taps of w along `dim` summed into the 2x2 kernel's 2 for one output parity: even
    (0): (tap 0, taps 1 + 2), odd (1): (taps 0 + 1, tap 2). Slices and adds on w's device only
    (no host tensor: it may run inside a CUDA graph capture)."""
    t0, t1, t2 = w.unbind(dim)
    pair = (t0, t1 + t2) if parity == 0 else (t0 + t1, t2)
    return torch.stack(pair, dim)


def subpixel_weights(weight: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, 3, 3] -> [4 * Cout, Cin, 2, 2]: group g = 2a + b is output parity class (a, b)'s
    2x2 kernel; taps summed in float32 (float64 for float64 weights), rounded once to the
    weight's dtype; channels-last like the decoder's weights."""
    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(wide)
    groups = [_combine(_combine(w, 2, a), 3, b) for a in (0, 1) for b in (0, 1)]
    return torch.cat(groups).to(weight.dtype).contiguous(memory_format=torch.channels_last)


@triton.jit
def _interleave_kernel(y_ptr, bias_ptr, out_ptr, H, W, C, HAS_BIAS: tl.constexpr,
                       BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)  # row = n * 2H + output row
    n, oh = row // (2 * H), row % (2 * H)
    a = oh % 2
    ow = block * BLOCK_W + tl.arange(0, BLOCK_W)
    b = ow % 2
    c = tl.arange(0, BLOCK_C)
    mask = (ow < 2 * W)[:, None] & (c < C)[None, :]
    # y is channels-last [N, H + 1, W + 1, 4C]: class (a, b)'s pixel (i + a, j + b), group 2a + b
    src_pixel = (n.to(tl.int64) * (H + 1) + oh // 2 + a) * (W + 1) + ow // 2 + b
    src = src_pixel[:, None] * (4 * C) + ((2 * a + b) * C)[:, None] + c[None, :]
    value = tl.load(y_ptr + src, mask=mask, other=0.0)
    if HAS_BIAS:  # in float32 (float64 for float64 frames), rounded once at the store
        bias = tl.load(bias_ptr + c, mask=c < C, other=0.0)
        if y_ptr.dtype.element_ty == tl.float64:
            value = value + bias[None, :]
        else:
            value = value.to(tl.float32) + bias.to(tl.float32)[None, :]
    dst = (row.to(tl.int64) * 2 * W + ow)[:, None] * C + c[None, :]
    tl.store(out_ptr + dst, value.to(out_ptr.dtype.element_ty), mask=mask)


def upsample_conv2d(x, weight, bias=None):
    """conv2d(nearest 2x upsampling of x, weight, padding 1) + bias for channels-last frames
    x [N, Cin, H, W] and a 3x3 weight [Cout, Cin, 3, 3] -> [N, Cout, 2H, 2W] channels-last, in
    x's dtype (see the module's docstring)."""
    check_upsample_conv(x, weight, bias)
    n, _, h, w = x.shape
    cout = weight.shape[0]
    x = x.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, subpixel_weights(weight), None, padding=1)
    y = y.contiguous(memory_format=torch.channels_last)  # [N, 4 * Cout, H + 1, W + 1]
    out = torch.empty(n, cout, 2 * h, 2 * w, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    block_c = triton.next_power_of_2(cout)
    block_w = max(1, min(triton.next_power_of_2(2 * w), 4096 // block_c))
    _interleave_kernel[(n * 2 * h, triton.cdiv(2 * w, block_w))](
        y, bias if bias is not None else y, out, h, w, cout, HAS_BIAS=bias is not None,
        BLOCK_W=block_w, BLOCK_C=block_c, num_warps=4)
    return out
