"""The fine-tuning harness (spu_kernels/harness): config validation, data loading and the Rotten
Tomatoes parser, short training runs on a tiny BERT, comparison mode, resume. All offline."""
import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_interrupted_in_epoch_2
from models import save_tiny_bert

from spu_kernels.harness import cli, data, report
from spu_kernels.harness.config import ConfigError, apply_override, from_dict, load_config, with_cpu_overrides
from spu_kernels.harness.methods import METHODS, get
from spu_kernels.harness.train import metrics, run

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# config validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, pattern", [
    ({"training": {"learning_rat": 1e-3}}, r"training\.learning_rat: unknown key \(did you mean 'learning_rate'\?\)"),
    ({"trainig": {}}, r"trainig: unknown top-level key \(did you mean 'training'\?\)"),
    ({"training": {"epochs": "three"}}, r"training\.epochs: must be an integer, got str 'three'"),
    ({"training": {"epochs": 1.5}}, r"training\.epochs: must be an integer"),
    ({"training": {"eval_every_epoch": "yes"}}, r"training\.eval_every_epoch: must be true or false"),
    ({"training": {"precision": "bf32"}}, r"training\.precision: 'bf32' is not allowed; choose one of auto, bf16"),
    ({"training": {"batch_size": 0}}, r"training\.batch_size: must be >= 1"),
    ({"dataset": {"max_lenght": 64}}, r"dataset\.max_lenght: unknown key \(did you mean 'max_length'\?\)"),
    ({"dataset": {"path": "a.csv", "name": "rotten_tomatoes"}}, r"exactly one of name, path, hf"),
    ({"method": {"name": "sivaa"}}, r"method\.name: method 'sivaa' is not available \(did you mean 'siva'\?\)"),
    ({"method": {"name": "siva", "args": {"rank": 8}}}, r"method\.args\.rank: unknown option for siva; siva takes r, "),
    ({"method": {"name": "siva", "args": {"r": 1.5}}}, r"method\.args\.r: must be an integer, got float"),
    ({"method": {"name": "full", "args": {"r": 8}}},
     r"method\.args\.r: unknown option for full; full takes no options"),
    ({"metric": "acc"}, r"metric: 'acc' is not allowed; choose one of accuracy, f1 \(did you mean 'accuracy'\?\)"),
    ({"compare": {"lora": {"args": {"rr": 4}}}}, r"compare\.lora\.args\.rr: unknown option for lora"),
    ({"cpu": {"training": {"epoch": 1}}}, r"cpu\.training\.epoch: unknown key \(did you mean 'epochs'\?\)"),
    ({"dataset": "rt"}, r"dataset: must be a mapping"),
    ({"training": {"compile": "fast"}}, r"training\.compile: 'fast' is not allowed; choose one of auto, false, true"),
    ({"training": {"compile": 1}}, r"training\.compile: must be true, false or a string, got int"),
])
def test_config_errors_name_the_key(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(raw)


def test_config_defaults_overrides_and_cpu_block(tmp_path):
    cfg = from_dict({})
    assert (cfg.dataset.name, cfg.method.name, cfg.training.precision, cfg.metric) == \
        ("rotten_tomatoes", "siva", "auto", "accuracy")
    assert from_dict({"training": {"learning_rate": "1e-3"}}).training.learning_rate == 1e-3   # YAML's 1e-3 string
    assert from_dict({"dataset": {"path": "x.csv"}}).dataset.name is None
    f = tmp_path / "c.yaml"
    f.write_text("method: {name: lora, args: {r: 4}}\ntraining: {epochs: 3}\ncpu: {training: {epochs: 1}}\n")
    cfg, raw = load_config(f, ["training.epochs=2", "method.args.r=8"])
    assert cfg.name == "c" and cfg.training.epochs == 2 and cfg.method.args == {"r": 8}
    assert with_cpu_overrides(raw).training.epochs == 1
    assert with_cpu_overrides(raw, ["training.epochs=2"]).training.epochs == 2     # --set wins
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "training.epochs")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    cfg, raw = load_config(path)
    with_cpu_overrides(raw)
    assert cfg.method.name in METHODS


