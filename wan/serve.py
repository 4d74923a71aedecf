"""`python -m wan.serve`: the command's name. The tool itself is wan/tools/serve.py."""
from .tools.serve import main

if __name__ == "__main__":
    main()
