"""Which modules of which architecture a method replaces, and the replace / restore logic.
Nothing here knows about kernels. Importing this package registers the built-in methods."""
# importing the method files registers their methods
from . import (  # noqa: F401
    bottleneck_methods,
    fishmask_methods,
    freeze_methods,  # last_n, bitfit
    ia3_methods,
    krona_methods,
    ladder_methods,
    lowrank_methods,
    prefix_methods,
    prompt_methods,
)
from .adapters import (
    active_adapter,
    add_adapter,
    delete_adapter,
    disable_adapter,
    list_adapters,
    merge_adapter,
    set_adapter,
    unmerge_adapter,
)
from .checkpoint import load_adapter, save_adapter
from .core import PatchContext, is_patched, merge, patch, summary, unpatch
from .peft_convert import from_peft, to_peft
from .peft_format import NoPeftEquivalent, peft_adapter_files
from .pretrained import from_pretrained, save_pretrained
from .registry import get_method, known_methods, register_method

__all__ = ["patch", "unpatch", "merge", "summary", "is_patched", "save_adapter", "load_adapter",
           "save_pretrained", "from_pretrained", "register_method", "known_methods", "get_method", "PatchContext",
           "add_adapter", "set_adapter", "delete_adapter", "active_adapter", "list_adapters", "disable_adapter",
           "merge_adapter", "unmerge_adapter", "from_peft", "to_peft", "peft_adapter_files", "NoPeftEquivalent"]
