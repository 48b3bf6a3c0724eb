"""The harness on several processes (harness/distributed.py): 2 CPU processes under torchrun (gloo)
against the 1-process run with the same global batch -- DDP through the CLI, FSDP2, MeZO, an
interrupted and resumed run -- and summary / save_adapter / load_adapter on DDP- and FSDP2-wrapped models.
One torchrun launch (tests/_dist_worker.py) does every multi-process part."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from models import save_tiny_bert, write_sentiment_words

from spu_kernels.harness import distributed as hdist
from spu_kernels.harness.config import from_dict
from spu_kernels.harness.train import _plan, _rank_part, run

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


MEZO = {"optimizer": "mezo", "learning_rate": 1e-3}
ACCUM = {"batch_size": 3, "gradient_accumulation_steps": 2}     # global batch 3 x 2 processes x 2 = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny BERT (dropout off, so 1 and 2 processes see one function), the data, the configs."""
    tmp = tmp_path_factory.mktemp("dist")
    save_tiny_bert(tmp / "model", dropout=0.0)
    write_sentiment_words(tmp / "d.jsonl", 100)

    def config(name, **training):
        # 80 train / 10 val / 10 test; global batch 12: 7 steps an epoch, the last one ragged (8 = 6 + 2)
        return {"name": name, "dataset": {"path": str(tmp / "d.jsonl"), "max_length": 16},
                "model": {"path": str(tmp / "model")}, "method": {"name": "lora", "args": {"r": 2}},
                "training": {"epochs": 1, "batch_size": 6, "eval_batch_size": 2, "learning_rate": 1e-2,
                             "progress": False, "tensorboard": False, "device": "cpu", "threads": 1,
                             "compile": "false", "output_dir": str(tmp / name)} | training}
    return tmp, config


@pytest.fixture(scope="module")
def two_procs(setup):
    """The 2-process runs (one torchrun launch); their output folder."""
    tmp, config = setup
    spec = {"model": str(tmp / "model"), "out": str(tmp)}
    for name, training in (("ddp", {}), ("fsdp", {"fsdp": True}), ("mezo", MEZO), ("resume", {"epochs": 2}),
                           ("accum", ACCUM), ("fsdp_accum", {"fsdp": True, **ACCUM})):
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config(name, **training)))
        spec[name] = str(tmp / f"{name}.yaml")
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(_free_port()), str(ROOT / "tests" / "_dist_worker.py"), str(tmp / "spec.json")],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tmp, proc.stderr


def _one_proc(setup, name, **training):
    """The 1-process run with the same global batch (12)."""
    tmp, config = setup
    raw = config(name, **({"batch_size": 12} | training))
    return run(from_dict(raw))


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "best" / "adapter.safetensors"))


def _assert_same_run(two: dict, one, folder: Path, one_folder: Path, tol: float = 1e-6) -> None:
    assert two["world_size"] == 2 and two["global_batch_size"] == 12 and one.global_batch_size == 12
    assert two["steps"] == one.steps and two["n_train"] == one.n_train == 80
    assert two["history"] == one.history                  # per-epoch validation metrics, exactly
    assert (two["accuracy"], two["f1"]) == (one.accuracy, one.f1)
    a, b = _adapter(folder), _adapter(one_folder)
    assert a.keys() == b.keys()
    for k in a:                                           # fp32, up to the gradient reduction's order
        torch.testing.assert_close(a[k], b[k], rtol=10 * tol, atol=tol, msg=k)
    moved = {k for k in a if not torch.equal(a[k], torch.zeros_like(a[k]))}
    assert moved, "the adapters did not train"


def test_ddp_run_equals_one_process(setup, two_procs):
    tmp, log = two_procs
    one = _one_proc(setup, "ref")
    two = json.loads((tmp / "ddp" / "results.json").read_text())
    _assert_same_run(two, one, tmp / "ddp", tmp / "ref")
    assert (tmp / "ddp" / "table.md").exists()            # the CLI's table, written once by rank 0
    assert "2 processes (data parallel), global batch 12" in (tmp / "ddp" / "table.md").read_text()
    assert log.count("test accuracy") == 6                # rank 0 logs (ddp, fsdp, mezo, resumed, accum,
    #                                                       fsdp_accum); rank 1 is quiet


def test_fsdp_run_equals_one_process(setup, two_procs):
    tmp, _ = two_procs
    one = _one_proc(setup, "ref_fsdp")
    two = json.loads((tmp / "fsdp" / "results.json").read_text())
    assert two["fsdp"] is True
    _assert_same_run(two, one, tmp / "fsdp", tmp / "ref_fsdp")


