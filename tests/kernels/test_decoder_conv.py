"""The decoder's narrow convolution (`conv3d_narrow`: the head, 96 -> 3 channels, as one GEMM over
the input pixels + the 27-tap shifted sum) against its eager twin (torch's conv) and float64, at
the real shapes (on a GPU) and small awkward ones (odd sizes, batch 2, 96/192/384 input channels,
a stream's first block and steady windows that are a prefix of a larger history buffer, 2-D and
time-only kernels). On a CPU the tap sum runs in Triton's interpreter (float32, float16)."""
import pytest
import torch

from helpers import HAS_CUDA, assert_close_elementwise, rel_err

pytest.importorskip("triton")
from wan.kernels import eager  # noqa: E402
from wan.kernels import triton as triton_ops  # noqa: E402
from wan.kernels.registry import resolve  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (batch, Cin, Cout, kernel, window frames, H, W, extra buffer frames after the window)
CASES = [
    (1, 96, 3, (3, 3, 3), 3, 6, 10, 0),      # a stream's first block: 1 frame after the history
    (1, 96, 3, (3, 3, 3), 6, 7, 9, 2),       # steady, the window a prefix of a longer buffer
    (2, 16, 5, (3, 3, 3), 4, 5, 2 ** 4 + 1, 1),  # batch 2, odd sizes, 5 outputs
    (1, 192, 3, (3, 3, 3), 4, 3, 5, 0),
    (1, 384, 2, (3, 3, 3), 3, 2, 3, 0),
    (1, 24, 8, (1, 3, 3), 2, 4, 6, 0),       # 2-D kernel over frames
    (1, 12, 16, (3, 1, 1), 4, 3, 5, 0),      # time-only kernel
    (1, 8, 1, (3, 5, 3), 5, 1, 1, 0),        # a 1 x 1 frame, one output
]
if HAS_CUDA:  # the decoder's head at 44 x 80 latents: steady (2 + 12 frames) and first block
    CASES += [(1, 96, 3, (3, 3, 3), 14, 352, 640, 0), (1, 96, 3, (3, 3, 3), 3, 352, 640, 11)]


def _inputs(case, dtype, seed=0):
    b, cin, cout, kernel, frames, h, w, extra = case
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32)

    buffer = torch.empty(b, cin, frames + extra, h, w, dtype=dtype, device=DEVICE,
                         memory_format=torch.channels_last_3d)
    buffer.copy_(randn(*buffer.shape).to(dtype))
    window = buffer[:, :, :frames]  # a view, as the decoder's conv buffers are
    fan_in = cin * kernel[0] * kernel[1] * kernel[2]
    weight = (randn(cout, cin, *kernel) / fan_in ** 0.5).to(dtype)
    bias = (0.1 * randn(cout)).to(dtype)
    return window, weight, bias


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv3d_narrow(case, dtype, with_bias):
    window, weight, bias = _inputs(case, dtype)
    bias = bias if with_bias else None
    wide = (None if bias is None else bias.double())
    exact = eager.conv3d_narrow(window.double(), weight.double(), wide)
    twin = eager.conv3d_narrow(window, weight, bias)
    got = triton_ops.conv3d_narrow(window, weight, bias)
    assert got.shape == exact.shape and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    err, twin_err = rel_err(got, exact), rel_err(twin, exact)
    assert err <= max(TOLERANCE[dtype], 2 * twin_err), (err, twin_err)
    assert_close_elementwise(got, exact, twin=twin)


def test_conv3d_narrow_float64():
    """float64 in and out (called directly: the registry sends float64 to eager): Z stays
    float64, the kernel sums the 27 terms in float32 (~1e-7 relative)."""
    window, weight, bias = _inputs(CASES[1], torch.float64)
    exact = eager.conv3d_narrow(window, weight, bias)
    got = triton_ops.conv3d_narrow(window, weight, bias)
    assert got.dtype == torch.float64
    assert rel_err(got, exact) <= 1e-6  # the float32 sum of 27 float64 terms


