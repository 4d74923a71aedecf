"""`python -m wan.integrate`: the command's name. The tool itself is wan/tools/integrate.py."""
from .tools.integrate import main

if __name__ == "__main__":
    main()
