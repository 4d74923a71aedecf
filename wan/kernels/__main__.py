"""`python -m wan.kernels`: for every op, its backends, whether each can run here (or why not),
and what the selection picks. The tool is wan/tools/backends.py."""
from ..tools.backends import main

if __name__ == "__main__":
    main()
