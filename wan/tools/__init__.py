"""The command line tools: `integrate.py` (install into a Matrix-Game-2 checkout and undo),
`compare.py` (what a precision costs in accuracy on one's own weights), `serve.py` (several players
per device, benchmark and sweep). Run them as `python -m wan.integrate`, `python -m wan.compare`,
`python -m wan.serve` (wan/integrate.py, ... are those command names)."""
