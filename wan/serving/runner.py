"""What a player needs per block of 3 latent frames: the denoising forwards, the decode to video
frames, and the t=0 forward that writes the clean block into the caches.

`StreamingBlockRunner` does one block per `block()` call, in upstream's order of work (its
`CausalInferencePipeline`) with one change: the decode is not queued behind the cache update. The
update only matters to the next block, and the decode only needs the denoised latents, so with
`overlap_update=True` (CUDA) the decoder runs on a high-priority stream and the update on the
default one beside it: the GPU's schedulers give the decoder's kernels precedence, the update
fills what they leave, the frames are ready after about denoise + decode.

With the decoder on another GPU than the DiT (one player split over two GPUs) the runner pipelines:
the block's latents cross over (NVLink), the decode runs on the decoder's GPU and `block()`
returns without waiting for it, so the DiT's next block overlaps this block's decode; a block then
takes about the slower of the two parts. The frames it returns are on the decoder's GPU and are
ready once that GPU gets there (`torch.cuda.synchronize(device)` or any use of them waits).

It measures both numbers a player feels, with CUDA events (CPU: host clocks; not in split mode,
whose two GPUs have no common event clock: time it from the host over many blocks):
* action-to-frame latency: from the block's start (its action input given) to its frames ready;
* block time: from the block's start until the next block can start (throughput).

The noise schedule is upstream's flow matching as its inference configs set it (1000 training
steps, shift 5, `warp_denoising_step: true`, `context_noise: 0`): the model's output is a flow
prediction, x0 = x_t - sigma * flow, and the next step's input is (1 - sigma') x0 + sigma' noise.
"""
import functools
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..runtime.conditioning import attention_window_frames, frame_tokens
from ..runtime.upstream_caches import new_stream_caches

DISTILLED_STEPS = (1000, 666, 333)  # upstream's denoising_step_list (before warping)


class FlowMatchSchedule:
    """Timesteps and sigmas of the denoising steps, warped onto upstream's 1000-step training
    schedule with shift 5 (its FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True))."""

    def __init__(self, steps: Sequence[int] = DISTILLED_STEPS, shift: float = 5.0):
        unshifted = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1]
        sigmas = shift * unshifted / (1 + (shift - 1) * unshifted)
        rows = [1000 - int(step) for step in steps]
        if min(rows) < 0 or max(rows) > 999:
            raise ValueError(f"denoising steps must lie in (0, 1000], got {list(steps)}")
        self.sigmas = [float(sigmas[r]) for r in rows]
        self.timesteps = [1000.0 * s for s in self.sigmas]


@dataclass
class BlockTiming:
    action_to_frame_ms: float
    block_ms: float


