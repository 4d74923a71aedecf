"""The GPU side of the play server: one model and one decoder, players on them, a worker thread.

Every player (a browser tab) is a `Player`: its input (`InputState`), and once the worker has
set it up a `PlayerSession` (its own DiT cache dicts, decoder stream, conditions, noise) over the
process's one model and decoder. The worker thread owns everything on the device: it applies the
commands the event loop queues (join, new game, leave), runs the `DeadlineScheduler`'s next
block, encodes the block's frames to JPEG and hands them to the player's `sink` (which the server
makes thread-safe). The event loop never waits on the GPU.

Modes of play: `continuous` (a block every 0.48 s; the block reads the held keys and the mouse
motion when it starts, released as late as its deadline allows) and `on-input` (the seed
server's: a block per key press).

Reactive play (continuous, `reactive` on by default): when a player's held keys (or the camera,
by at least a quarter step) change, the block on screen is re-made from the first frame that can
still be replaced (`StreamingBlockRunner.remake`: same noise, the caches and decoder history it
started from), so the world answers within about one block's compute instead of at the next
block. The scheduler grants a re-make only where it makes no player's block late
(`DeadlineScheduler.try_remake`); otherwise the input waits for the next block as before. The
re-made frames go out with `first_frame` set: the page replaces the frames it has not shown yet.
The stream after a re-make is exactly the stream that was fed the spliced actions.

Player slots (nano-vllm's warm-up-then-serve): at start-up the engine makes `capacity` block
runners (each its DiT cache dicts and decoder stream) and captures every CUDA graph they replay;
a join, a new game or an upload takes a free slot and rewinds it (`reuse_caches`): no capture
while serving (`/metrics` counts them). A new game's image conditioning does only what its first
block needs at once; the rest of the encoder's work runs in the slack between blocks. Commands
coalesce per player (one pending new game; a newer image replaces an older one) and a player's
games start at most once per `new_game_interval_s`: a flood of resets cannot starve the others.

Failures: an exception in one player's block ends that player's game with a message; the other
games go on. A CUDA error that poisons the device (an illegal access, a device-side assert)
cannot be survived: the engine records it (`failure`, `/health` fails) and calls `on_fatal`
(the server exits non-zero there, so a supervisor restarts it).

Admission: up to `capacity` players, measured at start-up (`warm_up`: a throw-away player's blocks
timed, capacity = how many such blocks fit in one 0.48 s period with 5% to spare) unless
`max_players` is given; one more is refused (`ServerFull`), so nobody's game gets slower.
A player who leaves takes its caches with it (the session, its cache dicts and decoder stream
are dropped in the worker; `memory_report` shows the device memory before and after).

Frames out as soon as they exist (an on-input player's, `on_input_at_frames_ready`, and a re-made
block's, `remakes_at_frames_ready`, both on; every block's with `send_at_frames_ready`, off by
default): the runner decodes a block ahead of its cache update, so the worker hands the frames to
the encoder when they are decoded (the scheduler's `on_frames`), on the decode stream, while the
GPU still writes the block into the caches; what needs the finished block (the player's latest
block for re-makes, an on-input player's next block) waits for it.

NaN or inf: every block's latents and frames are checked (`StreamingBlockRunner.check_finite`,
read when the frames are ready: the check is made on the decode stream just before them). A
block that holds any is not sent; its player gets `{"type": "error", "reason": ...}` naming the block and a new game (fresh caches and
decoder stream; the other players' games go on untouched). After MAX_NONFINITE_RESTARTS such
games in a row without one good block the game is stopped instead, with a message ("New game"
starts it again). During the warm-up such a block is an error at start-up.
"""
import contextlib
import gc
import itertools
import logging
import math
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from PIL import Image

from ..modules.shared.conditioning import history_steps
from ..modules.optimized_causal_model import OptimizedCausalWanModel
from ..modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from ..modules.vae_decoder import VAEDecoder3d, load_decoder_weights
from ..serving.runner import NonFiniteOutputError, StreamingBlockRunner, graph_captures
from ..modules.presets import LATENT_SIZE, UPSTREAM_VARIANTS, model_config, tiny_variant_config
from ..modules.random_init import randomize_decoder_weights_, randomize_weights_
from ..serving.scheduler import (PERIOD_S, VIDEO_FPS, DeadlineScheduler, PlayerSession,
                                 block_frames)
from .actions import ActionSpace, InputState, action_space, action_steps
from .conditioning import (CheckoutConditioner, DemoConditioner, builtin_start_image,
                           check_weights_dir)
from .encode import JpegEncoder, to_uint8

log = logging.getLogger(__name__)
PLAY_MODES = ("continuous", "on-input")
# the tiny preset's decoder: upstream's structure at 1/6 of its width (a CPU decodes a block in
# a fraction of a second instead of seconds); the real presets use upstream's decoder
TINY_DECODER_DIM = 16
# games restarted in a row because a block held NaN/inf before the player's game is stopped
MAX_NONFINITE_RESTARTS = 3


class ServerFull(Exception):
    pass


