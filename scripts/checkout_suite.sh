#!/usr/bin/env bash
# The seed's suite inside a Matrix-Game-2 checkout that `python -m wan.integrate` set up, on any
# machine, flash_attn or not:
#
#   bash scripts/checkout_suite.sh PATH/TO/Matrix-Game-2 [correctness|benchmark|compare|all]
#
# It runs the checkout's own ./tests/run_tests.sh (default: all) with the interpreter $PYTHON
# (default: python3 on PATH), and with the stand-ins of tests/checkout/standins.py for what that
# machine lacks and only that: flash_attn (through torch SDPA), a torchvision whose build does not
# fit the installed torch (an empty module tree), and on a machine without CUDA
# torch.cuda.current_device and upstream's CUDA-only attention entry points (exact SDPA). On a GPU
# machine with upstream's requirements installed it adds nothing. First it checks, and stops with
# one line and exit status 2 otherwise: that the checkout is integrated (python -m wan.integrate
# --status) and that upstream's modules import (upstream's requirements.txt installed; on a CPU
# all but flash_attn).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STANDINS="$ROOT/tests/checkout"
say() { echo "checkout_suite.sh: $*" >&2; }
usage="usage: bash scripts/checkout_suite.sh PATH/TO/Matrix-Game-2 [correctness|benchmark|compare|all]"
[ $# -ge 1 ] && [ $# -le 2 ] || { say "$usage"; exit 2; }
case "${2:-all}" in
    correctness|benchmark|compare|all) MODE="${2:-all}" ;;
    *) say "unknown mode '$2'; $usage"; exit 2 ;;
esac
[ -d "$1" ] || { say "$1 is not a folder; $usage"; exit 2; }
CHECKOUT="$(cd "$1" && pwd)"
PYTHON="$(command -v "${PYTHON:-python3}" || true)"
[ -n "$PYTHON" ] || { say "no ${PYTHON:-python3} on PATH (set PYTHON to an interpreter with torch)"; exit 2; }

"$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" \
    || { say "$PYTHON has no torch: set PYTHON to the interpreter that has upstream's requirements"; exit 2; }
errors="$(mktemp)"
trap 'rm -f "$errors"' EXIT

# 1. integrated? (this repository's wan, from its root)
state="$(cd "$ROOT" && "$PYTHON" - "$CHECKOUT" 2>"$errors" <<'EOF'
import sys
from pathlib import Path
from wan.tools.integrate import status
try:
    print(status(Path(sys.argv[1]), out=lambda line: None))
except SystemExit as err:
    print(f"error {err.code}")
EOF
)" || { say "python -m wan.integrate --status failed with $PYTHON: $(tail -n 1 "$errors")"; exit 2; }
case "$state" in
    installed) ;;
    edited) say "note: files installed into $CHECKOUT were edited since (python -m wan.integrate --status $CHECKOUT); running the suite on them" ;;
    clean) say "$CHECKOUT is not integrated: run \`python -m wan.integrate $CHECKOUT\` from $ROOT first"; exit 2 ;;
    incomplete) say "an install into $CHECKOUT stopped part-way: run \`python -m wan.integrate --undo $CHECKOUT\`, then install again"; exit 2 ;;
    error*) say "${state#error }"; exit 2 ;;
    *) say "unexpected state from wan.integrate --status: $state"; exit 2 ;;
esac

# 2. upstream's modules import, with the stand-ins this machine needs (the checkout's wan)
standins="$(cd "$CHECKOUT" && PYTHONPATH="$STANDINS" "$PYTHON" - "$CHECKOUT" 2>"$errors" <<'EOF'
import importlib.util, sys
sys.path.insert(0, sys.argv[1])
# what upstream's wan package and the seed's suite import (pip names where they differ)
needed = {"torch": "torch", "numpy": "numpy", "pytest": "pytest", "einops": "einops",
          "diffusers": "diffusers", "transformers": "transformers", "easydict": "easydict",
          "ftfy": "ftfy", "regex": "regex", "PIL": "pillow", "safetensors": "safetensors"}
missing = [pip for name, pip in needed.items() if importlib.util.find_spec(name) is None]
if missing:
    print(f"error {' '.join(missing)}")
    sys.exit()
import standins
try:
    used = standins.install()
    import wan.modules.causal_model, wan.modules.optimized_causal_model  # noqa: F401
except ModuleNotFoundError as err:
    print(f"error {err.name}")
    sys.exit()
except Exception as err:  # a dependency that is there but does not import
    print(f"broken {type(err).__name__}: {' '.join(str(err).split())}")
    sys.exit()
print(", ".join(used) or "none")
EOF
)" || { say "$PYTHON could not import upstream's modules in $CHECKOUT: $(tail -n 1 "$errors")"; exit 2; }
if [ "${standins#error }" != "$standins" ]; then
    say "$PYTHON lacks upstream's Python dependencies: ${standins#error }; install upstream's requirements (\`$PYTHON -m pip install -r $CHECKOUT/requirements.txt\`; on a CPU, where flash_attn does not build, at least \`$PYTHON -m pip install ${standins#error }\`: the stand-in covers flash_attn)"
    exit 2
fi
if [ "${standins#broken }" != "$standins" ]; then
    say "upstream's modules do not import in $CHECKOUT with $PYTHON: ${standins#broken }"
    exit 2
fi
say "running $CHECKOUT/tests/run_tests.sh $MODE with $PYTHON; stand-ins: $standins"

# 3. the seed's runner, its pytest the same interpreter, the stand-ins as a pytest plugin
shim="$(mktemp -d)"
trap 'rm -rf "$shim" "$errors"' EXIT
printf '#!/bin/sh\nexec "%s" -m pytest "$@"\n' "$PYTHON" > "$shim/pytest"
chmod +x "$shim/pytest"
cd "$CHECKOUT"
PATH="$shim:$PATH" PYTHONPATH="$STANDINS" PYTEST_ADDOPTS="-p standins ${PYTEST_ADDOPTS:-}" \
    ./tests/run_tests.sh "$MODE"
