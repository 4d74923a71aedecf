"""The VAE decoder's RMS norm + SiLU over channels, on channels-last activations.

Upstream's decoder normalises each pixel's channel vector (`F.normalize(x, dim=1) * sqrt(C) *
gamma`) and applies SiLU, as four or five separate passes in half precision. In channels-last
memory a pixel's channels are one contiguous row, so this is a row kernel: one program takes
BLOCK_R rows, accumulates in float32 and rounds once, and writes where it is told (the decoder
points it at the frames after the history in a convolution's input buffer, so no copy follows).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_silu_kernel(x_ptr, gamma_ptr, out_ptr, rows, channels, x_batch_stride,
                          out_batch_stride, scale, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    block, batch = tl.program_id(0), tl.program_id(1)
    r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < channels)
    offsets = r[:, None] * channels + c[None, :]
    x = tl.load(x_ptr + batch * x_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    inverse = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
    gamma = tl.load(gamma_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
    y = x * inverse[:, None] * gamma[None, :]
    y = y * tl.sigmoid(y)
    tl.store(out_ptr + batch * out_batch_stride + offsets, y.to(out_ptr.dtype.element_ty),
             mask=mask)


def _rows_within_batch(t: torch.Tensor) -> bool:
    """Channels-last with each batch element's pixels as consecutive rows of C values."""
    b, c, frames, h, w = t.shape
    return (t.stride(1) == 1 and t.stride(4) == c and t.stride(3) == w * c
            and t.stride(2) == h * w * c)


def rms_norm_silu(x, gamma, out=None):
    """silu(x / ||x||_channels * sqrt(C) * gamma) for x [B, C, T, H, W]; into `out` (same shape,
    channels-last rows) when given, else a new channels-last tensor."""
    b, c, frames, h, w = x.shape
    if not _rows_within_batch(x):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    if out.shape != x.shape or not _rows_within_batch(out):
        raise ValueError(f"out must be a channels-last {tuple(x.shape)} tensor, got "
                         f"{tuple(out.shape)} with strides {out.stride()}")
    rows = frames * h * w
    block_c = triton.next_power_of_2(c)
    block_r = max(1, 8192 // block_c)
    _rms_norm_silu_kernel[(triton.cdiv(rows, block_r), b)](
        x, gamma.reshape(-1).contiguous(), out, rows, c, x.stride(0), out.stride(0), c ** 0.5,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out
