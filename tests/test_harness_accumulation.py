"""``training.gradient_accumulation_steps`` and ``training.optimizer: adafactor`` in the harness: N
micro-batches of B train exactly as one batch of N x B (ragged last steps too, AdamW and MeZO), steps,
max_steps and the schedule count optimizer steps, Adafactor trains and resumes exactly, and the
combinations that cannot work are config errors. (Two processes: tests/test_distributed.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_interrupted_in_epoch_2
from models import save_tiny_bert, write_sentiment_words

from spu_kernels.harness import distributed as hdist
from spu_kernels.harness import train
from spu_kernels.harness.config import ConfigError, from_dict
from spu_kernels.harness.train import _plan, _step_parts, run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random BERT without dropout (micro-batches and one batch then see one function)."""
    folder = tmp_path_factory.mktemp("accum_bert")
    save_tiny_bert(folder, dropout=0.0)
    return folder


@pytest.fixture
def config(model_dir, tmp_path):
    write_sentiment_words(tmp_path / "d.jsonl", 60)

    def make(name, n_train=46, **training):
        return {"name": name, "dataset": {"path": str(tmp_path / "d.jsonl"), "max_length": 16, "n_train": n_train},
                "model": {"path": str(model_dir)}, "method": {"name": "lora", "args": {"r": 2}},
                "training": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "learning_rate": 1e-2,
                             "progress": False, "tensorboard": False, "device": "cpu", "compile": "false",
                             "output_dir": str(tmp_path / name)} | training}
    return make


def _adapter(res) -> dict:
    from safetensors.torch import load_file
    return load_file(f"{res.output_dir}/best/adapter.safetensors")


def _spy_steps(monkeypatch) -> list:
    """Record each optimizer step: (micro-batches, their weights, lr in force, the loss)."""
    calls, real = [], train._step

    def spy(ctx, ph, micro):
        lr = ph.opt.param_groups[0]["lr"]
        loss = real(ctx, ph, micro)
        calls.append({"n": len(micro), "weights": [w for _, w in micro], "lr": lr, "loss": float(loss),
                      "opt": ph.opt})
        return loss
    monkeypatch.setattr(train, "_step", spy)
    return calls


# --------------------------------------------------------------------------------------------
# the cut into steps and micro-batches
# --------------------------------------------------------------------------------------------
def test_step_parts_cover_the_order_once_and_match_the_plain_batches():
    order = list(range(23))
    for world in (1, 2, 3):
        for acc in (1, 2, 3):
            per_step = 4 * world * acc
            steps = -(-len(order) // per_step)
            seen = []
            for i in range(steps):
                parts = [_step_parts(order, i, 4, acc, hdist.Dist(rank=r, world_size=world)) for r in range(world)]
                n = parts[0][1]
                assert all(p[1] == n for p in parts) and n == len(order[i * per_step:(i + 1) * per_step])
                assert len({len(p[0]) for p in parts}) == 1          # every rank: as many micro-batches
                for k in range(len(parts[0][0])):                    # micro-batch k: a global batch, rank-cut
                    seen += sum((p[0][k] for p in parts), [])
            assert seen == order
            with pytest.raises(IndexError):
                _step_parts(order, steps, 4, acc, hdist.Dist(rank=0, world_size=world))
    # accumulation 1 is the plain cut; the last step of 23 in steps of 8 has micro-batches of 4 and 3
    assert _step_parts(order, 5, 4, 1, hdist.Dist()) == ([order[20:]], 3)
    assert _step_parts(order, 2, 4, 2, hdist.Dist()) == ([order[16:20], order[20:]], 7)


# --------------------------------------------------------------------------------------------
# accumulation = the big batch
# --------------------------------------------------------------------------------------------
def test_accumulated_micro_batches_equal_one_batch(config, monkeypatch):
    """42 = 3 x 12 + 6: in steps of 3 micro-batches of 4, the last step has 2 (4 + 2, the second
    ragged). The adapter is the one-batch-of-12 run's to fp32 rounding, loss and lr equal at every
    step; micro-batches of 4 without accumulation train differently (so the comparison can fail)."""
    calls = _spy_steps(monkeypatch)
    big = run(from_dict(config("big", 42, batch_size=12)))
    n_big = len(calls)
    acc = run(from_dict(config("acc", 42, batch_size=4, gradient_accumulation_steps=3)))
    micro = calls[n_big:]
    small = run(from_dict(config("small", 42, batch_size=4)))
    assert big.steps == acc.steps == 4 == n_big == len(micro) and small.steps == 11
    assert acc.global_batch_size == big.global_batch_size == 12
    assert acc.gradient_accumulation_steps == 3 and big.gradient_accumulation_steps == 1
    assert [c["n"] for c in micro] == [3, 3, 3, 2] and micro[-1]["weights"] == [4 / 6, 2 / 6]
    assert all(c["weights"] == [1 / 3] * 3 for c in micro[:3])
    for c_big, c_acc in zip(calls[:n_big], micro):
        assert c_acc["lr"] == c_big["lr"]
        assert c_acc["loss"] == pytest.approx(c_big["loss"], rel=1e-5)
    a, b, c = _adapter(acc), _adapter(big), _adapter(small)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(b[k], torch.zeros_like(b[k])) for k in b)                 # it trained
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3
    assert acc.history == big.history


