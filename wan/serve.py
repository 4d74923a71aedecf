"""`python -m wan.serve`: the command wan/tools/serve.py (several players per device; benchmark and
sweep)."""
from .tools.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
