"""Prometheus metrics of the play server (GET /metrics, text format): one registry per server."""
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MS_BUCKETS = (5, 10, 20, 40, 60, 80, 100, 120, 150, 200, 250, 300, 400, 500, 750, 1000, 2000, 5000)


class PlayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.players = Gauge("wan_play_players", "players connected", registry=r)
        self.capacity = Gauge("wan_play_capacity", "players admitted at most", registry=r)
        self.session_fps = Gauge("wan_play_session_fps", "frames per second delivered, last 5 s",
                                 ["session"], registry=r)
        self.block_ms = Histogram("wan_play_block_ms", "block time: start to frames ready (ms)",
                                  buckets=MS_BUCKETS, registry=r)
        self.wait_ms = Histogram("wan_play_queue_wait_ms",
                                 "time a released block waited for the GPU (ms)",
                                 buckets=MS_BUCKETS, registry=r)
        self.encode_ms = Histogram("wan_play_encode_ms", "JPEG encoding of one block (ms)",
                                   buckets=MS_BUCKETS, registry=r)
        self.press_to_frame_ms = Histogram(
            "wan_play_press_to_frame_ms",
            "server side: newest input received to its block's frames handed to the sender (ms)",
            buckets=MS_BUCKETS, registry=r)
        self.blocks = Counter("wan_play_blocks", "blocks generated", registry=r)
        self.late_blocks = Counter("wan_play_late_blocks", "blocks that missed their deadline",
                                   registry=r)
        self.frames_sent = Counter("wan_play_frames_sent", "frames sent to clients", registry=r)
        self.frames_dropped = Counter("wan_play_frames_dropped",
                                      "frames dropped for slow clients", registry=r)
        self.rejected = Counter("wan_play_rejected_messages", "client messages refused",
                                ["reason"], registry=r)
        self.refused_players = Counter("wan_play_refused_players", "players refused: server full",
                                       registry=r)
        self.device_memory = Gauge("wan_play_device_memory_bytes",
                                   "device memory held by tensors", registry=r)
        self.remakes = Counter("wan_play_remakes", "re-makes of the block on screen after an "
                               "input change (reactive play), by the scheduler's decision",
                               ["decision"], registry=r)
        self.first_frame_ms = Histogram(
            "wan_play_time_to_first_frame_ms",
            "from a join, a new game or an upload arriving to its first frames encoded (ms)",
            ["after"], buckets=MS_BUCKETS, registry=r)
        self.captures = Gauge("wan_play_graph_captures_while_serving",
                              "CUDA graphs captured after start-up (player slots are captured "
                              "before serving: 0 is the design)", registry=r)

    def remake_decided(self, granted: bool):
        self.remakes.labels("granted" if granted else "refused").inc()

    def first_frame(self, after: str, ms: float):
        self.first_frame_ms.labels(after).observe(ms)

    def block_done(self, player, batch):
        # once per block (a block sent in parts: at its first part); a re-made block's
        # lateness is a splice's, not a stall
        if not batch.remake and batch.first_frame == 0:
            self.blocks.inc()
            self.block_ms.observe(batch.block_ms)
            self.wait_ms.observe(batch.wait_ms)
            if batch.late:
                self.late_blocks.inc()
        self.encode_ms.observe(batch.encode_ms)
        # the first frames that reflect a new input: from that input's arrival to these frames
        if batch.input_received is not None and batch.input_id > player.measured_input:
            player.measured_input = batch.input_id
            self.press_to_frame_ms.observe(1e3 * (batch.encoded - batch.input_received))
        self.session_fps.labels(str(player.id)).set(player.fps(time.perf_counter()))

    def forget(self, player):
        try:
            self.session_fps.remove(str(player.id))
        except KeyError:
            pass

    def render(self, engine) -> bytes:
        self.players.set(engine.player_count())
        self.capacity.set(engine.capacity or 0)
        self.device_memory.set(engine.device_memory())
        self.captures.set(engine.captures_while_serving())
        return generate_latest(self.registry)
