"""`python -m wan.compare`: the command wan/tools/compare.py (what a precision costs in accuracy on
one's own weights)."""
from .tools.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
