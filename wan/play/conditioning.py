"""A start image turned into the model's two image conditions, block by block.

Upstream conditions a video on its start image: `visual_context`, the CLIP image features
[B, 257, 1280], and `cond_concat` [B, 20, F, h, w], a 4-channel mask (1 on the first latent frame)
beside the Wan VAE encoding of [the image, 4 * (F - 1) black frames]. Upstream encodes all F
latent frames up front (`inference_streaming.py`: 360); a game here has no end, so a conditioner's
`start(image, device, dtype)` gives a `StartConditions` that is ready for block 0 (CLIP features
and the encoder's first three latent frames) and encodes the rest one causal chunk per `advance()`
call, in the slack between blocks, until the encoder has settled: the black frames' latents stop
changing (bitwise). Every later block uses the settled latent, which is what upstream's encoding
gives there, however long it is.

`CheckoutConditioner` runs a Matrix-Game-2 checkout's own encoder modules and weights.
`DemoConditioner` stands in without them: conditions that are a fixed function of the image (its
colours pooled to the latent grid and to 257 tokens, through fixed random projections), so that
another image gives another game, with random weights. It is reported as a demo everywhere
(start-up line, /health, the page).
"""
import collections
import importlib
import io
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)
CONDITION_BLOCKS = 2  # blocks a conditioner's legacy __call__ gives (start() gives them all)
CLIP_TOKENS, CLIP_DIM = 257, 1280
LATENT_CHANNELS, MASK_CHANNELS = 16, 4
MAX_LATENT_FRAMES = 64   # latent frames encoded at most before giving up on the encoder settling
UPSTREAM_FRAMES = 360    # N of upstream's inference_streaming.py (--max_num_output_frames)
TILE_SIZE, TILE_STRIDE = (44, 80), (23, 38)  # upstream's tiled encode, in latent units
VAE_FILE = "Wan2.1_VAE.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
TOKENIZER_DIR = "xlm-roberta-large"
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model")  # either one is a vocabulary


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


