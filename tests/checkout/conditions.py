"""Start-image conditions: the play server's (`CheckoutConditioner.start` + `advance`, this
library) against upstream's own encoding, with a Matrix-Game-2 checkout's encoder code and weight
files written from its own classes at seeded random weights. Run from this repository's root
(its `wan` is this library; the checkout's comes in through `import_from_checkout`, as the server
imports it):

    python tests/checkout/conditions.py weights  --checkout MG2 --out WEIGHTS
    python tests/checkout/conditions.py upstream --checkout MG2 --weights WEIGHTS --out ref.pt
    python tests/checkout/conditions.py ours     --checkout MG2 --weights WEIGHTS --out ours.pt

`weights` writes, in upstream's formats: `Wan2.1_VAE.pth` (the state dict of upstream's
`VideoVAE_` as `WanVAE` builds it, upstream's own initialisation under `--seed`, stored in float16
as upstream's loader casts it there anyway), the CLIP checkpoint (every key and shape of upstream's
`clip_xlm_roberta_vit_h_14` model; the vision tower seeded random, scaled by fan-in; the text tower,
which `encode_video` never runs, zeros stored as one broadcast element each) and a tokenizer folder
(`xlm-roberta-large/`: a small word-level tokenizer saved with transformers' `save_pretrained`,
which upstream's `AutoTokenizer.from_pretrained` loads).

`upstream` saves upstream's `get_wanx_vae_wrapper(...).encode(video, device, tiled=True, ...)` of
[image, 4 * (N - 1) zero frames] with the mask before it (`cond_concat`, as inference_streaming.py
builds it) and `clip.encode_video(image)`. `ours` saves the server's `start()` then `advance()` until
done: blocks 0 .. B-1, visual_context, the settled frame, and timings.

Stand-ins, only for what this machine cannot install (as tests/checkout/standins.py): `flash_attn`
(SDPA), `torchvision` when its build does not fit this torch (plus the four transforms upstream's
CLIP builds; only `Normalize` runs: per-channel (x - mean) / std), and without CUDA
`torch.cuda.current_device` and the CLIP's attention (upstream's asserts CUDA; exact SDPA in the
inputs' dtype). Both runs use the same ones.
"""
import argparse
import importlib.util
import json
import logging
import math
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import standins  # noqa: E402

from wan.play.conditioning import (CLIP_FILE, TOKENIZER_DIR, VAE_FILE,  # noqa: E402
                                   CheckoutConditioner, image_to_tensor, import_from_checkout)

log = logging.getLogger("conditions")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _torchvision_transforms():
    """What upstream's CLIP takes from torchvision.transforms when the empty stand-in is in."""
    transforms = sys.modules["torchvision.transforms"]

    class Compose:
        def __init__(self, steps):
            self.transforms = list(steps)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, x):
            mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            return (x - mean) / std

    class _Unused:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, x):
            raise NotImplementedError("torchvision stand-in: only Normalize runs")

    transforms.Compose, transforms.Normalize = Compose, Normalize
    transforms.Resize = transforms.ToTensor = _Unused
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")


def install_standins() -> list:
    used = []
    if importlib.util.find_spec("flash_attn") is None:
        sys.modules["flash_attn"] = standins._flash_attn_module()
        used.append("flash_attn")
    if not standins._torchvision_usable():
        standins._empty_torchvision()
        _torchvision_transforms()
        used.append("torchvision")
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"
        used.append("torch.cuda.current_device")
    return used


def exact_clip_attention(clip):
    """Upstream's CLIP attention asserts CUDA: without it, exact SDPA in the inputs' dtype."""
    if not torch.cuda.is_available():
        type(clip).encode_video.__globals__["flash_attention"] = standins.exact_attention


def start_image(size, seed: int):
    """A picture of exactly the frame size (no resampling in image_to_tensor): smooth colour
    fields with some noise, seeded."""
    from PIL import Image
    h, w = size
    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, h).view(h, 1, 1)
    x = torch.linspace(0, 1, w).view(1, w, 1)
    phase = torch.rand(1, 1, 3, generator=gen) * 6.28
    picture = 0.5 + 0.35 * torch.sin(5 * x + 3 * y + phase) + 0.1 * torch.rand(h, w, 3,
                                                                               generator=gen)
    data = (picture.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return Image.frombytes("RGB", (w, h), data.numpy().tobytes())


def write_weights(checkout: Path, out: Path, seed: int):
    out.mkdir(parents=True, exist_ok=True)
    vae_module = import_from_checkout(checkout, "wan.vae.wanx_vae_src.vae")
    torch.manual_seed(seed)
    vae = vae_module.WanVAE().model
    torch.save({k: v.half() for k, v in vae.state_dict().items()}, out / VAE_FILE)
    del vae

    clip_module = import_from_checkout(checkout, "wan.vae.wanx_vae_src.clip")
    shapes = {k: tuple(v.shape) for k, v in clip_module.clip_xlm_roberta_vit_h_14(
        pretrained=False, return_transforms=False, device="meta").state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    for key, shape in shapes.items():
        if not key.startswith("visual."):
            state[key] = torch.zeros((), dtype=torch.float16).expand(shape)
        elif key.endswith("weight") and len(shape) == 1:  # norms
            state[key] = torch.ones(shape, dtype=torch.float16)
        else:
            std = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.02
            if key.endswith(("cls_embedding", "pos_embedding")):
                std = 0.02
            state[key] = (torch.randn(shape, generator=gen) * std).half()
    torch.save(state, out / CLIP_FILE)
    del state

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<s>", "<pad>", "</s>", "<unk>", "a", "photo", "of", "the", "world"]
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)},
                                           unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(
        str(out / TOKENIZER_DIR))
    return {"files": sorted(p.name for p in out.iterdir())}


