"""Prompt-based fine-tuning (LM-BFF, Gao et al. 2021; the setting of MeZO): a classification task
posed to a language model through a text template and label words.

    template    = "{sentence} It was [MASK]."          label_words = ["terrible", "great"]
    class logit = the LM's score of label word c at the [MASK] slot

Masked LMs (BERT / RoBERTa families) score the word at the mask token; causal LMs (GPT-2, LLaMA
family) score it as the next token after the text before [MASK] (the template must end with
[MASK] there). ``PromptTemplate`` turns examples into token ids and the slot's position;
``PromptClassifier`` wraps the LM (patched with any method or not: its ``model``) and returns a
``SequenceClassifierOutput`` (logits (B, C), cross-entropy loss when labels are given), so training
loops and the harness treat it as any sequence classifier.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn

MASK = "[MASK]"


class PromptTemplate:
    """Encodes examples with ``template`` (``{field}`` placeholders and one ``[MASK]``) for ``tokenizer``.

    ``label_words``: one word per class (a list, or a mapping class id -> word); each must be one
    token of the vocabulary (for BPE vocabularies a leading space is tried, as in " great").
    Inputs longer than ``max_length`` lose words from the end of their longest field, so the
    template's own words and the slot always survive.
    """

    def __init__(self, tokenizer, template: str, label_words: Sequence[str] | Mapping[int, str],
                 max_length: int = 128, causal: bool | None = None):
        if template.count(MASK) != 1:
            raise ValueError(f"prompt template must contain [MASK] exactly once, got {template!r}")
        self.tokenizer, self.template, self.max_length = tokenizer, template, int(max_length)
        self.causal = bool(causal) if causal is not None else tokenizer.mask_token is None
        if self.causal and template.split(MASK)[1].strip():
            raise ValueError(f"for a causal LM the template must end with [MASK] (the label word is the next token); "
                             f"got {template!r}")
        if not self.causal and tokenizer.mask_token is None:
            raise ValueError("this tokenizer has no mask token: use a masked LM, or causal=True with a causal LM")
        if isinstance(label_words, Mapping):
            keys = sorted(label_words)
            if keys != list(range(len(keys))):
                raise ValueError(f"label_words must map the classes 0..C-1 to words, got keys {keys}")
            label_words = [label_words[k] for k in keys]
        self.label_words = list(label_words)
        if len(self.label_words) < 2:
            raise ValueError(f"label_words needs a word for each of at least 2 classes, got {self.label_words}")
        self.label_token_ids = [self._single_token(w) for w in self.label_words]
        self.fields = [f for f in _fields(template)]
        if not self.fields:
            raise ValueError(f"prompt template has no {{field}} for the input text: {template!r}")

    def _single_token(self, word: str) -> int:
        for cand in (" " + word.strip(), word.strip()):
            ids = self.tokenizer(cand, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                return ids[0]
        raise ValueError(f"label word {word!r} is not a single token of this tokenizer "
                         f"({self.tokenizer(word, add_special_tokens=False)['input_ids']}); choose another word")

    def _text(self, ex: Mapping[str, str]) -> str:
        head, tail = self.template.split(MASK)
        slot = "" if self.causal else self.tokenizer.mask_token
        return head.format(**ex).rstrip() if self.causal else head.format(**ex) + slot + tail.format(**ex)

    def encode_one(self, example: Mapping[str, str] | str) -> tuple[list[int], int]:
        """(token ids, position of the slot: the mask token, or for causal LMs the last token)."""
        ex = {self.fields[0]: example} if isinstance(example, str) else dict(example)
        missing = [f for f in self.fields if f not in ex]
        if missing:
            raise KeyError(f"prompt template needs fields {self.fields}; the example lacks {missing}")
        while True:
            ids = self.tokenizer(self._text(ex))["input_ids"]
            if self.causal and ids and ids[-1] == self.tokenizer.eos_token_id and len(ids) > 1:
                ids = ids[:-1]      # some tokenizers append EOS: the slot is after the text
            if len(ids) <= self.max_length:
                break
            longest = max(self.fields, key=lambda f: len(str(ex[f])))
            words = str(ex[longest]).split()
            if len(words) <= 1:
                raise ValueError(f"the template alone is longer than max_length={self.max_length} tokens")
            ex[longest] = " ".join(words[:max(1, int(len(words) * 0.9))])
        pos = len(ids) - 1 if self.causal else ids.index(self.tokenizer.mask_token_id)
        return ids, pos

    def encode(self, examples: Sequence[Mapping[str, str] | str]) -> dict[str, torch.Tensor]:
        """A padded batch: input_ids, attention_mask (B, S) and slot_pos (B,). Right padding."""
        enc = [self.encode_one(e) for e in examples]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = self.pad([t for t, _ in enc], pad)
        return {"input_ids": ids, "attention_mask": mask, "slot_pos": torch.tensor([p for _, p in enc])}

    @staticmethod
    def pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token id lists right-padded with ``pad_id`` to the longest: (input_ids, attention_mask), (B, S) longs."""
        width = max(len(t) for t in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, t in enumerate(seqs):
            ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, :len(t)] = 1
        return ids, mask


def _fields(template: str) -> list[str]:
    import string
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class PromptClassifier(nn.Module):
    """A language model as a C-way classifier through a ``PromptTemplate``'s label words."""

    def __init__(self, model: nn.Module, template: PromptTemplate):
        super().__init__()
        self.model = model
        self.template = template
        self.register_buffer("label_token_ids", torch.tensor(template.label_token_ids), persistent=False)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, attention_mask=None, slot_pos=None, labels=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput
        if slot_pos is None:
            raise ValueError("PromptClassifier needs slot_pos (from PromptTemplate.encode)")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        logits = out.logits[rows, slot_pos.to(input_ids.device)][:, self.label_token_ids]   # (B, C)
        loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device)) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