def test_mezo_run_equals_one_process(setup, two_procs):
    """The same perturbation seeds on both ranks and the loss averaged over them: the projected
    gradient is the global batch's (a loss difference over 2 eps magnifies rounding: looser)."""
    tmp, _ = two_procs
    one = _one_proc(setup, "ref_mezo", **MEZO)
    two = json.loads((tmp / "mezo" / "results.json").read_text())
    _assert_same_run(two, one, tmp / "mezo", tmp / "ref_mezo", tol=1e-5)


def test_gradient_accumulation_equals_one_process(setup, two_procs):
    """2 micro-batches of 3 per rank (DDP no_sync / FSDP2 set_requires_gradient_sync for the first): the
    1-process run with batch 12; the epoch's last step (8 = 6 + 2) has a micro-batch rank 1 has no part of."""
    tmp, _ = two_procs
    one = _one_proc(setup, "ref_accum")
    for name in ("accum", "fsdp_accum"):
        two = json.loads((tmp / name / "results.json").read_text())
        assert two["gradient_accumulation_steps"] == 2 and two["fsdp"] is (name == "fsdp_accum")
        _assert_same_run(two, one, tmp / name, tmp / "ref_accum")


def test_resume_on_two_processes(setup, two_procs):
    tmp, _ = two_procs
    one = _one_proc(setup, "ref_resume", epochs=2)
    two = json.loads((tmp / "resume" / "results.json").read_text())
    assert "resumed from" in two_procs[1]
    _assert_same_run(two, one, tmp / "resume", tmp / "ref_resume")


def _api(tmp: Path, kind: str) -> list[dict]:
    return [json.loads((tmp / f"api_rank{rank}.json").read_text())[kind] for rank in (0, 1)]


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_summary_and_save_adapter_on_wrapped_models(two_procs, kind):
    for got in _api(two_procs[0], kind):
        assert got.get("saved"), got                      # the whole tensors, written once by rank 0
        assert "lora" in got["summary"].lower(), got


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_load_adapter_on_wrapped_models(two_procs, kind):
    for got in _api(two_procs[0], kind):
        assert got["ok"], got.get("error", "") + "\n" + got.get("tb", "")
        assert got["loaded"], got


# --------------------------------------------------------------------------------------------
# single-process pieces
# --------------------------------------------------------------------------------------------
def test_rank_parts_cover_each_global_batch_once():
    order = list(range(23))
    for world in (1, 2, 3):
        for i in range(3):
            parts = [_rank_part(order, i, 4, hdist.Dist(rank=r, world_size=world)) for r in range(world)]
            n = parts[0][1]
            assert sum((p for p, _ in parts), []) == order[i * 4 * world:i * 4 * world + n]
            assert all(g == n for _, g in parts)
    assert _rank_part(order, 2, 10, hdist.Dist())[0] == order[20:]     # one process: batch i, as always


def test_eval_shards_pad_and_gather_exactly():
    order = [5, 3, 0, 4, 1, 2, 6]
    shards = [hdist.shard(order, hdist.Dist(rank=r, world_size=3)) for r in range(3)]
    assert {len(s) for s in shards} == {3}                # the same number of forward passes on every rank
    counted = sorted(i for s in shards for i, c in s if c)
    assert counted == sorted(order)                       # the padding counts nowhere: nothing twice


def test_fsdp_on_one_process_and_phases_on_several_are_refused(setup, monkeypatch):
    _, config = setup
    with pytest.raises(ValueError, match="training.fsdp: FSDP2 shards the model over the processes"):
        _plan(from_dict(config("x", fsdp=True)), None, None, None, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="optimizer: mezo: MeZO keeps no gradients"):
        _plan(from_dict(config("x", fsdp=True, optimizer="mezo")), None, None, None, False)
    raw = config("x")
    raw["phases"] = [{"method": {"name": "full"}}, {"method": {"name": "lora", "args": {"r": 2}}}]
    with pytest.raises(ValueError, match="runs with phases .* run them as one process"):
        _plan(from_dict(raw), None, None, None, False)


@pytest.mark.parametrize("family", ["bert", "t5", "gpt2", "llama"])
def test_fsdp_blocks_are_the_transformer_blocks(family):
    """FSDP2 shards each transformer block once: T5's per-block ``layer`` sub-lists are not blocks
    (sharding a child after its block fails inside torch's DeviceMesh)."""
    from models import make_model
    model = make_model(family)
    found = hdist.blocks(model)
    cfg = model.config
    want = cfg.num_layers + cfg.num_decoder_layers if family == "t5" else cfg.num_hidden_layers
    assert len(found) == want and len({id(b) for b in found}) == want
    assert not any(a is not b and any(m is b for m in a.modules()) for a in found for b in found)