def run_upstream(args, size, dtype, device):
    module = import_from_checkout(args.checkout, "wan.vae.wanx_vae")
    vae = module.get_wanx_vae_wrapper(str(args.weights), torch.float16)  # as upstream's scripts
    vae.requires_grad_(False)
    vae.eval()
    vae = vae.to(device, dtype)
    exact_clip_attention(vae.clip)
    image = image_to_tensor(start_image(size, args.seed), size)[None, :, None].to(device, dtype)
    padding = torch.zeros_like(image).repeat(1, 1, 4 * (args.frames - 1), 1, 1)
    with torch.no_grad():
        start = time.perf_counter()
        latents = vae.encode(torch.cat([image, padding], dim=2), device=device, tiled=True,
                             tile_size=args.tile_size, tile_stride=args.tile_stride).to(device)
        encode_s = time.perf_counter() - start
        mask = torch.ones_like(latents)
        mask[:, :, 1:] = 0
        cond_concat = torch.cat([mask[:, :4], latents], dim=1)
        visual_context = vae.clip.encode_video(image)
    return {"cond_concat": cond_concat.cpu(), "visual_context": visual_context.cpu(),
            "encode_s": encode_s}


def run_ours(args, size, dtype, device):
    latent_hw = (size[0] // 8, size[1] // 8)
    conditioner = CheckoutConditioner(args.checkout, args.weights, device, dtype, latent_hw,
                                      tile_size=args.tile_size, tile_stride=args.tile_stride,
                                      reference_frames=args.frames,
                                      max_frames=min(args.frames, 64))
    exact_clip_attention(conditioner.vae.clip)
    image = start_image(size, args.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        started = time.perf_counter()
        cond = conditioner.start(image, device, dtype)
        sync()
        start_s = time.perf_counter() - started
        after_start = {"frames_encoded": cond.frames_encoded, "done": cond.done,
                       "block0_ready": cond.block(0) is not None,
                       "block1_ready": cond.block(1) is not None}
        calls = 0
        started = time.perf_counter()
        while cond.advance():
            calls += 1
            if calls > 10 * cond.max_frames:
                raise RuntimeError("advance() did not finish")
        sync()
        settle_s = time.perf_counter() - started
    return {"blocks": [cond.block(i).cpu() for i in range(args.blocks)],
            "visual_context": cond.visual_context.cpu(), "after_start": after_start,
            "settled_frame": cond.settled_frame, "frames_encoded": cond.frames_encoded,
            "capped": cond.capped, "advance_calls": calls, "start_s": start_s,
            "settle_s": settle_s}


def pair(text):
    a, b = text.split(",")
    return [int(a), int(b)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["weights", "upstream", "ours"])
    p.add_argument("--checkout", type=Path, required=True, help="the Matrix-Game-2 folder")
    p.add_argument("--weights", type=Path, help="the weights folder (upstream, ours)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="64x96", help="frame size HxW in pixels")
    p.add_argument("--frames", type=int, default=39, help="N: latent frames upstream encodes")
    p.add_argument("--blocks", type=int, default=13, help="blocks the server's run reports")
    p.add_argument("--tile-size", type=pair, default=[44, 80])
    p.add_argument("--tile-stride", type=pair, default=[23, 38])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    used = install_standins()
    log.info("stand-ins: %s", ", ".join(used) or "none")
    args.checkout = args.checkout.resolve()
    if (args.checkout / "Matrix-Game-2").is_dir():
        args.checkout = args.checkout / "Matrix-Game-2"
    if args.mode == "weights":
        report = write_weights(args.checkout, args.out, args.seed)
        log.info("wrote %s", report)
        return
    size = tuple(int(v) for v in args.size.split("x"))
    run = run_upstream if args.mode == "upstream" else run_ours
    result = run(args, size, DTYPES[args.dtype], torch.device(args.device))
    torch.save(result, args.out)
    log.info("%s", json.dumps({k: v for k, v in result.items()
                               if isinstance(v, (int, float, bool, dict, type(None)))}))


if __name__ == "__main__":
    main()