def test_every_method_has_an_example_config():
    names = {load_config(p)[0].method.name for p in (REPO / "configs").glob("*.yaml")}
    assert set(METHODS) <= names


def test_unavailable_method_is_a_clear_error():
    with pytest.raises(ConfigError, match="method 'nope' is not available; the harness has full, lora"):
        get("nope")


def test_metrics():
    m = metrics([1, 1, 0, 0], [1, 0, 0, 0], 2)
    assert m["accuracy"] == 0.75 and abs(m["f1"] - 2 / 3) < 1e-9


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def test_csv_jsonl_tsv_loading(tmp_path):
    rows = [("a fine film", "pos"), ("a dull film", "neg"), ("great", "pos")]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "y"])
        w.writerows(rows)
    ex, names = data.load_file(tmp_path / "d.csv", "sentence", "y")
    assert names == ["neg", "pos"] and [e.label for e in ex] == [1, 0, 1] and ex[0].text == "a fine film"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n"
                                              for i, (t, _) in enumerate(rows)))
    ex, names = data.load_file(tmp_path / "d.jsonl")
    assert names == ["0", "1", "2"] and [e.label for e in ex] == [0, 1, 2]
    (tmp_path / "d.tsv").write_text("text\tlabel\nx\t1\ny\t0\n")
    assert [e.label for e in data.load_file(tmp_path / "d.tsv")[0]] == [1, 0]
    with pytest.raises(ValueError, match=r"no column 'text'; columns are \['sentence', 'y'\]"):
        data.load_file(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_file(tmp_path / "missing.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": 0}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: not JSON"):
        data.load_file(tmp_path / "bad.jsonl")


def test_split_is_seeded_and_subsets_are_prefixes(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"s{i}", "label": i % 2}) + "\n"
                                              for i in range(100)))
    cfg = from_dict({"dataset": {"path": str(tmp_path / "d.jsonl")}})
    full = data.load_splits(cfg.dataset)
    assert (len(full.train), len(full.val), len(full.test)) == (80, 10, 10)
    again = data.load_splits(from_dict({"dataset": {"path": str(tmp_path / "d.jsonl"), "n_train": 7}}).dataset)
    assert again.train == full.train[:7] and again.test == full.test
    other = data.load_splits(from_dict({"dataset": {"path": str(tmp_path / "d.jsonl"), "split_seed": 1}}).dataset)
    assert other.test != full.test


