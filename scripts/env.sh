# Sourced by the other scripts: sets PYTHON to an interpreter that has everything the project needs.
# Uses the machine's python3 when it already has torch and the other dependencies (a GPU machine
# with its own CUDA torch); otherwise makes .venv and installs into it (CPU torch 2.13.0 first, so
# pip takes the local CPU build rather than downloading a CUDA one).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NEEDED="import torch, numpy, safetensors, einops, omegaconf, pytest"
if python3 -c "$NEEDED" 2>/dev/null; then
    PYTHON=python3
else
    if [ ! -x "$ROOT/.venv/bin/python" ]; then
        echo "setting up $ROOT/.venv" >&2
        python3 -m venv "$ROOT/.venv"
    fi
    PYTHON="$ROOT/.venv/bin/python"
    if ! "$PYTHON" -c "$NEEDED" 2>/dev/null; then
        "$PYTHON" -m pip install -q --upgrade pip
        "$PYTHON" -m pip install -q torch==2.13.0
        "$PYTHON" -m pip install -q -e "$ROOT[test]"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
