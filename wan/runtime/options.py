"""The options given to the optimized DiT, for the decoder built beside it.

In a Matrix-Game-2 checkout a user sets the options in the model's config.json (diffusers'
`from_config` hands them to OptimizedCausalWanModel as keywords), while upstream's scripts build
the decoder with no arguments at all (`VAEDecoderWrapper()`). So the DiT publishes the options it
was given here, and an OptimizedVAEDecoderWrapper given none of its own follows them, resolved at
its first call (the DiT is built first in upstream's scripts, but need not be). Order per option:
the decoder's own keyword, then the DiT's (config.json or keyword), then the environment
(WAN_CUDA_GRAPHS, WAN_BACKEND), then the defaults. The last DiT built wins. A DiT backend that
cannot run the decoder's ops on its device and dtype is not followed (said in the log); one
asked for by the decoder's own keyword or WAN_BACKEND is an error, as for the DiT.
"""
from typing import Optional

_given = {"cuda_graphs": None, "backend": None}


def publish_model_options(cuda_graphs: Optional[bool] = None, backend=None) -> None:
    """Record what the DiT was given (None: nothing, the environment and defaults then apply)."""
    _given["cuda_graphs"] = cuda_graphs
    _given["backend"] = backend


def model_options() -> dict:
    """{'cuda_graphs': ..., 'backend': ...} as the last optimized DiT was given them."""
    return dict(_given)