def test_conv3d_narrow_refuses_what_it_cannot_run():
    window, weight, bias = _inputs(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="columns"):
        triton_ops.conv3d_narrow(window, weight.repeat(4, 1, 1, 1, 1), None)  # 12 x 27 columns
    with pytest.raises(ValueError, match="odd"):
        triton_ops.conv3d_narrow(window, weight[:, :, :, :2], None)
    with pytest.raises(ValueError, match="shorter"):
        triton_ops.conv3d_narrow(window[:, :, :2], weight, None)
    with pytest.raises(ValueError, match="bias"):
        triton_ops.conv3d_narrow(window, weight, bias[:2])


def test_conv3d_narrow_in_the_registry():
    """`auto` picks Triton on CUDA and eager on a CPU; `triton` by name runs interpreted there."""
    name, fn = resolve("conv3d_narrow", "auto", DEVICE, torch.float16, 0)
    assert (name, fn) == (("triton", triton_ops.conv3d_narrow) if HAS_CUDA
                          else ("eager", eager.conv3d_narrow))
    name, fn = resolve("conv3d_narrow", "triton", DEVICE, torch.float32, 0)
    assert fn is triton_ops.conv3d_narrow
    name, fn = resolve("conv3d_narrow", "eager", DEVICE, torch.float32, 0)
    assert fn is eager.conv3d_narrow


# ------------------------------------------------------------------ the resample: upsample + conv
# (frames N, Cin, Cout, H, W): the decoder's resamples (12 or 6 frames) on a GPU, awkward ones
UPSAMPLE_CASES = [(2, 16, 8, 5, 7), (1, 12, 6, 1, 1), (3, 8, 24, 4, 2 ** 4 + 1), (1, 96, 48, 3, 6)]
if HAS_CUDA:
    UPSAMPLE_CASES += [(12, 192, 96, 176, 320), (12, 384, 192, 88, 160), (6, 384, 192, 44, 80)]


def _upsample_inputs(case, dtype, seed=0):
    n, cin, cout, h, w = case
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen, device=DEVICE).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)  # as the decoder's frames are
    weight = (torch.randn(cout, cin, 3, 3, generator=gen, device=DEVICE) / (9 * cin) ** 0.5)
    bias = 0.1 * torch.randn(cout, generator=gen, device=DEVICE)
    return x, weight.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", UPSAMPLE_CASES, ids=str)
def test_upsample_conv2d(case, dtype, with_bias, monkeypatch):
    """The 2x2 sub-pixel conv + interleave against torch's conv of the upsampled frames (the
    eager twin) and float64, elementwise and by norm; channels-last out."""
    # float32 convs in full precision (with TF32 cuDNN may pick it for one conv and not the other)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x, weight, bias = _upsample_inputs(case, dtype)
    bias = bias if with_bias else None
    wide = None if bias is None else bias.double()
    exact = eager.upsample_conv2d(x.double(), weight.double(), wide)
    twin = eager.upsample_conv2d(x, weight, bias)
    got = triton_ops.upsample_conv2d(x, weight, bias)
    assert got.shape == exact.shape == (case[0], case[2], 2 * case[3], 2 * case[4])
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    err, twin_err = rel_err(got, exact), rel_err(twin, exact)
    assert err <= max(TOLERANCE[dtype], 2 * twin_err), (err, twin_err)
    assert_close_elementwise(got, exact, twin=twin)


def test_upsample_conv2d_float64_is_the_upsampled_conv():
    """In float64 the two are the same math up to summation order (~1e-15)."""
    x, weight, bias = _upsample_inputs(UPSAMPLE_CASES[0], torch.float64)
    assert rel_err(triton_ops.upsample_conv2d(x, weight, bias),
                   eager.upsample_conv2d(x, weight, bias)) <= 1e-13


def test_upsample_conv2d_refuses_other_kernels():
    x, weight, bias = _upsample_inputs(UPSAMPLE_CASES[0], torch.float32)
    for op in (eager.upsample_conv2d, triton_ops.upsample_conv2d):
        with pytest.raises(ValueError, match="3x3 weight"):
            op(x, weight[:, :, :2, :2], bias)
        with pytest.raises(ValueError, match="bias must be"):
            op(x, weight, bias[:3])
