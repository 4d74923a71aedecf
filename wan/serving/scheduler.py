"""Several real-time players on one device: player sessions and a deadline scheduler.

Matrix-Game-2 plays at 25 fps: a stream's first block shows 9 frames, every later one 12, so a
player's block k is due on screen 0.36 s + 0.48 s * k after the player joined (a late block stalls
the picture and moves the player's later deadlines by as much). A block is released (may start)
one period before it is due, so that it reads actions no older than that; the scheduler runs the
released block with the earliest deadline, one block at a time (the DiT and the decoder each fill
the GPU: running players side by side gains nothing, `wan.serving.runner`'s note).

A `PlayerSession` is one player's state over the shared model and decoder: its block runner (its
own DiT cache dicts and decoder stream), image context, conditions, noise generator and the actions
it has received. Reports per player: fps (frames over the time they took to show), action-to-frame
latency (from the block's start, when its actions are read, to its frames ready; p50/p95), the time
blocks waited after their release, missed deadlines.

The clock, the sleep and the device synchronisation are parameters, so tests drive the scheduler
with a fake clock.
"""
import itertools
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..modules.shared.conditioning import history_steps
from .runner import NonFiniteOutputError, StreamingBlockRunner

VIDEO_FPS = 25
FIRST_BLOCK_FRAMES, BLOCK_FRAMES = 9, 12
PERIOD_S = BLOCK_FRAMES / VIDEO_FPS  # a steady block is due every 0.48 s
# a player holds real time when it shows at least this many frames per second (1% timer slack)
REALTIME_FPS = 0.99 * VIDEO_FPS


def block_frames(index: int) -> int:
    """Video frames block `index` of a stream shows."""
    return FIRST_BLOCK_FRAMES if index == 0 else BLOCK_FRAMES


