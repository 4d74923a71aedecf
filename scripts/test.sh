#!/usr/bin/env bash
# The test suite, or part of it:
#   bash scripts/test.sh                         # all of tests/ (pyproject.toml's testpaths)
#   bash scripts/test.sh tests/play              # just those paths (folders, files, node ids)
#   bash scripts/test.sh tests/play/test_play.py tests/serving/test_remake.py
#   bash scripts/test.sh -k decoder -x           # options go to pytest
# On a machine without CUDA the GPU tests skip. Paths may be given from any folder.
CALLER="$PWD"
source "$(dirname "$0")/env.sh"   # sets PYTHON; cd to the repository root
args=()
for arg in "$@"; do
    path="${arg%%::*}"
    # a path given relative to the caller's folder (not an option): the same path from the root
    if [ "${arg#-}" = "$arg" ] && [ "${path#/}" = "$path" ] && [ -e "$CALLER/$path" ]; then
        arg="$CALLER/$arg"
    fi
    args+=("$arg")
done
# no path: pytest runs testpaths (tests/); paths: just those
exec "$PYTHON" -m pytest -q -rs "${args[@]}"