def check_weights_dir(weights_dir) -> Path:
    """The folder `CheckoutConditioner` loads upstream's image encoders from must hold the VAE
    (`Wan2.1_VAE.pth`), the CLIP checkpoint and the CLIP tokenizer's folder (`xlm-roberta-large/`
    with a vocabulary), as Matrix-Game-2.0's weights lay them out beside the VAE. Raises
    FileNotFoundError naming every missing one (before anything loads); returns the folder."""
    root = Path(weights_dir)
    missing = [f"{root / name} ({what})" for name, what in
               ((VAE_FILE, "the Wan VAE, whose encoder makes cond_concat"),
                (CLIP_FILE, "the CLIP checkpoint, which makes visual_context"))
               if not (root / name).is_file()]
    tokenizer = root / TOKENIZER_DIR
    if not tokenizer.is_dir():
        missing.append(f"{tokenizer}/ (the folder of CLIP's text tokenizer, which upstream's CLIP "
                       f"loads with its checkpoint)")
    elif not any((tokenizer / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"{tokenizer}/{' or '.join(TOKENIZER_FILES)} (the tokenizer's vocabulary)")
    if missing:
        raise FileNotFoundError(
            "conditioning on the start image with a Matrix-Game-2 checkout's encoders needs these "
            f"files in {root} (the folder of the VAE weights), missing: " + "; ".join(missing)
            + ". Put them beside the VAE as Matrix-Game-2.0's weights have them, or leave out "
              "--matrix-game-dir for demo conditioning.")
    return root


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so that -0.0 differs from 0.0 and a NaN equals itself)."""
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return tensor.view(_INT_OF_SIZE[tensor.element_size()])
    return tensor


def bitwise_equal_on_device(now: Sequence[Optional[torch.Tensor]],
                            before: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """Whether two lists of tensors are equal bit for bit, as a 0-dim bool tensor on their device
    (nothing waits for the device), or None when they cannot be: another length, None against a
    tensor, another shape, dtype or device."""
    if len(now) != len(before):
        return None
    checks = []
    for a, b in zip(now, before):
        if a is None or b is None:
            if a is not b:
                return None
            continue
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return None
        if a is not b:
            checks.append(torch.eq(_bits(a), _bits(b)).all())
    if not checks:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([c.to(checks[0].device) for c in checks]).all()


class _DeviceFlag:
    """A 0-dim bool tensor read back without making the host wait: on CUDA it is copied to pinned
    memory behind an event, and is `ready()` once the device has got there."""

    def __init__(self, value: torch.Tensor):
        self._event = None
        if value.device.type == "cuda":
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = value

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def get(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._host)


class StartConditions:
    """One game's image conditions, encoded as the game goes (from a conditioner's `start`).

    `visual_context` [1, 257, 1280]. `block(i)` is `cond_concat` [1, 20, F, h, w] of block i (the
    4 mask channels first, 1 on latent frame 0 only), or None while its latent frames are not
    encoded yet. `advance()` does one unit of encode work: one causal chunk of the encoder, i.e.
    one more latent frame (all tiles); call it in the slack between blocks until it returns False.

    Settling: the encoder is causal and is fed black frames after the image, so it runs the same
    function on the same input from chunk 1 on; once a chunk leaves the encoder's state (its
    feature caches, `encoder.state()`) bit for bit as the chunk before did, every later latent
    frame equals the last one. `settled_frame` is then the first latent frame equal to the one
    before it (proven, not encoded: with the state unchanged after frame k it is k + 1), and every
    frame from it on is the settled latent (frame `settled_frame - 1`). An encoder without
    `state()` settles when two consecutive latent frames are bitwise equal. The check runs on the
    device and is read back a call later when the device has not got there yet (never waiting
    on it), so on a GPU the last `advance()` may only find that it is done.

    Bounded: after `max_frames` latent frames without settling, encoding stops with a warning
    (`capped`); frames from then on hold the last encoded one. `done` is True once settled or
    capped; the encoder (and its caches) is then let go.
    """

    def __init__(self, visual_context: torch.Tensor, encoder, *, max_frames: int = MAX_LATENT_FRAMES,
                 ready_frames: int = 3, device=None, dtype: Optional[torch.dtype] = None):
        if not isinstance(max_frames, int) or max_frames < 1:
            raise ValueError(f"max_frames must be a positive int, got {max_frames!r}")
        if not isinstance(ready_frames, int) or not 0 <= ready_frames <= max_frames:
            raise ValueError(f"ready_frames must be an int in [0, max_frames={max_frames}], got "
                             f"{ready_frames!r}")
        if not callable(getattr(encoder, "step", None)):
            raise TypeError(f"encoder must have a step() giving the next latent frame, got "
                            f"{type(encoder).__name__}")
        self.visual_context = visual_context
        self.max_frames = max_frames
        self.settled_frame: Optional[int] = None
        self.capped = False
        self._device, self._dtype = device, dtype
        self._encoder = encoder
        self._latents: List[torch.Tensor] = []   # [1, C, 1, h, w] each, in the output device/dtype
        self._last_raw: Optional[torch.Tensor] = None
        self._previous_state: Optional[list] = None
        self._pending = collections.deque()      # (frame proven settled if True, _DeviceFlag)
        self._hold_from: Optional[int] = None    # frames from here on are this one
        self._done = False
        self._settled_block = {}
        while self.frames_encoded < ready_frames and self.advance():
            pass

    @classmethod
    def settled(cls, visual_context: torch.Tensor, frames: Sequence[torch.Tensor]) -> "StartConditions":
        """Conditions computed all at once: latent frames [1, C, 1, h, w] whose last one is the
        settled latent (every later frame equals it): `done`, `settled_frame = len(frames)`."""
        if not frames:
            raise ValueError("frames must hold at least one latent frame")
        conditions = cls.__new__(cls)
        conditions.visual_context = visual_context
        conditions.max_frames = len(frames)
        conditions.capped = False
        conditions._device = conditions._dtype = None
        conditions._encoder = None
        conditions._latents = list(frames)
        conditions._last_raw = conditions._previous_state = None
        conditions._pending = collections.deque()
        conditions._settled_block = {}
        conditions._done = False
        conditions._settle(len(frames), quiet=True)
        return conditions

    @property
    def frames_encoded(self) -> int:
        """Latent frames encoded so far."""
        return len(self._latents)

    @property
    def done(self) -> bool:
        """No encode work left: settled, or capped at `max_frames`."""
        if not self._done:
            self._poll()
        return self._done

    @torch.no_grad()
    def advance(self) -> bool:
        """Encode one more latent frame (one causal chunk, every tile). Returns True while more
        work remains, False once done (settled or capped); a call after that does nothing."""
        if self.done:
            return False
        if self.frames_encoded >= self.max_frames:
            self._cap()
            return False
        index = self.frames_encoded
        frame = self._encoder.step()
        state_of = getattr(self._encoder, "state", None)
        if state_of is not None:  # an unchanged state proves frame index + 1 equals frame index
            state = list(state_of())
            same = (bitwise_equal_on_device(state, self._previous_state)
                    if self._previous_state is not None else None)
            self._previous_state, proven = state, index + 1
        else:  # frame index equal to frame index - 1
            same = (bitwise_equal_on_device([frame], [self._last_raw])
                    if self._last_raw is not None else None)
            self._last_raw, proven = frame, index
        self._latents.append(frame.to(self._device or frame.device, self._dtype or frame.dtype))
        if same is not None:
            self._pending.append((proven, _DeviceFlag(same)))
        self._poll()
        if not self._done and self.frames_encoded >= self.max_frames:
            self._cap()
        return not self._done

    def latent_frame(self, frame: int) -> Optional[torch.Tensor]:
        """Latent frame [1, C, 1, h, w] (the settled latent from `settled_frame` on), or None
        while not encoded yet."""
        if frame < 0:
            raise ValueError(f"frame must be >= 0, got {frame}")
        if self._hold_from is not None and frame >= self._hold_from:
            return self._latents[self._hold_from]
        return self._latents[frame] if frame < len(self._latents) else None

    def block(self, index: int, frames_per_block: int = 3) -> Optional[torch.Tensor]:
        """cond_concat [1, 4 + C, frames_per_block, h, w] of block `index` (mask channels first: 1
        on latent frame 0 only), or None while its latent frames are not encoded yet. Blocks past
        the settled frame are one tensor, made once: read it, do not write to it."""
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"block index must be an int >= 0, got {index!r}")
        if not isinstance(frames_per_block, int) or frames_per_block < 1:
            raise ValueError(f"frames_per_block must be an int >= 1, got {frames_per_block!r}")
        first = index * frames_per_block
        held = index > 0 and self._hold_from is not None and first >= self._hold_from
        if held and frames_per_block in self._settled_block:
            return self._settled_block[frames_per_block]
        frames = [self.latent_frame(f) for f in range(first, first + frames_per_block)]
        if any(f is None for f in frames):
            return None
        latent = torch.cat(frames, dim=2)
        mask = latent.new_zeros(latent.shape[0], MASK_CHANNELS, *latent.shape[2:])
        if index == 0:
            mask[:, :, 0] = 1.0
        cond = torch.cat([mask, latent], dim=1)
        if held:
            self._settled_block[frames_per_block] = cond
        return cond

    # settling ---------------------------------------------------------------------------------
    def _poll(self, wait: bool = False):
        while self._pending and (wait or self._pending[0][1].ready()):
            proven, flag = self._pending.popleft()
            if flag.get():
                self._settle(proven)
                return

    def _settle(self, frame: int, quiet: bool = False):
        self.settled_frame = frame
        self._hold_from = frame - 1
        self._finish()
        if not quiet:
            log.info("start-image conditions settled: latent frames from %d on equal frame %d "
                     "(%d latent frames encoded)", frame, frame - 1, self.frames_encoded)

    def _cap(self):
        self._poll(wait=True)  # a settled flag still on its way counts
        if self._done:
            return
        self.capped = True
        self._hold_from = self.frames_encoded - 1
        self._finish()
        log.warning("start-image conditions did not settle within %d latent frames: every later "
                    "block holds latent frame %d (upstream's encoding may still change after it)",
                    self.max_frames, self._hold_from)

    def _finish(self):
        self._done = True
        self._pending.clear()
        self._encoder = self._previous_state = self._last_raw = None


class DemoConditioner:
    """Conditions that depend on the image through fixed random projections (see the module's
    docstring): for random weights and for CPU tests. `demo` is True: nothing here is upstream's
    encoder. Its latent frames drift from the image's towards the black frames' over
    `CONDITION_BLOCKS * frames_per_block` frames, as a causal encoder's do, and then hold the
    black frames' latent (settled there)."""
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

    def start(self, image: Image.Image, device, dtype) -> StartConditions:
        """All of a game's conditions at once (`done`; settled at frame
        `CONDITION_BLOCKS * frames_per_block + 1`)."""
        pixels = image_to_tensor(image, self.image_size)
        h, w = self.latent_hw
        pooled = F.adaptive_avg_pool2d(pixels[None], (h, w))[0]                  # [3, h, w]
        first = torch.einsum("oc,chw->ohw", self.to_latent, pooled) + self.latent_bias
        black = torch.einsum("oc,chw->ohw", self.to_latent, -torch.ones(3, h, w)) + self.latent_bias
        drift = CONDITION_BLOCKS * self.frames_per_block
        weights = torch.tensor([0.5 ** f for f in range(drift)]).view(1, drift, 1, 1)
        latent = weights * first[:, None] + (1 - weights) * black[:, None]       # [16, F, h, w]
        frames = [latent[None, :, f:f + 1] for f in range(drift)] + [black[None, :, None]]
        colours = F.adaptive_avg_pool2d(pixels[None], (16, 16))[0].reshape(3, 256).t()  # [256, 3]
        tokens = torch.cat([colours, self.positions], dim=1)                              # [256, 11]
        context = torch.cat([tokens.mean(0, keepdim=True), tokens], dim=0) @ self.to_clip  # [257, 1280]
        return StartConditions.settled(context[None].to(device, dtype),
                                       [f.to(device, dtype) for f in frames])

    def __call__(self, image: Image.Image, device, dtype):
        """(visual_context [1, 257, 1280], cond_concat [1, 20, CONDITION_BLOCKS * F, h, w]): the
        first blocks of `start`'s conditions (kept for callers of the one-shot API)."""
        return _first_blocks(self.start(image, device, dtype), CONDITION_BLOCKS,
                             self.frames_per_block)