class PlayerSession:
    """One player: its runner (a `StreamingBlockRunner` over the shared model and decoder), its
    image context, conditions and the actions it has received.

    `cond_concat`: [B, 20, F, h, w], one block's conditions (F = frames per block: reused every
    block) or the whole stream's (sliced per block), or a source with `block(index, frames)`
    (wan.play's start images, encoded as the game goes); with `hold_conditions` a stream longer than
    what was given reuses the last block's conditions (the encoder is causal: far from the start
    image the black frames' latents settle). Actions arrive with `receive`; a block reads
    the history up to its last frame, holding the latest action where the player sent fewer steps
    than the block needs (a real-time server does not wait for input). `reuse_caches`: the
    runner's caches are rewound for this session instead of new ones made (a server's player
    slot: the graphs captured over them stay valid)."""

    def __init__(self, player_id, runner: StreamingBlockRunner, visual_context, cond_concat,
                 seed: int = 0, mouse_dim: Optional[int] = None,
                 keyboard_dim: Optional[int] = None, hold_conditions: bool = False,
                 reuse_caches: bool = False):
        self.player_id = player_id
        self.hold_conditions = hold_conditions
        self.runner = runner
        self.cond_concat = cond_concat
        runner.generator = torch.Generator(device=runner.device).manual_seed(seed)
        b, device, dtype = runner.batch, runner.device, runner.dtype
        self.mouse = None if mouse_dim is None else torch.zeros(b, 0, mouse_dim, device=device,
                                                                 dtype=dtype)
        self.keyboard = None if keyboard_dim is None else torch.zeros(b, 0, keyboard_dim,
                                                                      device=device, dtype=dtype)
        runner.start(visual_context, reuse_caches=reuse_caches)
        self.blocks_done = 0

    def warm_up(self) -> int:
        """Capture the graphs this player's blocks will replay before its first block
        (`StreamingBlockRunner.warm_up`); the graphs captured."""
        return self.runner.warm_up(self._conditions(0), _width_of(self.mouse),
                                   _width_of(self.keyboard))

    def receive(self, mouse=None, keyboard=None):
        """Append action steps ([B, steps, dim] each; 4 steps per latent frame after the first)."""
        if mouse is not None:
            self.mouse = torch.cat([self.mouse, mouse.to(self.mouse)], dim=1)
        if keyboard is not None:
            self.keyboard = torch.cat([self.keyboard, keyboard.to(self.keyboard)], dim=1)

    def run_block(self):
        """The next block: (frames [B, T, 3, H, W], its runner clock)."""
        index = self.blocks_done
        steps = self.block_steps(index)[1]  # the model reads the history up to the block's last frame
        frames, clock = self.runner.block(self._conditions(index), _held(self.mouse, steps),
                                          _held(self.keyboard, steps))
        self.blocks_done += 1
        return frames, clock

    def block_steps(self, index: int):
        """(first, end): the action steps of block `index`, one per video frame it shows: block 0
        steps 0-8, block k >= 1 steps 12k - 3 to 12k + 8 (a block's video frame j is step first + j)."""
        f = self.runner.frames_per_block
        first = 0 if index == 0 else history_steps(index * f - 1)
        return first, history_steps(index * f + f - 1)

    def remake_block(self, splice: int, mouse=None, keyboard=None):
        """The latest block again (`StreamingBlockRunner.remake`: same noise, the caches and
        decoder history it started from), its actions from its video frame `splice` on replaced
        by `mouse`/`keyboard` ([B, steps, dim], steps = the block's frames from `splice` on;
        None: that history is kept). Returns what `run_block` returns; the session is then
        exactly a session that was fed the spliced histories from the start."""
        if self.blocks_done == 0:
            raise RuntimeError(f"player {self.player_id}: no block to re-make yet")
        index = self.blocks_done - 1
        first, end = self.block_steps(index)
        if not 0 <= splice < end - first:
            raise ValueError(f"splice frame {splice} outside block {index}'s {end - first} frames")
        for name, new in (("mouse", mouse), ("keyboard", keyboard)):
            history = getattr(self, name)
            if new is None or history is None:
                continue
            if new.shape[1] != end - first - splice:
                raise ValueError(f"{name}: {new.shape[1]} steps given, the block has "
                                 f"{end - first - splice} from frame {splice}")
            # what was held before the splice stays (the steps up to it, held as the block read them)
            kept = _held(history, first + splice)
            setattr(self, name, torch.cat([kept, new.to(history)], dim=1))
        frames, clock = self.runner.remake(self._conditions(index), _held(self.mouse, end),
                                           _held(self.keyboard, end))
        return frames, clock

    def run_remake(self, splice: int):
        """A re-make the scheduler granted: the latest block from frame `splice` on, with the
        action histories as received (a server's session splices its new actions itself)."""
        return self.remake_block(splice)

    def _conditions(self, index: int):
        """cond_concat for block `index` ([B, 20, F, h, w]): the block's slice of what was
        given, a conditions source's `block(index)` (wan.play's start images), or the last
        block's where the stream outruns them and `hold_conditions` is set."""
        f = self.runner.frames_per_block
        cond = self.cond_concat
        if hasattr(cond, "block"):
            return cond.block(index, f)
        if cond.shape[2] == f:
            return cond
        start = index * f
        if cond.shape[2] >= start + f:
            return cond[:, :, start:start + f]
        if self.hold_conditions:
            return cond[:, :, -f:]
        raise ValueError(f"player {self.player_id}: cond_concat covers {cond.shape[2]} "
                         f"frames, block {index} needs {start + f}")


def _width_of(history):
    """One zero step of an action history (its width is what warm-up needs), or None."""
    return None if history is None else history.new_zeros(history.shape[0], 1, history.shape[2])


def _held(history, steps: int):
    """The first `steps` action steps, the last one repeated (zeros before any) when short."""
    if history is None:
        return None
    if history.shape[1] >= steps:
        return history[:, :steps]
    last = (history[:, -1:] if history.shape[1] else
            history.new_zeros(history.shape[0], 1, history.shape[2]))
    return torch.cat([history, last.expand(-1, steps - history.shape[1], -1)], dim=1)


@dataclass
class BlockRecord:
    """When one block of one player was due, released, started and finished (seconds on the
    scheduler's clock, from its start), and how many frames it showed."""
    player: object
    block: int
    frames: int
    joined: float  # when the player joined
    due: float
    release: float
    start: float
    finish: Optional[float]  # None in the record `step`'s on_frames gets: the block still runs
    remake: Optional[int] = None  # a re-made block: the frame its new actions start from
    ready: Optional[float] = None  # when its frames were ready (the runner's clock), if known

    @property
    def late(self) -> bool:
        """A block: finished after its deadline. A re-made block: its frames were ready after
        the frame it splices at was due (it was planned for the frames, not the cache update).
        A block not finished yet (on_frames): its frames were ready after its deadline."""
        use_ready = self.ready is not None and (self.remake is not None or self.finish is None)
        done = self.ready if use_ready else self.finish
        return done > self.due + 1e-9  # (a clock's rounding is not lateness)