@dataclass
class EngineConfig:
    """What the engine runs: the model preset and game mode, device, weights, admission."""
    mode: str = "universal"
    preset: Optional[str] = None         # default: the mode's config on CUDA, tiny on CPU
    device: str = "auto"
    checkpoint: Optional[str] = None     # the DiT's .safetensors (default: random weights)
    vae: Optional[str] = None            # Wan2.1_VAE.pth or a decoder .safetensors
    cuda_graphs: Optional[bool] = None   # default: on for CUDA
    max_players: Optional[int] = None    # default: measured at start-up
    matrix_game_dir: Optional[str] = None  # a checkout: its VAE encoder + CLIP condition on images
    warmup_blocks: int = 4
    jpeg_quality: int = 85
    jpeg: str = "auto"                   # the JPEG encoder: auto, cpu, gpu or pillow (encode.py)
    seed: int = 0
    reactive: bool = True                # continuous play re-makes the block on screen on input
    # True: a block's frames are encoded and sent as soon as they are decoded, while the GPU
    # still writes the block into the caches. Off by default: on an H100 it was not faster to
    # the screen, with nvJPEG (246 ms p50 against 216: the encode waited behind the update) nor
    # with jpeg="cpu" (no lead over sending after the block in three runs; the frames arrive
    # sooner but show at their slot of the playback; docs/LAB_NOTEBOOK.md steps 47, 49, 53)
    send_at_frames_ready: bool = False
    # with send_at_frames_ready: a block decoded one latent frame per decoder call, each part's
    # frames read on a stream of their own and sent as soon as they are decoded (the decoder's
    # first 4 frames 26 ms sooner, the decode 10 ms longer), a re-make's splice planned with its
    # part's frames-ready time. Off by default: no lead in three H100 runs (step 53)
    frames_in_parts: bool = False
    # an on-input player's frames sent as soon as they are decoded, whatever send_at_frames_ready
    # says: nothing plays between its presses, so the page shows them as they arrive and the
    # cache update (the block's last DiT pass) no longer stands between the press and the frame.
    # False sends them after the block, as continuous play does (a benchmark measures both)
    on_input_at_frames_ready: bool = True
    # a re-made block's frames sent as soon as they are decoded, whatever send_at_frames_ready
    # says: the scheduler plans a re-make's splice on the frames-ready time (its frames replace
    # ones about to show). False sends them after the block, ~20 ms after that plan (on an H100
    # 6-20 re-made frames a row then came too late for their slot, `frames_too_late`; step 55)
    remakes_at_frames_ready: bool = True
    new_game_interval_s: float = 1.0     # a player's new games start at most this often
    # the JPEG encoding of a block's frames (a host encoder: jpeg cpu or pillow) on a sender
    # thread beside the next block, so the GPU's worker does not wait for it (the worker only
    # queues the frames' copy to the host); False: the worker encodes and sends, then goes on
    encode_in_background: bool = True

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine "
                             f"(use --device cpu --preset tiny)")
        if device.type == "cuda" and device.index is None:  # the worker thread sets it by index
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def model_config(self, device: torch.device) -> Tuple[str, dict]:
        """(preset, the DiT's config) on `device`: the mode's config on CUDA, tiny on a CPU."""
        preset = self.preset or (self.mode if device.type == "cuda" else "tiny")
        if preset == "tiny":
            return preset, tiny_variant_config(action_space(self.mode).mode)
        if preset in UPSTREAM_VARIANTS:
            return preset, model_config(preset)
        raise ValueError(f"unknown preset {preset!r}; choose from tiny, "
                         f"{', '.join(UPSTREAM_VARIANTS)}")

    @staticmethod
    def dtypes(device: torch.device) -> Tuple[torch.dtype, torch.dtype]:
        """(the DiT's dtype, the decoder's): bf16 and fp16 on CUDA (upstream's), float32 on CPU."""
        if device.type == "cuda":
            return torch.bfloat16, torch.float16
        return torch.float32, torch.float32

    def decoder_dim(self, preset: str) -> int:
        return TINY_DECODER_DIM if preset == "tiny" else 96


def _check_preset(preset: str, space: ActionSpace, config: dict):
    action = config.get("action_config") or {}
    wants = (space.keyboard_dim, space.has_camera)
    has = (action.get("keyboard_dim_in"), bool(action.get("enable_mouse")))
    if has != wants:
        raise ValueError(f"preset {preset!r} has keyboard width {has[0]} and mouse={has[1]}, mode "
                         f"{space.mode!r} needs keyboard width {wants[0]} and mouse={wants[1]}; "
                         f"use --preset {space.mode} (or tiny)")


@dataclass
class FrameBatch:
    """One block's encoded frames for one player, with the times (server clock, seconds) the
    page and the metrics need."""
    block: int
    jpegs: List[bytes]
    input_id: int
    input_received: Optional[float]
    block_start: float
    frames_ready: float
    encoded: float
    encode_ms: float
    block_ms: float
    wait_ms: float
    late: bool
    first_frame: int = 0        # the block's frame index of jpegs[0] (> 0: a re-made block's
                                # from its splice, or a later part of a block sent in parts)
    remake: bool = False        # frames of a re-made block: they replace those not yet shown
    game: int = 0               # the player's game these frames belong to
    frames_in_block: int = 0    # the block's frames in all (jpegs may hold fewer: a re-make)


