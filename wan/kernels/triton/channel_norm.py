"""The VAE decoder's row kernels on channels-last activations: RMS norm + SiLU over channels (with
the preceding convolution's bias folded in), a convolution's bias + the residual add, and the two
in one pass where the sum feeds the next block's norm (the sum is stored for that block's
residual add; its norm goes straight into the next convolution's buffer, and the sum is not read
back). (The decoder's upsampling is inside `upsample_conv2d`, wan/kernels/triton/upsample_conv.py.)

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
def _row_tile(rows, channels, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile: BLOCK_R channel rows of batch element `batch`, as offsets within it."""
    block, batch = tl.program_id(0), tl.program_id(1)
    r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < channels)
    return batch, r[:, None] * channels + c[None, :], mask, c


@triton.jit
def _rms_norm_silu_rows(x, c, gamma_ptr, channels, scale):
    """silu(x / ||x|| * scale * gamma) of float32 rows x (zero where masked)."""
    inverse = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
    gamma = tl.load(gamma_ptr + c, mask=c < channels, other=0.0).to(tl.float32)
    y = x * inverse[:, None] * gamma[None, :]
    return y * tl.sigmoid(y)


@triton.jit
def _rms_norm_silu_kernel(x_ptr, bias_ptr, gamma_ptr, out_ptr, rows, channels, x_batch_stride,
                          out_batch_stride, scale, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    batch, offsets, mask, c = _row_tile(rows, channels, BLOCK_R, BLOCK_C)
    x = tl.load(x_ptr + batch * x_batch_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:  # the convolution's bias, rounded to the activations' dtype as cuDNN's add would
        bias = tl.load(bias_ptr + c, mask=c < channels, other=0.0)
        x = (x + bias[None, :].to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
        x = tl.where(mask, x, 0.0)
    y = _rms_norm_silu_rows(x, c, gamma_ptr, channels, scale)
    tl.store(out_ptr + batch * out_batch_stride + offsets, y.to(out_ptr.dtype.element_ty),
             mask=mask)


def _rows_within_batch(t: torch.Tensor) -> bool:
    """Channels-last with each batch element's pixels as consecutive rows of C values."""
    b, c, frames, h, w = t.shape
    return (t.stride(1) == 1 and t.stride(4) == c and t.stride(3) == w * c
            and t.stride(2) == h * w * c)


def _channels_last_rows(x):
    return x if _rows_within_batch(x) else x.contiguous(memory_format=torch.channels_last_3d)


def _check_out(out, like):
    if out.shape != like.shape or not _rows_within_batch(out):
        raise ValueError(f"out must be a channels-last {tuple(like.shape)} tensor, got "
                         f"{tuple(out.shape)} with strides {out.stride()}")


def _grid_and_blocks(x):
    b, c, frames, h, w = x.shape
    rows = frames * h * w
    block_c = triton.next_power_of_2(c)
    block_r = max(1, 8192 // block_c)
    return (triton.cdiv(rows, block_r), b), rows, block_r, block_c


def rms_norm_silu(x, gamma, out=None, bias=None):
    """silu(RMSnorm(x + bias) * gamma) over the channels of x [B, C, T, H, W] (x / ||x|| *
    sqrt(C) * gamma); into `out` (same shape, channels-last rows) when given, else a new
    channels-last tensor. `bias` [C] (optional): the preceding convolution's, added first."""
    x = _channels_last_rows(x)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    _check_out(out, x)
    grid, rows, block_r, block_c = _grid_and_blocks(x)
    _rms_norm_silu_kernel[grid](
        x, bias if bias is not None else x, gamma.reshape(-1).contiguous(), out, rows, x.shape[1],
        x.stride(0), out.stride(0), x.shape[1] ** 0.5, HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


@triton.jit
def _bias_residual_add_kernel(h_ptr, bias_ptr, s_ptr, out_ptr, gamma_ptr, normed_ptr, rows,
                              channels, h_batch_stride, s_batch_stride, out_batch_stride,
                              normed_batch_stride, scale, NORM: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    batch, offsets, mask, c = _row_tile(rows, channels, BLOCK_R, BLOCK_C)
    h = tl.load(h_ptr + batch * h_batch_stride + offsets, mask=mask, other=0.0)
    bias = tl.load(bias_ptr + c, mask=c < channels, other=0.0)
    h = (h.to(tl.float32) + bias[None, :].to(tl.float32)).to(h_ptr.dtype.element_ty)
    s = tl.load(s_ptr + batch * s_batch_stride + offsets, mask=mask, other=0.0)
    y = (h.to(tl.float32) + s.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + batch * out_batch_stride + offsets, y, mask=mask)
    if NORM:  # the next block's norm of the sum as stored (rounded), as its own kernel would read it
        n = _rms_norm_silu_rows(tl.where(mask, y.to(tl.float32), 0.0), c, gamma_ptr, channels,
                                scale)
        tl.store(normed_ptr + batch * normed_batch_stride + offsets,
                 n.to(normed_ptr.dtype.element_ty), mask=mask)


def _residual_add(h, bias, residual, gamma=None, normed=None):
    h, residual = _channels_last_rows(h), _channels_last_rows(residual)
    if residual.shape != h.shape:
        raise ValueError(f"residual {tuple(residual.shape)} does not match h {tuple(h.shape)}")
    out = torch.empty_like(h, memory_format=torch.channels_last_3d)
    norm = normed is not None
    if norm:
        _check_out(normed, h)
    grid, rows, block_r, block_c = _grid_and_blocks(h)
    _bias_residual_add_kernel[grid](
        h, bias, residual, out, gamma.reshape(-1).contiguous() if norm else h,
        normed if norm else out, rows, h.shape[1], h.stride(0), residual.stride(0),
        out.stride(0), normed.stride(0) if norm else 0, h.shape[1] ** 0.5, NORM=norm,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


def bias_residual_add(h, bias, residual):
    """(h + bias) + residual for h, residual [B, C, T, H, W] and bias [C]: a convolution's
    output, its bias and the residual block's shortcut, in one pass (channels-last out)."""
    return _residual_add(h, bias, residual)


def bias_residual_add_rms_norm_silu(h, bias, residual, gamma, out):
    """s = (h + bias) + residual (returned, channels-last), and silu(RMSnorm(s) * gamma) written
    into `out` (channels-last rows: the next convolution's buffer), in one pass."""
    return _residual_add(h, bias, residual, gamma, out)