@dataclass(order=True)
class _Next:
    due: float
    order: int                      # ties: the player who joined first
    release: float = field(compare=False)
    session: PlayerSession = field(compare=False)
    joined: float = field(compare=False)
    remake: Optional[int] = field(default=None, compare=False)  # re-make from this frame on
    # a re-make: from its start to its splice frame's readiness (default: the block's frames)
    ready: Optional[float] = field(default=None, compare=False)


class DeadlineScheduler:
    """Runs the sessions' blocks one at a time, earliest deadline first, each no earlier than its
    release. `on_block(record, frames)` is called after each block (e.g. to send the frames).

    Two ways to drive it: `run(n)` serves a fixed set of sessions for n blocks each (benchmarks,
    `wan.serve`); the live calls (`start_live`, `join`, `request`, `leave`, `step`) let sessions come
    and go while a worker thread calls `step()` in a loop (`wan.play`). Live sessions are either
    continuous (a block every period, 25 fps) or on-input (a block when `request` asks for one,
    due as soon as a block can be done). A live continuous block is released as late as its
    deadline allows, `release_lead()` before it is due, so that it reads the freshest input."""

    # the margin a late release keeps beyond the estimated time to its block's end
    RELEASE_MARGIN_S = 0.05
    # a re-made frame is planned to be ready this long before it shows (encode and send)
    REMAKE_MARGIN_S = 0.015

    def __init__(self, sessions: Sequence[PlayerSession] = (),
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep,
                 synchronize: Optional[Callable[[], None]] = None):
        self.sessions = list(sessions)
        self.clock, self.sleep = clock, sleep
        self.synchronize = synchronize or _synchronizer(
            device for s in self.sessions for device in (s.runner.device, s.runner.decoder_device))
        self._wake = threading.Condition()
        self._queue: List[_Next] = []
        self._begin = None
        self._order = itertools.count()
        self._continuous = set()           # id() of live continuous sessions
        self.block_estimate_s = PERIOD_S  # running estimate of one block's time
        # ... and of the time from a block's start to its frames (the decode runs ahead of the
        # cache update): what a re-made block's frames wait for
        self.ready_estimate_s: Optional[float] = None
        # blocks decoded in parts (the runner's frames_in_parts): {block's frames: {a part's
        # first frame: the time from the block's start to that part's frames}}, so that a
        # re-make can splice at a frame of an early part sooner than the whole block's frames
        self.part_ready_estimates_s: dict = {}

    def run(self, blocks_per_player: int, on_block=None, stagger: bool = True) -> List[BlockRecord]:
        """Blocks until every session has done `blocks_per_player` (blocks done before this call
        count: after warm-up blocks, `run(warmup + n)` runs n more). With `stagger` the players join one
        after another, spread evenly over one period (as players arrive at a server); otherwise
        all at once (the last ones then miss their first deadline when a round of first blocks
        takes longer than 0.36 s). Releases are one period before the deadline."""
        begin = self.clock()
        spacing = PERIOD_S / len(self.sessions) if stagger else 0.0
        queue = [_Next(order * spacing + block_frames(session.blocks_done) / VIDEO_FPS, order,
                       order * spacing, session, order * spacing)
                 for order, session in enumerate(self.sessions)
                 if session.blocks_done < blocks_per_player]
        records = []
        while queue:
            now = self.clock() - begin
            released = [n for n in queue if n.release <= now]
            if not released:  # everyone is ahead of time: wait for the first release
                self.sleep(min(n.release for n in queue) - now)
                continue
            chosen = min(released)
            queue.remove(chosen)
            record, frames = self._run(chosen, begin)
            records.append(record)
            if on_block is not None:
                on_block(record, frames)
            if chosen.session.blocks_done < blocks_per_player:
                queue.append(_following(chosen, record.finish, lead=PERIOD_S))
        return records

    def _run(self, chosen: "_Next", begin: float, on_frames=None):
        session = chosen.session
        start = self.clock() - begin
        if chosen.remake is None:
            frames, clock = session.run_block()
        else:
            frames, clock = session.run_remake(chosen.remake)
        index = session.blocks_done - 1
        if on_frames is not None and frames is not None:
            # the frames go out as soon as they exist, while the GPU still writes the block
            # into the caches (the runner decodes ahead of that update); a block decoded in
            # parts (the runner's frames_in_parts) goes out part by part
            parts = clock.parts if clock is not None else []
            for part in parts or [None]:
                if clock is not None:
                    clock.wait_frames(part.mark if part is not None else "frames")
                ready = self.clock() - begin
                if part is not None and index >= 2:  # (the first blocks pay captures)
                    self._note_part_ready(block_frames(index), part.first, ready - start)
                on_frames(BlockRecord(session.player_id, index, block_frames(index),
                                      chosen.joined, chosen.due, chosen.release, start, None,
                                      chosen.remake, ready),
                          frames if part is None else part.frames, part)
        self.synchronize()
        finish = self.clock() - begin
        ready = None
        if clock is not None:  # the runner's own clock: when the frames were ready
            try:
                ready = start + clock.timing().action_to_frame_ms / 1e3
            except NonFiniteOutputError:  # the session's to report (its check_finite says it)
                pass
        return BlockRecord(session.player_id, index, block_frames(index), chosen.joined,
                           chosen.due, chosen.release, start, finish, chosen.remake,
                           ready), frames

    # live serving ------------------------------------------------------------------------------
    def start_live(self):
        """Start the live clock (records' times count from here)."""
        self._begin = self.clock()

    def now(self) -> float:
        return self.clock() - self._begin

    def begin_time(self) -> float:
        """The clock's reading when the live clock started (records' times count from it)."""
        return self._begin

    def release_lead(self) -> float:
        """How long before its deadline a live continuous block is released: the time every
        continuous player's block takes (one may be running when it is released, the others may
        be due first) plus a margin, at most one period."""
        players = max(1, len(self._continuous))
        return min(PERIOD_S, self.block_estimate_s * players + self.RELEASE_MARGIN_S)

    def join(self, session, continuous: bool = True):
        """A live session joins now: continuous sessions get their first block due when its
        frames would show (0.36 s from now, later by as many frames as it takes, up to a period,
        for its blocks to fit beside the others' without making one of them late:
        `_first_fitting_block`), on-input ones wait for `request`."""
        with self._wake:
            if continuous:
                self._continuous.add(id(session))
                self._queue.append(self._first_fitting_block(session, self.now()))
            self._wake.notify()

    def _first_fitting_block(self, session, now: float) -> _Next:
        """A new continuous player's first block, due at the first of 0.36 s from now, a frame
        later, ... up to a period later at which its blocks (this one and the next ones,
        `_overruns`' plan) make no waiting block later than it would be anyway and are not late
        themselves; due at 0.36 s when none is (the GPU is over its capacity: everyone slows down
        alike). Released `release_lead()` before it is due. Under the lock, with the session
        already counted as continuous (the release lead counts it)."""
        plan = self._plan(now)
        anyway = _overruns(self._queue, **plan)
        first_due = now + block_frames(session.blocks_done) / VIDEO_FPS
        order = next(self._order)

        def block(due):
            return _Next(due, order, max(now, due - plan["lead"]), session, now)
        for frames in range(BLOCK_FRAMES + 1):
            entry = block(first_due + frames / VIDEO_FPS)
            overrun = _overruns(self._queue + [entry], **plan)
            if all(late <= anyway.get(key, 0.0) + 1e-9 for key, late in overrun.items()):
                return entry
        return block(first_due)

    def _plan(self, now: float) -> dict:
        """`_overruns`' arguments for a plan made now: the scheduler's estimates, two periods on."""
        ready = min(self.ready_estimate_s or math.inf, self.block_estimate_s)
        return dict(now=now, duration=self.block_estimate_s, ready=ready,
                    continuous=self._continuous, lead=self.release_lead(),
                    horizon=now + 2 * PERIOD_S, keep=self.RELEASE_MARGIN_S)

    def request(self, session) -> bool:
        """An on-input session asks for its next block now (its deadline: now + one block's time).
        False when it already has one waiting (presses while a block waits do not queue up)."""
        with self._wake:
            if any(n.session is session for n in self._queue):
                return False
            now = self.now()
            self._queue.append(_Next(now + self.block_estimate_s, next(self._order), now, session,
                                     now))
            self._wake.notify()
            return True

    def _note_part_ready(self, frames: int, first: int, seconds: float):
        """A running estimate of when the part from frame `first` of a `frames`-frame block is
        ready after the block's start."""
        parts = self.part_ready_estimates_s.setdefault(frames, {})
        parts[first] = seconds if first not in parts else 0.8 * parts[first] + 0.2 * seconds

    def _splice_ready(self, frames: int, splice: int, ready: float) -> float:
        """When frame `splice` of a re-made `frames`-frame block is ready after its start: its
        part's estimate for blocks decoded in parts, else `ready` (the block's frames)."""
        parts = self.part_ready_estimates_s.get(frames)
        holding = [first for first in (parts or ()) if first <= splice]
        return min(parts[max(holding)], ready) if holding else ready

    def try_remake(self, session, shown_at: float, frames: int, index: int) -> Optional[int]:
        """Grant a re-make of `session`'s latest block (block `index`, `frames` video frames, its
        frame 0 on screen at `shown_at` on this clock) if it can be ready before one of its frames
        shows without making any queued block late that would not be late anyway: queues it and
        returns the splice frame (the first frame it can replace), else None (refused: the input
        waits for the player's next block, which reads it when it starts). One re-make waits per
        player at most: a later change is read by that one when it runs."""
        with self._wake:
            if any(n.session is session and n.remake is not None for n in self._queue):
                return None
            now = self.now()
            plan = self._plan(now)
            ready = plan["ready"]
            overrun_anyway = _overruns(self._queue, **plan)
            for splice in range(frames):
                # the first frame whose re-made version can be ready before it shows (a block in
                # parts: its part's frames, sooner for the early parts)
                splice_ready = self._splice_ready(frames, splice, ready)
                if splice < (now + splice_ready + self.REMAKE_MARGIN_S - shown_at) * VIDEO_FPS \
                        - 1e-6:
                    continue
                due = shown_at + splice / VIDEO_FPS - self.REMAKE_MARGIN_S
                entry = _Next(due, next(self._order), now, session, now, remake=splice,
                              ready=splice_ready)
                overrun = _overruns(self._queue + [entry], **plan)
                # none later than it would be anyway (slack may be used, down to the margin)
                if _key(entry) not in overrun and all(
                        late <= overrun_anyway.get(key, 0.0) + 1e-9
                        for key, late in overrun.items()):
                    self._queue.append(entry)
                    self._wake.notify()
                    return splice
            return None

    def leave(self, session):
        """A live session leaves: its waiting block, if any, is dropped."""
        with self._wake:
            self._queue = [n for n in self._queue if n.session is not session]
            self._continuous.discard(id(session))

    def next_release(self) -> Optional[float]:
        """When the earliest waiting block is released (this clock), None when none waits."""
        with self._wake:
            return min((n.release for n in self._queue), default=None)

    def wake(self):
        """Wake a waiting `step` (e.g. to stop the worker)."""
        with self._wake:
            self._wake.notify()

    def step(self, timeout: float = 0.1, on_frames=None):
        """Run the released live block with the earliest deadline, or wait up to `timeout` for
        one: returns (record, frames), or None when nothing ran. `on_frames(record, frames, part)`,
        if given, is called as soon as the block's frames are ready, before the rest of the
        block (the cache update) is done: its record has no `finish` yet and `ready` set; `part`
        is None, or for a block decoded in parts (the runner's `frames_in_parts`) the
        `FramesPart` whose frames these are, one call per part in order."""
        with self._wake:
            now = self.now()
            released = [n for n in self._queue if n.release <= now]
            if not released:
                first = min((n.release for n in self._queue), default=now + timeout)
                self._wake.wait(max(0.0, min(timeout, first - now)))
                return None
            chosen = min(released)
            self._queue.remove(chosen)
        record, frames = self._run(chosen, self._begin, on_frames)
        duration = record.finish - record.start
        # a stream's first blocks pay their CUDA-graph captures: keep them out of the estimate
        if record.block >= 2:
            self.block_estimate_s = 0.8 * self.block_estimate_s + 0.2 * duration
            if record.ready is not None:
                ready = record.ready - record.start
                self.ready_estimate_s = ready if self.ready_estimate_s is None else \
                    0.8 * self.ready_estimate_s + 0.2 * ready
        with self._wake:
            # a re-made block's player keeps its next block, waiting in the queue
            if id(chosen.session) in self._continuous and chosen.remake is None:
                self._queue.append(_following(chosen, record.finish, self.release_lead()))
        return record, frames


