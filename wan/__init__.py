"""wan: a fast, drop-in CausalWanModel for Matrix-Game-2.0."""
from .modules.causal_model import CausalWanModel

__all__ = ["CausalWanModel"]
__version__ = "0.1.0"
