"""Bad input to the fine-tuning harness: data files with missing, empty or inconsistent labels,
and out-of-range settings. Each is a clear error naming where (file and line, or the config key)
and raised before anything is written to output_dir; config problems are refused by `check`."""
import json
import math
import re

import pytest
import yaml
from test_harness import tiny_config, tiny_model  # noqa: F401  (fixtures)

from spu_kernels.harness import cli, data
from spu_kernels.harness.config import from_dict
from spu_kernels.patching import registry


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _splits(**dataset):
    return data.load_splits(from_dict({"dataset": dataset}).dataset)


def _cli(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 1. one label map, from the training split
# --------------------------------------------------------------------------------------------
def test_string_labels_map_through_the_training_split_in_every_split(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,neg\nb,pos\nc,neg\nd,pos\n")
    (tmp_path / "val.csv").write_text("text,label\ne,pos\nf,pos\n")            # only one of the classes
    (tmp_path / "test.csv").write_text("text,label\ng,pos\nh,neg\n")
    s = _splits(path=str(tmp_path / "train.csv"), val_path=str(tmp_path / "val.csv"),
                test_path=str(tmp_path / "test.csv"))
    assert s.label_names == ["neg", "pos"]
    assert [e.label for e in s.train] == [0, 1, 0, 1]
    assert [e.label for e in s.val] == [1, 1] and [e.label for e in s.test] == [1, 0]


def test_a_label_the_training_split_lacks_is_an_error_naming_file_and_line(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,neg\nb,pos\n")
    (tmp_path / "val.csv").write_text("text,label\ne,pos\n")
    (tmp_path / "test.csv").write_text("text,label\ng,pos\nh,meh\n")
    with pytest.raises(ValueError, match=r"test\.csv line 3: label 'meh' is not one of the training split's "
                                         r"labels \['neg', 'pos'\]"):
        _splits(path=str(tmp_path / "train.csv"), val_path=str(tmp_path / "val.csv"),
                test_path=str(tmp_path / "test.csv"))


def test_a_split_carved_from_the_training_file_is_not_trained_on(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(50)])
    _jsonl(tmp_path / "val.jsonl", [{"text": f"v{i}", "label": i % 2} for i in range(4)])
    s = _splits(path=str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val.jsonl"))
    assert not {e.text for e in s.train} & {e.text for e in s.test}
    assert len(s.train) + len(s.test) == 50 and [e.text for e in s.val] == ["v0", "v1", "v2", "v3"]


def test_hf_splits_share_the_training_split_label_map(monkeypatch):
    import sys
    import types

    class Split(list):
        features = {"label": types.SimpleNamespace()}          # string labels: no ClassLabel names
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config: {               # the validation split comes first
        "validation": Split([{"text": "v", "label": "pos"}]),
        "train": Split([{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}]),
        "test": Split([{"text": "t", "label": "meh"}])}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match=r"fake\[test\] row 0: label 'meh' is not one of the training split's"):
        _splits(hf="fake")
    fake.load_dataset = lambda name, config: {
        "validation": Split([{"text": "v", "label": "pos"}]),
        "train": Split([{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}]),
        "test": Split([{"text": "t", "label": "neg"}])}
    s = _splits(hf="fake")
    assert s.label_names == ["neg", "pos"] and [e.label for e in s.val] == [1] and [e.label for e in s.test] == [0]


# --------------------------------------------------------------------------------------------
# 2, 3. empty, short and missing labels
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, pattern", [
    ("d.csv", "text,label\na,pos\nb,\nc,neg\n", r"d\.csv line 3: the 'label' field is empty"),
    ("d.csv", "text,label\na,pos\nb\nc,neg\n", r"d\.csv line 3: 1 field\(s\) but the header has 2"),
    ("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": null}\n', r"d\.jsonl line 2: the 'label' field "
                                                                            r"is null"),
    ("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c"}\n',
     r"d\.jsonl line 3: no 'label' field"),
    ("d.jsonl", '{"text": "a", "label": 0}\n\n{"label": 1}\n', r"d\.jsonl line 3: no 'text' field"),
])
def test_rows_with_an_empty_or_missing_field_are_errors_naming_file_and_line(tmp_path, name, text, pattern):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=pattern):
        data.load_file(tmp_path / name)


# --------------------------------------------------------------------------------------------
# 4, 5. class ids out of range
# --------------------------------------------------------------------------------------------
def test_negative_integer_labels_are_explained(tmp_path):
    _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": -1}, {"text": "c", "label": 1}])
    with pytest.raises(ValueError, match=r"d\.jsonl line 2: label -1 is negative.*unlabelled.*drop those rows"):
        data.load_file(tmp_path / "d.jsonl")


