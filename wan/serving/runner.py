"""What a player needs per block of 3 latent frames: the denoising forwards, the decode to video
frames, and the t=0 forward that writes the clean block into the caches.

`StreamingBlockRunner` does one block per `block()` call, in upstream's order of work (its
`CausalInferencePipeline`) with one change: the decode is not queued behind the cache update. The
update only matters to the next block, and the decode only needs the denoised latents, so with
`overlap_update=True` (CUDA) the decoder runs on a high-priority stream and the update on the
default one beside it: the GPU's schedulers give the decoder's kernels precedence, the update
fills what they leave, the frames are ready after about denoise + decode. And the update is
made for its cache writes alone: a model whose forward takes `cache_update_only` (the optimized
one) stops its last block after that block's cache writes and skips the head, whose output
nobody reads (`cache_update_only=False` here calls the full forward, as upstream does).

With the decoder on another GPU than the DiT (one player split over two GPUs) the runner pipelines:
the block's latents cross over (NVLink), the decode runs on the decoder's GPU and `block()`
returns without waiting for it, so the DiT's next block overlaps this block's decode; a block then
takes about the slower of the two parts. The frames it returns are on the decoder's GPU and are
ready once that GPU gets there (`torch.cuda.synchronize(device)` or any use of them waits).

It measures both numbers a player feels, with CUDA events (CPU: host clocks; not in split mode,
whose two GPUs have no common event clock: time it from the host over many blocks):
* action-to-frame latency: from the block's start (its action input given) to its frames ready;
* block time: from the block's start until the next block can start (throughput).

Non-finite values (NaN, inf) are checked once per block where it costs no host synchronisation:
the block's denoised latents and its frames each get a count of non-finite values on the device
(one small reduction), copied to the host without waiting. The count is read when the host has
waited for the block anyway: at the next `block()` call if the block is done by then, at
`clock.timing()`, or at `check_finite()` (which waits for it; free after a synchronize or once
its frames were copied to the host). A block with any raises NonFiniteOutputError naming the
block and what held them (the latents: the DiT; only the frames: the decoder); from that block
on the stream's caches or decoder history hold them too, so the runner refuses further blocks
until `start()` begins a new stream. On a CPU the count is known at once and read at the next
of those calls as well.

The noise schedule is upstream's flow matching as its inference configs set it (1000 training
steps, shift 5, `warp_denoising_step: true`, `context_noise: 0`): the model's output is a flow
prediction, x0 = x_t - sigma * flow, and the next step's input is (1 - sigma') x0 + sigma' noise.
"""
import functools
import inspect
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..modules.shared.conditioning import attention_window_frames, frame_tokens
from ..modules.shared.upstream_caches import new_stream_caches

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
    decode_ms: Optional[float] = None  # the decode's own span within the block


class NonFiniteOutputError(RuntimeError):
    """A block's latents or frames hold NaN or inf. `block` is the block's index in its stream
    (0 = the first), `where` 'latents' (the DiT's output: the DiT or its inputs) or 'frames' (the
    decoder's output from finite latents). The stream's caches or decoder history hold them from
    that block on: start a new stream."""

    def __init__(self, message: str, block: int, where: str):
        super().__init__(message)
        self.block, self.where = block, where


class _FiniteCheck:
    """One block's counts of non-finite values (latents, frames) on their way to the host."""

    def __init__(self, block: int, frame: int, parts):
        self.block, self.frame = block, frame
        self.parts = parts  # [(what, count on the host, CUDA event or None)]

    def done(self) -> bool:
        return all(event is None or event.query() for _, _, event in self.parts)

    def error(self, frames_per_block: int) -> Optional[NonFiniteOutputError]:
        for _, _, event in self.parts:
            if event is not None:
                event.synchronize()
        counts = {}
        for what, count, _ in self.parts:
            if what == "both":
                counts["latents"], counts["frames"] = (int(c) for c in count.tolist())
            else:
                counts[what] = int(count.item())
        bad = {k: v for k, v in counts.items() if v}
        if not bad:
            return None
        first, last = self.frame, self.frame + frames_per_block - 1
        if "latents" in bad:
            where, cause = "latents", (f"the DiT's denoised latents hold {bad['latents']} "
                                       f"non-finite value(s) (NaN or inf: the weights or the "
                                       f"inputs)")
        else:
            where, cause = "frames", (f"the decoder's frames hold {bad['frames']} non-finite "
                                      f"value(s) (NaN or inf) from finite latents")
        return NonFiniteOutputError(
            f"block {self.block} (latent frames {first}-{last}): {cause}; the stream's caches "
            f"carry them on, so it stopped: start a new stream", self.block, where)


