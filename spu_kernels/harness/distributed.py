"""The harness on several processes: ``torchrun --nproc_per_node N -m spu_kernels finetune ...`` or
``accelerate launch -m spu_kernels finetune ...`` (both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR).

``setup`` starts the process group (nccl with device cuda:LOCAL_RANK on GPUs, gloo on the CPU) once
per process; ``wrap`` puts the patched model in DDP or, with ``training.fsdp``, shards it with
FSDP2 (``fully_shard`` on each transformer block, then the root). ``shard`` / ``gather_predictions``
split an evaluation over the ranks and put the predictions back together exactly (the padded last
shard is dropped, so no sample counts twice). ``full_params`` gathers FSDP2's sharded parameters
for saving; ``grad_sync`` turns the gradient reduction off for all but the last micro-batch of a
step (gradient accumulation); ``copy_full_`` writes a whole tensor back into a sharded one; ``full_optimizer_state`` /
``load_optimizer_state`` save and load an optimizer's state whole (as one process would). With one process every
helper is a no-op, and the harness runs as it always did.
"""
from __future__ import annotations

import atexit
import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (one process: rank 0 of 1)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name}={value!r} is not an integer (torchrun / accelerate "
                         "launch set it)") from None


def current() -> Dist:
    """The launch this process belongs to, from the launcher's environment variables."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Dist()
    return Dist(rank=_env_int("RANK", 0), world_size=world, local_rank=_env_int("LOCAL_RANK", 0))


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs and writes."""
    return current().main


def resolve_device(name: str, d: Dist) -> torch.device:
    """``training.device`` for one process of a multi-process run: GPUs give cuda:LOCAL_RANK."""
    dev = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                       "cpu" if name == "auto" else name)
    if dev.type != "cuda":
        return dev
    if dev.index is not None:
        raise ValueError(f"training.device: {name!r} names one GPU, but under torchrun / accelerate launch each "
                         "process uses cuda:LOCAL_RANK; set device: cuda (or auto)")
    if not torch.cuda.is_available() or d.local_rank >= torch.cuda.device_count():
        raise ValueError(f"training.device: process LOCAL_RANK={d.local_rank} wants cuda:{d.local_rank}, but torch "
                         f"sees {torch.cuda.device_count()} GPU(s); start at most that many processes per machine "
                         "(--nproc_per_node), or use device: cpu")
    return torch.device("cuda", d.local_rank)


def setup(device: torch.device, d: Dist) -> None:
    """Start the process group for ``d`` (nothing for one process; an existing group is reused)."""
    if not d.enabled:
        return
    import torch.distributed as dist
    if dist.is_initialized():
        if dist.get_world_size() != d.world_size or dist.get_rank() != d.rank:
            raise ValueError(f"a process group of {dist.get_world_size()} processes (rank {dist.get_rank()}) is "
                             f"already running, but WORLD_SIZE={d.world_size}, RANK={d.rank}")
        return
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={d.world_size} but {var} is not set: start the run with torchrun "
                             "--nproc_per_node N -m spu_kernels finetune ... or accelerate launch")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(_teardown)


def _teardown() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        import torch.distributed as dist
        dist.barrier()


