"""`python -m wan.kernels`: the command wan/tools/kernels.py (every op's backends, whether each
can run here, what the selection picks)."""
from ..tools.kernels import main

if __name__ == "__main__":
    raise SystemExit(main())