class StreamingBlockRunner:
    """Blocks of one stream through a DiT (`CausalWanModel` or the optimized one, called with
    upstream's cache dicts) and a streaming decoder (`VAEDecoderWrapper` or the optimized one)."""

    def __init__(self, model, decoder, latent_hw=(44, 80), batch: int = 1,
                 schedule: Optional[FlowMatchSchedule] = None, overlap_update: bool = True,
                 decoder_dtype: Optional[torch.dtype] = None,
                 generator: Optional[torch.Generator] = None, cache_update_only: bool = True):
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
        # the t=0 update's output is never read: a model that can skip what only makes it does
        self.update_kwargs = ({"cache_update_only": True} if cache_update_only
                              and _takes_keyword(model.forward, "cache_update_only") else {})
        self.caches = None
        self.generator = generator  # the noise's source (default: torch's global one)
        # what a re-make of the latest block needs (`remake`): kept only when asked for, since
        # it holds the decoder history from before that block alive (~1 GiB at 44 x 80, fp16)
        self.keep_for_remake = False
        # frames out per latent frame: the decoder called once per latent frame of a block, so
        # its first frames are ready a third of a decode earlier; each part's frames, non-finite
        # check and clock mark are in the block clock's `parts` (a sender reads them there)
        self.frames_in_parts = False
        self._latest: Optional[_BlockReplay] = None
        self._checks = []           # blocks whose non-finite counts were not read yet
        self._failure: Optional[NonFiniteOutputError] = None

    def start(self, visual_context: torch.Tensor, reuse_caches: bool = False):
        """A new stream with this image context (a new decoder stream; fresh caches, or with
        `reuse_caches` this runner's own caches rewound in place: the same tensors, so the CUDA
        graphs captured over them replay for the new stream too, as a server's player slot
        needs; their contents are zeroed and the image is projected again at the first call)."""
        if reuse_caches and self.caches is not None:
            rewind_stream_caches(self.caches)
        else:
            window = attention_window_frames(self.model.local_attn_size)
            self.caches = new_stream_caches(self.model, self.batch, window,
                                            self.tokens_per_frame)
        self.visual_context = visual_context
        self.frame = 0
        self.blocks_done = 0
        self.release()  # no decoder history, non-finite checks or re-make from another stream

    def release(self):
        """The stream is over (its caches stay, for the next `start(..., reuse_caches=True)`):
        its decoder history and what a re-make would need go now."""
        self.decoder_cache = [None] * 32
        self._latest = None
        self._checks, self._failure = [], None

    @torch.no_grad()
    def warm_up(self, cond_concat, mouse_cond=None, keyboard_cond=None) -> int:
        """Capture every CUDA graph this stream's blocks will replay, before its first block: the
        DiT's over this stream's cache dicts (its blocks once on zeros, then rewound) and the
        decoder's (a stream's first block and a later one), so that no real block pays a capture
        (as nano-vllm captures before serving). Call after `start`; `cond_concat` of one block,
        the action conditions for their widths only. Returns the graphs captured (0 for models
        without `warm_up`, such as the reference ones, or without CUDA graphs)."""
        if self.caches is None:
            raise RuntimeError("call start(visual_context) before warm_up")
        captured = 0
        if hasattr(self.model, "warm_up"):
            captured += self.model.warm_up(self.visual_context, cond_concat, mouse_cond,
                                           keyboard_cond, caches=self.caches,
                                           t_dtype=torch.float32,  # as _timesteps passes it
                                           **self.update_kwargs)
        if hasattr(self.decoder, "warm_up"):
            b, f, (h, w) = self.batch, self.frames_per_block, self.latent_hw
            latents = torch.zeros(b, f, 16, h, w, dtype=self.decoder_dtype,
                                  device=self.decoder_device)
            captured += self.decoder.warm_up(latents)
            if self.frames_in_parts and f > 1:  # the one-latent-frame calls' graphs too
                captured += self.decoder.warm_up(latents[:, :1])
        return captured

    def check_finite(self, wait: bool = True):
        """Raise NonFiniteOutputError if a block made so far held NaN or inf. Reads the counts of
        the blocks not checked yet: with `wait`, waiting for them (free once the host has waited
        for the blocks, e.g. after a synchronize or a copy of their frames); without, only those
        already done."""
        if self._failure is not None:
            raise self._failure
        while self._checks and (wait or self._checks[0].done()):
            self._raise_if(self._checks.pop(0).error(self.frames_per_block))

    @torch.no_grad()
    def block(self, cond_concat, mouse_cond=None, keyboard_cond=None, noise=None):
        """One block: returns (video frames [B, T, 3, H, W] float32, its clock: `.timing()` gives
        the BlockTiming; None in split mode). cond_concat [B, 20, 3, h, w] for this block's
        frames; the action histories up to its last frame."""
        if self.caches is None:
            raise RuntimeError("call start(visual_context) before the first block")
        self.check_finite(wait=False)  # the earlier blocks that are done (no waiting)
        b, f, (h, w) = self.batch, self.frames_per_block, self.latent_hw
        # the block's noise, drawn up front in upstream's order (the first step's input, then one
        # draw per later step): a re-make replays exactly these
        shape = (b, 16, f, h, w)
        noises = [noise if noise is not None else self._noise(shape)]
        noises += [self._noise(shape) for _ in self.schedule.sigmas[1:]]
        if self.keep_for_remake:
            self._latest = _BlockReplay(self.frame, self.blocks_done, noises, self.decoder_cache)
        return self._make(noises, cond_concat, mouse_cond, keyboard_cond)

    @torch.no_grad()
    def remake(self, cond_concat, mouse_cond=None, keyboard_cond=None):
        """The latest block again, from the caches and decoder history it started from and with
        the same noise, over new conditions (typically action histories that differ from some
        frame of the block on): returns what `block` returns. The stream afterwards is exactly the
        stream that was fed these conditions for that block: the DiT's caches are written by
        frame position (the block's own slots are rewritten, the frames before it are not
        touched) and the decoder starts again from the history it had before the block. Only the
        latest block can be re-made (a later block's calls have moved the attention window on),
        and only with `keep_for_remake` on when it was made."""
        latest = self._latest
        if latest is None or latest.blocks_done != self.blocks_done - 1:
            raise RuntimeError("nothing to re-make: only the latest block of a stream can be "
                               "re-made, with keep_for_remake on when it was made")
        self.check_finite(wait=False)
        # the re-made block supersedes the old one's non-finite check
        self._checks = [c for c in self._checks if c.block != latest.blocks_done]
        self.frame, self.blocks_done = latest.frame, latest.blocks_done
        self.decoder_cache = latest.decoder_cache
        return self._make(latest.noises, cond_concat, mouse_cond, keyboard_cond)

    def _noise(self, shape):
        return torch.randn(shape, device=self.device, dtype=self.dtype, generator=self.generator)

    def _make(self, noises, cond_concat, mouse_cond, keyboard_cond):
        """The block at `self.frame` from its noises: denoise, decode, cache update."""
        clock = _Clock(self.device)
        clock.mark("start")
        b, f = self.batch, self.frames_per_block
        x = noises[0]
        call = dict(visual_context=self.visual_context, cond_concat=cond_concat,
                    mouse_cond=mouse_cond, keyboard_cond=keyboard_cond, **self.caches,
                    current_start=self.frame * self.tokens_per_frame)
        sigmas = self.schedule.sigmas
        for step, (t, sigma) in enumerate(zip(self.schedule.timesteps, sigmas)):
            flow = self.model(x, _timesteps(t, b, f, self.device), **call)
            x0 = x - sigma * flow
            if step + 1 < len(sigmas):
                next_sigma = sigmas[step + 1]
                x = (1 - next_sigma) * x0 + next_sigma * noises[step + 1]

        def update():  # the clean block into the caches (t = context noise = 0)
            self.model(x0, _timesteps(0.0, b, f, self.device), **call, **self.update_kwargs)

        latents = x0.transpose(1, 2).to(self.decoder_dtype)
        if self.split:  # latents over to the decoder's GPU; both GPUs go on without waiting
            with torch.cuda.device(self.decoder_device):
                frames, self.decoder_cache = self.decoder(
                    latents.to(self.decoder_device, non_blocking=True), *self.decoder_cache)
                frames_check = _to_host(_non_finite(frames))
            update()
            parts = [("latents", *_to_host(_non_finite(x0))), ("frames", *frames_check)]
            clock = None  # no event clock spans the two GPUs
        elif self.overlap:  # the decode first on its high-priority stream, the update beside it
            main = torch.cuda.current_stream(self.device)
            self.side.wait_stream(main)
            latents.record_stream(self.side)  # made on main, read on the side stream
            with torch.cuda.stream(self.side):
                clock.mark("decode")
                frames = self._decode(latents, x0, clock)
                # the check on this stream too, before "frames": whoever sends the frames as soon
                # as they are ready (`_Clock.wait_frames`) can read it without waiting for the
                # update (x0 is final here; the update only writes caches, which the next
                # block's check covers)
                check = _finite_check(x0, frames)
                clock.mark("frames")
            update()
            main.wait_stream(self.side)
        else:  # upstream's order
            update()
            clock.mark("decode")
            frames = self._decode(latents, x0, clock)
            clock.mark("frames")
        if clock is not None:
            # one count per block of non-finite latents and frames, on its way to the host
            # (before "done": once timing() has waited for the block, it has arrived)
            if not self.overlap:
                check = _finite_check(x0, frames)
            parts = [("both", *check)]
            clock.mark("done")
            clock.after = lambda: self.check_finite(wait=False)
        self._checks.append(_FiniteCheck(self.blocks_done, self.frame, parts))
        self.frame += f
        self.blocks_done += 1
        return frames, clock

    def _decode(self, latents, x0, clock: "_Clock"):
        """The block's latents [B, F, 16, h, w] -> its frames, on the current stream: one decoder
        call, or with `frames_in_parts` one per latent frame, each part's frames with their
        non-finite check (made on this stream before the part's mark) in `clock.parts`."""
        if not self.frames_in_parts:
            frames, self.decoder_cache = self.decoder(latents, *self.decoder_cache)
            return frames
        first = 0
        for i in range(latents.shape[1]):
            piece, self.decoder_cache = self.decoder(latents[:, i:i + 1], *self.decoder_cache)
            check, mark = _finite_check(x0, piece), f"part{i}"  # the check before the mark
            clock.mark(mark)
            clock.parts.append(FramesPart(first, piece, mark, check, clock.marks[mark],
                                          self.blocks_done, self.frame))
            first += piece.shape[1]
        return torch.cat([part.frames for part in clock.parts], dim=1)

    def check_part(self, part: "FramesPart"):
        """`check_finite` for a sender of one part of the latest block (`frames_in_parts`): the
        blocks before it, then that part's own counts (ready at its mark), without waiting for
        the rest of the block."""
        self.check_finite(wait=False)
        self._raise_if(_FiniteCheck(part.block, part.frame, [("both", *part.check)]).error(
            self.frames_per_block))

    def _raise_if(self, error: Optional[NonFiniteOutputError]):
        """A non-finite block found: the stream stops here (every later check raises it)."""
        if error is not None:
            self._checks, self._failure = [], error
            raise error