def all_gather_object(d: Dist, obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` for one process)."""
    if not d.enabled:
        return [obj]
    import torch.distributed as dist
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(d: Dist, obj):
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the ranks (``t`` itself for one process)."""
    if not d.enabled:
        return t
    import torch.distributed as dist
    t = t.detach().float().clone()
    dist.all_reduce(t)
    return t / d.world_size


def broadcast_module(d: Dist, model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a model)."""
    if not d.enabled:
        return
    import torch.distributed as dist
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


# --------------------------------------------------------------------------------------------
# the model on several processes
# --------------------------------------------------------------------------------------------
def blocks(lm: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``lm``: the children of the ModuleLists that its family's record
    names as layer stacks (spu_kernels.patching.architectures; matched at the end of the name, so
    T5's ``encoder.block.0.layer`` sub-lists are not blocks); [] for a family it does not know."""
    from ..patching.architectures import family_of, name_matches
    fam = family_of(lm)
    if fam is None:
        return []
    return [blk for name, mod in lm.named_modules() if isinstance(mod, nn.ModuleList)
            and any(name_matches(name, p) for p in fam.stacks) for blk in mod]


def wrap(model: nn.Module, lm: nn.Module, d: Dist, device: torch.device, fsdp: bool) -> nn.Module:
    """What the training steps call: FSDP2 (``fully_shard`` on each block of ``lm``, then on
    ``model``: the model itself, its parameters now DTensors), DDP around the model, or the model
    (one process)."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        broadcast_module(d, model)                  # every rank shards the same weights
        mesh = init_device_mesh(device.type, (d.world_size,))
        for blk in blocks(lm):
            fully_shard(blk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if not d.enabled:
        return model
    # static_graph: the patched model's graph is the same every step, so DDP learns once which
    # trainable parameters get no gradient (no find_unused_parameters search each step)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               static_graph=True)


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool):
    """Inside, backward passes through ``model`` (what ``wrap`` returned) reduce gradients over the
    ranks only if ``sync``: gradient accumulation's earlier micro-batches keep them local (DDP's
    ``no_sync``; FSDP2's ``set_requires_gradient_sync(False)``, unsharded gradients kept until the
    synced backward) and the last one reduces the sum. One process, or ``sync``: nothing changes."""
    if sync:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_params(model: nn.Module):
    """Inside, an FSDP2-sharded ``model``'s parameters are whole plain tensors on every rank (a
    collective: every rank enters); writes to them are not kept. Any other model: as it is."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield model
    finally:
        for m in sharded:
            m.reshard()


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param.copy_(full)``, where ``param`` may be a sharded DTensor (then a collective)."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor
        local = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


def _is_dtensor(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with FSDP2's sharded state (DTensors) gathered into whole CPU tensors (a
    collective: every rank calls it): the layout a 1-process run saves, so either loads the other's."""
    sd = opt.state_dict()
    state = {i: {k: v.full_tensor().cpu() if _is_dtensor(v) else v for k, v in s.items()}
             for i, s in sd["state"].items()}                # new dicts: sd's are the optimizer's own
    return {**sd, "state": state}


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """``opt.load_state_dict(sd)``, ``sd`` whole tensors (``full_optimizer_state``); state of a sharded
    parameter is sharded as the parameter is."""
    opt.load_state_dict(sd)
    for p, s in opt.state.items():
        if not _is_dtensor(p):
            continue
        from torch.distributed.tensor import distribute_tensor
        for k, v in s.items():
            if isinstance(v, torch.Tensor) and not _is_dtensor(v) and v.shape == p.shape:
                s[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


# --------------------------------------------------------------------------------------------
# evaluation over the ranks
# --------------------------------------------------------------------------------------------
def shard(order: list[int], d: Dist) -> list[tuple[int, bool]]:
    """This rank's share of ``order``: (item, counts) for positions rank, rank + W, ...; every rank
    gets ceil(n / W) items (so each runs the same number of forward passes, as FSDP2 needs), the
    padding repeats the first items with counts=False."""
    n, w = len(order), d.world_size
    return [(order[(d.rank + w * k) % n], d.rank + w * k < n) for k in range(math.ceil(n / w))] if n else []


def gather_predictions(d: Dist, mine: dict[int, int], n: int) -> list[int]:
    """Every rank's {item: prediction} put together into one list of ``n`` predictions."""
    preds = [None] * n
    for part in all_gather_object(d, mine):
        for i, p in part.items():
            preds[i] = p
    missing = [i for i, p in enumerate(preds) if p is None]
    if missing:
        raise RuntimeError(f"evaluation: no rank predicted items {missing[:5]} (a bug in the sharding)")
    return preds
