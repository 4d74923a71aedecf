"""Video frames to JPEG, on one of three paths (`JpegEncoder(where=...)`):

* `cpu`: the frames copied to the host on the current CUDA stream (the decode's, in the play
  engine), then libjpeg-turbo through simplejpeg on a pool of threads (it releases the GIL, so
  the frames of a block encode in parallel). The GPU's part is the copy alone, so the encoding
  neither waits behind other GPU work nor takes from it; `start` queues the copy and returns,
  so the play engine finishes the encoding on a sender thread beside the next block.
* `gpu`: nvJPEG (`torchvision.io.encode_jpeg` of CUDA tensors). torchvision runs it on a stream
  of its own at default priority: while a block's cache update fills the GPU it waits for the
  update (measured on an H100: 3.7 ms alone, ~20 ms beside the update), and the caller waits
  for it.
* `pillow`: Pillow (its JPEG encoder holds the GIL: no pool helps), the fallback when neither
  of the others can run.
`auto` takes the first that can run of cpu, gpu, pillow: the host path costs the GPU's critical
path only the copy (12 frames of 352 x 640: 8.4 ms of encoding on one CPU thread, 4.8 on two,
Pillow 12.9; 4.5 ms a block on an H100 machine's pool), nvJPEG its 3.6-4.0 ms a block.
"""
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import List

import torch

log = logging.getLogger(__name__)
JPEG_QUALITY = 85  # the seed server's
ENCODERS = ("auto", "cpu", "gpu", "pillow")


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Decoder frames [T, 3, H, W] in [-1, 1] (any float dtype, any device) -> uint8 [T, 3, H, W]."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _nvjpeg_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torchvision.io import encode_jpeg
        encode_jpeg([torch.zeros(3, 16, 16, dtype=torch.uint8, device=device)], quality=50)
        return True
    except Exception as error:  # torchvision missing, or built without nvJPEG
        log.info("nvJPEG unavailable (%s)", error)
        return False


def _simplejpeg():
    try:
        import simplejpeg
        return simplejpeg
    except ImportError:
        return None


class JpegEncoder:
    """`encode(frames uint8 [T, 3, H, W])` -> T JPEG byte strings. `where` says which path runs."""

    def __init__(self, device: torch.device, quality: int = JPEG_QUALITY, where: str = "auto",
                 threads: int = 0):
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        if where not in ENCODERS:
            raise ValueError(f"unknown JPEG encoder {where!r}; choose from {', '.join(ENCODERS)}")
        self.quality = quality
        self._simplejpeg = _simplejpeg()
        if where == "auto":
            where = ("cpu" if self._simplejpeg is not None else
                     "gpu" if _nvjpeg_available(device) else "pillow")
        elif where == "cpu" and self._simplejpeg is None:
            raise ValueError("JPEG encoder 'cpu' needs simplejpeg (pip install simplejpeg, or "
                             "the play extra); 'gpu' or 'pillow' run without it")
        elif where == "gpu" and not _nvjpeg_available(device):
            raise ValueError(f"JPEG encoder 'gpu' needs a CUDA device and torchvision with "
                             f"nvJPEG (the device here: {device}); 'cpu' or 'pillow' run without")
        self.kind = where
        self._pool = None
        if where == "cpu":
            threads = threads or min(8, os.cpu_count() or 1)
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="wan-jpeg")
            self.where = f"libjpeg-turbo (CPU, {threads} threads)"
        else:
            self.where = {"gpu": "nvJPEG (GPU)", "pillow": "Pillow (CPU)"}[where]

    @property
    def encodes_on_host(self) -> bool:
        """Whether the encoding itself runs on the host (cpu, pillow): `start` then only queues
        the frames' copy, and `EncodeJob.result` can run on another thread."""
        return self.kind != "gpu"

    def encode(self, frames: torch.Tensor) -> List[bytes]:
        """The frames' JPEGs, now (the caller waits for their copy and the encoding)."""
        return self.start(frames).result()

    def start(self, frames: torch.Tensor) -> "EncodeJob":
        """Begin encoding `frames` (uint8 [T, 3, H, W]): from CUDA with a host encoder, their
        copy to pinned host memory is queued on the current stream and nothing waits; nvJPEG
        encodes them here. The job's `result()` gives the JPEGs."""
        if self.kind == "gpu" and frames.is_cuda:
            from torchvision.io import encode_jpeg
            encoded = encode_jpeg(list(frames.contiguous().unbind(0)), quality=self.quality)
            jpegs = [bytes(e.cpu().numpy().tobytes()) for e in encoded]
            return EncodeJob(lambda: jpegs)
        host, copied = _to_host(frames)
        images = list(host.numpy())  # views of the pinned buffer, filled once `copied` is
        if self.kind == "cpu":
            return EncodeJob(lambda: list(self._pool.map(self._encode_one, images)), copied)
        return EncodeJob(lambda: [self._encode_pillow(image) for image in images], copied)

    def _encode_pillow(self, image) -> bytes:
        from PIL import Image
        buffer = io.BytesIO()
        Image.fromarray(image, "RGB").save(buffer, format="JPEG", quality=self.quality)
        return buffer.getvalue()

    def _encode_one(self, image) -> bytes:
        # 4:2:0 chroma, as Pillow and nvJPEG do at this quality
        return self._simplejpeg.encode_jpeg(image, quality=self.quality, colorspace="RGB",
                                            colorsubsampling="420")


class EncodeJob:
    """A block's frames on their way to JPEG (`JpegEncoder.start`). `copied`: the CUDA event of
    their copy to the host (None: nothing to wait for); `result()` waits for that copy alone,
    not for the rest of its stream, then encodes."""

    def __init__(self, encode, copied: "torch.cuda.Event | None" = None):
        self._encode, self.copied = encode, copied

    def result(self) -> List[bytes]:
        if self.copied is not None:
            self.copied.synchronize()
        return self._encode()


def _to_host(frames: torch.Tensor):
    """uint8 [T, 3, H, W] (any device) -> (a contiguous [T, H, W, 3] host tensor, the CUDA event
    of its copy or None). From CUDA: laid out on the GPU and copied into pinned memory on the
    current stream, which the caller does not wait for."""
    hwc = frames.permute(0, 2, 3, 1).contiguous()
    if not hwc.is_cuda:
        return hwc, None
    host = torch.empty(hwc.shape, dtype=hwc.dtype, pin_memory=True)
    host.copy_(hwc, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(hwc.device))
    return host, copied