def _first_blocks(conditions: StartConditions, blocks: int, frames_per_block: int):
    while conditions.frames_encoded < blocks * frames_per_block and conditions.advance():
        pass
    cond = torch.cat([conditions.block(i, frames_per_block) for i in range(blocks)], dim=2)
    return conditions.visual_context, cond


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


def tile_plan(height: int, width: int, size: Tuple[int, int],
              stride: Tuple[int, int]) -> List[Tuple[int, int, int, int]]:
    """The tiles of upstream's tiled VAE encode over a (height, width) pixel frame, in its order
    (rows, then columns): (top, bottom, left, right), starts every `stride`, `size` long; a start
    is left out where the tile before it already reaches the frame's end. A tile's bottom/right
    may pass the frame (the slice stops there)."""
    def starts(length, size_, stride_):
        return [s for s in range(0, length, stride_)
                if not (s >= stride_ and s - stride_ + size_ >= length)]
    return [(top, top + size[0], left, left + size[1])
            for top in starts(height, size[0], stride[0])
            for left in starts(width, size[1], stride[1])]


class _Tile:
    def __init__(self, image, bounds, target):
        self.image = image                    # [1, 3, 1, th, tw]: the first chunk
        self.zeros = torch.zeros(image.shape[0], image.shape[1], 4, *image.shape[3:],
                                 dtype=image.dtype, device=image.device)  # every later chunk
        self.bounds = bounds                  # (top edge, bottom edge, left edge, right edge)
        self.target = target                  # (row, column) in the latent frame
        self.cache: Optional[list] = None     # the encoder's feature caches for this tile
        self.outputs: Optional[torch.Tensor] = None  # encoder outputs [1, 2C, N, th', tw']
        self.mask: Optional[torch.Tensor] = None