def _overruns(entries: List[_Next], now: float, duration: float, ready: float,
              continuous: set, lead: float, horizon: float, keep: float) -> dict:
    """By how much each job would miss its deadline if the scheduler ran `entries` from `now` as
    `step` does (the released one with the earliest deadline next, each taking `duration`; idle
    until the next release when none is released; a continuous session's next block queued when
    one of its blocks finishes) until `horizon`: {(session id, deadline, splice): seconds} of
    those that miss. A block must finish `keep` before its deadline (the margin its late release
    keeps: the page plays its frames about that early), a re-made block's frames be ready
    (its own `ready` after its start, else `ready`) by its own."""
    late, pending, t = {}, sorted(entries), now
    while pending and t < horizon:
        released = [n for n in pending if n.release <= t]
        if not released:
            t = min(n.release for n in pending)
            continue
        chosen = released[0]  # sorted: the earliest deadline
        pending.remove(chosen)
        if chosen.remake is not None:
            done = t + (chosen.ready if chosen.ready is not None else ready)
        else:
            done = t + duration + keep
        t += duration
        if done > chosen.due + 1e-9:
            late[_key(chosen)] = done - chosen.due
        if chosen.remake is None and id(chosen.session) in continuous:
            following = _following(chosen, t, lead)
            following.session = _Counted(chosen.session)  # blocks_done one on, as after the run
            pending = sorted(pending + [following])
    return late


