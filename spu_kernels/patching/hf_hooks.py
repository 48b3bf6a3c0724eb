"""What ``patch`` hooks into a model beside its modules: PEFT detection and ``save_pretrained``.

* ``refuse_peft(model)``: ``patch`` on a PeftModel, or on a model holding PEFT tuner layers, fails
  before anything changes (the two would wrap the same layers); ``spu_kernels.from_peft`` converts.
* ``install_save_pretrained`` / ``remove_save_pretrained``: while patched, a transformers model's
  ``save_pretrained`` (also what ``Trainer.save_model`` and its checkpoints call) writes an adapter
  folder (``spu_kernels.save_pretrained``) instead of the whole model under wrapped names.
  It is an instance attribute (a bound method, so ``copy.deepcopy`` rebinds it to the copy);
  ``unpatch`` / ``merge`` remove it and the class's method applies again.

Nothing here imports the core (the core imports this file).
"""
from __future__ import annotations

import sys
import types

import torch.nn as nn


def peft_layers(model: nn.Module) -> list[str]:
    """Names of the PEFT tuner layers (LoRA, IA3, LoKr, ...) in ``model`` ("" for a PeftModel itself)."""
    peft = sys.modules.get("peft")   # PEFT objects exist only where peft was imported
    if peft is None:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer
    out = [""] if isinstance(model, getattr(peft, "PeftModel", ())) else []
    return out + [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def refuse_peft(model: nn.Module, what: str = "patch") -> None:
    found = peft_layers(model)
    if found:
        where = "a PeftModel" if found[0] == "" else f"PEFT tuner layers ({', '.join(found[:3])}, ...)"
        raise TypeError(f"spu_kernels.{what}: this model is {where}; spu_kernels cannot patch or save over PEFT's "
                        "layers. Convert it with spu_kernels.from_peft(model) (same tensors, spu's fused modules), "
                        "or use PEFT's own API on it")


def _save_pretrained(self: nn.Module, save_directory, **kwargs):
    """spu_kernels.save_pretrained(self, ...): the adapter folder, not the whole model."""
    from .pretrained import save_pretrained
    return save_pretrained(self, save_directory, **kwargs)


def install_save_pretrained(model: nn.Module) -> None:
    """Route ``model.save_pretrained`` to ``spu_kernels.save_pretrained`` (transformers models only)."""
    if callable(getattr(type(model), "save_pretrained", None)) and hasattr(model, "config"):
        model.save_pretrained = types.MethodType(_save_pretrained, model)


def remove_save_pretrained(model: nn.Module) -> None:
    hook = model.__dict__.get("save_pretrained")
    if getattr(hook, "__func__", None) is _save_pretrained:
        del model.__dict__["save_pretrained"]
