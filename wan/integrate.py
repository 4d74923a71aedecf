"""`python -m wan.integrate`: the command wan/tools/integrate.py (install into a Matrix-Game-2
checkout, and undo)."""
from .tools.integrate import main

if __name__ == "__main__":
    raise SystemExit(main())