@dataclass
class FramesPart:
    """One latent frame's video frames of a block decoded in parts (`frames_in_parts`): `first`
    is its first frame's index in the block, `mark` its clock mark (the frames and `check`, its
    non-finite counts on their way to the host, are ready there; `ready`: the mark itself, a
    CUDA event on a GPU); `block` and `frame`: the block's index and first latent frame."""
    first: int
    frames: torch.Tensor
    mark: str
    check: tuple
    ready: object
    block: int
    frame: int

    def reader_stream(self) -> Optional[torch.cuda.Stream]:
        """A stream on which this part's frames can be read as soon as they are ready (None on a
        CPU): one that waits for this part's mark only. The decode stream would not do: the
        later parts' decode is queued there ahead of anything a sender adds."""
        if not self.frames.is_cuda:
            return None
        stream = parts_stream(self.frames.device)
        stream.wait_event(self.ready)
        self.frames.record_stream(stream)  # read there: its memory is not reused before
        return stream


@dataclass
class _BlockReplay:
    """What re-making a block needs: its first latent frame, its index, its noises and the
    decoder history it started from (the list the decoder returned before it: decoders hand back
    new tensors each call, so that list is still the history of that moment)."""
    frame: int
    blocks_done: int
    noises: list
    decoder_cache: list