def test_hf_datasets_missing_is_a_clear_error(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no module named datasets")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match="needs the Hugging Face `datasets` package"):
        data.load_hf("rotten_tomatoes", None, "text", "label")


def _fake_sdist(folder: Path, rows) -> Path:
    """A vaderSentiment-3.3.2.tar.gz laid out like the real one, ground-truth file in its format
    (ID<TAB>RATING<TAB>SENTENCE, CRLF, no final newline)."""
    text = "\r\n".join(f"{i}\t{s}\t{t}" for i, s, t in rows)
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tf:
        blob = text.encode("utf-8")
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(blob)
        tf.addfile(info, io.BytesIO(blob))
    path = folder / data.VADER_SDIST
    with tarfile.open(path, "w:gz") as tf:
        blob = inner.getvalue()
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(blob)
        tf.addfile(info, io.BytesIO(blob))
    return path


def test_rotten_tomatoes_parser_labels_and_cache(tmp_path, monkeypatch):
    # ids around the real block boundaries (5152|5153, 10312|10313, 10347|10348)
    rows = ([(i, 2.1, f"good sentence {i}") for i in range(5140, 5153)]
            + [(i, -1.9, f"bad ''quoted'' sentence {i}") for i in range(5153, 5170)]
            + [(10312, -0.5, "meh"), (10313, 1.25, "It’s a masterpiece."), (10347, 0.0, "neutral"),
               (10348, -3.5, "The worst film of the year.")])
    _fake_sdist(tmp_path, rows)
    parsed = data.read_sdist(tmp_path / data.VADER_SDIST)
    assert [r["id"] for r in parsed] == [r[0] for r in rows]
    by_id = {r["id"]: r for r in parsed}
    assert by_id[5152]["label"] == 1 and by_id[5153]["label"] == 0 and by_id[10313]["label"] == 1
    assert by_id[10347]["label"] == 1 and by_id[10348]["label"] == 0 and by_id[10313]["text"] == "It’s a masterpiece."
    assert by_id[5160]["text"] == "bad ''quoted'' sentence 5160" and by_id[5160]["score"] == -1.9
    assert data.label_agreement(parsed) == (len(rows) - 1, len(rows) - 1)   # the 0.0 rating is not counted
    # the cache: no download when the archive is there; SPU_DATA_DIR moves it
    monkeypatch.setenv("SPU_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: pytest.fail("tried to download"))
    out = data.fetch_rotten_tomatoes(quiet=True)
    assert out == tmp_path / data.PROCESSED and len(out.read_text().splitlines()) == len(rows)
    assert len(data.load_rotten_tomatoes("score")) == len(rows) - 1
    splits = data.load_splits(from_dict({"dataset": {"name": "rotten_tomatoes"}}).dataset)
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(rows)


def test_rotten_tomatoes_label_check_refuses_a_wrong_file(tmp_path):
    _fake_sdist(tmp_path, [(i, -2.0, f"s{i}") for i in range(1, 40)])     # all "positive" ids rated negative
    with pytest.raises(ValueError, match="agree with the human rating's sign on only 0/39"):
        data.read_sdist(tmp_path / data.VADER_SDIST)


def test_bad_ground_truth_line_is_named():
    with pytest.raises(ValueError, match="line 2: expected ID<TAB>RATING<TAB>SENTENCE"):
        data.parse_ground_truth("1\t0.5\tfine\r\n2 0.5 broken\r\n")


# --------------------------------------------------------------------------------------------
# training on a tiny BERT
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random BERT with the real MiniLM tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    save_tiny_bert(folder)
    return str(folder)


@pytest.fixture
def tiny_config(tiny_model, tmp_path):
    words = (["good", "great", "fine", "lovely"], ["bad", "awful", "dull", "boring"])
    lines = [json.dumps({"text": f"a {words[i % 2][i % 4]} film number {i}", "label": 1 - i % 2}) + "\n"
             for i in range(60)]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    raw = {"name": "tiny", "dataset": {"path": str(tmp_path / "d.jsonl"), "max_length": 16, "n_val": 8, "n_test": 8},
           "model": {"path": tiny_model},
           "method": {"name": "siva", "args": {"r": 2}},
           "training": {"epochs": 1, "max_steps": 2, "batch_size": 8, "eval_batch_size": 16, "progress": False,
                        "tensorboard": False, "device": "cpu", "output_dir": str(tmp_path / "out")}}
    return raw


def test_two_step_run(tiny_config, tmp_path):
    tiny_config["training"]["tensorboard"] = True
    res = run(from_dict(tiny_config))
    assert res.steps == 2 and res.n_train == 48 and res.n_test == 6 and res.method == "siva"
    assert 0 <= res.accuracy <= 1 and 0 <= res.f1 <= 1 and res.peak_memory_mb > 0 and res.samples_per_s > 0
    assert 0 < res.trainable_params < res.total_params and res.val_accuracy is not None
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy"] == res.accuracy and saved["method_args"] == {"r": 2}
    assert (out / "best" / "adapter.safetensors").exists()
    assert list((out / "checkpoints").glob("epoch_1/adapter.safetensors"))
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "siva" in report.table_text([res])


def test_full_finetuning_trains_everything(tiny_config):
    tiny_config["method"] = {"name": "full"}
    res = run(from_dict(tiny_config))
    assert res.trainable_params == res.total_params
    assert (Path(res.output_dir) / "best" / "model.safetensors").exists()


def test_comparison_mode_writes_table(tiny_config, tmp_path, capsys):
    cfg_file = tmp_path / "cmp.yaml"
    tiny_config["compare"] = {"lora": {"args": {"r": 2}, "learning_rate": 1e-2}}
    cfg_file.write_text(yaml.safe_dump(tiny_config))
    rc = cli.main(["finetune", str(cfg_file), "--methods", "full,lora,last_n,bitfit",
                   "--output-dir", str(tmp_path / "cmp")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Peak memory (MB)" in printed and "last_n" in printed and "bitfit" in printed
    out = tmp_path / "cmp"
    table = list(csv.DictReader(open(out / "table.csv")))
    assert [r["method"] for r in table] == ["full", "lora", "last_n", "bitfit"]
    assert float(table[1]["learning_rate"]) == 1e-2
    assert int(table[0]["trainable_params"]) > int(table[2]["trainable_params"]) > int(table[3]["trainable_params"])
    assert "| Method | Accuracy | F1 |" in (out / "table.md").read_text()
    assert (out / "table.png").read_bytes()[:4] == b"\x89PNG"
    assert rc == 0 and cli.main(["finetune", str(cfg_file), "--methods", "full,nope"]) == 2


def test_resume_continues_where_it_stopped(tiny_config, tmp_path):
    tiny_config["training"].update(epochs=2, max_steps=None, batch_size=16)
    tiny_config["method"] = {"name": "lora", "args": {"r": 2, "dropout": 0.1}}
    straight = run(from_dict(tiny_config), output_dir=tmp_path / "a")
    # the same run, interrupted during epoch 2's evaluation, then resumed
    run_interrupted_in_epoch_2(from_dict(tiny_config), output_dir=tmp_path / "b")
    assert (tmp_path / "b" / "checkpoints" / "epoch_1" / "trainer_state.pt").exists()
    resumed = run(from_dict(tiny_config), output_dir=tmp_path / "b", resume=True)
    assert resumed.steps == straight.steps == 6 and len(resumed.history) == 2
    assert resumed.history == straight.history
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a" / "best" / "adapter.safetensors")
    b = load_file(tmp_path / "b" / "best" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)


@pytest.mark.parametrize("how", ["killed_while_saving", "stale_truncated_dir"])
def test_resume_takes_the_newest_complete_checkpoint(tiny_config, tmp_path, monkeypatch, capsys, how):
    """A checkpoint cut short (the run killed while writing it) is skipped: resume continues from
    the previous epoch's and ends as the uninterrupted run does."""
    import shutil
    tiny_config["training"].update(epochs=2, max_steps=None, batch_size=16)
    tiny_config["method"] = {"name": "lora", "args": {"r": 2, "dropout": 0.1}}
    straight = run(from_dict(tiny_config), output_dir=tmp_path / "a")
    ckpts = tmp_path / "b" / "checkpoints"
    if how == "killed_while_saving":          # epoch 2's trainer state: half written, then the kill
        real_save, calls = torch.save, []

        def killed(obj, f, *a, **k):
            if Path(f).name.startswith("trainer_state"):
                calls.append(1)
                if len(calls) == 2:
                    buf = io.BytesIO()
                    real_save(obj, buf)
                    Path(f).write_bytes(buf.getvalue()[:200])
                    raise KeyboardInterrupt
            return real_save(obj, f, *a, **k)
        monkeypatch.setattr(torch, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            run(from_dict(tiny_config), output_dir=tmp_path / "b")
        monkeypatch.setattr(torch, "save", real_save)
    else:                                     # a newer directory holding a truncated trainer state
        run_interrupted_in_epoch_2(from_dict(tiny_config), output_dir=tmp_path / "b")
        (ckpts / "epoch_2").mkdir()
        shutil.copy(ckpts / "epoch_1" / "adapter.safetensors", ckpts / "epoch_2")
        state = (ckpts / "epoch_1" / "trainer_state.pt").read_bytes()
        (ckpts / "epoch_2" / "trainer_state.pt").write_bytes(state[:200])
    capsys.readouterr()
    resumed = run(from_dict(tiny_config), output_dir=tmp_path / "b", resume=True)
    err = capsys.readouterr().err
    assert "incomplete checkpoint" in err and f"resumed from {ckpts / 'epoch_1'}" in err
    assert resumed.history == straight.history and resumed.accuracy == straight.accuracy
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a" / "best" / "adapter.safetensors")
    b = load_file(tmp_path / "b" / "best" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_2"]      # the incomplete one is gone


def test_cli_check_methods_schema(tiny_config, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(tiny_config))
    assert cli.main(["check", str(f)]) == 0
    assert cli.main(["methods"]) == 0 and "last_n" in capsys.readouterr().out
    assert cli.main(["schema"]) == 0 and "learning_rate" in capsys.readouterr().out
    f.write_text("training: {learnig_rate: 1}\n")
    assert cli.main(["check", str(f)]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err
    assert (REPO / "spu_kernels" / "__main__.py").exists()


# --------------------------------------------------------------------------------------------
# prompt-based fine-tuning, MeZO, soft prompts, two-phase recipes
# --------------------------------------------------------------------------------------------
PROMPT = {"template": "{text} It was [MASK].", "label_words": ["terrible", "great"]}


@pytest.mark.parametrize("method", [{"name": "lora", "args": {"r": 2}}, {"name": "klst", "args": {"k": 3, "r": 4}},
                                    {"name": "last_n", "args": {"n": 1}}])
def test_prompt_based_run(tiny_config, method):
    tiny_config["prompt"] = PROMPT
    tiny_config["method"] = method
    res = run(from_dict(tiny_config))
    assert res.steps == 2 and 0 <= res.accuracy <= 1 and 0 < res.trainable_params < res.total_params


def test_prompt_scores_are_the_label_words(tiny_model):
    from spu_kernels.harness.config import PromptConfig
    from spu_kernels.harness.data import Example
    from spu_kernels.harness.model import collate, encode, load_model
    model, tok, _, template = load_model(tiny_model, 2, PromptConfig(**PROMPT), 32)
    items = encode(tok, [Example("a fine film", 1), Example("dull", 0)], 32, template)
    batch = collate(items, tok.pad_token_id, "cpu")
    logits = model(**batch).logits
    lm_logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pos = [ids.index(tok.mask_token_id) for ids, _, _ in items]
    words = tok.convert_tokens_to_ids(["terrible", "great"])
    torch.testing.assert_close(logits, torch.stack([lm_logits[i, p, words] for i, p in enumerate(pos)]))


def test_mezo_run_and_soft_prompt(tiny_config):
    tiny_config["method"] = {"name": "lora", "args": {"r": 2, "soft_prompt": 4}}
    tiny_config["training"].update(optimizer="mezo", learning_rate=1e-3, mezo_eps=1e-2)
    res = run(from_dict(tiny_config))
    assert res.steps == 2 and res.learning_rate == 1e-3
    tiny_config["method"] = {"name": "prompt", "args": {"n_tokens": 3}}
    assert run(from_dict(tiny_config)).steps == 2


def test_compile_setting(tiny_config, monkeypatch):
    """training.compile: YAML booleans accepted; true compiles the training forward (dynamo's
    aot_eager here: Inductor on 2 CPU cores takes tens of seconds) and says so in the result."""
    from spu_kernels.harness import compile as hcompile
    calls = []
    real = torch.compile

    def compile_aot_eager(model, mode=None):
        calls.append(mode)
        return real(model, backend="aot_eager", fullgraph=True)
    monkeypatch.setattr(hcompile.torch, "compile", compile_aot_eager)
    off = from_dict(tiny_config | {"training": tiny_config["training"] | {"compile": False}})
    assert off.training.compile == "false"
    tiny_config["training"]["compile"] = True
    res = run(from_dict(tiny_config))
    assert res.compile == "true" and res.steps == 2 and calls == [None]
    assert json.loads((Path(res.output_dir) / "results.json").read_text())["compile"] == "true"
    torch._dynamo.reset()


def test_compile_failure_falls_back_to_eager(tiny_config, monkeypatch, capsys):
    """A compile that fails at the first step: grads cleared, a message, the run trains eagerly."""
    from spu_kernels.harness import compile as hcompile

    def broken_compile(model, mode=None):
        def forward(**batch):
            model(**batch).loss.backward()      # leaves grads behind, as a half-run step might
            raise RuntimeError("inductor exploded")
        return forward
    monkeypatch.setattr(hcompile.torch, "compile", broken_compile)
    tiny_config["training"]["compile"] = "true"
    eager = run(from_dict(tiny_config | {"training": tiny_config["training"] | {"compile": "false"}}))
    res = run(from_dict(tiny_config))
    assert res.compile.startswith("false (compile failed: RuntimeError: inductor exploded")
    assert "training eagerly instead" in capsys.readouterr().err
    assert res.steps == 2 and res.accuracy == eager.accuracy and res.val_accuracy == eager.val_accuracy


def test_compile_reduce_overhead_needs_a_gpu(tiny_config):
    tiny_config["training"]["compile"] = "reduce-overhead"
    with pytest.raises(ValueError, match="reduce-overhead captures CUDA graphs and needs a CUDA device"):
        run(from_dict(tiny_config))
    assert not (Path(tiny_config["training"]["output_dir"])).exists()


def test_two_phase_recipe(tiny_config):
    tiny_config["prompt"] = PROMPT
    tiny_config["training"]["max_steps"] = 1
    tiny_config["phases"] = [{"method": {"name": "full"}, "training": {"optimizer": "mezo", "learning_rate": 1e-6}},
                             {"method": {"name": "lora", "args": {"r": 2}}},
                             {"method": {"name": "klst", "args": {"k": 3, "r": 4}}, "training": {"max_steps": 2}}]
    cfg = from_dict(tiny_config)
    assert cfg.phase_names == "full(mezo)+lora+klst"
    res = run(cfg)
    assert res.method == "full(mezo)+lora+klst" and res.steps == 4
    assert [h["phase"] for h in res.history] == [1, 2, 3]
    assert (Path(res.output_dir) / "best" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="no per-epoch checkpoints"):
        run(cfg, resume=True)


@pytest.mark.parametrize("raw, pattern", [
    ({"phases": [{"method": {"name": "full"}}]}, r"phases: give two or more phases"),
    ({"phases": [{"method": {"name": "full"}, "trainig": {}}, {"method": {"name": "lora"}}]},
     r"phases\[0\]\.trainig: unknown key \(did you mean 'training'\?\)"),
    ({"phases": [{"method": {"name": "full"}}, {"method": {"name": "lora"}, "training": {"optimizer": "sgd"}}]},
     r"phases\[1\]\.training\.optimizer: 'sgd' is not allowed; choose one of adamw, adafactor, mezo"),
    ({"phases": [{"method": {"name": "full"}}, {"training": {}}]}, r"phases\[1\]\.method: missing"),
    ({"prompt": {"label_words": ["a", "b"]}}, r"prompt\.label_words: only with prompt\.template"),
    ({"prompt": {"template": "{text} It was.", "label_words": ["a", "b"]}}, r"prompt\.template: must contain \[MASK\]"),
    ({"prompt": {"template": "{text} [MASK]", "label_words": ["a"]}}, r"prompt\.label_words: give one word"),
    ({"method": {"name": "lora", "args": {"soft_prompts": 4}}}, r"method\.args\.soft_prompts: unknown option for lora "
                                                                r"\(did you mean 'soft_prompt'\?\)"),
])
def test_prompt_mezo_phase_config_errors(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(raw)
