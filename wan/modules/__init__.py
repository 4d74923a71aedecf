from .action_module import ActionModule
from .causal_model import CausalWanModel
from .checkpoint import CheckpointMismatchError

__all__ = ["ActionModule", "CausalWanModel", "CheckpointMismatchError"]
