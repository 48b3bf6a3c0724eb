"""The contract of a module that ``spu_kernels.patch`` puts in a model's place (PEFT's equivalent:
``BaseTunerLayer``).

A method (spu_kernels/patching/*_methods.py) replaces a model's module M with an ``AdapterModule``
A that wraps it (``A.base_layer``, or a property naming it); the core (patching/core.py) relies
on nothing else:
  * ``adapter_parameters()`` names what the method trains;
  * ``unpatch`` calls ``restore()`` and puts M back, so M must then be bit for bit what it was;
  * ``merge`` refuses the whole model, before anything changes, when any module's ``merge_error``
    is set; otherwise it puts each ``merge()`` result in the module's place.
"""
from __future__ import annotations

from typing import Iterator

import torch.nn as nn


class AdapterModule(nn.Module):
    """A trainable adapter in place of (and around) a frozen module, ``base_layer``.

    Subclasses hold the wrapped module as ``base_layer`` (a submodule; or a property returning the
    submodule under its own name, e.g. ``SoftPromptBackbone.backbone``) and implement
    ``adapter_parameters``; they override ``restore`` where wrapping changed the base layer, and
    ``merge`` where the adapter can be folded into weights (leaving ``merge_error`` None).
    """

    base_layer: nn.Module

    #: None when ``merge()`` works; else why it cannot (a class attribute, checked by
    #: ``spu_kernels.merge`` on every module before any is merged: merging writes in place).
    merge_error: str | None = None

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) for each parameter of the adapter, none of the base layer's: what the
        patch method trains (names relative to this module)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its adapter parameters")

    def restore(self) -> nn.Module:
        """Undo what wrapping did to the base layer and return the module to put back in this
        one's place: afterwards it computes bit for bit what it did before it was wrapped. The
        adapter may not be used afterwards. The default: the base layer, which wrapping left as is."""
        return self.base_layer

    def merge(self) -> nn.Module:
        """Fold the adapter into the base layer's weights (in place, rounded to their dtype) and
        return the plain module to put in this one's place, which then computes what this one did
        (to that rounding) without the adapter. The adapter is spent afterwards. Raises
        RuntimeError(``merge_error``) where merging is impossible (the default)."""
        raise RuntimeError(self.merge_error or f"{type(self).__name__} cannot be merged")
