"""The streaming VAE decoder's dominant convolutions, on their real shapes, cuDNN against our own.

Shapes: what OptimizedVAEDecoderWrapper runs per steady 12-frame block at 44 x 80 latents (B=1,
fp16, channels-last; the window is the conv's static buffer [B, C, 2 + T, H, W], history first,
valid in time, zero-padded 1 in H/W). Candidates per shape:

* `cudnn`: F.conv3d / F.conv2d as the decoder calls it now (channels-last, no bias inside
  residual blocks); `cudnn_pad128`: Cout padded to 128 with zero filters (96-channel convs);
* `torch <mode>` (--torch-modes): the same call in a child process under cudnn.benchmark with
  benchmark_limit 10 (torch's default) or 0 (every engine cuDNN offers);
* `triton[cfg]`: a Triton implicit GEMM (below) per tile config (BLOCK_M, BLOCK_N1, BLOCK_N2,
  BLOCK_K, warps, stages), `triton_tma[cfg]` the same with TMA tensor-descriptor loads (the
  spatial padding from the descriptor's out-of-bounds zero fill), `triton_fused` with bias +
  residual in the epilogue;
* `cudnn_fe[i]`: every plan of cuDNN's graph API (nvidia-cudnn-frontend, carried as a wheel) for
  the plain conv, `cudnn_fe_fused` for conv + bias + residual as one graph;
* `head_as_gemm`: the head (96 -> 3) as one GEMM over the input pixels + the 27-tap shifted sum
  (the library's conv3d_narrow, wan/kernels/triton/conv3d.py, is this).

Every candidate is checked against torch's conv in float32 (TF32 off): relative norm and max
error relative to max |ref|. Times: CUDA events per call, median of --reps after warm-up.
--decoder-block instead times the whole decoder's steady block per mode (default, cuDNN's full
engine search, the head through conv3d_narrow) in child processes. Writes $OUT/decoder_convs.json
(or decoder_block.json) and prints a table last. The runs behind
benchmarks/results/2026-12-01_h200_decoder_convs.json:

    python benchmarks/decoder_convs.py
    python benchmarks/decoder_convs.py --skip-triton --torch-modes default,benchmark0 \
        --fe-plain c192,c384_88,r192_96,c384_44 --fe-fused c96,c192 --fe-budget 10 \
        --fe-fused-budget 20 --reps 10
    WAN_SRC=<a copy of the library> python benchmarks/decoder_convs.py \
        --decoder-block default,search+narrow_head --blocks 10
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

# the library: this checkout's, or another copy's (WAN_SRC, e.g. a clean export of a commit)
sys.path.insert(0, os.environ.get("WAN_SRC") or str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


# name: (Cin, Cout, kernel, window frames, H, W, per steady block, conv2d?, bias?)
SHAPES = {  # (in this order: the ones that matter most first)
    "c96": (96, 96, (3, 3, 3), 14, 352, 640, 6, False, False),
    "head": (96, 3, (3, 3, 3), 14, 352, 640, 1, False, True),
    "c192": (192, 192, (3, 3, 3), 14, 176, 320, 6, False, False),
    "c384_88": (384, 384, (3, 3, 3), 8, 88, 160, 5, False, False),
    "c384_44": (384, 384, (3, 3, 3), 5, 44, 80, 10, False, False),
    "r192_96": (192, 96, (1, 3, 3), 12, 352, 640, 1, True, True),   # Resample's 2-D conv, 12 frames
}
# Triton configs per shape: (BLOCK_M, BLOCK_N1, BLOCK_N2, BLOCK_K, num_warps, num_stages)
TRITON_CONFIGS = {
    "c96": [(128, 64, 32, 32, 4, 3), (128, 64, 32, 32, 4, 4), (128, 64, 32, 32, 8, 4),
            (256, 64, 32, 32, 8, 3), (64, 64, 32, 32, 4, 4), (128, 128, 0, 32, 4, 4),
            (128, 128, 0, 32, 8, 4), (256, 128, 0, 32, 8, 3), (128, 32, 0, 32, 4, 4)],
    "head": [(128, 16, 0, 32, 4, 3), (256, 16, 0, 32, 8, 3), (64, 16, 0, 32, 4, 4),
             (256, 16, 0, 32, 4, 3), (128, 16, 0, 32, 4, 5)],
    "c192": [(128, 128, 64, 64, 8, 3), (128, 128, 0, 64, 8, 3), (128, 64, 0, 64, 4, 4),
             (256, 64, 0, 64, 8, 3), (128, 128, 64, 32, 8, 4)],
    "c384_88": [(128, 128, 0, 64, 8, 3), (128, 128, 0, 64, 4, 4), (256, 128, 0, 64, 8, 3),
                (128, 256, 0, 64, 8, 3)],
    "c384_44": [(128, 128, 0, 64, 8, 3), (64, 128, 0, 64, 4, 4), (128, 128, 0, 64, 4, 4)],
    "r192_96": [(128, 64, 32, 64, 4, 3), (128, 64, 32, 64, 8, 3), (256, 64, 32, 64, 8, 3),
                (128, 128, 0, 64, 8, 3), (128, 64, 32, 32, 4, 4)],
}
TORCH_MODES = {"default": dict(benchmark=False), "benchmark10": dict(benchmark=True, limit=10),
               "benchmark0": dict(benchmark=True, limit=0)}
# TMA configs: (BLOCK_H, BLOCK_W, BLOCK_N1, BLOCK_N2, BLOCK_K, num_warps, num_stages)
TMA_CONFIGS = {
    "c96": [(1, 128, 64, 32, 32, 4, 4), (2, 64, 64, 32, 32, 4, 4), (1, 128, 128, 0, 32, 8, 4),
            (2, 128, 64, 32, 32, 8, 3)],
    "c192": [(2, 64, 128, 64, 64, 8, 3)],  # one N tile per program: BLOCK_N1 + BLOCK_N2 >= Cout
}


# ---------------------------------------------------------------------------------- implicit GEMM
# A Triton implicit-GEMM conv over the channels-last window (a candidate measured here, not a
# library op: cuDNN with its full engine search is faster on every real shape, see the notes).
# Rows are output pixels (b, t, h, w), columns output channels, the reduction runs over the
# KT*KH*KW taps x Cin; the A tile of tap (kt, kh, kw) is the input shifted by (kt, kh - PH,
# kw - PW), rows outside the frame masked to zero (the spatial padding). Weights packed
# [taps * Cin, Cout]; 96 output channels as one tile of 64 + one of 32 sharing the A tile.
@triton.jit
def _conv3d_kernel(x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
                   M, T_out, H, W, Cin, Cout,
                   sxb, sxt, sxh, sxw, sob, sot, soh, sow, srb, srt, srh, srw,
                   KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, EVEN_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    PH: tl.constexpr = (KH - 1) // 2
    PW: tl.constexpr = (KW - 1) // 2
    BLOCK_N: tl.constexpr = BLOCK_N1 + BLOCK_N2
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(Cout, BLOCK_N)
    pid_m, pid_n = pid // n_tiles, pid % n_tiles

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    w_o = m % W
    rest = m // W
    h_o = rest % H
    rest = rest // H
    t_o = rest % T_out
    b_o = rest // T_out
    x_row = (b_o.to(tl.int64) * sxb + t_o.to(tl.int64) * sxt + h_o.to(tl.int64) * sxh
             + w_o.to(tl.int64) * sxw)
    k = tl.arange(0, BLOCK_K)
    n1 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N1)
    n1_ok = n1 < Cout
    acc1 = tl.zeros((BLOCK_M, BLOCK_N1), dtype=tl.float32)
    if BLOCK_N2 > 0:
        n2 = pid_n * BLOCK_N + BLOCK_N1 + tl.arange(0, BLOCK_N2)
        n2_ok = n2 < Cout
        acc2 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)

    c_steps = tl.cdiv(Cin, BLOCK_K)
    for i in range(0, KT * KH * KW * c_steps):
        tap = i // c_steps
        c0 = (i - tap * c_steps) * BLOCK_K
        kt = tap // (KH * KW)
        kh = (tap // KW) % KH
        kw = tap % KW
        hh = h_o + (kh - PH)
        ww = w_o + (kw - PW)
        row_ok = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        shift = kt * sxt + (kh - PH) * sxh + (kw - PW) * sxw
        a_ptrs = x_ptr + (x_row + shift)[:, None] + (c0 + k)[None, :]
        w_rows = (tap * Cin + c0 + k)[:, None] * Cout
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b1 = tl.load(w_ptr + w_rows + n1[None, :], mask=n1_ok[None, :], other=0.0)
        else:
            k_ok = (c0 + k) < Cin
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b1 = tl.load(w_ptr + w_rows + n1[None, :], mask=k_ok[:, None] & n1_ok[None, :],
                         other=0.0)
        acc1 = tl.dot(a, b1, acc1)
        if BLOCK_N2 > 0:
            if EVEN_K:
                b2 = tl.load(w_ptr + w_rows + n2[None, :], mask=n2_ok[None, :], other=0.0)
            else:
                b2 = tl.load(w_ptr + w_rows + n2[None, :], mask=k_ok[:, None] & n2_ok[None, :],
                             other=0.0)
            acc2 = tl.dot(a, b2, acc2)

    o_row = (b_o.to(tl.int64) * sob + t_o.to(tl.int64) * sot + h_o.to(tl.int64) * soh
             + w_o.to(tl.int64) * sow)
    _epilogue(acc1, n1, n1_ok, m_ok, o_row, b_o, t_o, h_o, w_o, bias_ptr, res_ptr, out_ptr,
              srb, srt, srh, srw, HAS_BIAS, HAS_RES)
    if BLOCK_N2 > 0:
        _epilogue(acc2, n2, n2_ok, m_ok, o_row, b_o, t_o, h_o, w_o, bias_ptr, res_ptr, out_ptr,
                  srb, srt, srh, srw, HAS_BIAS, HAS_RES)


@triton.jit
def _epilogue(acc, n, n_ok, m_ok, o_row, b_o, t_o, h_o, w_o, bias_ptr, res_ptr, out_ptr,
              srb, srt, srh, srw, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    if HAS_RES:
        r_row = (b_o.to(tl.int64) * srb + t_o.to(tl.int64) * srt + h_o.to(tl.int64) * srh
                 + w_o.to(tl.int64) * srw)
        r = tl.load(res_ptr + r_row[:, None] + n[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + o_row[:, None] + n[None, :], y, mask=mask)


def default_config(cin: int, cout: int):
    """A tile that fits any decoder conv: one N tile for up to 128 outputs (96 = 64 + 32)."""
    block_k = 64 if cin % 64 == 0 else 32 if cin % 32 == 0 else 16
    if cout <= 16:
        return (128, 16, 0, block_k, 4, 3)
    if cout == 96:
        return (128, 64, 32, block_k, 4, 3)
    if cout <= 64:
        return (128, 64, 0, block_k, 4, 3)
    return (128, 128, 0, block_k, 8, 3)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, KT, KH, KW] -> [KT*KH*KW*Cin, Cout] contiguous (row = tap * Cin + ci)."""
    cout, cin, kt, kh, kw = weight.shape
    return weight.permute(2, 3, 4, 1, 0).reshape(kt * kh * kw * cin, cout).contiguous()


