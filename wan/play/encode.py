"""Video frames to JPEG: on the GPU with nvJPEG (`torchvision.io.encode_jpeg` of CUDA tensors)
when the frames are there and torchvision has it, else on the CPU with Pillow (libjpeg-turbo)."""
import io
import logging
from typing import List

import torch

log = logging.getLogger(__name__)
JPEG_QUALITY = 85  # the seed server's


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
        log.info("nvJPEG unavailable (%s): JPEG encoding on the CPU", error)
        return False


class JpegEncoder:
    """`encode(frames uint8 [T, 3, H, W])` -> T JPEG byte strings. `where` says which path runs."""

    def __init__(self, device: torch.device, quality: int = JPEG_QUALITY, gpu: bool = True):
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
        self.quality = quality
        self.gpu = gpu and _nvjpeg_available(device)
        self.where = "nvJPEG (GPU)" if self.gpu else "Pillow (CPU)"

    def encode(self, frames: torch.Tensor) -> List[bytes]:
        if self.gpu and frames.is_cuda:
            from torchvision.io import encode_jpeg
            encoded = encode_jpeg(list(frames.contiguous().unbind(0)), quality=self.quality)
            return [bytes(e.cpu().numpy().tobytes()) for e in encoded]
        from PIL import Image
        out = []
        host = frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        for frame in host:
            buffer = io.BytesIO()
            Image.fromarray(frame, "RGB").save(buffer, format="JPEG", quality=self.quality)
            out.append(buffer.getvalue())
        return out