class Player:
    """One browser tab's game. `sink(batch)` is called from the worker thread with each block's
    frames; `on_event(dict)` with status messages (errors, a new game)."""
    _ids = itertools.count(1)

    def __init__(self, space: ActionSpace, play_mode: str, sink: Callable[[FrameBatch], None],
                 on_event: Callable[[dict], None] = lambda event: None,
                 image: Optional[Image.Image] = None, seed: Optional[int] = None):
        if play_mode not in PLAY_MODES:
            raise ValueError(f"unknown play mode {play_mode!r}; choose from {', '.join(PLAY_MODES)}")
        self.id = next(Player._ids)
        self.play_mode = play_mode
        self.input = InputState(space)
        self.sink, self.on_event = sink, on_event
        self.image = image
        self.seed = self.id if seed is None else seed
        self.session: Optional[PlayerSession] = None
        self.games = 0
        self.joined = time.perf_counter()
        self.last_input = self.joined
        self.frames_shown = deque(maxlen=64)  # (time, frames) of recent blocks: the fps
        self.closed = False
        self.press_waiting = False  # on-input: a press arrived before the game was set up
        self.broken: Optional[NonFiniteOutputError] = None  # its last block held NaN/inf
        self.failed: Optional[Exception] = None  # its last block raised (its game ends)
        self.nonfinite_restarts = 0  # games restarted for that since its last good block
        self.action = None           # the action its latest block (or re-make) read
        self.measured_input = 0      # the newest input id whose press-to-frame was measured
        self.latest = None           # the BlockRecord of its latest block (not a re-make)
        self.remake_considered = 0   # the newest input id a re-make was considered for
        self.remake_waiting = False  # a granted re-make waits in the scheduler
        self.slot: Optional[StreamingBlockRunner] = None  # its block runner (a player slot)
        self.conditions = None       # its game's start-image conditions (encoded as it goes)
        # the command waiting for the worker (coalesced: "join", "reset"; "leave" wins) and the
        # newest start image sent with a reset (a newer one replaces it)
        self.pending: Optional[str] = None
        self.pending_image: Optional[Image.Image] = None
        self.pending_since: Optional[Tuple[str, float]] = None  # (join|new_game|upload, when)
        self.game_started = -math.inf  # perf_counter of its latest game's start
        self.first_frame_of: Optional[Tuple[str, float]] = None  # what waits for block 0

    # what the scheduler reads ----------------------------------------------------------------
    @property
    def player_id(self) -> int:
        return self.id

    @property
    def blocks_done(self) -> int:
        return 0 if self.session is None else self.session.blocks_done

    def run_block(self):
        """The next block, reading the input as it is now (called by the scheduler)."""
        session = self.session
        if session is None:  # the player left after its block was chosen: nothing to make
            return None, None
        self.action = self.input.sample()
        f = session.runner.frames_per_block
        needed = history_steps((session.blocks_done + 1) * f - 1)  # up to this block's last frame
        # every mode has a keyboard; the mouse history (modes with a camera) is as long
        mouse, keyboard = action_steps(self.action, needed - session.keyboard.shape[1],
                                       session.runner.device, session.runner.dtype)
        session.receive(mouse, keyboard)
        return self._guarded(session.run_block)

    def run_remake(self, splice: int):
        """The latest block again from its frame `splice` on with the input as it is now
        (called by the scheduler for a granted re-make)."""
        session = self.session
        if session is None:
            return None, None
        action = self.input.sample()
        first, end = session.block_steps(session.blocks_done - 1)
        mouse, keyboard = action_steps(action, end - first - splice, session.runner.device,
                                       session.runner.dtype)
        out = self._guarded(session.remake_block, splice, mouse, keyboard)
        self.action = action
        return out

    def _guarded(self, make, *args):
        """A block of this player's: what goes wrong in it is this player's (the worker ends
        its game and goes on with the others), not the worker's."""
        try:
            return make(*args)
        except NonFiniteOutputError as error:  # an earlier block's, read now: the worker restarts
            self.broken = error
        except Exception as error:  # noqa: BLE001 - reported to the player, the worker goes on
            self.failed = error
        return None, None

    def fps(self, now: float, window_s: float = 5.0) -> float:
        # a copy first (taken at once under the GIL): the sender thread appends meanwhile
        recent = [(t, n) for t, n in list(self.frames_shown) if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0


class GameEngine:
    """The model, the decoder, the players and the worker thread that runs them."""

    def __init__(self, config: EngineConfig, metrics=None):
        self.config = config
        self.space = action_space(config.mode)
        self.device = config.resolved_device()
        self.preset, model_cfg = config.model_config(self.device)
        _check_preset(self.preset, self.space, model_cfg)
        # what the weights do not decide, before anything is built
        if config.vae and self.preset == "tiny":
            raise ValueError("--vae needs a real preset: the tiny preset's decoder is narrower "
                             "than upstream's")
        if config.matrix_game_dir and not config.vae:
            raise ValueError("--matrix-game-dir needs --vae (Wan2.1_VAE.pth; the CLIP "
                             "checkpoint and xlm-roberta-large tokenizer beside it, as "
                             "upstream's get_wanx_vae_wrapper reads them)")
        if config.matrix_game_dir:  # every encoder file named before any weights load
            check_weights_dir(Path(config.vae).resolve().parent)
        self.latent_hw = LATENT_SIZE[self.preset]
        self.dtype, self.decoder_dtype = config.dtypes(self.device)
        with torch.device(self.device):
            model = OptimizedCausalWanModel.from_config(model_cfg, cuda_graphs=config.cuda_graphs)
            decoder = OptimizedVAEDecoderWrapper(cuda_graphs=config.cuda_graphs)
            if self.preset == "tiny":
                decoder.decoder = VAEDecoder3d(dim=TINY_DECODER_DIM)
        # what the model resolved (None: on wherever it runs on CUDA, WAN_CUDA_GRAPHS aside)
        self.cuda_graphs = model.options.graphs_on(self.device)
        if config.checkpoint:
            model.load_checkpoint(config.checkpoint)
        else:
            randomize_weights_(model, config.seed)
        if config.vae:
            load_decoder_weights(decoder, config.vae)
        else:
            randomize_decoder_weights_(decoder)
        model.num_frame_per_block = 3
        self.model = model.to(self.device, self.dtype).eval()
        self.decoder = decoder.to(self.device, self.decoder_dtype).eval()
        if config.matrix_game_dir:
            self.conditioner = CheckoutConditioner(
                config.matrix_game_dir, Path(config.vae).resolve().parent, self.device,
                self.dtype, self.latent_hw, self.model.num_frame_per_block)
        else:
            self.conditioner = DemoConditioner(self.latent_hw, self.model.num_frame_per_block)
        self.demo = config.checkpoint is None or self.conditioner.demo
        self.frame_size = self.conditioner.image_size
        self.default_image = builtin_start_image(self.frame_size)
        self.encoder = JpegEncoder(self.device, config.jpeg_quality, config.jpeg)
        self._sender: Optional[ThreadPoolExecutor] = None  # encode_in_background's thread
        if config.encode_in_background and self.encoder.encodes_on_host:
            self.set_encode_in_background(True)
        self.scheduler = DeadlineScheduler(synchronize=self._synchronize)
        self.capacity = config.max_players
        self.metrics = metrics
        self.players: List[Player] = []
        self._lock = threading.Lock()
        self._waiting: "deque[Player]" = deque()  # players with a pending command, in order
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self.steady_block_ms: Optional[float] = None
        self.memory_before_players = self.device_memory()
        self.failure: Optional[BaseException] = None
        self.on_fatal: Callable[[BaseException], None] = lambda error: None
        self._free_slots: List[StreamingBlockRunner] = []  # player slots not in a game
        self.slots = 0
        self.captures_at_start: Optional[int] = None  # graphs captured when serving began
        self._encode_unit_s = 0.02  # running estimate of one unit of image-encoding work
        self.remakes = {"granted": 0, "refused": 0, "late": 0}
        self.settled_latent_frame: Optional[int] = None  # where a start image's latents settled
        self._sent = _UNSENT  # what `_frames_ready` did with the running block's frames

    def _synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def device_memory(self) -> int:
        """Bytes of device memory held by tensors (CUDA), 0 on a CPU."""
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def describe(self) -> str:
        weights = "random weights" if self.config.checkpoint is None else self.config.checkpoint
        return (f"mode {self.space.mode}, preset {self.preset} on {self.device} "
                f"({str(self.dtype).replace('torch.', '')}, CUDA graphs "
                f"{'on' if self.cuda_graphs else 'off'}), {weights}, conditioning: "
                f"{self.conditioner.name}, JPEG: {self.encoder.where}"
                f"{' beside the next block' if self.encodes_in_background else ''}, "
                f"capacity {self.capacity}")

    # set-up ----------------------------------------------------------------------------------
    def _new_runner(self) -> StreamingBlockRunner:
        runner = StreamingBlockRunner(self.model, self.decoder, latent_hw=self.latent_hw)
        runner.keep_for_remake = self.config.reactive
        runner.frames_in_parts = self.config.frames_in_parts
        return runner

    def _conditions_for(self, image: Optional[Image.Image]) -> "GameConditions":
        """The start image's conditions: what the first block needs now, the rest as it goes."""
        image = image if image is not None else self.default_image
        return GameConditions.start(self.conditioner, image, self.device, self.dtype)

    def _new_session(self, player: Player, image: Optional[Image.Image]) -> PlayerSession:
        """A new game for `player` in its slot (the slot rewound: its graphs stay valid), or in a
        runner of its own when it has none (a throw-away player's: warmed up here)."""
        conditions = player.conditions = self._conditions_for(image)
        if player.slot is not None:
            return self._session_in(player.slot, conditions, player.id,
                                    player.seed * 1000 + player.games, reuse_caches=True)
        return self._session_in(self._new_runner(), conditions, player.id,
                                player.seed * 1000 + player.games)

    def _session_in(self, runner: StreamingBlockRunner, conditions: "GameConditions",
                    player_id: int, seed: int, reuse_caches: bool = False) -> PlayerSession:
        """A session over `runner`; a new runner's graphs are captured here (every graph its
        blocks replay, before its first block), a rewound one's replay."""
        session = PlayerSession(player_id, runner, conditions.visual_context, conditions,
                                seed=seed, mouse_dim=2 if self.space.has_camera else None,
                                keyboard_dim=self.space.keyboard_dim, hold_conditions=True,
                                reuse_caches=reuse_caches)
        if not reuse_caches and self.cuda_graphs:
            session.warm_up()
        return session

    def _add_slot(self, runner: StreamingBlockRunner):
        runner.release()
        self._free_slots.append(runner)
        self.slots += 1

    @torch.no_grad()
    def warm_up(self) -> float:
        """Blocks of a throw-away player (compiles, autotunes, measures): returns the steady
        block time in ms (frames encoded included) and sets the capacity when not given. Its
        runner becomes the first player slot."""
        player = Player(self.space, "continuous", sink=lambda batch: None)
        player.session = self._new_session(player, None)
        times = []
        for _ in range(max(3, self.config.warmup_blocks)):
            start = time.perf_counter()
            frames, _ = player.run_block()
            if player.broken is not None:
                raise player.broken
            if player.failed is not None:
                raise player.failed
            job = self.encoder.start(to_uint8(frames[0]))
            if self._sender is None:  # serving, the worker waits for the encoding too
                job.result()
            self._synchronize()
            player.session.runner.check_finite()  # NaN/inf from these weights: refuse to serve
            times.append(time.perf_counter() - start)
            if self._sender is not None:  # serving, on the sender thread beside the next block
                job.result()
        self._add_slot(player.session.runner)
        del player
        gc.collect()
        steady = statistics.median(times[2:])
        self.steady_block_ms = 1e3 * steady
        self.scheduler.block_estimate_s = steady
        if self.capacity is None:
            self.capacity = max(1, math.floor(PERIOD_S / (1.05 * steady)))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.memory_before_players = self.device_memory()
        log.info("warm-up: %.1f ms per steady block (%s) -> capacity %d players",
                 self.steady_block_ms, "the JPEG encoding beside it" if self._sender is not None
                 else "its JPEG encoding included", self.capacity)
        return self.steady_block_ms

    @torch.no_grad()
    def _make_slots(self):
        """A player slot per admitted player, every graph they replay captured now (before
        serving): a join then only rewinds a slot."""
        conditions = self._conditions_for(None)
        while self.slots < (self.capacity or 1):
            self._add_slot(self._session_in(self._new_runner(), conditions, 0, 0).runner)
        self.captures_at_start = graph_captures(self.model, self.decoder)
        log.info("%d player slot(s) ready; %d CUDA graphs captured before serving", self.slots,
                 self.captures_at_start)

    def set_frames_in_parts(self, on: bool):
        """Every player slot's blocks decoded in parts (`EngineConfig.frames_in_parts`) or whole,
        from its next block on (a benchmark measures both in one run). On needs the engine built
        with it on: the one-latent-frame calls' graphs are captured at start-up, not while
        serving."""
        if on and not self.config.frames_in_parts:
            raise ValueError("frames in parts: build the engine with "
                             "EngineConfig(frames_in_parts=True) (its graphs are captured at "
                             "start-up)")
        with self._lock:
            runners = self._free_slots + [p.slot for p in self.players if p.slot is not None]
        for runner in runners:
            runner.frames_in_parts = on

    @property
    def encodes_in_background(self) -> bool:
        """Whether the frames' JPEG encoding runs on the sender thread (else on the worker)."""
        return self._sender is not None

    def set_encode_in_background(self, on: bool):
        """The JPEG encoding on the sender thread (`EngineConfig.encode_in_background`) or on
        the worker, from the next block on; call it with no player in a game (a benchmark
        measures both in one run). On needs a host encoder (jpeg cpu or pillow)."""
        if on and not self.encoder.encodes_on_host:
            raise ValueError(f"encoding in the background needs a host JPEG encoder (jpeg cpu "
                             f"or pillow); this engine's is {self.encoder.where}")
        if on and self._sender is None:
            # one thread, so a player's frames go out in the order they were made
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="wan-play-send")
        elif not on and self._sender is not None:
            self._sender.shutdown(wait=True)
            self._sender = None
        self.config.encode_in_background = on

    def free_slots(self) -> int:
        """Player slots not in a game now."""
        with self._lock:
            return len(self._free_slots)

    def captures_while_serving(self) -> int:
        """Graphs captured since serving began (0 is the design: slots are captured before)."""
        if self.captures_at_start is None:
            return 0
        return graph_captures(self.model, self.decoder) - self.captures_at_start

    # the event loop's calls (thread-safe) ------------------------------------------------------
    def add_player(self, play_mode: str, sink, on_event=lambda event: None,
                   image: Optional[Image.Image] = None) -> Player:
        """A new player, or ServerFull at capacity. Its game starts in the worker."""
        if self.failure is not None:
            raise ServerFull(f"the server cannot start games: its GPU worker failed "
                             f"({self.failure!r})")
        with self._lock:
            limit = self.capacity if self.capacity is not None else 1
            if len(self.players) >= limit:
                raise ServerFull(f"server full: {len(self.players)} of {limit} players are "
                                 f"playing (each needs real time from this "
                                 f"{'GPU' if self.device.type == 'cuda' else 'CPU'}); try again later")
            player = Player(self.space, play_mode, sink, on_event, image)
            self.players.append(player)
        self._command("join", player, image)
        return player

    def remove_player(self, player: Player):
        with self._lock:
            if player not in self.players:
                return
            self.players.remove(player)
            player.closed = True
        self.scheduler.leave(player)
        self._command("leave", player, None)

    def new_game(self, player: Player, image: Optional[Image.Image] = None):
        """Start the player's game again (with a new start image if given). Coalesced: one new
        game waits per player, a newer image replaces an older one that waits."""
        self._command("reset", player, image)

    def input_changed(self, player: Player):
        """The player's held keys or mouse changed: with reactive play, the worker looks at once
        whether to re-make the block on screen (it would otherwise see it after its wait)."""
        if player.play_mode == "continuous" and self.config.reactive:
            self.scheduler.wake()

    def press(self, player: Player):
        """On-input play: a key press asks for a block."""
        player.last_input = time.perf_counter()
        if player.play_mode != "on-input":
            return
        if player.session is None:
            player.press_waiting = True  # the worker asks for the block once the game is set up
        else:
            self.scheduler.request(player)

    def player_count(self) -> int:
        with self._lock:
            return len(self.players)

    def _command(self, name: str, player: Player, argument):
        """Queue `name` for `player`, merged with what waits already: a leave wins over
        anything, a join absorbs a reset (the image of the newest), resets merge into one."""
        now = time.perf_counter()
        with self._lock:
            if name == "leave":
                player.pending, player.pending_image = "leave", None
            elif player.pending == "leave":
                return
            else:
                if argument is not None:
                    player.pending_image = argument
                player.pending = player.pending if player.pending == "join" else name
                if player.pending_since is None:
                    kind = "join" if name == "join" else "upload" if argument is not None \
                        else "new_game"
                    player.pending_since = (kind, now)
            if player not in self._waiting:
                self._waiting.append(player)
        self.scheduler.wake()

    # the worker ------------------------------------------------------------------------------
    def start(self):
        if self.capacity is None:
            self.warm_up()
        self._make_slots()
        self.scheduler.start_live()
        self._running = True
        self._thread = threading.Thread(target=self._work, name="wan-play-gpu", daemon=True)
        self._thread.start()

    def stop(self):
        self._running = False
        self.scheduler.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._sender is not None:  # the frames already made still go out
            self._sender.shutdown(wait=True)

    def started(self) -> bool:
        """Whether `start` ran (the worker thread exists)."""
        return self._thread is not None

    def _work(self):
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            with torch.no_grad():
                while self._running:
                    self._apply_commands()
                    if self.config.reactive:
                        self._offer_remakes()
                    if self._encode_in_slack():
                        continue
                    self._sent = _UNSENT
                    config = self.config
                    early = self._frames_ready if config.send_at_frames_ready or \
                        config.on_input_at_frames_ready or config.remakes_at_frames_ready \
                        else None
                    done = self.scheduler.step(timeout=0.05 if not self._encoding() else 0.005,
                                               on_frames=early)
                    if done is not None:
                        self._block_done(*done)
        except BaseException as error:  # the server reports it on /health and stops serving
            self.failure = error
            log.exception("the GPU worker stopped")
            self.on_fatal(error)

    def _apply_commands(self):
        now = time.perf_counter()
        with self._lock:
            ready = []
            for player in list(self._waiting):
                # a flood of new games: one per new_game_interval_s, the rest merged into it
                if player.pending == "reset" and \
                        now - player.game_started < self.config.new_game_interval_s:
                    continue
                self._waiting.remove(player)
                ready.append((player, player.pending, player.pending_image))
                player.pending, player.pending_image = None, None
        for player, name, image in ready:
            if name == "leave":
                # again here: a join this worker applied while the player was leaving queued a block
                self.scheduler.leave(player)
                player.session = None  # its decoder stream goes; its slot waits for the next
                self._free_slot(player)
                if self.device.type == "cuda" and self.player_count() == 0:
                    torch.cuda.empty_cache()
                log.info("player %d left; device memory %.2f GiB (%.2f GiB before any player)",
                         player.id, self.device_memory() / 2**30, self.memory_before_players / 2**30)
                continue
            if player.closed:
                continue
            if image is not None:
                player.image = image
            if name == "reset":
                player.nonfinite_restarts = 0  # the player asked: a new series of tries
                self._restart(player)
            else:
                self._start_game(player)

    def _free_slot(self, player: Player):
        if player.slot is not None:
            player.slot.release()
            self._free_slots.append(player.slot)
            player.slot = None

    def _start_game(self, player: Player):
        player.broken, player.failed = None, None
        if player.slot is None:
            if not self._free_slots:  # more players than slots (a capacity raised later)
                log.warning("no free player slot for player %d: making one now (its graphs "
                            "are captured while others play)", player.id)
                self._free_slots.append(self._new_runner())
                self.slots += 1
            player.slot = self._free_slots.pop()
        player.game_started = time.perf_counter()
        player.first_frame_of, player.pending_since = player.pending_since, None
        try:
            player.session = self._new_session(player, player.image)
        except Exception as error:  # noqa: BLE001 - e.g. the image's encoding: this player's
            log.warning("player %d: the game could not start: %r", player.id, error)
            player.session = None
            player.on_event({"type": "error", "reason": f"the game could not start: {error}"})
            return
        player.action, player.latest = None, None
        player.remake_waiting = False
        self.scheduler.join(player, continuous=player.play_mode == "continuous")
        if player.play_mode == "on-input" and player.press_waiting:
            player.press_waiting = False  # a press that came before its game was ready
            self.scheduler.request(player)
        player.on_event({"type": "game", "game": player.games, "demo": self.demo})

    def _restart(self, player: Player):
        """The player's game again from its start image (its slot rewound, a new decoder stream)."""
        self.scheduler.leave(player)
        player.session = None
        player.games += 1
        self._start_game(player)

    def _end_game(self, player: Player, reason: str):
        """The player's game stops (its slot kept: 'New game' starts another); nobody else's."""
        self.scheduler.leave(player)
        player.session, player.broken, player.failed = None, None, None
        player.on_event({"type": "error", "reason": reason})

    def _nonfinite(self, player: Player, error: NonFiniteOutputError):
        """A block of `player` held NaN/inf: not shown; the player is told and gets a new game
        (or, after MAX_NONFINITE_RESTARTS in a row, its game stops). Nobody else is touched."""
        player.nonfinite_restarts += 1
        stop = player.nonfinite_restarts > MAX_NONFINITE_RESTARTS
        log.warning("player %d, game %d: %s; %s", player.id, player.games, error,
                    "game stopped" if stop else "new game")
        if stop:
            self._end_game(player, (
                f"your game stopped: {error}. It happened in {MAX_NONFINITE_RESTARTS + 1} games "
                f"in a row (the model's weights?); 'New game' tries again"))
            return
        player.on_event({"type": "error", "reason": f"a new game was started: {error}"})
        self._restart(player)

    def _failed(self, player: Player, error: Exception):
        """A block of `player` raised: fatal to the process where the device is poisoned (a
        CUDA error), else that player's game ends with the reason and the others go on."""
        if _poisons_device(error):
            raise error
        log.warning("player %d, game %d: its block failed: %r; its game stopped", player.id,
                    player.games, error)
        if isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        self._end_game(player, f"your game stopped: its block failed ({type(error).__name__}: "
                               f"{error}); 'New game' tries again")

    # reactive play -----------------------------------------------------------------------------
    def _offer_remakes(self):
        """Players whose input changed since their latest block read it: ask the scheduler to
        re-make that block from the first frame that can still be replaced."""
        with self._lock:
            players = [p for p in self.players if p.play_mode == "continuous"]
        for player in players:
            session, record = player.session, player.latest
            if session is None or record is None or player.action is None \
                    or player.remake_waiting:
                continue
            newest = player.input.input_id
            if newest <= player.remake_considered:
                continue
            player.remake_considered = newest
            if record.block != session.blocks_done - 1 or \
                    not player.input.differs_from(player.action):
                continue
            shown_at = self._shown_at(player, record)
            splice = self.scheduler.try_remake(player, shown_at, block_frames(record.block),
                                               record.block)
            granted = splice is not None
            player.remake_waiting = granted
            self.remakes["granted" if granted else "refused"] += 1
            if self.metrics is not None:
                self.metrics.remake_decided(granted)

    def _shown_at(self, player: Player, record) -> float:
        """When frame 0 of the player's latest block shows (the scheduler's clock): from what
        the page said was on screen with its input, when it said so recently; else the
        schedule's plan (the later of the block's deadline and its finish)."""
        planned = max(record.due, record.finish)
        shown = player.input.shown
        if shown is None or time.perf_counter() - shown[2] > 2.0 or shown[0] > record.block:
            return planned
        block, frame, when = shown
        # video frames between the one on screen and the latest block's first
        ahead = _stream_frame(record.block) - (_stream_frame(block) + frame)
        return when - self.scheduler.begin_time() + ahead / VIDEO_FPS

    # image conditioning in the slack ------------------------------------------------------------
    def _encoding(self) -> List["GameConditions"]:
        with self._lock:
            return [p.conditions for p in self.players
                    if p.session is not None and p.conditions is not None
                    and not p.conditions.done]

    def _encode_in_slack(self) -> bool:
        """One unit of a game's start-image encoding where it fits before the next block's
        release (it never delays a block); True when one ran."""
        pending = self._encoding()
        if not pending:
            return False
        release = self.scheduler.next_release()
        slack = math.inf if release is None else release - self.scheduler.now()
        if slack < 1.5 * self._encode_unit_s:
            return False
        start = time.perf_counter()
        try:
            pending[0].advance()
        except Exception as error:  # noqa: BLE001 - that game's conditions: end that game
            player = next((p for p in self.players if p.conditions is pending[0]), None)
            if player is not None:  # (a game that ended leaves the encoding list)
                self._failed(player, error)
            return True
        self._synchronize()
        self._encode_unit_s = 0.8 * self._encode_unit_s + 0.2 * (time.perf_counter() - start)
        if pending[0].done and pending[0].settled_frame is not None:
            self.settled_latent_frame = pending[0].settled_frame  # reported by the benchmark
        return True

    # frames out --------------------------------------------------------------------------------
    def _player(self, player_id: int) -> Optional[Player]:
        """The player with this id, None once it left."""
        with self._lock:
            return next((p for p in self.players if p.id == player_id), None)

    def _frames_ready(self, record, frames, part=None):
        """The scheduler's on_frames: a block's frames (or one part of them, `frames_in_parts`)
        are decoded (its cache update may still run on the GPU): send them now. After a part
        that could not go (the player left, the block failed), the later parts do not either."""
        if self._sent is None:
            return
        player = self._player(record.player)
        if player is not None and not self.sends_at_frames_ready(player, record):
            return  # `_block_done` sends them
        self._sent = self._send(record, frames, part)

    def sends_at_frames_ready(self, player: Player, record) -> bool:
        """Whether the frames of `player`'s block `record` go out when they are decoded (else
        after the whole block): every block's with `send_at_frames_ready`, a re-made block's
        (`remakes_at_frames_ready`), an on-input player's (`on_input_at_frames_ready`)."""
        config = self.config
        return config.send_at_frames_ready or (
            record.remake is not None and config.remakes_at_frames_ready) or (
            player.play_mode == "on-input" and config.on_input_at_frames_ready)

    def _block_done(self, record, frames):
        """After a whole block: its frames out (unless `_frames_ready` sent them), then what
        needs the finished block (the player's latest block, an on-input player's next one)."""
        sent = self._send(record, frames) if self._sent is _UNSENT else self._sent
        player = self._player(record.player)
        if player is None:
            return
        if record.remake is not None:
            player.remake_waiting = False
        if sent is not player:  # not sent (None): the player left, or its game ended
            return
        if record.remake is None:
            player.latest = record
        if player.play_mode == "on-input" and player.input.has_pending_taps():
            self.scheduler.request(player)  # presses that came while this block was made

    def _send(self, record, frames, part=None) -> Optional[Player]:
        """Encode a block's frames (a re-made block's from its splice on), or of one part of it
        (a `FramesPart`: the frames from `part.first` on), and hand them to the player's sink;
        returns the player, or None when nothing went out (the player left, or the block failed
        or held NaN/inf: the player's game then ends or restarts)."""
        player = self._player(record.player)
        if player is None or player.session is None:  # left while its block ran
            return None
        remake = record.remake
        try:  # the block's check is on the host once its frames are ready: no waiting here
            if player.failed is not None:
                error, player.failed = player.failed, None
                self._failed(player, error)
                return None
            if player.broken is not None:
                raise player.broken
            if part is None:
                player.session.runner.check_finite()
            else:
                player.session.runner.check_part(part)
        except NonFiniteOutputError as error:
            self._nonfinite(player, error)
            return None
        player.nonfinite_restarts = 0
        start = time.perf_counter()
        # the block's frames from `first` on: a part's own, from the splice of a re-made block
        offset = part.first if part is not None else 0
        first = max(offset, remake or 0)
        shown = frames[0][first - offset:]
        if not len(shown):  # a part before a re-made block's splice: nothing of it changed
            return player
        # on the decode stream, which the block's frames came from: the cache update, still
        # running on the default stream, does not hold the encoding back; a part's frames on a
        # stream that waits for that part only (the next parts' decode is queued on the other)
        runner = player.session.runner
        stream = runner.side if part is None else part.reader_stream()
        with _on_stream(stream):
            job = self.encoder.start(to_uint8(shown))
        if stream is not None and stream is not runner.side and job.copied is not None:
            # (the decoder's next writes, on its own stream, after this part's frames are read)
            runner.side.wait_event(job.copied)
        made = (record, player.action, player.games, start, first)
        if self._sender is None:
            self._deliver(player, job, *made)
        else:  # the encoding beside the next block; the frames go out from the sender thread
            self._sender.submit(self._deliver, player, job, *made)
        return player

    def _deliver(self, player: Player, job, record, action, game: int, start: float,
                 first: int):
        """The frames' JPEGs (`job`) in a FrameBatch to the player's sink, with the metrics:
        on the worker thread, or with `encode_in_background` on the sender thread (frames of a
        game that has ended meanwhile, by a new game or an error, are dropped there: the page
        was told of the new game first)."""
        try:
            jpegs = job.result()
        except Exception as error:  # noqa: BLE001 - this player's; the worker reports it
            log.exception("player %d: encoding its frames failed", player.id)
            player.failed = error
            return
        if game != player.games or player.closed:
            return
        remake = record.remake
        encoded = time.perf_counter()
        begin = self.scheduler.begin_time()
        # the block's time as the metrics define it: its start to its frames ready
        ready = record.ready if record.ready is not None else record.finish
        batch = FrameBatch(
            block=record.block, jpegs=jpegs, input_id=action.input_id,
            input_received=action.input_received, block_start=begin + record.start,
            frames_ready=begin + ready, encoded=encoded,
            encode_ms=1e3 * (encoded - start), block_ms=1e3 * (ready - record.start),
            wait_ms=1e3 * max(0.0, record.start - record.release), late=record.late,
            first_frame=first, remake=remake is not None, game=game,
            frames_in_block=record.frames)
        if remake is None:
            player.frames_shown.append((encoded, len(jpegs)))
        elif record.late:
            self.remakes["late"] += 1
        if record.block == 0 and remake is None and player.first_frame_of is not None:
            kind, since = player.first_frame_of
            player.first_frame_of = None
            if self.metrics is not None:
                self.metrics.first_frame(kind, 1e3 * (encoded - since))
        if self.metrics is not None:
            self.metrics.block_done(player, batch)
        player.sink(batch)


