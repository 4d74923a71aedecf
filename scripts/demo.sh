#!/usr/bin/env bash
# The main job, with random weights (GPU: universal bf16; CPU: tiny fp32):
# 1. benchmarks/stream.py: the DiT's streaming forward, reference vs optimized (extra arguments go
#    here; see --help);
# 2. benchmarks/end_to_end.py: time to screen per block (3 denoising forwards, decode to video
#    frames, cache update), upstream-equivalent reference vs optimized. With `--out X.json` its
#    report goes to X_end_to_end.json (+ .png).
source "$(dirname "$0")/env.sh"
for arg in "$@"; do
    if [ "$arg" = -h ] || [ "$arg" = --help ]; then
        "$PYTHON" benchmarks/stream.py --help
        echo
        echo "then, with --out and --device passed on: benchmarks/end_to_end.py"
        exec "$PYTHON" benchmarks/end_to_end.py --help
    fi
done
"$PYTHON" benchmarks/stream.py "$@"
e2e_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) e2e_args=(--out "${2%.json}_end_to_end.json"); shift ;;
        --out=*) out="${1#--out=}"; e2e_args=(--out "${out%.json}_end_to_end.json") ;;
        --device|--device=*) e2e_args+=("$1"); [ "$1" = --device ] && { e2e_args+=("$2"); shift; } ;;
    esac
    shift
done
exec "$PYTHON" benchmarks/end_to_end.py "${e2e_args[@]}"
