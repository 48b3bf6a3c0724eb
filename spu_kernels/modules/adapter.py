"""The contract of a module that ``spu_kernels.patch`` puts in a model's place (PEFT's equivalent:
``BaseTunerLayer``).

A method (spu_kernels/patching/*_methods.py) replaces a model's module M with an ``AdapterModule``
A that wraps it (``A.base_layer``, or a property naming it); the core (patching/core.py) relies
on nothing else:
  * ``adapter_parameters()`` names what the method trains;
  * ``unpatch`` calls ``restore()`` and puts M back, so M must then be bit for bit what it was;
  * ``merge`` refuses the whole model, before anything changes, when any module's ``merge_error``
    is set; otherwise it puts each ``merge()`` result in the module's place.

Adapter management (patching/adapters.py: several named adapters, ``disable_adapter``,
``merge_adapter`` / ``unmerge_adapter``) needs more, only of modules with ``switchable = True``:
  * ``detach_base()`` / ``attach_base()`` undo / redo what wrapping did to the base layer while
    the adapter stays usable (a default no-op: most adapters leave the base layer as it is);
  * ``forward`` computes ``base_forward`` (the wrapped module alone, bit for bit) while
    ``enabled`` is False or ``merged`` is True, and refuses to train while merged
    (``check_merged_training``);
  * ``merged_tensors()`` names the tensors ``merge()`` writes in place: ``merge_in_place`` keeps a
    CPU copy of them that ``unmerge`` puts back, bit for bit.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
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

    #: True where the module supports detach_base / attach_base, ``enabled`` and ``merged``
    #: (see the module docstring); adapter management refuses the others.
    switchable: bool = False
    #: False inside ``spu_kernels.disable_adapter``: forward computes the base layer alone
    enabled: bool = True
    #: True between ``merge_in_place`` and ``unmerge``: the base weights hold the adapter
    merged: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        # peft.get_peft_model on a patched model (e.g. target_modules="all-linear") would put its
        # tuner layer in place of the wrapped base layer, which the fused op reads directly: the
        # PEFT adapter would be silently ignored. Refuse it loudly.
        if name == "base_layer" and "base_layer" in self._modules and type(value).__module__.startswith("peft."):
            raise TypeError(f"PEFT is wrapping the base layer of spu_kernels' {type(self).__name__}, where the fused "
                            "op would ignore it. Call spu_kernels.to_peft(model) (the same adapter as a PeftModel) "
                            "or spu_kernels.unpatch(model) before peft.get_peft_model (from_peft converts the other "
                            "way); PEFT may already have wrapped other layers of this model: reload it")
        super().__setattr__(name, value)

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

    # -- adapter management (switchable modules) ---------------------------------------------
    @property
    def detach_error(self) -> str | None:
        """None when ``detach_base`` works; else why not."""
        return None

    def detach_base(self) -> None:
        """Undo what wrapping did to the base layer, keeping the adapter usable (``attach_base``
        redoes it bit for bit). The default: nothing, wrapping left the base layer as it is."""

    def attach_base(self) -> None:
        """Redo what ``detach_base`` undid."""

    def base_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module alone: what forward computes while disabled or merged."""
        return self.base_layer(*args, **kwargs)

    def bypassed(self) -> bool:
        """True when forward must compute ``base_forward`` (disabled, or merged); raises when
        merged and training (the adapter's gradients would be silently zero)."""
        if self.merged:
            self.check_merged_training()
            return True
        return not self.enabled

    def check_merged_training(self) -> None:
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(f"{type(self).__name__}: the adapter is merged into the base weights "
                               "(spu_kernels.merge_adapter), so training would not update it; call "
                               "spu_kernels.unmerge_adapter(model) before training, or model.eval() / "
                               "torch.no_grad() for inference")

    def merged_tensors(self) -> list[torch.Tensor]:
        """The tensors ``merge()`` writes in place. The default: the base layer's parameters."""
        return list(self.base_layer.parameters())

    @torch.no_grad()
    def merge_in_place(self) -> None:
        """Fold the adapter into the base weights but keep it (PEFT's merge_adapter): a CPU copy
        of each tensor ``merge()`` writes is kept so that ``unmerge`` restores it bit for bit."""
        if self.merge_error:
            raise RuntimeError(self.merge_error)
        if self.merged:
            return
        tensors = self.merged_tensors()
        self._unmerged = [(t, t.detach().to("cpu", copy=True)) for t in tensors]
        self.merge()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the weights ``merge_in_place`` changed, bit for bit."""
        if not self.merged:
            return
        for t, saved in self._unmerged:
            t.copy_(saved.to(t.device))
        del self._unmerged
        self.merged = False