class GameConditions:
    """A game's start-image conditions (a conditioner's `start()`, encoded as the game goes) for
    the scheduler's session: `block(index, frames)` gives a block's cond_concat, running the
    encoder on when that block's latent frames are not encoded yet (the player's own block waits
    for them; the engine runs `advance` in the slack between blocks before that)."""

    def __init__(self, source):
        self.source = source
        self.visual_context = source.visual_context

    @classmethod
    def start(cls, conditioner, image, device, dtype) -> "GameConditions":
        return cls(conditioner.start(image, device, dtype))

    @property
    def done(self) -> bool:
        """Nothing left to encode (the latents settled, or the encoder's cap was reached)."""
        return self.source.done

    @property
    def settled_frame(self) -> Optional[int]:
        """The first latent frame equal to the one before it (later blocks reuse it)."""
        return self.source.settled_frame

    def advance(self) -> bool:
        """One unit of the encoder's work; False once nothing is left."""
        return self.source.advance()

    def block(self, index: int, frames: int):
        while True:
            cond = self.source.block(index, frames)
            if cond is not None:
                return cond
            if not self.advance() and self.source.block(index, frames) is None:
                raise RuntimeError(f"the start image's conditions for block {index} never came "
                                   f"(the encoder stopped)")


_UNSENT = object()  # a block whose frames `_frames_ready` has not handled


def _on_stream(stream):
    """`torch.cuda.stream(stream)`, or nothing when there is no such stream (a CPU)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _stream_frame(block: int) -> int:
    """The stream's video frame index of block `block`'s first frame (9, then 12 a block)."""
    return sum(block_frames(b) for b in range(block))


def _poisons_device(error: BaseException) -> bool:
    """A CUDA error after which the device cannot be trusted (sticky: every later call fails)."""
    text = str(error)
    return isinstance(error, RuntimeError) and not isinstance(
        error, torch.cuda.OutOfMemoryError) and any(
        sign in text for sign in ("CUDA error", "illegal memory access", "device-side assert",
                                  "CUBLAS_STATUS_EXECUTION_FAILED", "cudaErrorLaunchFailure"))
