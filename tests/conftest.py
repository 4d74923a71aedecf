import sys
from pathlib import Path

# the helper modules beside the tests (helpers.py, golden_runner.py) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