def test_steps_max_steps_and_schedule_count_optimizer_steps(config, monkeypatch):
    """46 samples in steps of 4 x 2: 6 steps an epoch; max_steps 8 stops in epoch 2; the linear decay
    (no warm-up) runs over the 8 optimizer steps."""
    calls = _spy_steps(monkeypatch)
    res = run(from_dict(config("sched", batch_size=4, gradient_accumulation_steps=2, epochs=3, max_steps=8,
                               warmup_ratio=0.0)))
    assert res.steps == 8 == len(calls) and res.epochs == pytest.approx(8 / 6)
    assert [c["n"] for c in calls] == [2] * 8
    assert [c["lr"] for c in calls] == pytest.approx([1e-2 * (8 - s) / 8 for s in range(8)], rel=1e-12)
    assert [h["step"] for h in res.history] == [6, 8]
    saved = json.loads(Path(res.output_dir, "results.json").read_text())
    assert saved["gradient_accumulation_steps"] == 2 and saved["global_batch_size"] == 8


def test_constant_schedule_after_warm_up(config, monkeypatch):
    """lr_schedule: constant holds the peak after the linear warm-up (the T5 recipe: warmup_ratio 0)."""
    calls = _spy_steps(monkeypatch)
    run(from_dict(config("const", batch_size=4, gradient_accumulation_steps=2, epochs=1, warmup_ratio=0.5,
                         lr_schedule="constant")))
    assert [c["lr"] for c in calls] == pytest.approx([1e-2 * (s + 1) / 3 for s in range(3)] + [1e-2] * 3,
                                                     rel=1e-12)


def test_mezo_accumulation_averages_the_projected_gradient(config):
    """MeZO's loss over 2 micro-batches is the step's mean loss: the same perturbations (seeded) give
    the big batch's update (a loss difference over 2 eps magnifies rounding: looser)."""
    mezo = {"optimizer": "mezo", "learning_rate": 1e-3, "mezo_eps": 1e-2}
    big = run(from_dict(config("mbig", batch_size=8, **mezo)))
    acc = run(from_dict(config("macc", batch_size=4, gradient_accumulation_steps=2, **mezo)))
    a, b = _adapter(acc), _adapter(big)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(b[k], torch.zeros_like(b[k])) for k in b)


