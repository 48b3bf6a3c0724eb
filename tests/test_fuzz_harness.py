"""Property-based tests (hypothesis) of the fine-tuning harness's input handling.

(a) Data files: random CSV / TSV / JSONL training, validation and test files (the config's
    dataset ``path``, ``val_path``, ``test_path``) with random text and label values -- unicode,
    quotes, commas, tabs and line breaks in fields, empty and whitespace values, null, missing
    keys, ints (negative ones too), int-like strings, bools, floats, short and long CSV rows,
    lines that are not JSON objects. An oracle written here from README.md says what each file
    must give. ``load_splits`` + ``check_labels`` either load -- one label map (the training
    split's) in every split, every row accounted for, the class count the oracle expects -- or
    raise a ValueError naming the file, and for a bad row its line (one the oracle finds bad);
    never another exception type.
(b) Config validation: random values (valid, boundary, out of range, wrong type, null, NaN / inf,
    strings, lists) for ``training.learning_rate``, ``warmup_ratio``, ``max_grad_norm``,
    ``mezo_eps``, ``epochs``, ``batch_size``, ``method.args.r``, ``method.args.dropout``, ... go
    through a YAML file into ``spu-kernels check`` and ``spu-kernels finetune``: a config the
    oracle (README's ranges) refuses is refused by both with an error naming the key, and nothing
    is written to output_dir; one it accepts passes ``check``, and (a few examples: each is a
    training run) ``finetune`` trains on a tiny random BERT for 1-2 steps without error.

Reproducible (``derandomize=True``, no example database); ``SPU_FUZZ_EXAMPLES`` scales the example
counts (default 300 for data and for config checks, a twentieth of that for the training runs,
~0.3 s each: the file takes ~20 s on 2 cores). A longer manual run:

    SPU_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/test_fuzz_harness.py

(``SPU_FUZZ_RANDOM=1`` draws new examples each time instead of the fixed ones.)

What it found (labels like '--3' or '³', non-UTF-8 files, seeds that overflow, a saved head of
another size) is fixed and kept as the plain tests below.
"""
import csv
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from test_harness import tiny_model  # noqa: F401  (session fixture: a tiny random BERT folder)

from spu_kernels.harness import cli, data
from spu_kernels.harness.config import from_dict

# hypothesis's cache (constants it collects) goes to the temp dir, not into the repository
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "spu_kernels_hypothesis"))

EXAMPLES = int(os.environ.get("SPU_FUZZ_EXAMPLES", "300"))
TRAIN_RUNS = max(2, EXAMPLES // 20)


def fuzz_settings(n):
    return settings(max_examples=n, derandomize=not os.environ.get("SPU_FUZZ_RANDOM"), database=None,
                    deadline=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ============================================================================================
# (a) data files
# ============================================================================================
MISSING = object()          # the key is absent (JSONL) / the field is cut off (CSV)


texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)
nasty = st.sampled_from(['a, "quoted" text', "tab\there", "line\nbreak", "cr\rreturn", "crlf\r\nend", "  ", "",
                         "ünïcödé ✓ 日本語", '"', "'", ",,,", "\t", "=1+1", "\\N", "NULL", "null", "\u2028"])
label_values = st.one_of(
    st.integers(-2, 6), st.integers(0, 3), st.integers(0, 3).map(str), st.sampled_from([" 1", "2 ", "-1", "007"]),
    st.sampled_from(["pos", "neg", "neutral", "Pos", "pos "]), st.sampled_from(["", "  ", None]),
    st.booleans(), st.sampled_from([1.0, 2.5, -0.0, float("nan")]),
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=4))