def _pixel_strides(t: torch.Tensor, name: str):
    """(b, t, h, w) element strides of a [B, C, T, H, W] tensor whose channels are contiguous."""
    if t.stride(1) != 1 and t.shape[1] != 1:
        raise ValueError(f"{name} must be channels-last (channel stride 1), got strides "
                         f"{t.stride()}")
    return t.stride(0), t.stride(2), t.stride(3), t.stride(4)


def conv3d_window(x, packed, kernel_size, bias=None, residual=None, out=None, config=None):
    """conv of window x [B, Cin, KT - 1 + T, H, W] (channels-last) with packed weights
    (pack_weight) of a (KT, KH, KW) kernel, valid in time, zero-padded in H/W, stride 1 ->
    [B, Cout, T, H, W] channels-last (into `out` when given), + bias [Cout], + residual."""
    grid, args, meta = launch_args(x, packed, kernel_size, bias, residual, out, config)
    _conv3d_kernel[grid](*args, **meta)
    return args[4]


def launch_args(x, packed, kernel_size, bias=None, residual=None, out=None, config=None):
    """(grid, positional arguments, keyword arguments) of the kernel for conv3d_window's call
    (args[4] is the output; out is allocated here when None)."""
    kt, kh, kw = kernel_size
    b, cin, frames, h, w = x.shape
    cout = packed.shape[1]
    if packed.shape[0] != kt * kh * kw * cin:
        raise ValueError(f"packed weights {tuple(packed.shape)} do not match Cin {cin} and "
                         f"kernel {tuple(kernel_size)}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError("the spatial kernel must be odd (same padding)")
    t_out = frames - kt + 1
    if t_out < 1:
        raise ValueError(f"a window of {frames} frames is shorter than the kernel's {kt}")
    if out is None:
        out = torch.empty(b, cout, t_out, h, w, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last_3d)
    if tuple(out.shape) != (b, cout, t_out, h, w):
        raise ValueError(f"out must be {(b, cout, t_out, h, w)}, got {tuple(out.shape)}")
    if residual is not None and tuple(residual.shape) != tuple(out.shape):
        raise ValueError(f"residual {tuple(residual.shape)} does not match {tuple(out.shape)}")
    sx, so = _pixel_strides(x, "x"), _pixel_strides(out, "out")
    sr = _pixel_strides(residual, "residual") if residual is not None else (0, 0, 0, 0)
    block_m, block_n1, block_n2, block_k, warps, stages = (
        config or default_config(cin, cout))
    m = b * t_out * h * w
    grid = (triton.cdiv(m, block_m) * triton.cdiv(cout, block_n1 + block_n2),)
    args = (x, packed, bias if bias is not None else packed,
            residual if residual is not None else x, out, m, t_out, h, w, cin, cout, *sx, *so, *sr)
    meta = dict(KT=kt, KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                EVEN_K=cin % block_k == 0, BLOCK_M=block_m, BLOCK_N1=block_n1,
                BLOCK_N2=block_n2, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return grid, args, meta


# ---------------------------------------------------------------------------------- TMA variant
@triton.jit
def _conv3d_tma_kernel(x_desc, w1_desc, w2_desc, out_ptr, T_out, H, W, Cin, Cout,
                       sob, sot, soh, sow,
                       KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N1: tl.constexpr,
                       BLOCK_N2: tl.constexpr, BLOCK_K: tl.constexpr):
    PH: tl.constexpr = (KH - 1) // 2
    PW: tl.constexpr = (KW - 1) // 2
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_h = tl.cdiv(H, BLOCK_H)
    w0 = (pid % tiles_w) * BLOCK_W
    h0 = ((pid // tiles_w) % tiles_h) * BLOCK_H
    bt = pid // (tiles_w * tiles_h)
    t = bt % T_out
    b = bt // T_out
    acc1 = tl.zeros((BLOCK_M, BLOCK_N1), dtype=tl.float32)
    if BLOCK_N2 > 0:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)
    c_steps = Cin // BLOCK_K
    for i in range(0, KT * KH * KW * c_steps):
        tap = i // c_steps
        c0 = (i - tap * c_steps) * BLOCK_K
        kt = tap // (KH * KW)
        kh = (tap // KW) % KH
        kw = tap % KW
        a = x_desc.load([b, t + kt, h0 + kh - PH, w0 + kw - PW, c0]).reshape(BLOCK_M, BLOCK_K)
        acc1 = tl.dot(a, w1_desc.load([tap * Cin + c0, 0]), acc1)
        if BLOCK_N2 > 0:
            acc2 = tl.dot(a, w2_desc.load([tap * Cin + c0, BLOCK_N1]), acc2)
    r = tl.arange(0, BLOCK_M)
    hh = h0 + r // BLOCK_W
    ww = w0 + r % BLOCK_W
    m_ok = (hh < H) & (ww < W)
    row = b.to(tl.int64) * sob + t.to(tl.int64) * sot + hh.to(tl.int64) * soh + ww * sow
    n1 = tl.arange(0, BLOCK_N1)
    tl.store(out_ptr + row[:, None] + n1[None, :], acc1.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (n1 < Cout)[None, :])
    if BLOCK_N2 > 0:
        n2 = BLOCK_N1 + tl.arange(0, BLOCK_N2)
        tl.store(out_ptr + row[:, None] + n2[None, :], acc2.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & (n2 < Cout)[None, :])


def tma_launch(x, packed_padded, kernel_size, cout, out, cfg):
    """(grid, args, meta) of the TMA kernel; packed_padded: [K, BLOCK_N1 + BLOCK_N2] zero-padded."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    bh, bw, n1, n2, bk, warps, stages = cfg
    kt, kh, kw = kernel_size
    b, cin, frames, h, w = x.shape
    xp = x.permute(0, 2, 3, 4, 1)  # [B, F, H, W, C], channels contiguous
    x_desc = TensorDescriptor(xp, list(xp.shape), list(xp.stride()), [1, 1, bh, bw, bk])
    w1 = TensorDescriptor(packed_padded, list(packed_padded.shape), list(packed_padded.stride()),
                          [bk, n1])
    w2 = TensorDescriptor(packed_padded, list(packed_padded.shape), list(packed_padded.stride()),
                          [bk, max(n2, 16)]) if n2 else w1
    t_out = frames - kt + 1
    grid = (b * t_out * triton.cdiv(h, bh) * triton.cdiv(w, bw),)
    so = out.stride(0), out.stride(2), out.stride(3), out.stride(4)
    args = (x_desc, w1, w2, out, t_out, h, w, cin, cout, *so)
    meta = dict(KT=kt, KH=kh, KW=kw, BLOCK_H=bh, BLOCK_W=bw, BLOCK_N1=n1, BLOCK_N2=n2,
                BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return grid, args, meta


# ---------------------------------------------------------------------------------- helpers
def make_inputs(name, device="cuda", dtype=torch.float16, seed=0):
    cin, cout, k, frames, h, w, _, conv2d, with_bias = SHAPES[name]
    torch.manual_seed(seed)
    if conv2d:  # frames [N, C, H, W] channels-last, seen as a [1, C, N, H, W] window
        x4 = torch.empty(frames, cin, h, w, dtype=dtype, device=device,
                         memory_format=torch.channels_last)
        x = x4.permute(1, 0, 2, 3).unsqueeze(0)
    else:
        x4 = None
        x = torch.empty(1, cin, frames, h, w, dtype=dtype, device=device,
                        memory_format=torch.channels_last_3d)
    x.copy_(torch.randn(x.shape, device=device, dtype=dtype))  # into the channels-last memory
    weight = (torch.randn(cout, cin, *k, device=device) / (cin * k[0] * k[1] * k[2]) ** 0.5)
    weight = weight.to(dtype)
    bias = (0.1 * torch.randn(cout, device=device)).to(dtype)
    return x, x4, weight, bias


def out_like(name, x, cout, device="cuda", dtype=torch.float16):
    cin, cout, k, frames, h, w, _, conv2d, _ = SHAPES[name]
    return torch.empty(1, cout, frames - k[0] + 1, h, w, dtype=dtype, device=device,
                       memory_format=torch.channels_last_3d)


def tflop(name):
    cin, cout, k, frames, h, w, _, _, _ = SHAPES[name]
    return 2 * cin * cout * k[0] * k[1] * k[2] * (frames - k[0] + 1) * h * w / 1e12


def bench(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def errors(y, ref):
    y = y.float()
    diff = (y - ref)
    return {"rel_norm": (diff.norm() / ref.norm()).item(),
            "max_err_rel": (diff.abs().max() / ref.abs().max()).item()}


# ---------------------------------------------------------------------------------- precompile
def _compile_job(job):
    """In a worker process: compile one kernel config into Triton's on-disk cache."""
    kind, name, cfg = job
    t0 = time.time()
    try:
        torch.cuda.set_device(0)
        cin, cout, k, frames, h, w, _, _, with_bias = SHAPES[name]
        x = torch.empty(1, cin, frames, h, w, dtype=torch.float16, device="cuda",
                        memory_format=torch.channels_last_3d)
        if SHAPES[name][7]:
            x = torch.empty(frames, cin, h, w, dtype=torch.float16, device="cuda",
                            memory_format=torch.channels_last).permute(1, 0, 2, 3).unsqueeze(0)
        out = out_like(name, x, cout)
        if kind == "triton":
            packed = torch.empty(k[0] * k[1] * k[2] * cin, cout, dtype=torch.float16,
                                 device="cuda")
            bias = torch.empty(cout, dtype=torch.float16, device="cuda") if with_bias else None
            grid, args, meta = launch_args(x, packed, k, bias, None, out, cfg)
            _conv3d_kernel.warmup(*args, grid=grid, **meta)
            if name in ("c96", "c192") and not with_bias:  # fused bias+residual variant too
                bias = torch.empty(cout, dtype=torch.float16, device="cuda")
                grid, args, meta = launch_args(x, packed, k, bias, out.clone(), out, cfg)
                _conv3d_kernel.warmup(*args, grid=grid, **meta)
        else:
            n = cfg[2] + cfg[3]
            packed = torch.zeros(k[0] * k[1] * k[2] * cin, n, dtype=torch.float16, device="cuda")
            grid, args, meta = tma_launch(x, packed, k, cout, out, cfg)
            _conv3d_tma_kernel.warmup(*args, grid=grid, **meta)
        return job, time.time() - t0, None
    except Exception as err:  # noqa: BLE001 - reported, the run goes on
        return job, time.time() - t0, f"{type(err).__name__}: {str(err)[:400]}"


def precompile(names, workers):
    jobs = [("triton", n, c) for n in names for c in TRITON_CONFIGS[n]]
    jobs += [("tma", n, c) for n in names for c in TMA_CONFIGS.get(n, [])]
    t0 = time.time()
    failed = {}
    import multiprocessing
    with ProcessPoolExecutor(max_workers=workers,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        for job, seconds, err in pool.map(_compile_job, jobs):
            if err:
                failed[str(job)] = err
                print(f"compile failed {job}: {err}", flush=True)
    print(f"precompiled {len(jobs)} configs in {time.time() - t0:.1f} s "
          f"({len(failed)} failed)", flush=True)
    return time.time() - t0, failed


# ---------------------------------------------------------------------------------- cuDNN graph API
def cudnn_fe_candidates(name, x, x4, weight, bias, residual, reps, record, ref, ref_fused,
                        plain=True, fused=True, budget_s=30.0, fused_budget_s=30.0):
    """Every plan cuDNN's graph API offers (heuristics A, B, fallback) for the plain conv, each
    built and timed; then the same for conv + bias + residual as one graph (within budget_s
    each). 2-D convs (r192_96) as 4-D graphs over the frames, as torch calls them."""
    import cudnn
    record["cudnn_backend_version"] = cudnn.backend_version()
    handle = cudnn.create_handle()
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    conv2d = SHAPES[name][7]
    if conv2d:
        xg, wg, padding = x4, weight[:, :, 0].contiguous(memory_format=torch.channels_last), [1, 1]
        out4 = torch.empty(x4.shape[0], weight.shape[0], *x4.shape[2:], dtype=x.dtype,
                           device=x.device, memory_format=torch.channels_last)
        out, view = out4, lambda: out4.permute(1, 0, 2, 3).unsqueeze(0)
        res_g = residual[0].permute(1, 0, 2, 3) if residual is not None else None
        bias_g = bias.view(1, -1, 1, 1)
    else:
        xg, wg, padding = x, weight, [0, SHAPES[name][2][1] // 2, SHAPES[name][2][2] // 2]
        out = torch.empty(x.shape[0], weight.shape[0], x.shape[2] - weight.shape[2] + 1,
                          *x.shape[3:], dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last_3d)
        view = lambda: out  # noqa: E731
        res_g, bias_g = residual, bias.view(1, -1, 1, 1, 1)
    results = []
    half, f32 = cudnn.data_type.HALF, cudnn.data_type.FLOAT

    def graph_for(epilogue):
        g = cudnn.pygraph(io_data_type=half, intermediate_data_type=f32, compute_data_type=f32,
                          handle=handle)
        X = g.tensor(name="X", dim=list(xg.shape), stride=list(xg.stride()), data_type=half)
        Wt = g.tensor(name="W", dim=list(wg.shape), stride=list(wg.stride()), data_type=half)
        nd = len(padding)
        Y = g.conv_fprop(image=X, weight=Wt, padding=padding, stride=[1] * nd,
                         dilation=[1] * nd, compute_data_type=f32, name="conv")
        pack = {X: xg, Wt: wg}
        if epilogue:
            Y.set_data_type(f32)
            Bt = g.tensor(name="B", dim=list(bias_g.shape), stride=list(bias_g.stride()),
                          data_type=half)
            Y = g.add(a=Y, b=Bt, compute_data_type=f32, name="bias")
            pack[Bt] = bias_g
            if epilogue == "bias+res":
                Rt = g.tensor(name="R", dim=list(res_g.shape), stride=list(res_g.stride()),
                              data_type=half)
                Y.set_data_type(f32)
                Y = g.add(a=Y, b=Rt, compute_data_type=f32, name="res")
                pack[Rt] = res_g
        Y.set_output(True).set_data_type(half).set_dim(list(out.shape)).set_stride(
            list(out.stride()))
        pack[Y] = out
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
        g.check_support()
        return g, pack

    def time_plans(label, epilogue, ref_, budget_s):
        t0 = time.time()
        g, pack = graph_for(epilogue)
        count = g.get_execution_plan_count()
        print(f"cudnn_fe {label}: {count} plans", flush=True)
        done = 0
        for i in range(count):
            if time.time() - t0 > budget_s:
                results.append({"candidate": f"{label}[...]",
                                "note": f"stopped after {done} of {count} plans (time budget)"})
                break
            done += 1
            try:
                g.build_plan_at_index(i)
                ws = g.get_workspace_size_plan_at_index(i)
                workspace = torch.empty(max(ws, 1), dtype=torch.uint8, device=x.device)
                fn = lambda: g.execute_plan_at_index(pack, workspace, i, handle=handle)  # noqa: E731
                fn()
                torch.cuda.synchronize()
                err = errors(view(), ref_)
                med, best = bench(fn, max(3, reps // 3), warmup=1)
                results.append({"candidate": f"{label}[{i}]", "plan": g.get_plan_name_at_index(i),
                                "ms": med, "min_ms": best, "workspace": ws, **err})
            except Exception as exc:  # noqa: BLE001
                results.append({"candidate": f"{label}[{i}]", "error": str(exc)[:200]})
        ok = [r for r in results if r["candidate"].startswith(label + "[") and "ms" in r]
        if ok:
            top = min(ok, key=lambda r: r["ms"])
            print(f"  {name} {label} best {top['candidate']} {top['plan']}: {top['ms']:.3f} ms "
                  f"rel_norm {top['rel_norm']:.1e} ({time.time() - t0:.1f} s)", flush=True)

    with_bias = SHAPES[name][8]
    if plain:
        time_plans("cudnn_fe+bias" if with_bias else "cudnn_fe", "bias" if with_bias else None,
                   ref, budget_s)
    if fused and residual is not None:
        time_plans("cudnn_fe_fused(bias+res)", "bias+res", ref_fused, fused_budget_s)
    return results


# ---------------------------------------------------------------------------------- head as GEMM
@triton.jit
def _tap_sum_kernel(z_ptr, bias_ptr, out_ptr, T_out, H, W, NZ, COUT, sob, sot, soh, sow,
                    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[t, h, w, c] = bias[c] + sum over the 27 taps of Z[(t + kt, h + kh - 1, w + kw - 1),
    tap * COUT + c] (zero outside the frame): the head conv after Z = X @ W_all."""
    row, block = tl.program_id(0), tl.program_id(1)
    h = row % H
    t = row // H
    w = block * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < COUT
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for kt in tl.static_range(3):
        for kh in tl.static_range(3):
            for kw in tl.static_range(3):
                hh = h + kh - 1
                ww = w + kw - 1
                ok = (ww >= 0) & (ww < W) & ((ww * 0 + hh) >= 0) & ((ww * 0 + hh) < H)
                zrow = ((t + kt) * H + hh).to(tl.int64) * W + ww
                tap = (kt * 3 + kh) * 3 + kw
                z = tl.load(z_ptr + zrow[:, None] * NZ + tap * COUT + c[None, :],
                            mask=ok[:, None] & c_ok[None, :], other=0.0)
                acc += z.to(tl.float32)
    acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    o = t.to(tl.int64) * sot + h * soh + w * sow
    tl.store(out_ptr + o[:, None] + c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(w < W)[:, None] & c_ok[None, :])


def head_as_gemm(x, weight, bias, out, z_dtype):
    """The head conv (Cout 3) as Z = X @ W_all ([pixels, 96] x [96, 27 * 3], cuBLAS) then the
    27-tap shifted sum (Triton). Batch 1."""
    cout, cin = weight.shape[:2]
    frames, h, w = x.shape[2:]
    nz = 88  # 81 columns, padded for 16-byte rows
    w_all = torch.zeros(cin, nz, dtype=x.dtype, device=x.device)
    w_all[:, :27 * cout] = weight.permute(1, 2, 3, 4, 0).reshape(cin, 27 * cout)
    xf = x.permute(0, 2, 3, 4, 1).reshape(-1, cin)

    def run():
        if z_dtype == torch.float32:
            z = torch.mm(xf, w_all, out_dtype=torch.float32)
        else:
            z = torch.mm(xf, w_all)
        t_out = frames - 2
        _tap_sum_kernel[(t_out * h, triton.cdiv(w, 128))](
            z, bias, out, t_out, h, w, nz, cout, out.stride(0), out.stride(2), out.stride(3),
            out.stride(4), BLOCK_W=128, BLOCK_C=4, num_warps=4)
        return out
    return run


# ---------------------------------------------------------------------------------- torch modes
def torch_mode_child(mode, names, reps):
    """In a child process: torch's F.conv3d/conv2d under one cudnn mode (default, benchmark with
    limit 10 or 0), per shape: the first call's time (the search), the steady time, the kernel."""
    opts = TORCH_MODES[mode]
    torch.backends.cudnn.benchmark = opts["benchmark"]
    if "limit" in opts:
        torch.backends.cudnn.benchmark_limit = opts["limit"]
    rows = {}
    for name in names:
        cin, cout, k, frames, h, w, _, conv2d, with_bias = SHAPES[name]
        x, x4, weight, bias = make_inputs(name)
        b_arg = bias if with_bias else None
        if conv2d:
            w4 = weight[:, :, 0].contiguous(memory_format=torch.channels_last)
            fn = lambda: F.conv2d(x4, w4, b_arg, padding=1)  # noqa: E731
        else:
            wcl = weight.contiguous(memory_format=torch.channels_last_3d)
            fn = lambda: F.conv3d(x, wcl, b_arg, 1, (0, k[1] // 2, k[2] // 2))  # noqa: E731
        torch.cuda.synchronize()
        t0 = time.time()
        fn()
        torch.cuda.synchronize()
        first_s = time.time() - t0
        med, best = bench(fn, reps)
        kernels = []
        try:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            kernels = sorted({e.key for e in prof.key_averages()
                              if getattr(e, "self_device_time_total", 0) > 0
                              and not e.key.startswith(("aten::", "cuda"))})
        except Exception as exc:  # noqa: BLE001
            kernels = [f"profiler failed: {exc}"]
        rows[name] = {"ms": med, "min_ms": best, "first_call_s": first_s,
                      "tflops": tflop(name) / (med / 1e3), "kernels": kernels[:6]}
        print(f"  torch {mode} {name}: {med:.3f} ms (first call {first_s:.2f} s) "
              f"{[k_[:90] for k_ in kernels[:3]]}", flush=True)
        x = x4 = weight = bias = fn = None
        torch.cuda.empty_cache()
    print("TORCH_MODE_JSON " + json.dumps({mode: rows}), flush=True)


def torch_modes(modes, names, reps):
    import subprocess
    found = {}
    for mode in modes:
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--torch-mode-child", mode,
                               "--shapes", ",".join(names), "--reps", str(reps)],
                              capture_output=True, text=True, timeout=150)
        for line in proc.stdout.splitlines():
            if line.startswith("TORCH_MODE_JSON "):
                found.update(json.loads(line[len("TORCH_MODE_JSON "):]))
            else:
                print(line, flush=True)
        if proc.returncode:
            print(proc.stderr[-2000:], flush=True)
            found.setdefault(mode, {"error": proc.stderr[-600:]})
        print(f"torch mode {mode}: {time.time() - t0:.1f} s", flush=True)
    return found


# ---------------------------------------------------------------------------------- whole decoder
# mode: (cuDNN's full engine search for every conv, the head through the registry's conv3d_narrow)
DECODER_MODES = {"default": (False, False), "search": (True, False),
                 "narrow_head": (False, True), "search+narrow_head": (True, True)}


def _narrow_head_causal_conv(ovd):
    """The decoder module's _causal_conv with its head (Cout <= 8, 3x3x3) through conv3d_narrow
    (the same buffer protocol: write after the history, conv over the window, keep the tail)."""
    from wan.kernels.triton.conv3d import conv3d_narrow
    original = ovd._causal_conv

    def causal_conv(conv, write, frames, state, index, bias=True):
        if conv.out_channels > 8 or tuple(conv.kernel_size) != (3, 3, 3):
            return original(conv, write, frames, state, index, bias)
        buffer = state.buffers[index]
        window = buffer[:, :, :ovd.HISTORY_FRAMES + frames]
        write(window[:, :, ovd.HISTORY_FRAMES:])
        y = conv3d_narrow(window, conv.weight, conv.bias if bias else None)
        tail = window[:, :, frames:]
        buffer[:, :, :ovd.HISTORY_FRAMES].copy_(tail.clone() if frames < ovd.HISTORY_FRAMES
                                               else tail)
        return y
    return causal_conv


def decoder_block_child(mode, blocks, save):
    """In a child process: OptimizedVAEDecoderWrapper (random weights, fp16, CUDA graphs as by
    default) over 3 + `blocks` blocks of 3 latent frames at 44 x 80; the first two calls' wall
    times (capture, and the engine search when on) and the steady blocks' median."""
    search, narrow = DECODER_MODES[mode]
    if search:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.benchmark_limit = 0  # every engine cuDNN offers, not the first 10
    from wan.modules import optimized_vae_decoder as ovd
    from wan.modules.random_init import randomize_decoder_weights_
    if narrow:
        ovd._causal_conv = _narrow_head_causal_conv(ovd)
    decoder = randomize_decoder_weights_(ovd.OptimizedVAEDecoderWrapper()).to(
        "cuda", torch.float16).eval()
    gen = torch.Generator(device="cuda").manual_seed(5)
    latents = [torch.randn(1, 3, 16, 44, 80, device="cuda", generator=gen).half()
               for _ in range(blocks + 3)]
    cache, walls, times = [None] * 32, [], []
    with torch.no_grad():
        for i, z in enumerate(latents):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.time()
            start.record()
            frames, cache = decoder(z, *cache)
            end.record()
            end.synchronize()
            walls.append(time.time() - t0)
            if i >= 3:
                times.append(start.elapsed_time(end))
    torch.save(frames.cpu(), save)
    row = {"block_ms": statistics.median(times), "block_min_ms": min(times),
           "first_call_s": walls[0], "second_call_s": walls[1], "third_call_s": walls[2],
           "blocks": len(times), "cuda_graphs": str(getattr(decoder, "cuda_graphs", None))}
    print(f"  decoder {mode}: {row}", flush=True)
    print("DECODER_JSON " + json.dumps({mode: row}), flush=True)


def decoder_blocks(modes, blocks):
    import subprocess
    found, outputs = {}, {}
    for mode in modes:
        t0 = time.time()
        save = f"/tmp/decoder_frames_{mode}.pt"
        proc = subprocess.run([sys.executable, __file__, "--decoder-block-child", mode,
                               "--blocks", str(blocks), "--save", save],
                              capture_output=True, text=True, timeout=200)
        for line in proc.stdout.splitlines():
            if line.startswith("DECODER_JSON "):
                found.update(json.loads(line[len("DECODER_JSON "):]))
            else:
                print(line, flush=True)
        if proc.returncode:
            print(proc.stderr[-3000:], flush=True)
            found.setdefault(mode, {"error": proc.stderr[-800:]})
        elif os.path.exists(save):
            outputs[mode] = torch.load(save)
        print(f"decoder mode {mode}: {time.time() - t0:.1f} s", flush=True)
    base = outputs.get(modes[0])
    for mode, frames in outputs.items():
        if base is not None and mode in found:
            found[mode]["frames_rel_diff_vs_" + modes[0]] = rel(frames, base)
    return found


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------- per shape
def run_shape(name, reps, fe, record, use_triton=True):
    cin, cout, k, frames, h, w, per_block, conv2d, with_bias = SHAPES[name]
    pad = (0, k[1] // 2, k[2] // 2)
    x, x4, weight, bias = make_inputs(name)
    weight_cl = weight.contiguous(memory_format=torch.channels_last_3d)
    b_arg = bias if with_bias else None
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = F.conv3d(x.float(), weight.float(), b_arg.float() if with_bias else None, padding=pad)
    out = out_like(name, x, cout)
    residual = torch.randn(out.shape, device="cuda").to(torch.float16).contiguous(
        memory_format=torch.channels_last_3d)
    ref_fused = None
    if not with_bias:
        ref_fused = F.conv3d(x.float(), weight.float(), bias.float(), padding=pad) + residual.float()
    results = []
    flops = tflop(name)

    def add(candidate, fn, check, ref_=ref, **extra):
        try:
            y = fn()
            torch.cuda.synchronize()
            err = errors(check() if check else y, ref_) if ref_ is not None else {}
            med, best = bench(fn, reps)
            results.append({"candidate": candidate, "ms": med, "min_ms": best,
                            "tflops": flops / (med / 1e3), **err, **extra})
            print(f"  {name} {candidate}: {med:.3f} ms {err}", flush=True)
        except Exception as exc:  # noqa: BLE001
            results.append({"candidate": candidate, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            print(f"  {name} {candidate}: ERROR {type(exc).__name__}: {str(exc)[:200]}", flush=True)

    # cuDNN as the decoder calls it
    if conv2d:
        w4 = weight[:, :, 0].contiguous(memory_format=torch.channels_last)
        y4 = lambda: F.conv2d(x4, w4, b_arg, padding=1)  # noqa: E731
        add("cudnn", y4, lambda: y4().permute(1, 0, 2, 3).unsqueeze(0))
    else:
        add("cudnn", lambda: F.conv3d(x, weight_cl, b_arg, 1, pad), None)
        if cout == 96:
            wp = torch.zeros(128, *weight.shape[1:], dtype=weight.dtype, device="cuda")
            wp[:96] = weight
            wp = wp.contiguous(memory_format=torch.channels_last_3d)
            add("cudnn_pad128", lambda: F.conv3d(x, wp, None, 1, pad),
                lambda: F.conv3d(x, wp, None, 1, pad)[:, :96],
                note="conv only (128 channels out, 96 used)")
        if not with_bias:  # what the decoder pays after the conv today: bias + residual pass
            from wan.kernels.triton.channel_norm import bias_residual_add
            y = F.conv3d(x, weight_cl, None, 1, pad)
            add("bias_residual_add (after cudnn)", lambda: bias_residual_add(y, bias, residual),
                None, ref_=None, note="the separate pass a fused epilogue saves")
    # Triton, per config
    packed = pack_weight(weight)
    for cfg in TRITON_CONFIGS[name] if use_triton else []:
        add(f"triton{list(cfg)}",
            lambda cfg=cfg: conv3d_window(x, packed, k, b_arg, None, out, cfg), None)
    ok = [r for r in results if r["candidate"].startswith("triton") and "ms" in r
          and r["rel_norm"] < 3e-3]
    if ok and not with_bias and name in ("c96", "c192"):
        best = min(ok, key=lambda r: r["ms"])
        cfg = tuple(json.loads(best["candidate"][len("triton"):]))
        add(f"triton_fused(bias+res){list(cfg)}",
            lambda: conv3d_window(x, packed, k, bias, residual, out, cfg), None,
            ref_=ref_fused)
    # TMA variant
    for cfg in TMA_CONFIGS.get(name, []) if use_triton else []:
        n = cfg[2] + cfg[3]
        pp = torch.zeros(packed.shape[0], n, dtype=packed.dtype, device="cuda")
        pp[:, :cout] = packed
        grid, args, meta = tma_launch(x, pp, k, cout, out, cfg)
        add(f"triton_tma{list(cfg)}",
            lambda grid=grid, args=args, meta=meta: (
                _conv3d_tma_kernel[grid](*args, **meta), out)[1], None)
    if name == "head":  # as a GEMM over the input pixels, then the 27-tap shifted sum
        for z_dtype in (torch.float16, torch.float32):
            add(f"head_as_gemm(z {str(z_dtype)[6:]})", head_as_gemm(x, weight, bias, out, z_dtype),
                None)
    # cuDNN graph API
    if name in fe["plain"] or name in fe["fused"]:
        try:
            results += cudnn_fe_candidates(name, x, x4, weight_cl, bias,
                                           None if with_bias else residual, reps, record, ref,
                                           ref_fused, name in fe["plain"], name in fe["fused"],
                                           fe["budget"], fe["fused_budget"])
        except Exception as exc:  # noqa: BLE001
            results.append({"candidate": "cudnn_fe", "error": f"{type(exc).__name__}: {str(exc)[:600]}"})
            traceback.print_exc()
    for r in results:
        if "ms" in r and "tflops" not in r:
            r["tflops"] = flops / (r["ms"] / 1e3)
    return {"shape": {"cin": cin, "cout": cout, "kernel": list(k), "window_frames": frames,
                      "h": h, "w": w, "per_block": per_block, "conv2d": conv2d,
                      "tflop": flops}, "results": results}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--fe-plain", default=",".join(SHAPES),
                        help="shapes whose plain conv is run through every cuDNN graph-API plan")
    parser.add_argument("--fe-fused", default="c96,c192",
                        help="shapes whose conv + bias + residual graph is run likewise")
    parser.add_argument("--fe-budget", type=float, default=30.0, help="seconds per graph")
    parser.add_argument("--fe-fused-budget", type=float, default=30.0)
    parser.add_argument("--skip-triton", action="store_true", help="no Triton conv candidates")
    parser.add_argument("--torch-modes", default="",
                        help="also torch's conv under these cudnn modes (child processes): "
                             + ",".join(TORCH_MODES))
    parser.add_argument("--torch-mode-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--decoder-block", default="",
                        help="only the whole decoder's steady block under these modes (child "
                             "processes): " + ",".join(DECODER_MODES))
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--decoder-block-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    names = [n for n in args.shapes.split(",") if n]
    if args.torch_mode_child:
        return torch_mode_child(args.torch_mode_child, names, args.reps)
    if args.decoder_block_child:
        return decoder_block_child(args.decoder_block_child, args.blocks, args.save)
    t_start = time.time()
    record = {"benchmark": "decoder_convs", "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__,
              "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "dtype": "float16", "batch": 1,
              "latent": [44, 80]}
    if args.decoder_block:
        record["decoder_block"] = decoder_blocks(args.decoder_block.split(","), args.blocks)
        record["wan_src"] = os.environ.get("WAN_SRC", "this checkout")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "decoder_block.json", "w") as f:
            json.dump(record, f, indent=1)
        print(f"\n{record['device']}, torch {record['torch']}, cuDNN {record['cudnn']}")
        print(f"{'decoder mode':22} {'block ms':>9} {'min':>7} {'1st call s':>10} "
              f"{'2nd call s':>10} {'frames vs first mode':>20}")
        for mode, row in record["decoder_block"].items():
            if "block_ms" in row:
                diff = next((v for k, v in row.items() if k.startswith("frames_rel")), float("nan"))
                print(f"{mode:22} {row['block_ms']:9.2f} {row['block_min_ms']:7.2f} "
                      f"{row['first_call_s']:10.1f} {row['second_call_s']:10.1f} {diff:20.2e}")
            else:
                print(f"{mode:22} ERROR {row.get('error', '')[-200:]}")
        return
    if args.torch_modes:
        record["torch_modes"] = torch_modes(args.torch_modes.split(","), names, args.reps)
    if not args.skip_triton:
        record["compile_s"], record["compile_failures"] = precompile(names, args.workers)
    record["shapes"] = {}
    for name in names:
        t0 = time.time()
        fe = {"plain": args.fe_plain.split(","), "fused": args.fe_fused.split(","),
              "budget": args.fe_budget, "fused_budget": args.fe_fused_budget}
        record["shapes"][name] = run_shape(name, args.reps, fe, record, not args.skip_triton)
        torch.cuda.empty_cache()
        print(f"{name}: {time.time() - t0:.1f} s", flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "decoder_convs.json", "w") as f:
            json.dump(record, f, indent=1)
    record["wall_s"] = time.time() - t_start
    with open(Path(args.out) / "decoder_convs.json", "w") as f:
        json.dump(record, f, indent=1)
    # the table, last
    print(f"\n{record['device']}, torch {record['torch']}, triton {record['triton']}, "
          f"cuDNN {record['cudnn']} / graph API {record.get('cudnn_backend_version')}")
    print(f"{'shape':9} {'candidate':44} {'ms':>7} {'TFLOP/s':>8} {'rel_norm':>9} {'max_rel':>8}")
    for name, entry in record["shapes"].items():
        rows = entry["results"]
        timed = sorted([r for r in rows if "ms" in r], key=lambda r: r["ms"])
        base = next((r["ms"] for r in rows if r["candidate"] == "cudnn" and "ms" in r), None)
        shown = [r for r in timed if not r["candidate"].startswith("cudnn_fe")][:10]
        fe = []
        for label in sorted({r["candidate"].split("[")[0] for r in timed
                             if r["candidate"].startswith("cudnn_fe")}):
            fe += [r for r in timed if r["candidate"].split("[")[0] == label][:2]
        for mode, rows_ in record.get("torch_modes", {}).items():
            if name in rows_:
                print(f"{name:9} {'torch ' + mode:44} {rows_[name]['ms']:7.3f} "
                      f"{rows_[name]['tflops']:8.1f}" + (f"{'':19}  x{base / rows_[name]['ms']:.2f}"
                                                         if base else ""))
        for r in shown + fe:
            print(f"{name:9} {r['candidate'][:44]:44} {r['ms']:7.3f} {r['tflops']:8.1f} "
                  f"{r.get('rel_norm', float('nan')):9.2e} {r.get('max_err_rel', float('nan')):8.1e}"
                  + (f"  x{base / r['ms']:.2f}" if base else ""))
        errs = [r for r in rows if "error" in r]
        for r in [r for r in errs if not r["candidate"].startswith("cudnn_fe")] + [
                r for r in errs if r["candidate"].startswith("cudnn_fe")][:2]:
            print(f"{name:9} {r['candidate'][:44]:44} ERROR {r['error'][:120]}")
        if errs:
            print(f"{name:9} ({len(errs)} candidates failed)")
    print(f"wall {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
