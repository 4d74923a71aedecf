"""The live `DeadlineScheduler` on a simulated clock: players whose blocks take a given time,
keys that change at random moments, players that join and leave. No model runs; what comes out
is what the schedule alone decides: when a key change can show (press-to-shown, without the
encode, transport and page a real run adds: ~30-60 ms), re-makes granted and refused, late
blocks. Used by the tests (re-makes never make a block late, joins never make the others late)
and by `benchmarks/schedule_sim.py` to try a scheduling rule before a GPU run (lab notebook
step 57).

A key change at time t is shown, when its re-make is granted at splice frame j, at the slot of
frame j of the re-made block; when refused, at the first frame of the player's first block that
starts after t (it reads the new keys when it starts).
"""
import math
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional

from .scheduler import VIDEO_FPS, BlockRecord, DeadlineScheduler, block_frames


class SimClock:
    """A clock that only moves when told."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimSession:
    """A player whose blocks take `block_s` (their frames ready `ready_s` after the start) of
    the simulated clock, times a random factor of 1 +- `jitter` (uniform)."""

    def __init__(self, player_id, clock: SimClock, block_s: float, ready_s: float,
                 jitter: float = 0.0, rng: Optional[random.Random] = None):
        self.player_id, self.clock = player_id, clock
        self.block_s, self.ready_s, self.jitter = block_s, ready_s, jitter
        self.rng = rng or random.Random(0)
        self.blocks_done = 0

    def _block(self):
        factor = 1.0 + self.jitter * (2 * self.rng.random() - 1)
        self.clock.now += self.block_s * factor
        timing = SimpleNamespace(action_to_frame_ms=1e3 * self.ready_s * factor)
        return None, SimpleNamespace(timing=lambda: timing, parts=[])

    def run_block(self):
        self.blocks_done += 1
        return self._block()

    def run_remake(self, splice: int):  # the same work again; the block count stays
        return self._block()


@dataclass
class SimResult:
    """What one simulated run gave."""
    records: List[BlockRecord] = field(default_factory=list)
    press_to_shown_s: List[float] = field(default_factory=list)
    granted: int = 0
    refused: int = 0
    first_frame_s: List[float] = field(default_factory=list)  # joiners: join to first frame
    late_blocks_of_others: int = 0  # joiners' runs: the steady players' late blocks

    @property
    def late_blocks(self) -> int:
        return sum(r.late for r in self.records if r.remake is None)

    @property
    def late_remakes(self) -> int:
        return sum(r.late for r in self.records if r.remake is not None)


def simulate(players: int, block_s: float, ready_s: Optional[float] = None,
             change_every_s: float = 0.7, seconds: float = 30.0, reactive: bool = True,
             jitter: float = 0.0, seed: int = 0, joiner_every_s: Optional[float] = None, joiner_plays_s: float = 1.5,
             stagger: bool = True) -> SimResult:
    """`players` continuous players (joining spread over a period with `stagger`, else at
    once), each player's keys changing at random (exponential gaps of mean `change_every_s`;
    `math.inf`: never) for `seconds`. With `joiner_every_s`, one more player joins every that
    many seconds (at a random phase), plays `joiner_plays_s` and leaves: its first frames'
    times and the steady players' late blocks are counted. Re-makes asked for on every change
    when `reactive`."""
    rng = random.Random(seed)
    clock = SimClock()
    scheduler = DeadlineScheduler(clock=clock, sleep=lambda s: None, synchronize=lambda: None)
    scheduler.block_estimate_s = block_s
    scheduler.start_live()
    ready_s = block_s if ready_s is None else ready_s
    steady = [SimSession(p, clock, block_s, ready_s, jitter, rng) for p in range(players)]
    events = []  # (time, kind, session)
    for p, session in enumerate(steady):
        events.append(((p / players if stagger else 0.0) * block_frames(1) / VIDEO_FPS,
                       "join", session))
        t = 0.5 + rng.expovariate(1 / change_every_s) if math.isfinite(change_every_s) else None
        while t is not None and t < seconds:
            events.append((t, "change", session))
            t += rng.expovariate(1 / change_every_s)
    if joiner_every_s:
        t, joiner_id = 2.0, players
        while t + joiner_plays_s < seconds:
            joiner = SimSession(joiner_id, clock, block_s, ready_s, jitter, rng)
            at = t + rng.random() * 0.48
            events += [(at, "join", joiner), (at + joiner_plays_s, "leave", joiner)]
            t, joiner_id = t + joiner_every_s, joiner_id + 1
    events.sort(key=lambda e: e[0])

    result = SimResult()
    latest: Dict[object, BlockRecord] = {}
    joined_at: Dict[object, float] = {}
    waiting = []  # key changes not shown yet: (time, player)
    steady_ids = {s.player_id for s in steady}
    while clock.now < seconds:
        while events and events[0][0] <= clock.now:
            at, kind, session = events.pop(0)
            if kind == "join":
                joined_at[session.player_id] = clock.now
                scheduler.join(session)
            elif kind == "leave":
                scheduler.leave(session)
            else:
                record = latest.get(session.player_id)
                if record is None:
                    continue
                splice = None
                if reactive:
                    shown_at = max(record.due, record.finish)
                    splice = scheduler.try_remake(session, shown_at, record.frames, record.block)
                if splice is not None:
                    result.granted += 1
                    result.press_to_shown_s.append(
                        max(shown_at + splice / VIDEO_FPS, clock.now) - at)
                else:
                    if reactive:
                        result.refused += 1
                    waiting.append((at, session.player_id))
        done = scheduler.step(timeout=0.0)
        if done is None:  # idle until the next start or event
            upcoming = [t for t in (scheduler.next_release(), events[0][0] if events else None)
                        if t is not None]
            clock.now = max(clock.now, min(upcoming)) if upcoming else seconds
            continue
        record, _ = done
        result.records.append(record)
        if record.remake is not None:
            continue
        latest[record.player] = record
        shown = max(record.due, record.finish)
        if record.block == 0 and record.player not in steady_ids:
            result.first_frame_s.append(shown - joined_at[record.player])
        for change in [c for c in waiting if c[1] == record.player and c[0] <= record.start]:
            waiting.remove(change)
            result.press_to_shown_s.append(shown - change[0])
    if joiner_every_s:
        result.late_blocks_of_others = sum(
            r.late for r in result.records if r.remake is None and r.player in steady_ids
            and r.block > 0)
    return result
