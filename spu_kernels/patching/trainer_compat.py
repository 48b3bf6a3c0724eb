"""transformers.Trainer with patched models: resuming from, and loading the best of, adapter checkpoints.

Saving needs nothing: on a patched model ``Trainer.save_model`` and every checkpoint write an adapter
folder (``model.save_pretrained`` is spu's while patched). Loading one back is Trainer code
(``_load_from_checkpoint`` / ``_load_best_model``), which knows only full checkpoints and PEFT models
and fails on an spu adapter folder. ``SPUTrainer`` (or ``SPUTrainerMixin`` first in the bases of
another Trainer subclass, e.g. TRL's) loads such folders with ``spu_kernels.load_adapter``; any other
checkpoint goes to the Trainer as before::

    from spu_kernels.patching.trainer_compat import SPUTrainer
    trainer = SPUTrainer(model=patched_model, args=args, train_dataset=ds)
    trainer.train(resume_from_checkpoint=True)

Not for FSDP / DeepSpeed, whose checkpoints the Trainer loads itself (the folders there are still
adapter-only when saved with a full state dict).
"""
from __future__ import annotations

import os

import transformers

from .checkpoint import WEIGHTS_NAME, load_adapter
from .pretrained import CONFIG_NAME
from .unwrap import unwrap_model


def is_adapter_folder(path: str | os.PathLike | None) -> bool:
    """True for a folder ``spu_kernels.save_pretrained`` wrote."""
    return path is not None and os.path.isfile(os.path.join(path, CONFIG_NAME)) and \
        os.path.isfile(os.path.join(path, WEIGHTS_NAME))


class SPUTrainerMixin:
    """Put first in a Trainer subclass's bases: adapter-folder checkpoints load with ``load_adapter``."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if is_adapter_folder(resume_from_checkpoint):
            load_adapter(unwrap_model(model if model is not None else self.model), resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if is_adapter_folder(best):
            load_adapter(unwrap_model(self.model), best)
            return
        super()._load_best_model()


class SPUTrainer(SPUTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that resumes from (and loads the best of) spu adapter checkpoints."""
