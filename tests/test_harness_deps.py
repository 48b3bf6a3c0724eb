"""The harness's own dependencies (pyyaml, tqdm, tensorboard, matplotlib) are the ``harness`` extra:
``import spu_kernels`` (and importing the harness itself) needs none of them, and a harness command
that needs a missing one says ``pip install 'spu_kernels[harness]'``."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from spu_kernels.harness import cli, report, train

REPO = Path(__file__).resolve().parents[1]
EXTRA = "pip install 'spu_kernels[harness]'"
HARNESS_DEPS = ("yaml", "tqdm", "tensorboard", "matplotlib")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_import_spu_kernels_needs_no_harness_dependency():
    """In a fresh process where they cannot be imported (sys.modules[name] = None): spu_kernels and
    the harness's modules import, `schema` runs, `check` (which reads YAML) names the extra."""
    proc = _python(f"""
        import sys
        for name in {HARNESS_DEPS!r} + ("torch.utils.tensorboard",):
            sys.modules[name] = None
        import spu_kernels
        import spu_kernels.harness, spu_kernels.harness.cli, spu_kernels.harness.train, spu_kernels.harness.report
        from spu_kernels.harness import cli
        print("rc", cli.main(["schema"]), cli.main(["check", "configs/siva_minilm_rt.yaml"]))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "rc 0 2"
    assert f"spu-kernels: error: the fine-tuning harness needs pyyaml for YAML configs, which is not installed: " \
           f"{EXTRA}" in proc.stderr
    # and where they are installed, importing spu_kernels loads none of them (torch.hub itself imports
    # tqdm when it is there)
    proc = _python("""
        import sys
        import spu_kernels
        print(sorted({m.split(".")[0] for m in sys.modules} & {"yaml", "tensorboard", "matplotlib"}))
    """)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stderr[-2000:]


def test_missing_yaml_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)
    assert cli.main(["check", str(REPO / "configs" / "siva_minilm_rt.yaml")]) == 2
    err = capsys.readouterr().err
    assert "spu-kernels: error: the fine-tuning harness needs pyyaml" in err and EXTRA in err


def test_missing_tqdm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match=r"needs tqdm for progress bars.*pip install 'spu_kernels\[harness\]'"):
        train.evaluate(torch.nn.Linear(1, 1), [], 0, torch.device("cpu"), None, 1, 2)


def test_missing_tensorboard_and_matplotlib_name_the_extra(monkeypatch, tmp_path, capsys):
    """Logs and the plot are extras of a run: without them it goes on, and says how to get them."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert train._open_output(tmp_path / "out", True, "lora") is None
    row = {"method": "lora", "accuracy": 0.5, "f1": 0.5, "peak_memory_mb": 1.0, "samples_per_s": 1.0,
           "trainable_params": 1, "total_params": 2, "memory_kind": "x", "model": "m"}
    assert report.plot([row], tmp_path / "table.png") is None
    err = capsys.readouterr().err
    assert "TensorBoard logs off" in err and "no table.png" in err and err.count(EXTRA) == 2
