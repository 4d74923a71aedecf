"""`python -m wan.play`: the command wan/tools/play.py (the browser game server)."""
from ..tools.play import main

if __name__ == "__main__":
    raise SystemExit(main())
