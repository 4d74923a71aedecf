import os
import sys
from pathlib import Path

import torch

# tests/ mirrors the package (kernels/, runtime/, modules/, serving/, play/, tools/; the seed's suite,
# the docs and seed-command tests at the top). The folders have no __init__.py: pytest's default
# import mode imports each test file by its name with its folder on sys.path, so test file names
# are unique across folders, and a test file imports one beside it by name (test_remake.py:
# `from test_serving import ...`). The helper modules here (helpers.py, golden_runner.py,
# proxy_nginx.py) import as top-level modules from every folder:
sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU, Triton kernels run in Triton's interpreter. It is chosen when a kernel is defined,
# so it is set before anything imports them; `auto` never picks the interpreter (tests name it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_dit_options_from_earlier_tests():
    """A decoder given no options follows the last optimized DiT built in the process
    (wan/runtime/options.py): each test starts as a fresh process would."""
    from wan.runtime.options import publish_model_options
    publish_model_options()
    yield
