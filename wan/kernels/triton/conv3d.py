"""A causal convolution with few output channels (the decoder's head: 96 -> 3 channels, 3x3x3,
at full resolution) as one GEMM over the input pixels and a shifted sum.

cuDNN runs the head at ~23 TFLOP/s (1.85 ms for 42 GFLOP on an H200; its full engine search finds
nothing better): with 3 output channels every input element is fetched once per tap (27 times)
for 3 multiply-adds each. Here instead:

1. Z = X @ W_all: every input pixel's channel row [Cin] times all taps' filters [Cin, taps * Cout]
   (81 columns for the head, padded to a multiple of 8), one cuBLAS GEMM over the window
   [B, Cin, F, H, W] seen as [B, F*H*W, Cin] (channels-last: a view);
2. out[b, c, t, h, w] = bias[c] + sum over taps (kt, kh, kw) of Z[b, (t + kt, h + kh - PH,
   w + kw - PW), tap * Cout + c], zero outside the frame: a Triton kernel that reads Z (still in
   L2 for neighbouring rows), sums in float32 and rounds once.

Z is kept in the input's dtype for float16 (each entry a 96-term float32-accumulated dot rounded
once; the error over the 27-term sum stays at cuDNN's level), in float32 for bfloat16 (its 8-bit
mantissa would double the error), and in the input's dtype for float32/float64.

Measured on an H200 at the head's steady shape (window [1, 96, 14, 352, 640], fp16): 0.74 ms
against cuDNN's 1.85 ms, relative error vs float32 2.9e-4 (cuDNN 3.0e-4); Z in float32 1.02 ms
(benchmarks/results/2026-12-01_h200_decoder_convs.json; the benchmark that made it, since
removed, is in docs/LAB_NOTEBOOK.md, "Experiments that left the tree").
"""
import torch
import triton
import triton.language as tl

MAX_COLUMNS = 256  # taps * Cout this op takes (Z's width); wider convs belong to cuDNN


@triton.jit
def _tap_sum_kernel(z_ptr, bias_ptr, out_ptr, frames_in, T_out, H, W, NZ, COUT,
                    sob, sot, soh, sow, HAS_BIAS: tl.constexpr, KT: tl.constexpr,
                    KH: tl.constexpr, KW: tl.constexpr, BLOCK_W: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    row, block = tl.program_id(0), tl.program_id(1)  # row = (b * T_out + t) * H + h
    h = row % H
    t = (row // H) % T_out
    b = row // (H * T_out)
    w = block * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < COUT
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for kt in tl.static_range(KT):
        for kh in tl.static_range(KH):
            hh = w * 0 + (h + kh - (KH - 1) // 2)  # as a vector (the interpreter's masks)
            for kw in tl.static_range(KW):
                ww = w + kw - (KW - 1) // 2
                ok = (ww >= 0) & (ww < W) & (hh >= 0) & (hh < H)
                z_row = ((b * frames_in + t + kt) * H + hh).to(tl.int64) * W + ww
                tap = (kt * KH + kh) * KW + kw
                z = tl.load(z_ptr + z_row[:, None] * NZ + tap * COUT + c[None, :],
                            mask=ok[:, None] & c_ok[None, :], other=0.0)
                acc += z.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    o = b.to(tl.int64) * sob + t.to(tl.int64) * sot + h.to(tl.int64) * soh + w * sow
    tl.store(out_ptr + o[:, None] + c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(w < W)[:, None] & c_ok[None, :])


def _z_dtype(dtype):
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _gemm(a, b, dtype):
    """a [M, K] @ b [K, N] with the result in `dtype` (float32 for half inputs: cuBLAS's
    out_dtype on CUDA, no float32 copy of a)."""
    if a.dtype == dtype:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=dtype)
    return torch.mm(a.to(dtype), b.to(dtype))


def _check(x, weight, bias):
    if x.dim() != 5 or weight.dim() != 5 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x [B, Cin, F, H, W] and weight [Cout, Cin, KT, KH, KW] expected, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    cout, _, kt, kh, kw = weight.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"the spatial kernel must be odd (same padding), got {kh} x {kw}")
    if kt * kh * kw * cout > MAX_COLUMNS:
        raise ValueError(f"{cout} output channels x {kt * kh * kw} taps is more than this op's "
                         f"{MAX_COLUMNS} columns: use a convolution (cuDNN) for wide outputs")
    if x.shape[2] < kt:
        raise ValueError(f"a window of {x.shape[2]} frames is shorter than the kernel's {kt}")
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias must be [{cout}], got {tuple(bias.shape)}")


def conv3d_narrow(x, weight, bias=None):
    """conv3d of the window x [B, Cin, KT - 1 + T, H, W] with weight [Cout, Cin, KT, KH, KW]
    (taps * Cout <= 256), valid in time, zero-padded (KH - 1) / 2, (KW - 1) / 2 in height and
    width, stride 1, + bias [Cout] -> [B, Cout, T, H, W] channels-last, in x's dtype. x may be
    a view of a larger channels-last buffer (its frames a prefix): nothing is copied then."""
    _check(x, weight, bias)
    cout, cin, kt, kh, kw = weight.shape
    b, _, frames, h, w = x.shape
    taps = kt * kh * kw
    nz = -(-taps * cout // 8) * 8  # Z's row: 16-byte aligned for the GEMM
    z_dtype = _z_dtype(x.dtype)
    w_all = torch.zeros(cin, nz, dtype=x.dtype, device=x.device)
    w_all[:, :taps * cout] = weight.permute(1, 2, 3, 4, 0).reshape(cin, taps * cout)
    # per batch element [F*H*W, Cin]: a view of channels-last memory (also of a buffer's prefix)
    rows = x.permute(0, 2, 3, 4, 1).reshape(b, frames * h * w, cin)
    if b == 1:
        z = _gemm(rows[0], w_all, z_dtype).view(1, frames * h * w, nz)
    else:
        z = torch.stack([_gemm(r, w_all, z_dtype) for r in rows])
    t_out = frames - kt + 1
    out = torch.empty(b, cout, t_out, h, w, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last_3d)
    block_w = min(128, triton.next_power_of_2(w))
    _tap_sum_kernel[(b * t_out * h, triton.cdiv(w, block_w))](
        z, bias if bias is not None else z, out, frames, t_out, h, w, nz, cout, out.stride(0),
        out.stride(2), out.stride(3), out.stride(4), HAS_BIAS=bias is not None, KT=kt, KH=kh,
        KW=kw, BLOCK_W=block_w, BLOCK_C=triton.next_power_of_2(cout), num_warps=4)
    return out
