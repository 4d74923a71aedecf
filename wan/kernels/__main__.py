"""`python -m wan.kernels`: the same listing as `python -m wan.ops` (wan/ops/__main__.py)."""
from ..ops.__main__ import main

if __name__ == "__main__":
    main()