class StreamingBlockRunner:
    """Blocks of one stream through a DiT (`CausalWanModel` or the optimized one, called with
    upstream's cache dicts) and a streaming decoder (`VAEDecoderWrapper` or the optimized one)."""

    def __init__(self, model, decoder, latent_hw=(44, 80), batch: int = 1,
                 schedule: Optional[FlowMatchSchedule] = None, overlap_update: bool = True,
                 decoder_dtype: Optional[torch.dtype] = None,
                 generator: Optional[torch.Generator] = None):
        self.model, self.decoder = model, decoder
        self.latent_hw, self.batch = tuple(latent_hw), batch
        self.schedule = schedule or FlowMatchSchedule()
        self.frames_per_block = getattr(model, "num_frame_per_block", 3)
        param = model.patch_embedding.weight
        self.device, self.dtype = param.device, param.dtype
        self.decoder_dtype = decoder_dtype or decoder.conv2.weight.dtype
        self.decoder_device = decoder.conv2.weight.device
        self.split = self.decoder_device != self.device  # the DiT and the decoder on two GPUs
        self.overlap = overlap_update and self.device.type == "cuda" and not self.split
        # the decode's stream: the highest priority torch offers (lower numbers run first)
        self.side = decode_stream(self.device) if self.overlap else None
        self.tokens_per_frame = frame_tokens(latent_hw[0], latent_hw[1], model.patch_size)
        self.caches = None
        self.generator = generator  # the noise's source (default: torch's global one)

    def start(self, visual_context: torch.Tensor):
        """A new stream with this image context (fresh caches, a new decoder stream)."""
        window = attention_window_frames(self.model.local_attn_size)
        self.caches = new_stream_caches(self.model, self.batch, window, self.tokens_per_frame)
        self.visual_context = visual_context
        self.decoder_cache = [None] * 32
        self.frame = 0

    @torch.no_grad()
    def block(self, cond_concat, mouse_cond=None, keyboard_cond=None, noise=None):
        """One block: returns (video frames [B, T, 3, H, W] float32, its clock: `.timing()` gives
        the BlockTiming; None in split mode). cond_concat [B, 20, 3, h, w] for this block's
        frames; the action histories up to its last frame."""
        if self.caches is None:
            raise RuntimeError("call start(visual_context) before the first block")
        clock = _Clock(self.device)
        clock.mark("start")
        b, f, (h, w) = self.batch, self.frames_per_block, self.latent_hw
        x = noise if noise is not None else torch.randn(b, 16, f, h, w, device=self.device,
                                                        dtype=self.dtype, generator=self.generator)
        call = dict(visual_context=self.visual_context, cond_concat=cond_concat,
                    mouse_cond=mouse_cond, keyboard_cond=keyboard_cond, **self.caches,
                    current_start=self.frame * self.tokens_per_frame)
        sigmas = self.schedule.sigmas
        for step, (t, sigma) in enumerate(zip(self.schedule.timesteps, sigmas)):
            flow = self.model(x, _timesteps(t, b, f, self.device), **call)
            x0 = x - sigma * flow
            if step + 1 < len(sigmas):
                next_sigma = sigmas[step + 1]
                x = (1 - next_sigma) * x0 + next_sigma * torch.randn(
                    x0.shape, device=x0.device, dtype=x0.dtype, generator=self.generator)

        def update():  # the clean block into the caches (t = context noise = 0)
            self.model(x0, _timesteps(0.0, b, f, self.device), **call)

        latents = x0.transpose(1, 2).to(self.decoder_dtype)
        if self.split:  # latents over to the decoder's GPU; both GPUs go on without waiting
            with torch.cuda.device(self.decoder_device):
                frames, self.decoder_cache = self.decoder(
                    latents.to(self.decoder_device, non_blocking=True), *self.decoder_cache)
            update()
            clock = None  # no event clock spans the two GPUs
        elif self.overlap:  # the decode first on its high-priority stream, the update beside it
            main = torch.cuda.current_stream(self.device)
            self.side.wait_stream(main)
            latents.record_stream(self.side)  # made on main, read on the side stream
            with torch.cuda.stream(self.side):
                frames, self.decoder_cache = self.decoder(latents, *self.decoder_cache)
                clock.mark("frames")
            update()
            main.wait_stream(self.side)
        else:  # upstream's order
            update()
            frames, self.decoder_cache = self.decoder(latents, *self.decoder_cache)
            clock.mark("frames")
        if clock is not None:
            clock.mark("done")
        self.frame += f
        return frames, clock


@functools.lru_cache(maxsize=None)
def decode_stream(device: torch.device) -> torch.cuda.Stream:
    """One high-priority decode stream per device, shared by every runner (player): cuBLAS and
    cuDNN keep a workspace per stream for the life of the process (32 MiB and more each), so a
    stream per player would leave that much behind every player who came and went."""
    return torch.cuda.Stream(device, priority=-1)


def _timesteps(t: float, batch: int, frames: int, device):
    """t per frame in float32 whatever the model's dtype, as upstream's pipeline passes it: bf16
    would round the warped steps (908.84 -> 908), which moves a bf16 model's output by 13-34%."""
    return torch.full((batch, frames), t, device=device, dtype=torch.float32)


class _Clock:
    """Marks on the GPU timeline (CUDA events) or the host's (perf_counter); read with timing()
    after the work is done (it synchronises)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = {}

    def mark(self, name: str):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def timing(self) -> BlockTiming:
        if self.cuda:
            self.marks["done"].synchronize()
            start = self.marks["start"]
            return BlockTiming(start.elapsed_time(self.marks["frames"]),
                               start.elapsed_time(self.marks["done"]))
        start = self.marks["start"]
        return BlockTiming(1e3 * (self.marks["frames"] - start), 1e3 * (self.marks["done"] - start))
