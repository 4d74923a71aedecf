#!/usr/bin/env bash
# The play server: python -m wan.play with everything set up (see scripts/env.sh), arguments passed
# on (--help lists them). Installs the server's own dependencies (the `play` extra: starlette,
# uvicorn, websockets, pillow, prometheus-client) into that Python when they are missing.
source "$(dirname "$0")/env.sh"
if ! "$PYTHON" -c "import starlette, uvicorn, websockets, PIL, prometheus_client" 2>/dev/null; then
    echo "installing the play server's dependencies into $PYTHON (pip install '.[play]')" >&2
    "$PYTHON" -m pip install -q -e "$ROOT[play]"
fi
exec "$PYTHON" -m wan.play "$@"
