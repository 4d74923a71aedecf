#!/usr/bin/env bash
# The main job, with random weights (GPU: universal bf16; CPU: tiny fp32):
# 1. benchmarks/stream.py: the DiT's streaming forward, reference vs optimized (extra arguments go
#    here; see --help);
# 2. benchmarks/end_to_end.py: time to screen per block (3 denoising forwards, decode to video
#    frames, cache update), upstream-equivalent reference vs optimized.
# The reports: `--out X.json` writes X.json (+ X.png) and X_end_to_end.json (+ .png); without
# --out they go to demo_results/DATE_TIME/stream.json (+ .png, + stream_end_to_end.json, .png),
# a new folder each run, named in the log.
source "$(dirname "$0")/env.sh"
for arg in "$@"; do
    if [ "$arg" = -h ] || [ "$arg" = --help ]; then
        "$PYTHON" benchmarks/stream.py --help
        echo
        echo "then, with --out and --device passed on: benchmarks/end_to_end.py"
        echo "(without --out the reports go to demo_results/DATE_TIME/)"
        exec "$PYTHON" benchmarks/end_to_end.py --help
    fi
done
stream_args=("$@")
out=""
for arg in "$@"; do
    case "$arg" in --out|--out=*) out=given ;; esac
done
if [ -z "$out" ]; then
    folder="demo_results/$(date +%Y-%m-%d_%H%M%S)"
    mkdir -p "$folder"
    stream_args+=(--out "$folder/stream.json")
    echo "demo.sh: writing the reports (JSON and PNG) to $ROOT/$folder/" >&2
fi
"$PYTHON" benchmarks/stream.py "${stream_args[@]}"
e2e_args=()
set -- "${stream_args[@]}"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) e2e_args+=(--out "${2%.json}_end_to_end.json"); shift ;;
        --out=*) out="${1#--out=}"; e2e_args+=(--out "${out%.json}_end_to_end.json") ;;
        --device|--device=*) e2e_args+=("$1"); [ "$1" = --device ] && { e2e_args+=("$2"); shift; } ;;
    esac
    shift
done
"$PYTHON" benchmarks/end_to_end.py "${e2e_args[@]}"
if [ -n "${folder:-}" ]; then
    echo "demo.sh: the reports are in $ROOT/$folder/: $(cd "$folder" && ls | tr '\n' ' ')" >&2
fi