class _Counted:
    """A session seen one block later (what `_following` reads of it while simulating)."""

    def __init__(self, session):
        self.session = getattr(session, "session", session)
        self.blocks_done = session.blocks_done + 1

    def __getattr__(self, name):
        return getattr(self.session, name)


def _key(entry: _Next):
    session = getattr(entry.session, "session", entry.session)
    return id(session), round(entry.due, 9), entry.remake


def _following(chosen: _Next, finish: float, lead: float) -> _Next:
    """The session's next block after `chosen` finished at `finish`: due one block's frames after
    the later of its deadline and its finish (a late block stalls the picture until it is ready,
    moving the later deadlines), released `lead` before that but not before it was shown."""
    session = chosen.session
    shown = max(chosen.due, finish)
    due = shown + block_frames(session.blocks_done) / VIDEO_FPS
    return _Next(due, chosen.order, max(shown, due - lead), session, chosen.joined)


def _synchronizer(devices) -> Callable[[], None]:
    """Waits for the work queued on the sessions' CUDA devices, the decoders' included (a split
    player's frames come from another GPU): finish times are then real."""
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)

    def synchronize():
        for device in cuda:
            torch.cuda.synchronize(device)
    return synchronize


def percentile(values: List[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def players_report(records: List[BlockRecord]) -> Dict:
    """Per player: fps (frames / time from joining until the last one showed), action-to-frame latency
    p50/p95 (start to finish of its blocks), wait after release p50/p95, deadlines missed; and
    whether every player held real time (>= REALTIME_FPS)."""
    remakes = [r for r in records if r.remake is not None]
    records = [r for r in records if r.remake is None]  # the stream's blocks, each once
    per_player = {}
    for player in dict.fromkeys(r.player for r in records):
        mine = [r for r in records if r.player == player]
        shown_until = max(max(r.due, r.finish) for r in mine) - mine[0].joined
        latency = [1e3 * (r.finish - r.start) for r in mine]
        wait = [1e3 * (r.start - r.release) for r in mine]
        per_player[str(player)] = {
            "blocks": len(mine), "frames": sum(r.frames for r in mine),
            "fps": sum(r.frames for r in mine) / shown_until,
            "latency_p50_ms": statistics.median(latency),
            "latency_p95_ms": percentile(latency, 0.95),
            "wait_p50_ms": statistics.median(wait), "wait_p95_ms": percentile(wait, 0.95),
            "missed_deadlines": sum(r.late for r in mine)}
    fps = [p["fps"] for p in per_player.values()]
    latency = [1e3 * (r.finish - r.start) for r in records]
    return {"players": len(per_player), "per_player": per_player, "min_fps": min(fps),
            "realtime": min(fps) >= REALTIME_FPS, "latency_p50_ms": statistics.median(latency),
            "latency_p95_ms": percentile(latency, 0.95), "remakes": len(remakes),
            "remakes_late": sum(r.late for r in remakes)}