def rewind_stream_caches(caches: dict):
    """Upstream-style cache dicts back to how `new_stream_caches` makes them, in place: tensors
    zeroed, the cross-attention caches to be filled again (`is_init` False)."""
    for name in ("kv_cache", "kv_cache_mouse", "kv_cache_keyboard", "crossattn_cache"):
        for layer in caches.get(name) or ():
            if layer is None:
                continue
            for key, value in layer.items():
                if torch.is_tensor(value):
                    value.zero_()
            if "is_init" in layer:
                layer["is_init"] = False


def graph_captures(model, decoder) -> int:
    """CUDA graphs the DiT and the decoder have captured so far (0 for models without graphs,
    such as the reference ones): a server counts them to show that none is captured while it
    serves."""
    return sum(getattr(part, "counters", {}).get("captures", 0) for part in (model, decoder))


@functools.lru_cache(maxsize=None)
def decode_stream(device: torch.device) -> torch.cuda.Stream:
    """One high-priority decode stream per device, shared by every runner (player): cuBLAS and
    cuDNN keep a workspace per stream for the life of the process (32 MiB and more each), so a
    stream per player would leave that much behind every player who came and went."""
    return torch.cuda.Stream(device, priority=-1)


@functools.lru_cache(maxsize=None)
def parts_stream(device: torch.device) -> torch.cuda.Stream:
    """One high-priority stream per device on which the parts of blocks decoded in parts are
    read (copied to the host, encoded) while the decode stream goes on with the next part."""
    return torch.cuda.Stream(device, priority=-1)


