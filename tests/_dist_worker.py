"""One rank of tests/test_distributed.py's runs under ``torchrun --nproc_per_node 2`` (CPU, gloo).

    torchrun --nproc_per_node 2 tests/_dist_worker.py SPEC.json

SPEC: {"ddp" | "fsdp" | "mezo" | "resume" | "accum" | "fsdp_accum": config yaml, "model": folder, "out":
folder}. It runs the CLI on the DDP config, ``run`` on the FSDP2, MeZO and gradient-accumulation
configs, an interrupted and resumed DDP run, and summary / save_adapter / load_adapter on a DDP- and
an FSDP2-wrapped patched model; each check's outcome goes to ``out/api_rank<R>.json`` (the pytest side asserts on them).
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch


def _api_checks(model_dir: str, out: Path, rank: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForSequenceClassification

    import spu_kernels
    from spu_kernels.patching.checkpoint import adapter_state_dict
    from spu_kernels.patching.unwrap import full_tensor

    def fresh():
        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(model_dir)
        spu_kernels.patch(m, "lora", r=2)
        with torch.no_grad():                        # lora_B starts at 0: make the saved tensors nonzero
            for n, p in m.named_parameters():
                if p.requires_grad:
                    p.add_(0.01 * (torch.arange(p.numel()).reshape(p.shape) % 7 + 1))
        return m

    results = {}
    for kind in ("ddp", "fsdp"):
        res = results[kind] = {"ok": False}
        try:
            m = fresh()
            want = {n: p.detach().clone() for n, p in adapter_state_dict(m).items()}
            if kind == "ddp":
                wrapped = torch.nn.parallel.DistributedDataParallel(m)
            else:
                mesh = init_device_mesh("cpu", (dist.get_world_size(),))
                for blk in m.bert.encoder.layer:
                    fully_shard(blk, mesh=mesh)
                fully_shard(m, mesh=mesh)
                wrapped = m
            s = spu_kernels.summary(wrapped)
            path = out / f"{kind}.safetensors"
            spu_kernels.save_adapter(wrapped, path, is_main_process=rank == 0)
            dist.barrier()
            from safetensors.torch import load_file
            saved = load_file(str(path))
            res.update(summary=str(s)[:200], saved=saved.keys() == want.keys()
                       and all(torch.equal(saved[k], want[k]) for k in want))
            # load into a second wrapped model whose adapters differ, then compare whole tensors
            m2 = fresh()
            with torch.no_grad():
                for p in m2.parameters():
                    if p.requires_grad:
                        p.zero_()
            if kind == "ddp":
                w2 = torch.nn.parallel.DistributedDataParallel(m2)
            else:
                for blk in m2.bert.encoder.layer:
                    fully_shard(blk, mesh=mesh)
                fully_shard(m2, mesh=mesh)
                w2 = m2
            spu_kernels.load_adapter(w2, path)
            got = {n: full_tensor(t).detach() for n, t in adapter_state_dict(w2).items()}
            res.update(ok=True, loaded=got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want))
        except Exception as e:  # noqa: BLE001 -- reported to the test, which names the failing step
            res.update(error=f"{type(e).__name__}: {e}", tb=traceback.format_exc()[-2000:])
    return results


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    from helpers import run_interrupted_in_epoch_2

    from spu_kernels.harness import cli, train
    from spu_kernels.harness.config import load_config

    assert cli.main(["finetune", spec["ddp"]]) == 0
    for name in ("fsdp", "mezo", "accum", "fsdp_accum"):
        cfg, _ = load_config(spec[name], [])
        train.run(cfg)
    # resume: interrupted at epoch 2's evaluation (epoch 1's checkpoint is written), then resumed
    cfg, _ = load_config(spec["resume"], [])
    run_interrupted_in_epoch_2(cfg)
    train.run(cfg, resume=True)

    rank = int(os.environ["RANK"])
    api = _api_checks(spec["model"], out, rank)
    (out / f"api_rank{rank}.json").write_text(json.dumps(api, indent=1))
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    # both ranks leave together, the process group closed while both are alive; then exit without the
    # interpreter's teardown, where a gloo thread once aborted rank 1 ("terminate called without an
    # active exception") after every check had passed
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
