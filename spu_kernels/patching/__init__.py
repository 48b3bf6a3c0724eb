"""Which modules of which architecture a method replaces, and the replace / restore logic.
Nothing here knows about kernels. Importing this package registers the built-in methods."""
# importing the method files registers their methods
from . import (  # noqa: F401
    freeze_methods,  # last_n, bitfit
    ia3_methods,
    krona_methods,
    ladder_methods,
    lowrank_methods,
    prompt_methods,
)
from .checkpoint import load_adapter, save_adapter
from .core import PatchContext, is_patched, merge, patch, summary, unpatch
from .registry import get_method, known_methods, register_method

__all__ = ["patch", "unpatch", "merge", "summary", "is_patched", "save_adapter", "load_adapter",
           "register_method", "known_methods", "get_method", "PatchContext"]