# --------------------------------------------------------------------------------------------
# Adafactor
# --------------------------------------------------------------------------------------------
def test_adafactor_trains(config, monkeypatch):
    """Full fine-tuning with Adafactor, one step an epoch over 8 samples (2 micro-batches): AdamW's
    parameter groups (no decay on biases and norms), and the loss falls."""
    calls = _spy_steps(monkeypatch)
    raw = config("ada", 8, batch_size=4, gradient_accumulation_steps=2, epochs=12, optimizer="adafactor",
                 learning_rate=1e-2, weight_decay=0.1, eval_every_epoch=False, save_checkpoints=False)
    run(from_dict(raw | {"method": {"name": "full"}}))
    opt = calls[0]["opt"]
    from transformers.optimization import Adafactor
    assert isinstance(opt, Adafactor) and not opt.defaults["relative_step"] and not opt.defaults["scale_parameter"]
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert all(p.ndim == 1 for p in opt.param_groups[1]["params"])
    losses = [c["loss"] for c in calls]
    assert len(losses) == 12 and sum(losses[-2:]) < 0.9 * sum(losses[:2]), losses


def test_adafactor_resumes_exactly(config):
    """Interrupted in epoch 2 and resumed: Adafactor's state (step, row / column moments) comes back,
    so the weights are the uninterrupted run's bit for bit; a checkpoint of other settings is refused."""
    from safetensors.torch import load_file
    settings = {"batch_size": 4, "gradient_accumulation_steps": 2, "epochs": 3, "optimizer": "adafactor",
                "learning_rate": 0.1}
    straight = run(from_dict(config("straight", 16, **settings) | {"method": {"name": "full"}}))
    raw = config("resumed", 16, **settings) | {"method": {"name": "full"}}
    run_interrupted_in_epoch_2(from_dict(raw))
    resumed = run(from_dict(raw), resume=True)
    assert resumed.steps == straight.steps == 6 and resumed.history == straight.history
    a, b = (load_file(f"{r.output_dir}/best/model.safetensors") for r in (resumed, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = train.latest_checkpoint(Path(resumed.output_dir))
    for key, value in (("gradient_accumulation_steps", 1), ("optimizer", "adamw")):
        other = {"optimizer": "adafactor", "gradient_accumulation_steps": 2} | {key: value}
        with pytest.raises(ValueError, match=f"was trained with training.{key}: .*this run has {value}"):
            train._resume(ckpt, None, "full", None, None, None, torch.device("cpu"), other)   # before any loading


# --------------------------------------------------------------------------------------------
# config errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, pattern", [
    ({"method": {"name": "fishmask", "args": {"p": 0.01}}, "training": {"optimizer": "adafactor"}},
     r"training\.optimizer: adafactor does not apply to method 'fishmask': it trains with its own optimizer, "
     r"spu_kernels\.MaskedAdamW .* use optimizer: adamw \(or mezo\)"),
    ({"method": {"name": "lora"}, "training": {"optimizer": "adafactor", "fsdp": True}},
     r"training\.optimizer: adafactor with training\.fsdp: .* use fsdp: false"),
    ({"phases": [{"method": {"name": "full"}, "training": {"optimizer": "mezo"}},
                 {"method": {"name": "fishmask"}, "training": {"optimizer": "adafactor"}}]},
     r"phases\[1\]: training\.optimizer: adafactor does not apply to method 'fishmask'"),
    ({"training": {"optimizer": "adafactor"}, "compare": {"fishmask": {"learning_rate": 1e-3}}},
     r"compare\.fishmask: training\.optimizer: adafactor does not apply"),
    ({"training": {"optimizer": "adafacter"}}, r"training\.optimizer: 'adafacter' is not allowed; choose one of "
                                               r"adamw, adafactor, mezo \(did you mean 'adafactor'\?\)"),
    ({"training": {"gradient_accumulation_steps": 0}}, r"training\.gradient_accumulation_steps: must be >= 1"),
    ({"training": {"gradient_accumulation_steps": 1.5}}, r"training\.gradient_accumulation_steps: must be an "
                                                         r"integer"),
])
def test_config_errors(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(raw)


def test_adafactor_with_fishmask_refused_for_a_method_given_at_run_time(config):
    """``--methods fishmask`` / ``run(cfg, method="fishmask")`` on an adafactor config: refused before any work."""
    cfg = from_dict(config("x", optimizer="adafactor"))
    with pytest.raises(ConfigError, match="adafactor does not apply to method 'fishmask'"):
        _plan(cfg, "fishmask", None, None, False)
