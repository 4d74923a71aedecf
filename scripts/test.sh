#!/usr/bin/env bash
# The test suite. On a machine without CUDA the GPU tests skip; extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
exec "$PYTHON" -m pytest -q -rs tests "$@"