def _non_finite(tensor: torch.Tensor) -> torch.Tensor:
    """How many values of `tensor` are NaN or inf (a 0-d int64 on its device; no sync)."""
    return torch.isfinite(tensor).logical_not().sum()


def _finite_check(latents: torch.Tensor, frames: torch.Tensor):
    """A block's non-finite counts (latents, frames) as one tensor on its way to the host, with
    its event (`_to_host`): made on the current stream."""
    return _to_host(torch.stack([_non_finite(latents), _non_finite(frames)]))


def _to_host(count: torch.Tensor):
    """(the count on the host, an event that says it arrived): a copy that does not wait (CUDA:
    into pinned memory on the current stream), or the count itself on a CPU."""
    if count.device.type != "cuda":
        return count, None
    with torch.cuda.device(count.device):
        host = count.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    return host, event


def _takes_keyword(fn, name: str) -> bool:
    """Whether `fn` has a parameter called `name` (the reference models lack the library's)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


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
        self.parts: List[FramesPart] = []  # a block decoded in parts (`frames_in_parts`)
        self.after = None  # called once the block's work is known done (the runner's check)

    def mark(self, name: str):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def wait_frames(self, mark: str = "frames"):
        """Wait until the block's frames (and their non-finite check) are ready, not for the
        rest of the block (the cache update may still run); `mark` a part's (`parts`) for that
        part's. On a CPU they already are."""
        if self.cuda:
            self.marks[mark].synchronize()

    def timing(self) -> BlockTiming:
        """The block's times (waits for its work); raises NonFiniteOutputError if this or an
        earlier block of the stream held NaN or inf."""
        if self.cuda:
            self.marks["done"].synchronize()
            start = self.marks["start"]
            decode = self.marks["decode"].elapsed_time(self.marks["frames"])
            timing = BlockTiming(start.elapsed_time(self.marks["frames"]),
                                 start.elapsed_time(self.marks["done"]), decode)
        else:
            start = self.marks["start"]
            timing = BlockTiming(1e3 * (self.marks["frames"] - start),
                                 1e3 * (self.marks["done"] - start),
                                 1e3 * (self.marks["frames"] - self.marks["decode"]))
        if self.after is not None:
            self.after()
        return timing
