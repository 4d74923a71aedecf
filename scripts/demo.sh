#!/usr/bin/env bash
# The main job: a streaming benchmark with random weights (GPU: universal bf16; CPU: tiny fp32).
# Extra arguments go to benchmarks/stream.py (see --help).
source "$(dirname "$0")/env.sh"
exec "$PYTHON" benchmarks/stream.py "$@"
