"""Sessions and the deadline scheduler (wan/serving/scheduler.py) with a fake clock: deadlines and releases,
earliest deadline first, fairness, stalls and the report; and a real session's actions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import build_decoder, build_model
from wan.modules.optimized_causal_model import OptimizedCausalWanModel
from wan.modules.optimized_vae_decoder import OptimizedVAEDecoderWrapper
from wan.serving.runner import StreamingBlockRunner
from wan.modules.random_init import random_inputs
from wan.serving.scheduler import (BLOCK_FRAMES, VIDEO_FPS, DeadlineScheduler, PlayerSession, _held,
                         players_report)

PERIOD = BLOCK_FRAMES / VIDEO_FPS  # 0.48 s
ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        assert seconds > 0
        self.now += seconds


class FakeSession:
    """A player whose blocks take `block_s` seconds of the fake clock."""

    def __init__(self, player_id, clock, block_s):
        self.player_id, self.clock, self.block_s = player_id, clock, block_s
        self.blocks_done = 0

    def run_block(self):
        self.clock.now += self.block_s
        self.blocks_done += 1
        return None, None

    def run_remake(self, splice):  # a re-made block: the same work, the count stays
        self.clock.now += self.block_s
        return None, None


def _schedule(block_s, players, blocks=10, stagger=True):
    clock = FakeClock()
    sessions = [FakeSession(p, clock, block_s) for p in range(players)]
    records = DeadlineScheduler(sessions, clock=clock, sleep=clock.sleep,
                                synchronize=lambda: None).run(blocks, stagger=stagger)
    return records, players_report(records)


def test_players_within_capacity_hold_real_time_and_take_turns():
    records, report = _schedule(0.1, players=4)  # 4 x 100 ms per 480 ms period
    assert report["realtime"] and report["players"] == 4
    for player in report["per_player"].values():
        assert player["fps"] == pytest.approx(VIDEO_FPS, rel=1e-9)
        assert player["missed_deadlines"] == 0 and player["latency_p50_ms"] == pytest.approx(100)
        assert player["blocks"] == 10 and player["frames"] == 9 + 12 * 9
    # earliest deadline first: every round serves each player once, in the order they joined
    order = [r.player for r in records]
    assert order == [p for _ in range(10) for p in range(4)]
    for r in records:  # nothing starts before its release, a first block is due 0.36 s after
        assert r.start >= r.release - 1e-12  # its player joined (joins spread over a period)
    assert [r.due for r in records[:4]] == pytest.approx([0.36 + p * PERIOD / 4 for p in range(4)])


def test_players_joining_at_once_stall_once_then_hold():
    """Four first blocks of 100 ms take longer than the 0.36 s the first one may take: the
    fourth player's picture stalls 40 ms once, then every deadline is met."""
    records, report = _schedule(0.1, players=4, stagger=False)
    assert report["per_player"]["3"]["missed_deadlines"] == 1
    assert report["per_player"]["0"]["missed_deadlines"] == 0
    assert report["per_player"]["3"]["fps"] == pytest.approx(117 / (0.4 + 9 * PERIOD))


def test_over_capacity_every_player_slows_down_alike():
    _, report = _schedule(0.1, players=6)  # 600 ms of work per 480 ms period
    fps = [p["fps"] for p in report["per_player"].values()]
    assert not report["realtime"] and max(fps) < 0.95 * VIDEO_FPS
    assert max(fps) - min(fps) < 0.05 * max(fps)  # fair: nobody is starved
    assert all(p["missed_deadlines"] > 0 for p in report["per_player"].values())
    # the throughput bound: 12 frames per 0.6 s round
    assert sum(fps) == pytest.approx(6 * 12 / 0.6, rel=0.1)


def test_an_idle_gpu_waits_for_the_next_release():
    records, report = _schedule(0.05, players=1, blocks=3)
    assert [round(r.start, 6) for r in records] == [0.0, 0.36, 0.84]
    assert report["per_player"]["0"]["wait_p95_ms"] == pytest.approx(0.0, abs=1e-6)


def test_actions_are_held_when_the_player_sent_too_few():
    history = torch.tensor([[[1.0], [2.0]]])
    assert _held(history, 4).flatten().tolist() == [1.0, 2.0, 2.0, 2.0]
    assert _held(history, 1).flatten().tolist() == [1.0]
    assert _held(history[:, :0], 2).flatten().tolist() == [0.0, 0.0]


@torch.no_grad()
def test_session_feeds_the_runner_the_received_actions():
    """A session's blocks equal the runner's blocks on the same conditions, noise and actions (the
    last received action held where the player sent too few steps)."""
    latent = (8, 16)
    dit = build_model(cls=OptimizedCausalWanModel)
    inputs = random_inputs(dit, latent, 3, 3, seed=1)
    mouse, keyboard = inputs["mouse_cond"], inputs["keyboard_cond"]

    def runner(**kwargs):
        return StreamingBlockRunner(dit, build_decoder(OptimizedVAEDecoderWrapper, torch.float32),
                                    latent_hw=latent, **kwargs)

    session = PlayerSession("a", runner(), inputs["visual_context"], inputs["cond_concat"], seed=7,
                            mouse_dim=2, keyboard_dim=keyboard.shape[2])
    session.receive(mouse[:, :9], keyboard[:, :9])  # block 0 reads steps [0, 9)
    first, _ = session.run_block()
    session.receive(mouse[:, 9:16], keyboard[:, 9:16])  # block 1 reads 21: 5 are held
    second, _ = session.run_block()
    assert first.shape[1] == 9 and second.shape[1] == 12

    again = runner(generator=torch.Generator().manual_seed(7))
    again.start(inputs["visual_context"])
    expected_first, _ = again.block(inputs["cond_concat"], mouse[:, :9], keyboard[:, :9])
    expected_second, _ = again.block(inputs["cond_concat"], _held(mouse[:, :16], 21),
                                     _held(keyboard[:, :16], 21))
    assert torch.equal(first, expected_first) and torch.equal(second, expected_second)


def test_torchrun_over_two_cpu_processes_gives_each_player_the_same_frames(tmp_path):
    """4 players served by one process, then by 2 processes under torchrun (gloo): every
    player's frames are the same (one thread per process in both runs: the same summation order),
    and rank 0 reports all four players."""
    # CPU processes on any machine (a one-GPU machine has no cuda:1 for rank 1)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = ["-m", "wan.serve", "--players", "4", "--blocks", "2"]
    alone, together = tmp_path / "alone.pt", tmp_path / "torchrun.pt"
    subprocess.run([sys.executable, *command, "--frames-out", str(alone)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    *command, "--frames-out", str(together), "--out", str(report)], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    expected, got = torch.load(alone), torch.load(together)
    assert sorted(got) == sorted(expected) == [0, 1, 2, 3]
    for player in expected:
        assert got[player].shape[1] == 9 + 12
        assert ((got[player] - expected[player]).norm() / expected[player].norm()) < 1e-6
    summary = json.loads(report.read_text())
    assert summary["processes"] == 2
    assert [r[0]["players"] for r in summary["runs_per_rank"]] == [2, 2]
