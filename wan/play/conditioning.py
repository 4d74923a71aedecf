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
import importlib
import io
import logging
import sys
from pathlib import Path
from typing import Tuple

import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)
CONDITION_BLOCKS = 2  # blocks of conditions a conditioner gives: the first one and a settled one
CLIP_TOKENS, CLIP_DIM = 257, 1280
LATENT_CHANNELS, MASK_CHANNELS = 16, 4


def image_to_tensor(image: Image.Image, size: Tuple[int, int]) -> torch.Tensor:
    """The start image as upstream's scripts prepare it: centre-cropped to the frame's aspect
    ratio, resized to `size` (H, W) with an antialiased bilinear filter, as [3, H, W] floats in
    [-1, 1]."""
    h, w = size
    image = image.convert("RGB")
    if image.height * w > h * image.width:  # taller than the frame: crop rows
        crop_w, crop_h = image.width, image.width * h / w
    else:
        crop_w, crop_h = image.height * w / h, image.height
    left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
    image = image.resize((w, h), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
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


def import_from_checkout(root, module: str):
    """Import `module` (e.g. 'wan.vae.wanx_vae') from a Matrix-Game-2 checkout at `root`, whose
    top-level package is also named `wan`: this library's `wan` modules step aside while the
    checkout's are imported, then come back; the checkout's stay reachable through the returned
    module (imports inside its functions that run later must not name `wan`: upstream's encoder
    code imports everything at the top)."""
    root = str(Path(root).resolve())
    clash = ("wan", "utils")

    def ours(name):
        return any(name == c or name.startswith(c + ".") for c in clash)
    saved = {name: mod for name, mod in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        loaded = importlib.import_module(module)
    finally:
        sys.path.remove(root)
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)
    if not str(Path(loaded.__file__).resolve()).startswith(root):
        raise ImportError(f"{module} did not come from {root}")
    return loaded


class CheckoutConditioner:
    """Upstream's image conditioning, with a Matrix-Game-2 checkout's own encoders and weights:
    `get_wanx_vae_wrapper` of its `wan/vae/wanx_vae.py` over the folder holding Wan2.1_VAE.pth and
    the CLIP checkpoint. As upstream's `inference_streaming.py`: the image and 4 * (N - 1) black
    frames encoded (tiled: tiles 44 x 80, stride 23 x 38), the mask (1 on the first latent frame)
    before them, CLIP features of the image. N = `condition_blocks` blocks of latent frames;
    later blocks reuse the last one (upstream encodes all 360 frames up front)."""
    demo = False

    def __init__(self, matrix_game_dir, weights_dir, device, dtype, latent_hw=(44, 80),
                 frames_per_block: int = 3, condition_blocks: int = 4):
        module = import_from_checkout(matrix_game_dir, "wan.vae.wanx_vae")
        vae = module.get_wanx_vae_wrapper(str(weights_dir), torch.float16)
        vae.requires_grad_(False)
        vae.eval()
        self.vae = vae.to(device, dtype)
        self.latent_hw, self.frames_per_block = tuple(latent_hw), frames_per_block
        self.latent_frames = condition_blocks * frames_per_block
        self.name = (f"upstream's VAE encoder + CLIP from {matrix_game_dir} (weights {weights_dir}), "
                     f"{self.latent_frames} latent frames encoded per game")

    @property
    def image_size(self) -> Tuple[int, int]:
        return self.latent_hw[0] * 8, self.latent_hw[1] * 8

    @torch.no_grad()
    def __call__(self, image: Image.Image, device, dtype):
        pixels = image_to_tensor(image, self.image_size)[None, :, None].to(device, dtype)
        black = torch.zeros_like(pixels).repeat(1, 1, 4 * (self.latent_frames - 1), 1, 1)
        latents = self.vae.encode(torch.cat([pixels, black], dim=2), device=device, tiled=True,
                                  tile_size=[44, 80], tile_stride=[23, 38]).to(device, dtype)
        mask = torch.zeros_like(latents[:, :MASK_CHANNELS])
        mask[:, :, 0] = 1.0
        cond = torch.cat([mask, latents], dim=1)
        visual_context = self.vae.clip.encode_video(pixels)
        return visual_context.to(device, dtype), cond
