"""A start image turned into the model's two image conditions.

Upstream conditions a video on its start image once: `visual_context`, the CLIP image features
[B, 257, 1280], and `cond_concat` [B, 20, F, h, w], a 4-channel mask (1 on the first latent
frame) beside the Wan VAE encoding of [the image, black frames...]. Both need upstream's encoders
and weights (a Matrix-Game-2 checkout). Without them this module's `DemoConditioner` stands in:
conditions that are a fixed function of the image (its colours pooled to the latent grid and to
257 tokens, through fixed random projections), so that another image gives another game, with
random weights. It is reported as a demo everywhere (start-up line, /health, the page).

A conditioner gives conditions for `CONDITION_BLOCKS` blocks; later blocks reuse the last block's
(the encoder is causal and the black frames' latents settle far from the image: `PlayerSession`'s
`hold_conditions`).
"""
import io
from typing import Tuple

import torch
import torch.nn.functional as F
from PIL import Image

CONDITION_BLOCKS = 2  # blocks of conditions a conditioner gives: the first one and a settled one
CLIP_TOKENS, CLIP_DIM = 257, 1280
LATENT_CHANNELS, MASK_CHANNELS = 16, 4


def image_to_tensor(image: Image.Image, size: Tuple[int, int]) -> torch.Tensor:
    """The image resized to cover `size` (H, W), centre-cropped, as [3, H, W] floats in [-1, 1]
    (upstream's preprocessing of the start image)."""
    h, w = size
    image = image.convert("RGB")
    scale = max(h / image.height, w / image.width)
    resized = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                           Image.BICUBIC)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    cropped = resized.crop((left, top, left + w, top + h))
    data = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8)
    return data.view(h, w, 3).permute(2, 0, 1).float() / 127.5 - 1.0


class DemoConditioner:
    """Conditions that depend on the image through fixed random projections (see the module's
    docstring): for random weights and for CPU tests. `demo` is True: nothing here is upstream's
    encoder."""
    demo = True
    name = "demo (random projections of the image; no VAE/CLIP encoder)"

    def __init__(self, latent_hw: Tuple[int, int], frames_per_block: int = 3, seed: int = 0):
        self.latent_hw, self.frames_per_block = tuple(latent_hw), frames_per_block
        gen = torch.Generator().manual_seed(seed)
        self.to_latent = torch.randn(LATENT_CHANNELS, 3, generator=gen)
        self.latent_bias = 0.3 * torch.randn(LATENT_CHANNELS, 1, 1, generator=gen)
        # 256 image tokens (a 16 x 16 grid of colours) with fixed position features, one global token
        index = torch.arange(256, dtype=torch.float32)
        self.positions = torch.stack([torch.sin(index * f) for f in (0.05, 0.2, 0.7, 1.3)]
                                     + [torch.cos(index * f) for f in (0.05, 0.2, 0.7, 1.3)], dim=1)
        self.to_clip = torch.randn(3 + 8, CLIP_DIM, generator=gen) / 11 ** 0.5

    @property
    def image_size(self) -> Tuple[int, int]:
        """Video frame size (H, W) of this latent size (the VAE's 8x spatial compression)."""
        return self.latent_hw[0] * 8, self.latent_hw[1] * 8

    def __call__(self, image: Image.Image, device, dtype):
        """(visual_context [1, 257, 1280], cond_concat [1, 20, CONDITION_BLOCKS * F, h, w])."""
        pixels = image_to_tensor(image, self.image_size)
        h, w = self.latent_hw
        pooled = F.adaptive_avg_pool2d(pixels[None], (h, w))[0]                  # [3, h, w]
        first = torch.einsum("oc,chw->ohw", self.to_latent, pooled) + self.latent_bias
        black = torch.einsum("oc,chw->ohw", self.to_latent, -torch.ones(3, h, w)) + self.latent_bias
        frames = CONDITION_BLOCKS * self.frames_per_block
        # later frames drift from the image towards the black frames' latent, as a causal encoder's do
        weights = torch.tensor([0.5 ** f for f in range(frames)]).view(1, frames, 1, 1)
        latent = weights * first[:, None] + (1 - weights) * black[:, None]       # [16, F, h, w]
        mask = torch.zeros(MASK_CHANNELS, frames, h, w)
        mask[:, 0] = 1.0
        cond = torch.cat([mask, latent], dim=0)[None]
        colours = F.adaptive_avg_pool2d(pixels[None], (16, 16))[0].reshape(3, 256).t()  # [256, 3]
        tokens = torch.cat([colours, self.positions], dim=1)                              # [256, 11]
        context = torch.cat([tokens.mean(0, keepdim=True), tokens], dim=0) @ self.to_clip  # [257, 1280]
        return (context[None].to(device, dtype), cond.to(device, dtype))


def builtin_start_image(size: Tuple[int, int] = (352, 640)) -> Image.Image:
    """The start image when the player brings none: a drawn landscape (sky, hills, a road), made
    here so that the package carries no binary file."""
    h, w = size
    y = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    x = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    sky = torch.stack([0.45 + 0.3 * y, 0.65 + 0.25 * y, 0.95 - 0.1 * y])
    horizon = 0.55 + 0.06 * torch.sin(9 * x) + 0.04 * torch.sin(23 * x + 1)
    ground = torch.stack([0.25 + 0.2 * y, 0.5 - 0.1 * y, 0.2 + 0.0 * y])
    road = ((x - 0.5).abs() < 0.04 + 0.35 * (y - 0.55).clamp(min=0)) & (y > horizon)
    picture = torch.where(y > horizon, ground, sky)
    picture = torch.where(road, torch.full_like(picture, 0.35), picture)
    data = (picture.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (w, h), data.numpy().tobytes())


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
