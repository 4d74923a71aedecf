"""The runner's old import path (`from wan.pipeline import StreamingBlockRunner`, as the README
once said): it lives in wan/serving/runner.py."""
from .serving.runner import BlockTiming, FlowMatchSchedule, StreamingBlockRunner  # noqa: F401
