#!/bin/bash
# The seed's test runner: ./tests/run_tests.sh [correctness|benchmark|compare|all|help]
# Works from this repository and from a Matrix-Game-2 checkout that `python -m wan.integrate` set up.
set -e
cd "$(dirname "$0")/.."

# pytest from PATH, as the seed runs it; otherwise this repository's environment
if command -v pytest >/dev/null 2>&1; then
    PYTEST=(pytest)
elif [ -x .venv/bin/python ]; then
    PYTEST=(.venv/bin/python -m pytest)
else
    PYTEST=(python3 -m pytest)
fi
SUITE=tests/test_causal_wan_model.py::TestCausalWanModel

case "${1:-all}" in
    correctness)
        echo "Running correctness tests..."
        "${PYTEST[@]}" "$SUITE::test_forward_correctness" -v -s
        "${PYTEST[@]}" "$SUITE::test_forward_with_kv_cache" -v -s
        ;;
    benchmark)
        echo "Running performance benchmark..."
        "${PYTEST[@]}" "$SUITE::test_performance_benchmark" -v -s
        echo "Baseline saved to tests/baseline_performance.txt"
        cat tests/baseline_performance.txt
        ;;
    compare)
        echo "Running model comparison..."
        "${PYTEST[@]}" "$SUITE::test_model_comparison" -v -s
        ;;
    all)
        echo "Running all tests..."
        "${PYTEST[@]}" tests/test_causal_wan_model.py -v -s
        ;;
    help)
        echo "Usage: ./tests/run_tests.sh [correctness|benchmark|compare|all|help]"
        echo "  correctness  test_forward_correctness and test_forward_with_kv_cache"
        echo "  benchmark    test_performance_benchmark (writes tests/baseline_performance.txt)"
        echo "  compare      test_model_comparison (original vs OptimizedCausalWanModel)"
        echo "  all          the whole suite (default)"
        ;;
    *)
        echo "Unknown test type: $1 (./tests/run_tests.sh help)" >&2
        exit 1
        ;;
esac
