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

Admission: up to `capacity` players, measured at start-up (`warm_up`: a throw-away player's blocks
timed, capacity = how many such blocks fit in one 0.48 s period with 5% to spare) unless
`max_players` is given; one more is refused (`ServerFull`), so nobody's game gets slower.
A player who leaves takes its caches with it (the session, its cache dicts and decoder stream
are dropped in the worker; `memory_report` shows the device memory before and after).

NaN or inf: every block's latents and frames are checked (`StreamingBlockRunner.check_finite`,
read after the scheduler's synchronize: no extra wait). A block that holds any is not sent; its
player gets `{"type": "error", "reason": ...}` naming the block and a new game (fresh caches and
decoder stream; the other players' games go on untouched). After MAX_NONFINITE_RESTARTS such
games in a row without one good block the game is stopped instead, with a message ("New game"
starts it again). During the warm-up such a block is an error at start-up.
"""
import gc
import itertools
import logging
import math
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from PIL import Image

from ..runtime.conditioning import history_steps
from ..runtime.options import cuda_graphs_on, resolve_option
from ..modules.optimized_causal_model import OptimizedCausalWanModel
from ..modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from ..modules.vae_decoder import VAEDecoder3d, load_decoder_weights
from ..serving.runner import NonFiniteOutputError, StreamingBlockRunner
from ..modules.presets import LATENT_SIZE, UPSTREAM_VARIANTS, model_config, tiny_variant_config
from ..modules.random_init import randomize_decoder_weights_, randomize_weights_
from ..serving.scheduler import PERIOD_S, DeadlineScheduler, PlayerSession
from .actions import ActionSpace, InputState, action_space, action_steps
from .conditioning import CheckoutConditioner, DemoConditioner, builtin_start_image
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
    seed: int = 0

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
        self.nonfinite_restarts = 0  # games restarted for that since its last good block

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
        try:
            return session.run_block()
        except NonFiniteOutputError as error:  # an earlier block's, read now: the worker restarts
            self.broken = error
            return None, None

    def fps(self, now: float, window_s: float = 5.0) -> float:
        recent = [(t, n) for t, n in self.frames_shown if now - t <= window_s]
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
        self.latent_hw = LATENT_SIZE[self.preset]
        self.dtype, self.decoder_dtype = config.dtypes(self.device)
        # None: the library's default (on wherever the models run on CUDA, WAN_CUDA_GRAPHS aside)
        self.cuda_graphs = cuda_graphs_on(resolve_option("cuda_graphs", config.cuda_graphs),
                                          self.device)
        with torch.device(self.device):
            model = OptimizedCausalWanModel.from_config(model_cfg, cuda_graphs=config.cuda_graphs)
            decoder = OptimizedVAEDecoderWrapper(cuda_graphs=config.cuda_graphs)
            if self.preset == "tiny":
                decoder.decoder = VAEDecoder3d(dim=TINY_DECODER_DIM)
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
        self.encoder = JpegEncoder(self.device, config.jpeg_quality)
        self.scheduler = DeadlineScheduler(synchronize=self._synchronize)
        self.capacity = config.max_players
        self.metrics = metrics
        self.players: List[Player] = []
        self._lock = threading.Lock()
        self._commands: "queue.Queue[Tuple[str, Player, object]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self.steady_block_ms: Optional[float] = None
        self.memory_before_players = self.device_memory()
        self.failure: Optional[BaseException] = None

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
                f"{self.conditioner.name}, JPEG: {self.encoder.where}, capacity {self.capacity}")

    # set-up ----------------------------------------------------------------------------------
    def _new_session(self, player: Player, image: Optional[Image.Image]) -> PlayerSession:
        image = image if image is not None else self.default_image
        visual_context, cond_concat = self.conditioner(image, self.device, self.dtype)
        runner = StreamingBlockRunner(self.model, self.decoder, latent_hw=self.latent_hw)
        session = PlayerSession(player.id, runner, visual_context, cond_concat,
                                seed=player.seed * 1000 + player.games,
                                mouse_dim=2 if self.space.has_camera else None,
                                keyboard_dim=self.space.keyboard_dim, hold_conditions=True)
        session.warm_up()  # every graph its blocks replay, before its first block
        return session

    @torch.no_grad()
    def warm_up(self) -> float:
        """Blocks of a throw-away player (compiles, autotunes, measures): returns the steady
        block time in ms (frames encoded included) and sets the capacity when not given."""
        player = Player(self.space, "continuous", sink=lambda batch: None)
        player.session = self._new_session(player, None)
        times = []
        for _ in range(max(3, self.config.warmup_blocks)):
            start = time.perf_counter()
            frames, _ = player.run_block()
            if player.broken is not None:
                raise player.broken
            self.encoder.encode(to_uint8(frames[0]))
            self._synchronize()
            player.session.runner.check_finite()  # NaN/inf from these weights: refuse to serve
            times.append(time.perf_counter() - start)
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
        log.info("warm-up: %.1f ms per steady block (encode included) -> capacity %d players",
                 self.steady_block_ms, self.capacity)
        return self.steady_block_ms

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
                                 f"playing (each needs real time from this GPU); try again later")
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
        """Start the player's game again (with a new start image if given)."""
        self._command("reset", player, image)

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
        self._commands.put((name, player, argument))
        self.scheduler.wake()

    # the worker ------------------------------------------------------------------------------
    def start(self):
        if self.capacity is None:
            self.warm_up()
        self.scheduler.start_live()
        self._running = True
        self._thread = threading.Thread(target=self._work, name="wan-play-gpu", daemon=True)
        self._thread.start()

    def stop(self):
        self._running = False
        self.scheduler.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _work(self):
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            with torch.no_grad():
                while self._running:
                    self._apply_commands()
                    done = self.scheduler.step(timeout=0.05)
                    if done is not None:
                        self._deliver(*done)
        except BaseException as error:  # the server reports it on /health and stops serving
            self.failure = error
            log.exception("the GPU worker stopped")

    def _apply_commands(self):
        while True:
            try:
                name, player, argument = self._commands.get_nowait()
            except queue.Empty:
                return
            if name == "leave":
                # again here: a join this worker applied while the player was leaving queued a block
                self.scheduler.leave(player)
                player.session = None  # its cache dicts, decoder stream and graphs go with it
                if self.device.type == "cuda" and self.player_count() == 0:
                    torch.cuda.empty_cache()
                log.info("player %d left; device memory %.2f GiB (%.2f GiB before any player)",
                         player.id, self.device_memory() / 2**30, self.memory_before_players / 2**30)
                continue
            if player.closed:
                continue
            if name == "reset":
                player.nonfinite_restarts = 0  # the player asked: a new series of tries
                if argument is not None:
                    player.image = argument
                self._restart(player)
            else:
                self._start_game(player)

    def _start_game(self, player: Player):
        player.broken = None
        player.session = self._new_session(player, player.image)
        self.scheduler.join(player, continuous=player.play_mode == "continuous")
        if player.play_mode == "on-input" and player.press_waiting:
            player.press_waiting = False  # a press that came before its game was ready
            self.scheduler.request(player)
        player.on_event({"type": "game", "game": player.games, "demo": self.demo})

    def _restart(self, player: Player):
        """The player's game again from its start image (a new session: caches, decoder stream)."""
        self.scheduler.leave(player)
        player.session = None
        player.games += 1
        self._start_game(player)

    def _nonfinite(self, player: Player, error: NonFiniteOutputError):
        """A block of `player` held NaN/inf: not shown; the player is told and gets a new game
        (or, after MAX_NONFINITE_RESTARTS in a row, its game stops). Nobody else is touched."""
        player.nonfinite_restarts += 1
        stop = player.nonfinite_restarts > MAX_NONFINITE_RESTARTS
        log.warning("player %d, game %d: %s; %s", player.id, player.games, error,
                    "game stopped" if stop else "new game")
        if stop:
            self.scheduler.leave(player)
            player.session, player.broken = None, None
            player.on_event({"type": "error", "reason": (
                f"your game stopped: {error}. It happened in {MAX_NONFINITE_RESTARTS + 1} games "
                f"in a row (the model's weights?); 'New game' tries again")})
            return
        player.on_event({"type": "error", "reason": f"a new game was started: {error}"})
        self._restart(player)

    def _deliver(self, record, frames):
        with self._lock:
            player = next((p for p in self.players if p.id == record.player), None)
        if player is None or player.session is None:  # left while its block ran
            return
        try:  # the scheduler synchronized after the block: reading its check waits for nothing
            if player.broken is not None:
                raise player.broken
            player.session.runner.check_finite()
        except NonFiniteOutputError as error:
            self._nonfinite(player, error)
            return
        player.nonfinite_restarts = 0
        begin = self.scheduler._begin
        start = time.perf_counter()
        jpegs = self.encoder.encode(to_uint8(frames[0]))
        encoded = time.perf_counter()
        action = player.action
        batch = FrameBatch(
            block=record.block, jpegs=jpegs, input_id=action.input_id,
            input_received=action.input_received, block_start=begin + record.start,
            frames_ready=begin + record.finish, encoded=encoded,
            encode_ms=1e3 * (encoded - start), block_ms=1e3 * (record.finish - record.start),
            wait_ms=1e3 * max(0.0, record.start - record.release), late=record.late)
        player.frames_shown.append((encoded, len(jpegs)))
        if player.play_mode == "on-input" and player.input.has_pending_taps():
            self.scheduler.request(player)  # presses that came while this block was made
        if self.metrics is not None:
            self.metrics.block_done(player, batch)
        player.sink(batch)
