"""transformers.Trainer on a patched tiny model (CPU): checkpoints hold the adapter only, and
SPUTrainer resumes from one exactly as an uninterrupted run."""
import pytest
import torch
import transformers as tf
from models import VOCAB, make_model
from safetensors.torch import load_file

import spu_kernels
from spu_kernels.patching.checkpoint import WEIGHTS_NAME
from spu_kernels.patching.trainer_compat import SPUTrainer


def dataset(n=16, seq=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(2, VOCAB, (seq,), generator=g), "attention_mask": torch.ones(seq,
            dtype=torch.long), "labels": int(i % 2)} for i in range(n)]


def patched():
    return spu_kernels.patch(make_model("bert").train(), "lora", r=2)


def trainer(model, out, cls=SPUTrainer):
    args = tf.TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=6, save_steps=3,
                                save_strategy="steps", per_device_train_batch_size=4, learning_rate=1e-2,
                                logging_strategy="no", seed=0, data_seed=0, disable_tqdm=True)
    return cls(model=model, args=args, train_dataset=dataset())


def adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoints_are_adapter_only_and_resume_exactly(tmp_path):
    model = patched()
    before = adapter(model)
    full = trainer(model, tmp_path / "full")
    full.train()
    want = adapter(model)
    assert any(not torch.equal(want[n], before[n]) for n in want)        # it trained

    ckpt = tmp_path / "full" / "checkpoint-3"
    files = {f.name: f.stat().st_size for f in ckpt.iterdir()}
    assert WEIGHTS_NAME in files and "model.safetensors" not in files and "config.json" not in files
    full_size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert files[WEIGHTS_NAME] < full_size / 10

    resumed = patched()
    trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(ckpt))
    got = adapter(resumed)
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n

    # the plain Trainer does not know adapter folders: it fails, it does not train on from the base
    with pytest.raises(ValueError, match="checkpoint"):
        trainer(patched(), tmp_path / "plain", cls=tf.Trainer).train(resume_from_checkpoint=str(ckpt))

    # load_best_model_at_end's loader takes adapter folders too
    full.state.best_model_checkpoint = str(ckpt)
    full._load_best_model()
    saved = load_file(ckpt / WEIGHTS_NAME)
    assert adapter(model).keys() == saved.keys()
    assert all(torch.equal(adapter(model)[n], saved[n]) for n in saved)
    assert any(not torch.equal(want[n], saved[n]) for n in saved)
