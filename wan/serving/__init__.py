"""What a player needs, above the models: `runner.py` (one player's stream of blocks: denoising
steps, decoding, the cache update) and `scheduler.py` (several players' sessions on one device and
the deadline scheduler that orders their blocks). The command line tool over them is `wan.serve`;
the browser game server is `wan.play`.

`from wan.serving import DeadlineScheduler` (the path the README gave) keeps working."""
from .runner import FlowMatchSchedule, NonFiniteOutputError, StreamingBlockRunner
from .scheduler import (BLOCK_FRAMES, PERIOD_S, REALTIME_FPS, VIDEO_FPS, BlockRecord,
                        DeadlineScheduler, PlayerSession, percentile, players_report)

__all__ = ["BLOCK_FRAMES", "PERIOD_S", "REALTIME_FPS", "VIDEO_FPS", "BlockRecord",
           "DeadlineScheduler", "FlowMatchSchedule", "NonFiniteOutputError", "PlayerSession",
           "StreamingBlockRunner", "percentile", "players_report"]