@st.composite
def label_for(draw, kind, dirt):
    """Labels of a file mostly of one kind (ints, int-like strings, class names); with ``dirt``
    sometimes anything."""
    if dirt and draw(st.integers(0, 12 // dirt)) == 0:
        return draw(label_values)
    if kind == "int":
        return draw(st.integers(0, 3))
    if kind == "intstr":
        return str(draw(st.integers(0, 3)))
    return draw(st.sampled_from(["pos", "neg", "neutral"]))


@st.composite
def records(draw, kind, n_min, n_max, dirt):
    """[{field: value or MISSING}] for one file, plus JSONL junk lines as {"__raw__": line}; ``dirt``
    0: every row well formed; 1: now and then a bad one; 2: often."""
    out = []
    for _ in range(draw(st.integers(n_min if dirt < 2 else 0, n_max))):
        r = draw(st.integers(0, 60 // dirt)) if dirt else 99
        if r == 0:
            out.append({"__raw__": draw(st.sampled_from(["not json", "[1, 2]", "3", '"text"', "null", "", "   ",
                                                         '{"text": "a", "label": 1', "{}"]))})
            continue
        text = draw(st.one_of(texts, nasty)) if r > 3 else draw(st.sampled_from([MISSING, None, 5, True, ""]))
        label = draw(label_for(kind, dirt)) if r != 1 else MISSING
        rec = {"text": text, "label": label}
        if r == 2:
            rec["extra"] = draw(texts)
        out.append(rec)
    return out


@st.composite
def data_file(draw, role, n_min, n_max, kind, dirt):
    fmt = draw(st.sampled_from(["csv", "tsv", "jsonl"]))
    if dirt and draw(st.integers(0, 6 // dirt)) == 0:
        kind = draw(st.sampled_from(["int", "intstr", "names"]))
    header = ["text", "label"]
    if draw(st.booleans()):
        header = draw(st.sampled_from([["label", "text"], ["text", "label", "extra"]]))
    if dirt == 2 and draw(st.integers(0, 4)) == 0:
        header = draw(st.sampled_from([["text"], ["sentence", "label"]]))
    return dict(role=role, fmt=fmt, header=header, rows=draw(records(kind, n_min, n_max, dirt)))


@st.composite
def datasets(draw):
    dirt = draw(st.sampled_from([0, 0, 1, 2]))
    kind = draw(st.sampled_from(["int", "intstr", "names"]))
    files = [draw(data_file("train", 8, 16, kind, dirt))]      # >= 8 rows: carved 10% splits get one each
    for role in ("val", "test"):
        if draw(st.booleans()):
            files.append(draw(data_file(role, 1, 5, kind, dirt)))
    return files


def write_file(folder, spec):
    """Writes the file; returns (path, [(line, record or None for a bad line, bad reason or None)])."""
    path = Path(folder) / f"{spec['role']}.{spec['fmt']}"
    lines = []          # (line number, parsed record or None, why bad or None)
    if spec["fmt"] == "jsonl":
        out, n = [], 0
        for rec in spec["rows"]:
            n += 1
            if "__raw__" in rec:
                raw = rec["__raw__"]
                out.append(raw)
                if raw.strip():
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError:
                        lines.append((n, None, "not JSON"))
                        continue
                    lines.append((n, obj if isinstance(obj, dict) else None,
                                  None if isinstance(obj, dict) else "not an object"))
                continue
            obj = {k: v for k, v in rec.items() if v is not MISSING}
            out.append(json.dumps(obj, ensure_ascii=False))
            lines.append((n, obj, None))
        path.write_text("\n".join(out) + "\n", encoding="utf-8")
        return path, lines
    delim = "\t" if spec["fmt"] == "tsv" else ","
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delim)
    header = spec["header"]
    w.writerow(header)
    n = len(re.findall(r"\r\n|\r|\n", buf.getvalue()))
    for rec in spec["rows"]:
        if "__raw__" in rec:
            continue
        fields = []
        for col in header:
            v = rec.get(col, "")
            if v is MISSING:
                break                     # a short row: the fields from here on are cut off
            fields.append("" if v is None else str(v))
        if "extra" in rec and "extra" not in header:
            fields.append(str(rec["extra"]))           # a long row
        start = len(buf.getvalue())
        w.writerow(fields)
        n += len(re.findall(r"\r\n|\r|\n", buf.getvalue()[start:]))
        if fields == []:
            continue                      # a blank line: no row
        if len(fields) != len(header):
            lines.append((n, None, "field count"))
        else:
            lines.append((n, dict(zip(header, fields)), None))
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    return path, lines


def as_int(v):
    """The spec's integer label: an int (not a bool), or a string of decimal digits with an optional '-'."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"-?[0-9]+", v.strip()):      # ASCII digits, as the loader
        return int(v)
    return None


def oracle(files):
    """What loading must give: ("error", {(path, line), or (path, None) for a whole-file problem}),
    ("range", {(path, line)}, parsed) for int labels >= the class count (check_labels finds those,
    after every file has loaded), or ("ok", label names, parsed)."""
    bad, out_of_range, parsed = set(), set(), {}
    for path, lines, spec in files:
        path = str(path)
        if any(why for _, _, why in lines):               # the file's rows are refused before anything else
            return "error", {(path, ln) for ln, _, why in lines if why}, None
        rows = [(ln, rec) for ln, rec, _ in lines]
        if not rows or "text" not in rows[0][1] or "label" not in rows[0][1]:
            return "error", {(path, None)}, None
        for ln, rec in rows:
            lab = rec.get("label")
            if rec.get("text") is None or lab is None or (isinstance(lab, str) and not lab.strip()):
                bad.add((path, ln))
        if bad:
            return "error", bad, None
        if spec["role"] == "train":
            ints = [as_int(rec["label"]) for _, rec in rows]
            if all(i is not None for i in ints):
                negative = {(path, ln) for (ln, _), i in zip(rows, ints) if i < 0}
                if negative:
                    return "error", negative, None
                names = [str(i) for i in range(max(ints) + 1)]
            else:
                names = sorted({str(rec["label"]) for _, rec in rows})
        ids = []
        for ln, rec in rows:
            if names == [str(i) for i in range(len(names))]:
                i = as_int(rec["label"])
                if i is None or i < 0:
                    bad.add((path, ln))
                elif i >= len(names):
                    out_of_range.add((path, ln))
            elif str(rec["label"]) not in names:
                bad.add((path, ln))
            else:
                i = names.index(str(rec["label"]))
            ids.append(i)
        if bad:
            return "error", bad, None
        parsed[spec["role"]] = [(str(rec["text"]), i) for (_, rec), i in zip(rows, ids)]
    if out_of_range:
        return "range", out_of_range, parsed
    return "ok", names, parsed


@fuzz_settings(EXAMPLES)
@given(specs=datasets())
def test_data_files_load_with_one_label_map_or_fail_naming_file_and_line(specs):
    with tempfile.TemporaryDirectory() as folder:
        files = [(*write_file(folder, s), s) for s in specs]
        paths = {s["role"]: str(p) for p, _, s in files}
        ds = from_dict({"dataset": {"path": paths["train"], "val_path": paths.get("val"),
                                    "test_path": paths.get("test")}}).dataset
        verdict, detail, parsed = oracle(files)
        if verdict != "error" and ("val" not in paths or "test" not in paths):
            n_main = len(parsed["train"])
            n_train, n_val = round(n_main * 0.8), round(n_main * 0.1)
            carved = {"val": n_val, "test": n_main - n_train - n_val}
            if any(carved[r] == 0 for r in carved if r not in paths):     # a split carved from train is empty
                verdict, detail = "error", {(paths["train"], None)}
        try:
            splits = data.load_splits(ds)
            n_classes = data.check_labels(splits)
        except ValueError as e:
            msg = str(e)
            assert verdict != "ok", f"refused a loadable dataset: {msg}"
            if any(ln is not None for _, ln in detail):
                assert any(f"{p} line {ln}:" in msg for p, ln in detail), \
                    f"the error names no bad row of {sorted(detail)}: {msg}"
            else:
                assert any(p in msg for p, _ in detail), f"the error does not name the file: {msg}"
            return
        assert verdict == "ok", f"loaded a dataset with bad rows {sorted(detail)}"
        assert splits.label_names == detail and n_classes == len(detail)
        got = {"train": [(e.text, e.label) for e in splits.train], "val": [(e.text, e.label) for e in splits.val],
               "test": [(e.text, e.label) for e in splits.test]}
        for role in ("val", "test"):
            if role in parsed:                                      # a given file is that split, in order
                assert got[role] == parsed[role], role
        carved = [r for r in ("val", "test") if r not in parsed]
        if not carved:
            assert got["train"] == parsed["train"]
        else:                                                       # every row of the main file, once
            assert Counter(got["train"]) + sum((Counter(got[r]) for r in carved), Counter()) == \
                Counter(parsed["train"])


@pytest.mark.parametrize("label", ["--3", "³", "-²"])
def test_labels_that_only_look_like_ints_make_a_string_labelled_file(tmp_path, label):
    """Integer labels are ASCII decimal ints; anything else ('--3', '³') is a class name, so the file's
    labels are all names, sorted: no int() crash naming nothing."""
    (tmp_path / "d.csv").write_text(f"text,label\na,0\nb,{label}\nc,1\n", encoding="utf-8")
    examples, names = data.load_file(tmp_path / "d.csv")
    assert names == sorted(["0", label, "1"])
    assert [names[e.label] for e in examples] == ["0", label, "1"]


def test_a_non_utf8_file_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "d.csv").write_bytes("text,label\nbon,1\ncaf\xe9,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"d\.csv"):
        data.load_file(tmp_path / "d.csv")


# ============================================================================================
# (b) config values
# ============================================================================================
# key -> (kind, lower bound, bound included, upper bound or None, nullable, accepts numeric strings)
# (README: learning_rate, mezo_eps, max_grad_norm > 0; warmup_ratio in [0, 1]; counts >= 1; method
# options: r a positive int, dropout in [0, 1), alpha a finite number; config floats also take the
# strings YAML reads 1e-3 as)
SPEC = {
    "training.learning_rate": ("float", 0, False, None, True),
    "training.warmup_ratio": ("float", 0, True, 1, False),
    "training.max_grad_norm": ("float", 0, False, None, True),
    "training.mezo_eps": ("float", 0, False, None, False),
    "training.weight_decay": ("float", 0, True, None, False),
    "training.epochs": ("int", 1, True, None, False),
    "training.batch_size": ("int", 1, True, None, False),
    "training.eval_batch_size": ("int", 1, True, None, False),
    "training.max_steps": ("int", 1, True, None, True),
    "training.log_every": ("int", 1, True, None, False),
    "training.seed": ("int", 0, True, 2**32 - 1, False),
    "dataset.max_length": ("int", 8, True, None, False),
    "dataset.n_train": ("int", 1, True, None, True),
    "model.num_labels": ("int", 2, True, None, True),
    "method.args.r": ("arg_int", 1, True, None, False),
    "method.args.dropout": ("arg_float", 0, True, 1, False),     # [0, 1)
    "method.args.alpha": ("arg_float", None, True, None, True),
}


def accepts(key, value):
    kind, lo, lo_incl, hi, nullable = SPEC[key]
    if value is None:
        return nullable
    if isinstance(value, bool):
        return False
    if kind in ("int", "arg_int"):
        if not isinstance(value, int):
            return False
    else:
        if isinstance(value, str) and kind == "float":
            try:
                value = float(value)
            except ValueError:
                return False
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
    if lo is not None and (value < lo if lo_incl else value <= lo):
        return False
    if hi is not None and (value >= hi if key == "method.args.dropout" else value > hi):
        return False
    return True


junk = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.integers(-10**12, 10**12),
                 st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 0.0, 1.0, -1, 0.5, 1.5]),
                 st.sampled_from(["1e-3", "0.5", "1", "abc", "", "nan", "-inf", " 2e-1 ", "1,5", "0x10"]),
                 st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.sampled_from(["a"]), st.integers(0, 2),
                                                                         max_size=1))


def valid_value(key, training=False):
    """Values the oracle accepts (small ones: ``training`` examples run them)."""
    kind, lo, _, hi, nullable = SPEC[key]
    if key == "model.num_labels" and training:          # a new head: test_num_labels_that_differ_from_the_saved_head...
        return st.sampled_from([None, 2])
    if key == "training.seed":
        return st.integers(lo, hi)
    if key in ("training.epochs", "training.max_steps"):
        return st.integers(1, 2)
    if key in ("training.batch_size", "training.eval_batch_size", "training.log_every", "dataset.n_train"):
        return st.integers(1, 40)
    if key == "dataset.max_length":
        return st.integers(8, 64)
    if key == "model.num_labels":
        return st.integers(2, 5)
    if key == "method.args.r":
        return st.integers(1, 4)
    if key == "method.args.dropout":
        return st.sampled_from([0, 0.0, 0.5, 0.999]) | st.floats(0, 0.99)
    if key == "training.warmup_ratio":
        return st.sampled_from([0, 0.0, 1, 1.0, "0.5"]) | st.floats(0, 1)
    if key == "method.args.alpha":
        return st.sampled_from([None, -4.0, 0, 16]) | st.floats(-100, 100)
    if kind == "float":
        lo_v = 1e-6 if key != "training.weight_decay" else 0
        return st.sampled_from(["1e-3", 1e-3, 1]) | st.floats(lo_v, 1.0)
    raise AssertionError(key)


def base_config(model, folder):
    words = (["good", "great", "fine"], ["bad", "awful", "dull"])
    (Path(folder) / "d.jsonl").write_text("".join(
        json.dumps({"text": f"a {words[i % 2][i % 3]} film {i}", "label": 1 - i % 2}) + "\n" for i in range(30)))
    return {"name": "fuzz", "dataset": {"path": str(Path(folder) / "d.jsonl"), "max_length": 16},
            "model": {"path": model}, "method": {"name": "lora", "args": {"r": 2}},
            "training": {"epochs": 1, "max_steps": 2, "batch_size": 8, "eval_batch_size": 16, "progress": False,
                         "tensorboard": False, "device": "cpu", "threads": 1,
                         "output_dir": str(Path(folder) / "out")}}


def with_values(raw, values):
    raw = json.loads(json.dumps(raw))
    for key, value in values.items():
        node = raw
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = value
    return raw


def run_cli(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.err


@st.composite
def config_values(draw, valid_only=False):
    keys = draw(st.lists(st.sampled_from(sorted(SPEC)), min_size=1, max_size=3, unique=True))
    if valid_only:
        return {k: draw(valid_value(k, training=True)) for k in keys}
    return {k: draw(st.one_of(valid_value(k), junk)) for k in keys}


def test_config_values_are_accepted_or_refused_naming_the_key(tiny_model, tmp_path_factory, capsys):  # noqa: F811
    folder = tmp_path_factory.mktemp("cfg")
    raw0 = base_config(tiny_model, folder)

    @fuzz_settings(EXAMPLES)
    @given(values=config_values())
    def check(values):
        raw = with_values(raw0, values)
        f = folder / "c.yaml"
        f.write_text(yaml.safe_dump(raw, allow_unicode=True))
        bad = [k for k, v in values.items() if not accepts(k, v)]
        rc, err = run_cli(["check", str(f)], capsys)
        if not bad:
            assert rc == 0, f"check refused a valid config {values}: {err}"
            return
        assert rc == 2, f"check accepted {values} (bad: {bad})"
        assert any(k + ":" in err for k in bad), f"the error names none of {bad}: {err}"
        shutil.rmtree(folder / "out", ignore_errors=True)
        rc, err = run_cli(["finetune", str(f)], capsys)
        assert rc == 2 and any(k + ":" in err for k in bad), f"finetune: rc {rc}, {err}"
        assert not (folder / "out").exists(), f"finetune wrote to output_dir before refusing {values}"
    check()


def test_accepted_config_values_train_a_tiny_model(tiny_model, tmp_path_factory, capsys):  # noqa: F811
    folder = tmp_path_factory.mktemp("cfg_run")
    raw0 = base_config(tiny_model, folder)

    @fuzz_settings(TRAIN_RUNS)
    @given(values=config_values(valid_only=True), optimizer=st.sampled_from(["adamw", "adamw", "mezo"]))
    def check(values, optimizer):
        raw = with_values(raw0, {**values, "training.optimizer": optimizer})
        raw["training"]["max_steps"] = min(raw["training"].get("max_steps") or 2, 2)
        f = folder / "c.yaml"
        f.write_text(yaml.safe_dump(raw, allow_unicode=True))
        shutil.rmtree(folder / "out", ignore_errors=True)
        rc, err = run_cli(["finetune", str(f)], capsys)
        assert rc == 0, f"finetune failed on an accepted config {values}: {err}"
        res = json.loads((folder / "out" / "results.json").read_text())
        assert 1 <= res["steps"] <= 2 and 0 <= res["accuracy"] <= 1
    check()


def test_a_seed_out_of_range_is_refused_or_trains(tiny_model, tmp_path, capsys):  # noqa: F811
    raw = with_values(base_config(tiny_model, tmp_path), {"training.seed": 10**15, "training.max_steps": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    rc_check, _ = run_cli(["check", str(tmp_path / "c.yaml")], capsys)
    rc, err = run_cli(["finetune", str(tmp_path / "c.yaml")], capsys)
    refused = rc_check == 2 and rc == 2 and "training.seed" in err and not (tmp_path / "out").exists()
    assert refused or (rc_check == 0 and rc == 0), f"check rc {rc_check}, finetune rc {rc}: {err.strip()[-200:]}"


def test_num_labels_that_differ_from_the_saved_head_get_a_new_head(tiny_model, tmp_path, capsys):  # noqa: F811
    raw = with_values(base_config(tiny_model, tmp_path), {"model.num_labels": 3, "training.max_steps": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert run_cli(["check", str(tmp_path / "c.yaml")], capsys)[0] == 0
    rc, err = run_cli(["finetune", str(tmp_path / "c.yaml")], capsys)
    assert rc == 0 or (rc == 2 and "model.num_labels" in err), err.strip()[-300:]