@pytest.mark.parametrize("case", ["num_labels", "val_file"])
def test_labels_beyond_num_labels_stop_finetune_before_anything_is_written(tiny_config, tmp_path, capsys, case):
    if case == "num_labels":            # model.num_labels: 2 but the file has class 2 on line 5
        _jsonl(tmp_path / "d.jsonl", [{"text": f"s{i}", "label": 2 if i == 4 else i % 2} for i in range(60)])
        tiny_config["model"]["num_labels"] = 2
        pattern = r"d\.jsonl line 5: label 2 is not below num_labels = 2 \(model\.num_labels\)"
    else:                               # integer labels 0..1 in training, 2 in the validation file
        _jsonl(tmp_path / "val.jsonl", [{"text": "v", "label": 1}, {"text": "w", "label": 2}])
        tiny_config["dataset"].update(val_path=str(tmp_path / "val.jsonl"), n_val=None)
        pattern = r"val\.jsonl line 2: label 2 is not below .*the training split's labels are 0\.\.1"
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(tiny_config))
    rc, err = _cli(["finetune", str(f)], capsys)
    assert rc == 2 and re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# 6, 7. out-of-range settings
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("training.max_grad_norm=-1", "training.max_grad_norm: must be > 0 or null"),
    ("training.learning_rate=-1e-3", "training.learning_rate: must be > 0"),
    ("training.learning_rate=.nan", "training.learning_rate: must be a finite number"),
    ("training.warmup_ratio=.nan", "training.warmup_ratio: must be a finite number"),
    ("training.warmup_ratio=1.5", "training.warmup_ratio: must be <= 1"),
    ("training.mezo_eps=0", "training.mezo_eps: must be > 0"),
    ("training.threads=1000000", "training.threads: must be <= 4096"),
    ("training.seed=-1", "training.seed: must be >= 0"),
    ("method.args.dropout=1.5", "method.args.dropout: must be a number in [0, 1)"),
    ("method.args.r=0", "method.args.r: must be a positive int"),
    ("method.args.alpha=.inf", "method.args.alpha: must be a finite number"),
    ("compare.lora.args.dropout=-0.1", "compare.lora.args.dropout: must be a number in [0, 1)"),
    ("compare.lora.learning_rate=0", "compare.lora.learning_rate: must be > 0"),
    ("cpu.method.args.dropout=1", "cpu.method.args.dropout: must be a number in [0, 1)"),
])
def test_out_of_range_settings_are_refused_by_check_naming_the_key(tiny_config, tmp_path, capsys, override, key):
    tiny_config["method"] = {"name": "lora", "args": {"r": 2}}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(tiny_config))
    assert _cli(["check", str(f)], capsys)[0] == 0
    rc, err = _cli(["check", str(f), "--set", override], capsys)
    assert rc == 2 and key in err, err


def test_out_of_range_settings_stop_finetune_before_anything_is_written(tiny_config, tmp_path, capsys):
    tiny_config["method"] = {"name": "lora", "args": {"r": 2, "dropout": 1.5}}
    tiny_config["training"]["tensorboard"] = True
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(tiny_config))
    rc, err = _cli(["finetune", str(f)], capsys)
    assert rc == 2 and "method.args.dropout: must be a number in [0, 1)" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, options, pattern", [
    ("lora", {"dropout": 1.5}, r"dropout: must be a number in \[0, 1\) for lora, got 1\.5"),
    ("lora", {"dropout": -0.5}, r"dropout: must be a number in \[0, 1\)"),
    ("lora", {"r": 0}, r"r: must be a positive int for lora, got 0"),
    ("lora", {"alpha": math.nan}, r"alpha: must be a finite number"),
    ("krona", {"scale": math.inf}, r"scale: must be a finite number"),
    ("klst", {"k": 4}, r"k: must be an odd positive int for klst, got 4"),
    ("lst", {"r": True}, r"r: must be a positive int"),
    ("prompt", {"n_tokens": 0}, r"n_tokens: must be a positive int"),
    ("ia3", {"dynamic": True, "generator_rank": 0}, r"generator_rank: must be a positive int for ia3, got 0"),
    ("prefix", {"init_std": -0.1}, r"init_std: must be a finite number > 0 for prefix"),
    ("prefix", {"reparam": True, "reparam_hidden": 0}, r"reparam_hidden: must be a positive int for prefix"),
    ("last_n", {"n": -1}, r"n: must be an int >= 0"),
    ("siva", {"soft_prompt": 0}, r"soft_prompt: must be a positive int"),
])
def test_check_options_validates_method_options_without_a_model(name, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        registry.check_options(name, options)


def test_check_options_accepts_the_defaults_and_valid_values():
    registry.check_options("lora", {"r": 4, "dropout": 0.0, "alpha": None, "target_modules": ["query"]})
    registry.check_options("klst", {"k": 5, "r": 8, "dropout": 0.1})
    registry.check_options("last_n", {"n": 0})                       # a linear probe
    registry.check_options("siva", {"soft_prompt": {"n_tokens": 4}})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        registry.check_options("nope", {})
