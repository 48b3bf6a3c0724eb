"""The harness killed with SIGKILL and resumed: ``python -m spu_kernels finetune CONFIG`` in a
subprocess (a tiny random BERT, 96 sentences, full fine-tuning with the model's dropout on, 5 epochs,
a checkpoint per epoch, CPU, one thread) is killed at random moments of its training and while it
writes a checkpoint (the ``epoch_N.tmp`` folder exists), then ``--resume``d to the end. The resumed
run must succeed and end exactly as an uninterrupted run of the same config does: the same
results.json (every metric and the per-epoch history; timings and memory aside) and bit-identical
final and best weights (the harness is deterministic on the CPU).

Four kills and seven subprocesses in all (each ~4 s of imports and model loading).
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from test_harness import tiny_model  # noqa: F401  (session fixture: a tiny random BERT folder)

VOLATILE = {"peak_memory_mb", "samples_per_s", "wall_s", "train_s", "output_dir"}
EPOCHS = 5
SETUP_LINE = "trainable"          # the harness logs it once the model is loaded, right before training
TIMEOUT = 180


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):  # noqa: F811
    """The config, and an uninterrupted run of it: (config path, its results, its folder, training time)."""
    folder = tmp_path_factory.mktemp("faults")
    words = (["good", "great", "fine", "lovely", "superb"], ["bad", "awful", "dull", "boring", "poor"])
    rows = [{"text": f"a {words[i % 2][(i * 7) % 5]} film, {words[(i // 3) % 2][i % 5]} acting {i}",
             "label": 1 - i % 2} for i in range(96)]
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = folder / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "faults", "dataset": {"path": str(folder / "d.jsonl"), "max_length": 16},
        "model": {"path": tiny_model}, "method": {"name": "full"},
        "training": {"epochs": EPOCHS, "batch_size": 8, "eval_batch_size": 32, "learning_rate": 1e-3,
                     "progress": False, "tensorboard": False, "device": "cpu", "threads": 1,
                     "save_checkpoints": True}}))
    proc, err = launch(cfg, folder / "straight")
    wait_for(lambda: SETUP_LINE in err.read_text(), proc, "the straight run's setup")
    t0 = time.monotonic()
    wait_for(lambda: "] test accuracy" in err.read_text(), proc, "the straight run's end of training")
    train_time = time.monotonic() - t0
    assert proc.wait(TIMEOUT) == 0, err.read_text()[-2000:]
    return cfg, results(folder / "straight"), folder / "straight", train_time


def launch(cfg, out, resume=False, tag=""):
    out.mkdir(parents=True, exist_ok=True)
    err = out.parent / f"{out.name}{tag}.stderr"
    argv = [sys.executable, "-m", "spu_kernels", "finetune", str(cfg), "--set", f"training.output_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(argv + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
                            stderr=open(err, "w"), cwd=out.parent, env=env)
    return proc, err


def wait_for(cond, proc, what, timeout=TIMEOUT, pause=0.0005):
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(pause)


def sigkill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(TIMEOUT) == -signal.SIGKILL, "the run had ended before the kill"


def results(out):
    res = json.loads((out / "results.json").read_text())
    return {k: v for k, v in res.items() if k not in VOLATILE}


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def assert_same_end(out, straight_res, straight_dir):
    assert results(out) == straight_res
    for rel in (f"checkpoints/epoch_{EPOCHS}/model.safetensors", "best/model.safetensors"):
        a, b = weights(straight_dir / rel), weights(out / rel)
        assert a.keys() == b.keys(), rel
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{rel}: {len(differ)} tensors differ from the uninterrupted run's, e.g. {differ[:3]}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"epoch_{EPOCHS}"]


def test_killed_at_random_moments_then_resumed_ends_as_the_uninterrupted_run(job):
    cfg, straight_res, straight_dir, train_time = job
    rng = random.Random(12)
    out = cfg.parent / "random_kills"
    left, kills = 1.0, 0                             # the fraction of the training still to run
    for i in range(2):
        proc, err = launch(cfg, out, resume=i > 0, tag=f".{i}")
        started = ("resumed from", "starting from scratch") if i > 0 else (SETUP_LINE,)
        wait_for(lambda: any(w in err.read_text() for w in started), proc, "the start of training")
        if i > 0:
            done = re.search(r"resumed from \S*epoch_(\d+)", err.read_text())
            left = 1 - (int(done.group(1)) if done else 0) / EPOCHS
        time.sleep(rng.uniform(0.05, 0.7) * left * train_time)
        if proc.poll() is None:                      # (a run far faster than the straight one may be done)
            sigkill(proc)
            kills += 1
    assert kills, "both runs ended before their kill"
    proc, err = launch(cfg, out, resume=True, tag=".final")
    assert proc.wait(TIMEOUT) == 0, err.read_text()[-2000:]
    assert_same_end(out, straight_res, straight_dir)


def test_killed_while_writing_checkpoints_then_resumed_ends_as_the_uninterrupted_run(job):
    cfg, straight_res, straight_dir, _ = job
    rng = random.Random(34)
    out = cfg.parent / "checkpoint_kills"
    ckpts = out / "checkpoints"
    mid_write = []
    for i, epoch in enumerate((2, 4)):
        proc, err = launch(cfg, out, resume=i > 0, tag=f".{i}")
        tmp = ckpts / f"epoch_{epoch}.tmp"
        wait_for(tmp.is_dir, proc, f"{tmp.name} to appear")
        time.sleep(rng.uniform(0.0, 0.01))          # somewhere inside the write
        sigkill(proc)
        if tmp.is_dir():                             # killed before the folder was complete and renamed
            mid_write.append(epoch)
            assert (ckpts / f"epoch_{epoch - 1}" / "COMPLETE").exists(), "the previous checkpoint is gone"
        if i > 0 and epoch - 2 in mid_write:
            assert "skipping the incomplete checkpoint" in err.read_text()
    assert mid_write, "no kill landed while a checkpoint was being written (the poll was too slow)"
    proc, err = launch(cfg, out, resume=True, tag=".final")
    assert proc.wait(TIMEOUT) == 0, err.read_text()[-2000:]
    log = err.read_text()
    if 4 in mid_write:
        assert f"skipping the incomplete checkpoint {ckpts / 'epoch_4.tmp'}" in log, log[-1500:]
        assert f"resumed from {ckpts / 'epoch_3'}" in log, log[-1500:]
    assert_same_end(out, straight_res, straight_dir)
