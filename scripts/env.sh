# Sourced by the other scripts: sets PYTHON to an interpreter that has everything the project needs,
# and says on stderr (one line) which one and why.
#   1. python3 has torch and every other dependency: use it (a GPU machine with its own CUDA torch).
#   2. python3 has a CUDA torch but lacks other dependencies: install just those into python3 with
#      pip (saying so), never a CPU venv beside it, which would silently swap the GPU torch for a
#      CPU one; if pip cannot install them, stop with a message naming what is missing and the fix.
#   3. otherwise (no torch, or a CPU-only torch): make .venv and install into it, CPU torch 2.13.0
#      first (so pip takes the CPU build rather than downloading a CUDA one), then `-e .[test,plot]`
#      (plot: matplotlib, for the PNG the benchmarks write beside a --out report).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODULES="torch numpy safetensors einops omegaconf pytest matplotlib"   # import names = pip names here
missing_in() {  # the modules of $MODULES that interpreter $1 cannot import
    "$1" -c "import importlib.util, sys
print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" $MODULES 2>/dev/null \
        || echo "$MODULES"
}
cuda_torch_in() {  # the CUDA version of interpreter $1's torch; fails for no torch or a CPU build
    "$1" -c "import sys, torch; v = torch.version.cuda; print(v) if v else sys.exit(1)" 2>/dev/null
}

if command -v python3 >/dev/null; then MISSING="$(missing_in python3)"; else MISSING="$MODULES"; fi
if [ -z "$MISSING" ]; then
    PYTHON=python3
    echo "env.sh: using $(command -v python3): it has torch and every dependency" >&2
elif CUDA="$(cuda_torch_in python3)"; then
    echo "env.sh: python3 ($(command -v python3)) has CUDA torch (CUDA $CUDA) but lacks: $MISSING;" \
         "installing them into it with pip (not a CPU venv: that would replace the GPU torch)" >&2
    if ! python3 -m pip install -q $MISSING; then
        echo "env.sh: could not install $MISSING into python3. Install them yourself" \
             "(python3 -m pip install $MISSING, or your system's packages), or set up another" \
             "Python that has CUDA torch and them; stopping rather than running on a CPU torch." >&2
        return 1 2>/dev/null || exit 1
    fi
    PYTHON=python3
else
    if [ ! -x "$ROOT/.venv/bin/python" ]; then
        echo "env.sh: python3 has no torch with CUDA and lacks: $MISSING; setting up $ROOT/.venv" \
             "(CPU torch 2.13.0)" >&2
        python3 -m venv "$ROOT/.venv"
    fi
    PYTHON="$ROOT/.venv/bin/python"
    if [ -n "$(missing_in "$PYTHON")" ]; then
        echo "env.sh: installing torch==2.13.0 and the project (-e .[test,plot]) into $ROOT/.venv" >&2
        "$PYTHON" -m pip install -q --upgrade pip
        "$PYTHON" -m pip install -q torch==2.13.0
        "$PYTHON" -m pip install -q -e "$ROOT[test,plot]"
    fi
    echo "env.sh: using $PYTHON (.venv: python3 lacks a CUDA torch or dependencies)" >&2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
