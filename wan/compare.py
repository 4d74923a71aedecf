"""`python -m wan.compare`: the command's name. The tool itself is wan/tools/compare.py."""
from .tools.compare import main

if __name__ == "__main__":
    main()
