"""The ``spu-kernels`` command line itself: --version, `check` of the local paths a config names,
and a quiet exit when stdout is closed early (`spu-kernels schema | head`)."""
import re
import subprocess
import sys

import pytest
import yaml

import spu_kernels
from spu_kernels.harness import cli


@pytest.fixture
def config(tmp_path):
    """A config whose data file and model folder exist (`check` never loads the model)."""
    (tmp_path / "d.jsonl").write_text('{"text": "a film", "label": 1}\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return {"dataset": {"path": str(tmp_path / "d.jsonl")}, "model": {"path": str(tmp_path / "model")},
            "method": {"name": "lora"}, "training": {"device": "cpu", "output_dir": str(tmp_path / "out")}}


def _check(raw, tmp_path, capsys, *argv):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw))
    rc = cli.main(["check", str(f), *argv])
    return rc, capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(r"spu_kernels \S+ \(torch \S+, triton [^,]+, transformers \S+\)", out), out
    assert out.startswith(f"spu_kernels {spu_kernels.__version__} (torch ")


def test_check_accepts_existing_paths(config, tmp_path, capsys):
    rc, err = _check(config, tmp_path, capsys)
    assert rc == 0 and "OK" in err, err


@pytest.mark.parametrize("override,message", [
    ("dataset.path=missing.jsonl", "dataset.path: missing.jsonl does not exist"),
    ("dataset.val_path=nope/val.csv", "dataset.val_path: nope/val.csv does not exist"),
    ("dataset.test_path={tmp}", "dataset.test_path: {tmp} is a folder, not a data file"),
    ("model.path=bert-base-uncased", "model.path: bert-base-uncased is not a folder"),
    ("model.path={tmp}", "model.path: {tmp} has no config.json"),
    ("cpu.dataset.path=small.jsonl", "with the cpu: overrides, dataset.path: small.jsonl does not exist"),
])
def test_check_names_the_key_and_the_missing_path(config, tmp_path, capsys, override, message):
    rc, err = _check(config, tmp_path, capsys, "--set", override.format(tmp=tmp_path))
    assert rc == 2 and message.format(tmp=tmp_path) in err, err


def test_finetune_stops_on_a_missing_model_folder_before_writing(config, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(config))
    rc = cli.main(["finetune", str(f), "--set", "model.path=no/such/model"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.path: no/such/model is not a folder" in err and "hub names" in err, err
    assert not (tmp_path / "out").exists()


def test_closed_stdout_exits_quietly():
    """`spu-kernels schema | head`: no BrokenPipeError traceback, the status of a command its pipe closed."""
    proc = subprocess.Popen([sys.executable, "-m", "spu_kernels", "schema"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()                 # the reader is gone before the CLI writes (its imports take a while)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err