class CausalTiledEncoder:
    """Upstream's tiled Wan VAE encoding of [image, black frames...], one latent frame per
    `step()`, bitwise what `WanVAE.encode(video, device, tiled=True, tile_size, tile_stride)`
    gives at that frame for a video of `reference_frames` latent frames.

    It drives the checkout's own modules (`vae.model.encoder`, `vae.model.conv1`,
    `vae.build_mask`, `vae.scale`) the way upstream's encode does, one causal chunk at a time:
    chunk 0 is the image (1 pixel frame), chunk k >= 1 four black pixel frames (zeros in [-1, 1]
    space, as upstream pads), each tile with its own feature caches. Upstream runs the 1x1x1
    `conv1` once over all N latent frames of a tile; a convolution's rounding may depend on the
    length it runs over (it does on CPU in float32 at 44 x 80), so here it runs over a buffer of
    the tile's N frames too (frames not encoded yet are zeros: a 1x1x1 convolution's output at a
    frame reads only that frame), and frame k is taken from it. The shift/scale and the blending
    of tiles (upstream's masks, summed in tile order, divided by the summed masks) are
    elementwise, done on the encoding device in the video's dtype. `state()` is every tile's
    feature caches: what the next chunk reads besides its (constant) input."""

    def __init__(self, vae, pixels: torch.Tensor, tile_size: Sequence[int] = TILE_SIZE,
                 tile_stride: Sequence[int] = TILE_STRIDE,
                 reference_frames: int = UPSTREAM_FRAMES):
        if pixels.dim() != 5 or pixels.shape[:3] != (1, 3, 1):
            raise ValueError(f"pixels must be [1, 3, 1, H, W], got {tuple(pixels.shape)}")
        factor = vae.upsampling_factor
        if pixels.shape[3] % factor or pixels.shape[4] % factor:
            raise ValueError(f"frame size {tuple(pixels.shape[3:])} must be a multiple of "
                             f"{factor}")
        size = (tile_size[0] * factor, tile_size[1] * factor)
        stride = (tile_stride[0] * factor, tile_stride[1] * factor)
        if min(stride) < 1 or stride[0] > size[0] or stride[1] > size[1]:
            raise ValueError(f"tile_stride {tuple(tile_stride)} must be positive and at most "
                             f"tile_size {tuple(tile_size)}")
        self.vae, self.model = vae, vae.model
        self.reference_frames = reference_frames
        height, width = pixels.shape[3:]
        self.latent_hw = (height // factor, width // factor)
        self.border = ((size[0] - stride[0]) // factor, (size[1] - stride[1]) // factor)
        self.tiles = [_Tile(pixels[:, :, :, top:bottom, left:right],
                            (top == 0, bottom >= height, left == 0, right >= width),
                            (top // factor, left // factor))
                      for top, bottom, left, right in tile_plan(height, width, size, stride)]
        # as many cache slots as upstream's clear_cache gives the encoder (its module's
        # count_conv3d, reached through the model's globals: the checkout is not in sys.modules)
        count = getattr(type(self.model).encode, "__globals__", {}).get("count_conv3d")
        slots = (count(self.model.encoder) if count is not None else
                 sum(type(m).__name__ == "CausalConv3d" for m in self.model.encoder.modules()))
        for tile in self.tiles:
            tile.cache = [None] * slots
        z = self.model.z_dim
        shift, scale = (s.to(dtype=pixels.dtype, device=pixels.device) for s in vae.scale)
        self.shift, self.scale = shift.view(1, z, 1, 1, 1), scale.view(1, z, 1, 1, 1)
        self.weight: Optional[torch.Tensor] = None
        self.frames = 0

    def state(self) -> list:
        return [entry for tile in self.tiles for entry in tile.cache]

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """The next latent frame [1, C, 1, h, w] (C = 16), scaled as upstream's encode."""
        k = self.frames
        if k >= self.reference_frames:
            raise RuntimeError(f"all {self.reference_frames} latent frames of the reference "
                               f"length are encoded")
        latents = []
        for tile in self.tiles:
            out = self.model.encoder(tile.image if k == 0 else tile.zeros,
                                     feat_cache=tile.cache, feat_idx=[0])
            if tile.outputs is None:
                tile.outputs = out.new_zeros(*out.shape[:2], self.reference_frames,
                                             *out.shape[3:])
                tile.mask = self.vae.build_mask(out, is_bound=tile.bounds,
                                                border_width=self.border).to(
                    dtype=out.dtype, device=out.device)
            tile.outputs[:, :, k] = out[:, :, 0]
            mu = self.model.conv1(tile.outputs)[:, :self.model.z_dim, k:k + 1]
            latents.append((mu - self.shift) * self.scale)
        if self.weight is None:
            self.weight = latents[0].new_zeros(1, 1, 1, *self.latent_hw)
            for tile, latent in zip(self.tiles, latents):
                self._window(self.weight, tile, latent).add_(tile.mask)
        values = latents[0].new_zeros(1, latents[0].shape[1], 1, *self.latent_hw)
        for tile, latent in zip(self.tiles, latents):
            self._window(values, tile, latent).add_(latent * tile.mask)
        self.frames += 1
        return values / self.weight

    @staticmethod
    def _window(frame, tile, latent):
        row, column = tile.target
        return frame[:, :, :, row:row + latent.shape[3], column:column + latent.shape[4]]


class CheckoutConditioner:
    """Upstream's image conditioning, with a Matrix-Game-2 checkout's own encoders and weights:
    `get_wanx_vae_wrapper` of its `wan/vae/wanx_vae.py` over the folder holding Wan2.1_VAE.pth,
    the CLIP checkpoint and its tokenizer folder (checked first: `check_weights_dir`). As
    upstream's `inference_streaming.py`: [the image, black frames...] encoded (tiled: tiles
    44 x 80, stride 23 x 38 latent units), the mask (1 on the first latent frame) before them,
    CLIP features of the image; `start` encodes only block 0's latent frames and hands the rest
    to `StartConditions.advance` (`CausalTiledEncoder`), so that every block's conditions equal
    upstream's encoding of `reference_frames` latent frames at that block (beyond the settled
    frame: upstream's too, for any length). `condition_blocks`: blocks the legacy `__call__`
    gives."""
    demo = False

    def __init__(self, matrix_game_dir, weights_dir, device, dtype, latent_hw=(44, 80),
                 frames_per_block: int = 3, condition_blocks: int = 4, *,
                 tile_size: Sequence[int] = TILE_SIZE, tile_stride: Sequence[int] = TILE_STRIDE,
                 max_frames: int = MAX_LATENT_FRAMES, reference_frames: int = UPSTREAM_FRAMES):
        weights_dir = check_weights_dir(weights_dir)
        if not isinstance(reference_frames, int) or reference_frames < 1:
            raise ValueError(f"reference_frames must be a positive int, got {reference_frames!r}")
        if not isinstance(max_frames, int) or not 1 <= max_frames <= reference_frames:
            raise ValueError(f"max_frames must be an int in [1, reference_frames="
                             f"{reference_frames}], got {max_frames!r}")
        if not isinstance(frames_per_block, int) or not 1 <= frames_per_block <= max_frames:
            raise ValueError(f"frames_per_block must be an int in [1, max_frames], got "
                             f"{frames_per_block!r}")
        self.tile_size, self.tile_stride = tuple(tile_size), tuple(tile_stride)
        if len(self.tile_size) != 2 or len(self.tile_stride) != 2:
            raise ValueError(f"tile_size and tile_stride are (rows, columns) in latent units, got "
                             f"{tile_size!r}, {tile_stride!r}")
        module = import_from_checkout(matrix_game_dir, "wan.vae.wanx_vae")
        vae = module.get_wanx_vae_wrapper(str(weights_dir), torch.float16)
        vae.requires_grad_(False)
        vae.eval()
        self.device, self.dtype = torch.device(device), dtype
        self.vae = vae.to(self.device, dtype)
        self.latent_hw, self.frames_per_block = tuple(latent_hw), frames_per_block
        self.condition_blocks = condition_blocks
        self.max_frames, self.reference_frames = max_frames, reference_frames
        self.name = (f"upstream's VAE encoder + CLIP from {matrix_game_dir} (weights "
                     f"{weights_dir}), encoded until settled (at most {max_frames} latent "
                     f"frames per game)")

    @property
    def image_size(self) -> Tuple[int, int]:
        return self.latent_hw[0] * 8, self.latent_hw[1] * 8

    @torch.no_grad()
    def start(self, image: Image.Image, device, dtype) -> StartConditions:
        """CLIP features of the image and the encoder's first `frames_per_block` latent frames
        (pixel frames 0 .. 4 * frames_per_block - 4): block 0's conditions. The rest is
        `advance()` work."""
        pixels = image_to_tensor(image, self.image_size)[None, :, None].to(self.device,
                                                                            self.dtype)
        visual_context = self.vae.clip.encode_video(pixels)
        encoder = CausalTiledEncoder(self.vae.vae, pixels, self.tile_size, self.tile_stride,
                                     self.reference_frames)
        return StartConditions(visual_context.to(device, dtype), encoder,
                               max_frames=self.max_frames, ready_frames=self.frames_per_block,
                               device=device, dtype=dtype)

    def __call__(self, image: Image.Image, device, dtype):
        """(visual_context, cond_concat [1, 20, condition_blocks * F, h, w]) at once (the
        one-shot API; `start` is the incremental one)."""
        return _first_blocks(self.start(image, device, dtype), self.condition_blocks,
                             self.frames_per_block)
