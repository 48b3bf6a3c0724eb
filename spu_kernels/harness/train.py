"""The training loop of the harness: one method, one config -> one result row.

``run(cfg, method=...)`` loads the data and the model, applies the method (``methods.apply``),
trains with AdamW or Adafactor (the T5 recipe's; both with linear warm-up, then linear decay or constant) or
MeZO (``training.optimizer: mezo``: two forward passes a step, no backward), evaluates on the
validation split after each epoch, keeps the best epoch's weights (by ``cfg.metric``), writes a
checkpoint per epoch (adapter in safetensors via ``spu_kernels.save_adapter``; for ``full`` the
model's state dict) from which ``resume=True`` continues, and finally measures the test split. Logs go to TensorBoard
(``output_dir/tb``) and the result to ``output_dir/results.json``.

With ``prompt.template`` the model is the language model itself (masked or causal) wrapped in a
``PromptClassifier``: class scores are the LM's scores of the label words at the [MASK] slot, and
the method is applied to the LM. With ``task: text2text`` the model is a sequence-to-sequence LM (T5)
in a ``Text2TextClassifier``: training minimises its own seq2seq cross-entropy on each example's class
target words, evaluation predicts by rank classification (the class whose target sequence it scores
highest), and the method is applied to the LM. With ``phases`` the phases run in order on one model (a patched
phase is merged before the next one patches); per-epoch checkpoints and resume are then off, and
the final weights are saved whole. The model, its prompt handling and the batches: model.py.

``run`` goes through named steps: ``_plan`` (the phases), ``_build`` (device, data, model),
``_train_phase`` for each phase (``_start_phase``, ``_resume_phase``, then per epoch ``_train_epoch``
with ``_step``, and ``_end_epoch`` with ``_validate`` and ``_save_epoch``), and ``_finish`` (the test
split, the final weights, the result row).

On several processes (``torchrun`` / ``accelerate launch``; harness/distributed.py) the epoch's
seeded order is cut into global batches of ``training.batch_size`` x world_size samples (so
``batch_size`` is per process, and its one-process meaning is unchanged) and each rank takes its
own contiguous part of every global batch (what a DistributedSampler does, with set_epoch: the
same order on every rank, a new one each epoch). Each rank's loss is weighted by its share of the
global batch, so a ragged last batch gives the exact global mean. The model trains in DDP, or with
``training.fsdp`` under FSDP2; evaluation is split over the ranks and its predictions gathered;
rank 0 alone logs and writes (checkpoints, TensorBoard, results), the others wait at a barrier
until it has. MeZO runs unwrapped on every rank with the same perturbation seeds (every rank seeds
torch's CPU generator alike, and rank 0's state is broadcast at the start) and the loss averaged
over the ranks, which averages the projected gradient. Runs with phases stay single-process.

Gradient accumulation (``training.gradient_accumulation_steps`` N): an optimizer step takes the next
batch_size x W x N samples of the order, as N global micro-batches of batch_size x W (cut as above;
the last step may have fewer, and a ragged last one). Each micro-batch's loss is weighted by its
share of the step's samples, so the accumulated gradient is the gradient of the mean loss over the
step's samples exactly; DDP / FSDP2 reduce gradients at a step's last micro-batch only (``no_sync`` /
``set_requires_gradient_sync``; at every one in a phase's first step, where DDP records its static
graph), clipping, the GradScaler and the schedule act once per optimizer
step. MeZO's closure sums the weighted micro-batch losses: its projected gradient is the step's.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only); on a CPU the process's
peak resident set (VmHWM, reset at the start of each run through /proc/self/clear_refs on Linux,
else ``resource.getrusage`` since the process began) -- it includes Python, torch and the data.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import spu_kernels

from ..patching.unwrap import full_tensor
from . import distributed as hdist
from . import methods as hmethods
from .compile import TrainStep, resolve_compile
from .config import Config, TrainingConfig, check_optimizer
from .data import Splits, check_labels, load_splits
from .deps import INSTALL, need
from .model import collate, encode, lm_of, load_model
from .model import log as _log

CHECKPOINT_DONE = "COMPLETE"          # written last into a checkpoint directory


@dataclass
class RunResult:
    name: str
    method: str
    accuracy: float
    f1: float
    peak_memory_mb: float
    memory_kind: str
    samples_per_s: float
    trainable_params: int
    total_params: int
    wall_s: float
    train_s: float
    epochs: float
    steps: int
    learning_rate: float
    method_args: dict
    val_accuracy: float | None
    val_f1: float | None
    best_epoch: int | None
    device: str
    precision: str
    model: str
    dataset: str
    n_train: int
    n_val: int
    n_test: int
    max_length: int
    output_dir: str
    history: list = field(default_factory=list)
    compile: str = "false"    # how the training steps ran: false, true, reduce-overhead (harness/compile.py)
    world_size: int = 1       # processes (torchrun / accelerate launch)
    global_batch_size: int = 0    # training samples per optimizer step, over all processes and micro-batches
    gradient_accumulation_steps: int = 1     # micro-batches per optimizer step
    fsdp: bool = False
    task: str = "classification"      # or text2text: rank classification over the target words (model.py)
    text2text_eval: str | None = None    # task text2text: rank, or generate (exact match of the greedy output)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------
# device, precision, memory
# --------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"training.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device: {name!r} asked for, but torch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use device: auto or cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32, no autocast)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError("training.precision: bf16 is not supported by this GPU; use fp16 or fp32")
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "auto":
        return None
    if precision == "fp16":
        raise ValueError("training.precision: fp16 needs a CUDA GPU; on a CPU use fp32 (or bf16)")
    return torch.bfloat16


def _precision_name(dtype) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class PeakMemory:
    """Peak memory of one run (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "CUDA max allocated"
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            return
        self.kind = "process peak RSS"
        self._proc = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")          # resets VmHWM to the current RSS
            self._proc = self._vmhwm() is not None
        except OSError:
            pass
        if not self._proc:
            self.kind = "process peak RSS (since start)"

    @staticmethod
    def _vmhwm() -> float | None:
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._proc:
            return self._vmhwm() or 0.0
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def metrics(preds: list[int], labels: list[int], num_labels: int) -> dict:
    """accuracy, and F1: of the positive class (1) for two classes, macro-averaged over the classes
    otherwise. A prediction may be -1, no class (text2text.eval: generate, an output matching no
    class's words): it is wrong for accuracy, and for F1 a miss of its item's true class (a false
    negative there) and a false positive of none."""
    if len(preds) != len(labels):
        raise ValueError(f"metrics: {len(preds)} predictions for {len(labels)} labels")
    bad = [p for p in preds if not -1 <= p < num_labels]
    if bad:
        raise ValueError(f"metrics: prediction {bad[0]} is no class id of 0..{num_labels - 1} (nor -1, no class)")
    n = len(labels)
    acc = sum(p == y for p, y in zip(preds, labels)) / max(1, n)
    classes = [1] if num_labels == 2 else list(range(num_labels))
    f1s = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": acc, "f1": sum(f1s) / len(f1s)}


@torch.no_grad()
def evaluate(model, data, pad_id, device, amp_dtype, batch_size, num_labels, desc="eval", progress=True,
             dist: hdist.Dist = hdist.Dist()) -> dict:
    """Metrics of ``model`` on ``data``; on several processes each rank predicts its shard
    (``distributed.shard``) and the predictions are gathered, so every rank gets the exact metrics.
    A Text2TextClassifier with ``eval_mode`` "generate" predicts by exact match of its greedy output
    (model.py; -1 = no class, gathered like any prediction), under FSDP2 with ``synced_gpus`` (every
    rank decodes until all are done, so all run the same forward passes); otherwise the argmax of
    the logits."""
    tqdm = _tqdm()
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))     # less padding
    mine = hdist.shard(order, dist)
    preds = {}
    generate = getattr(model, "eval_mode", "rank") == "generate"
    extra = {"generate": True, "synced_gpus": dist.enabled and hdist.is_sharded(model)} if generate else {}
    steps = math.ceil(len(mine) / batch_size)
    for s in tqdm(range(steps), desc=desc, disable=not progress or not dist.main, leave=False, file=sys.stderr):
        part = mine[s * batch_size:(s + 1) * batch_size]
        batch = collate([data[i] for i, _ in part], pad_id, device)
        batch.pop("labels")
        with autocast(device, amp_dtype):
            out = model(**batch, **extra)
        for (i, counts), p in zip(part, (out if generate else out.logits.argmax(-1)).tolist()):
            if counts:
                preds[i] = p
    model.train(was_training)
    return metrics(hdist.gather_predictions(dist, preds, len(data)), [it[1] for it in data], num_labels)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def _write_replace(path: Path, write) -> None:
    """``write(tmp)`` under a temporary name beside ``path``, renamed into place once complete."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _saves_whole_model(model, method: str) -> bool:
    return hmethods.get(method).patch is None or not spu_kernels.is_patched(lm_of(model))


def _gathered_model_state(model, method: str) -> dict | None:
    """An FSDP2-sharded model saved whole (``full``): its state dict as whole CPU tensors, gathered
    on every rank (a collective) before rank 0 writes it; else None (``_save_weights`` reads the model)."""
    if not (hdist.is_sharded(model) and _saves_whole_model(model, method)):
        return None
    return {k: full_tensor(v).detach().cpu() for k, v in model.state_dict().items()}


def _saving(model, method: str):
    """The context rank 0 writes weights in: FSDP2's adapters unsharded on every rank (a collective)."""
    return contextlib.nullcontext() if _saves_whole_model(model, method) else hdist.full_params(model)


def _save_weights(model, method: str, path: Path, state: dict | None = None) -> None:
    """The model (``full``: its state dict, or ``state``) or its adapter into ``path``."""
    if _saves_whole_model(model, method):
        from safetensors.torch import save_file
        state = {k: v.detach().contiguous().cpu() for k, v in (state or model.state_dict()).items()}
        # tied weights share storage; safetensors wants each tensor once
        seen, out = {}, {}
        for k, v in state.items():
            key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
            if key is not None and key in seen:
                continue
            seen[key] = k
            out[k] = v.clone() if key is None else v
        _write_replace(path / "model.safetensors",
                       lambda tmp: save_file(out, str(tmp), metadata={"format": "spu_kernels.full.v1"}))
    else:
        _write_replace(path / "adapter.safetensors", lambda tmp: spu_kernels.save_adapter(lm_of(model), tmp))


def _load_weights(model, method: str, path: Path) -> None:
    if hmethods.get(method).patch is None:
        from safetensors.torch import load_file
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        if unexpected:
            raise ValueError(f"{path}/model.safetensors does not fit this model: unexpected {unexpected[:5]}")
    else:
        spu_kernels.load_adapter(lm_of(model), path / "adapter.safetensors")


def save_checkpoint(root: Path, epoch: int, model, method: str, trainer_state: dict, best_weights,
                    state: dict | None = None) -> Path:
    """``root/epoch_N``: written as ``epoch_N.tmp`` (each file under a temporary name, renamed into
    place when complete; the COMPLETE marker last), then renamed; older checkpoints are removed.
    ``state``: the gathered state dict of a sharded model (``_gathered_model_state``)."""
    final, tmp = root / f"epoch_{epoch}", root / f"epoch_{epoch}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_weights(model, method, tmp, state)
    _write_replace(tmp / "trainer_state.pt", lambda p: torch.save(trainer_state, p))
    if best_weights is not None:
        _write_replace(tmp / "best.pt", lambda p: torch.save(best_weights, p))
    _write_replace(tmp / CHECKPOINT_DONE, lambda p: p.write_text(json.dumps({"epoch": epoch, "method": method})))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.iterdir():                        # keep the newest only
        if old.is_dir() and old != final:
            shutil.rmtree(old, ignore_errors=True)
        elif old.name == "best.pt":                   # where older versions kept the best weights
            old.unlink()
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (``epoch_N`` with its COMPLETE marker); incomplete ones (the run
    stopped while writing them) are skipped with a one-line message."""
    root = output_dir / "checkpoints"
    found = []
    for p in sorted(root.iterdir()) if root.is_dir() else ():
        m = re.fullmatch(r"epoch_(\d+)(\.tmp)?", p.name)
        if m is None or not p.is_dir():
            continue
        if m.group(2) or not (p / CHECKPOINT_DONE).exists():
            _log(f"resume: skipping the incomplete checkpoint {p} (the run stopped while writing it)")
        else:
            found.append((int(m.group(1)), p))
    return max(found, default=(None, None))[1]


def _unreadable(ckpt: Path, e: Exception) -> ValueError:
    """A damaged checkpoint file: say which, not a traceback."""
    return ValueError(f"--resume: cannot read the checkpoint {ckpt} ({type(e).__name__}: {e}); delete it to "
                      "resume from an older one, or run without --resume")


def _resume_weights(ckpt: Path, model, method: str) -> None:
    """The checkpoint's weights into the (not yet wrapped) model."""
    try:
        _load_weights(model, method, ckpt)
    except Exception as e:
        raise _unreadable(ckpt, e) from e


def _resume(ckpt: Path, model, method: str, opt, sched, scaler, device,
            training: dict | None = None) -> tuple[dict, dict | None]:
    """Load a checkpoint's optimizer, scheduler, scaler and RNG state (the weights are already in:
    ``_resume_weights``); (state, best weights). The optimizer state is saved whole, also under FSDP2.
    ``training``: the run's optimizer and gradient_accumulation_steps (``_training_key``), which must be
    the checkpoint's (its optimizer state and step counts depend on them)."""
    try:
        saved = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        best = (torch.load(ckpt / "best.pt", map_location="cpu", weights_only=True)
                if (ckpt / "best.pt").exists() else None)
    except Exception as e:
        raise _unreadable(ckpt, e) from e
    was = saved.get("training", {"optimizer": "adamw", "gradient_accumulation_steps": 1})   # older checkpoints
    for key, value in (training or {}).items():
        if was.get(key) != value:
            raise ValueError(f"--resume: the checkpoint {ckpt} was trained with training.{key}: {was.get(key)}, "
                             f"this run has {value}; resume with the checkpoint's setting, or start again "
                             "without --resume (or with another output_dir)")
    hdist.load_optimizer_state(opt, saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng_cpu"])
    if device.type == "cuda" and saved.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(saved["rng_cuda"], device)
    return saved["state"], best


# --------------------------------------------------------------------------------------------
def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "norm" in name.lower() or p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _tqdm():
    return need("tqdm.auto", "tqdm", "progress bars").tqdm


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """The forward passes' autocast context (``amp_dtype`` None = fp32: autocast off)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def _open_output(out: Path, tensorboard: bool, method: str):
    """Create ``out``; the TensorBoard writer (None when off or not installed)."""
    out.mkdir(parents=True, exist_ok=True)
    if not tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(out / "tb"))
    except ImportError as e:
        _log(f"[{method}] TensorBoard logs off: {e} ({INSTALL})")
        return None


def _training_key(tr: TrainingConfig) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    return {"optimizer": tr.optimizer, "gradient_accumulation_steps": tr.gradient_accumulation_steps}


def _optimizer(model, tr, lr: float):
    """(optimizer, uses MeZO) for one phase. Adafactor is transformers' with the T5 fine-tuning recipe's
    settings (scale_parameter, relative_step and warmup_init off: steps of ``lr`` itself, which the
    schedule scales; torch.optim.Adafactor always scales by the parameter's RMS and caps by 1/sqrt(t),
    so zero-initialised adapters would start with steps of 1e-3 x lr); weight decay is decoupled
    (theta x (1 - lr x wd)), the same parameter groups as AdamW."""
    if tr.optimizer == "mezo":
        return spu_kernels.MeZO(_param_groups(model, tr.weight_decay), lr=lr, eps=tr.mezo_eps), True
    lm = lm_of(model)
    if spu_kernels.is_patched(lm) and spu_kernels.summary(lm).method == "fishmask":   # state for the mask only
        if tr.optimizer != "adamw":
            raise ValueError(f"training.optimizer: {tr.optimizer} does not apply to fishmask, which trains with "
                             "spu_kernels.MaskedAdamW; use optimizer: adamw (or mezo)")
        if tr.fsdp:
            raise ValueError("training.fsdp with fishmask: MaskedAdamW updates whole (unsharded) tensors through "
                             "their masks; use DDP (fsdp: false)")
        masks = {id(p): idx for p, idx in spu_kernels.fishmask_masks(lm)}
        groups = [{**g, "params": [(p, masks[id(p)]) for p in g["params"]]}
                  for g in _param_groups(model, tr.weight_decay)]
        return spu_kernels.MaskedAdamW(groups, lr=lr), False
    if tr.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(_param_groups(model, tr.weight_decay), lr=lr, scale_parameter=False, relative_step=False,
                         warmup_init=False), False
    return torch.optim.AdamW(_param_groups(model, tr.weight_decay), lr=lr), False


# --------------------------------------------------------------------------------------------
# the run, step by step
# --------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What one run shares across its phases: settings, data, model, output and the counters."""
    cfg: Config
    method: str                     # the row's name (``full(mezo)+klst`` for phases)
    multi: bool                     # more than one phase
    device: torch.device
    amp_dtype: torch.dtype | None
    out: Path
    source: str                     # the dataset, as the result names it
    mem: PeakMemory
    model: torch.nn.Module
    model_name: str
    pad_id: int
    num_labels: int
    train_data: list
    val_data: list
    test_data: list
    writer: object = None
    # counters over all phases: steps, samples and time for samples/s, the validation history
    state: dict = field(default_factory=lambda: {"epoch": 0, "step": 0, "best": None, "best_epoch": None,
                                                 "history": [], "train_s": 0.0, "samples": 0})
    epochs_done: float = 0.0
    trainable: int = 0
    total: int = 0
    last: tuple = (0.0, {}, None)   # the last phase's (learning rate, method args, method)
    compiles: list = field(default_factory=list)
    dist: hdist.Dist = hdist.Dist()         # this process's rank and the number of processes

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class _Phase:
    """One phase: its method, settings, optimizer and progress (epoch / step counted in this phase)."""
    tag: str
    name: str
    args: dict
    lr: float
    tr: TrainingConfig
    opt: torch.optim.Optimizer
    use_mezo: bool
    train_step: TrainStep
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    params: list
    steps_per_epoch: int
    total_steps: int
    train_model: torch.nn.Module             # what training steps call: DDP around the model, or the model
    named: list = field(default_factory=list)      # (name, parameter) of what trains
    epoch: int = 0
    step: int = 0
    best: float | None = None
    best_epoch: int | None = None
    best_weights: dict | None = None
    # DDP with static_graph records the graph in its first backward, which must reduce: until a step
    # has run, gradient accumulation reduces at every micro-batch (the same sum, more traffic)
    stepped: bool = False


def _plan(cfg: Config, method, method_args, learning_rate, resume: bool) -> tuple[str, list]:
    """(the row's name, [(method, args, learning rate, TrainingConfig)] per phase)."""
    if cfg.phases:
        if method not in (None, cfg.method.name) or method_args is not None or learning_rate is not None:
            raise ValueError("a config with phases runs its phases; --method / --methods do not apply to it")
        if resume:
            raise ValueError("--resume: runs with phases keep no per-epoch checkpoints; start them again")
        if hdist.current().enabled:
            raise ValueError("runs with phases merge one phase's adapters into the weights before the next, which "
                             "a DDP / FSDP2-wrapped model does not allow; run them as one process (python -m "
                             "spu_kernels finetune ..., not torchrun / accelerate launch)")
        return cfg.phase_names, [(m.name, m.args, t.learning_rate, t) for m, t in cfg.phases]
    _check_fsdp(cfg.training, hdist.current())
    method = method or cfg.method.name
    check_optimizer(method, cfg.training)
    if method_args is None:
        method_args = cfg.method.args if method == cfg.method.name else {}
    if learning_rate is None and method == cfg.method.name:
        learning_rate = cfg.training.learning_rate
    return method, [(method, method_args, learning_rate, cfg.training)]


def _check_fsdp(tr: TrainingConfig, d: hdist.Dist) -> None:
    if not tr.fsdp:
        return
    if not d.enabled:
        raise ValueError("training.fsdp: FSDP2 shards the model over the processes of a multi-process run, and this "
                         "run has one; launch it with torchrun --nproc_per_node N -m spu_kernels finetune ... "
                         "(or accelerate launch), or set fsdp: false")
    if tr.optimizer == "mezo":
        raise ValueError("training.fsdp with optimizer: mezo: MeZO keeps no gradients or optimizer state to shard "
                         "and runs unwrapped on every rank; set fsdp: false")


def _build(cfg: Config, method: str, multi: bool, output_dir, splits: Splits | None) -> _Run:
    """Device, precision, data and model (on the device), the process group on several processes;
    nothing is written yet."""
    tr = cfg.training
    d = hdist.current()
    device = resolve_device(tr.device)                 # checks the setting; under a launcher: cuda:LOCAL_RANK
    if d.enabled:
        device = hdist.resolve_device(tr.device, d)
    hdist.setup(device, d)
    amp_dtype = resolve_precision(tr.precision, device)
    if tr.threads:
        torch.set_num_threads(tr.threads)
    out = Path(output_dir or tr.output_dir or Path("runs") / (cfg.name or "run") / method)
    splits = splits or load_splits(cfg.dataset)
    num_labels = check_labels(splits, cfg.model.num_labels)
    mem = PeakMemory(device)
    torch.manual_seed(tr.seed)
    text2text = cfg.text2text if cfg.task == "text2text" else None
    model, tok, model_name, template = load_model(cfg.model, num_labels, cfg.prompt, cfg.dataset.max_length,
                                                  text2text=text2text, label_names=splits.label_names)
    prefix = text2text.source_prefix if text2text is not None else ""
    train_data, val_data, test_data = (encode(tok, part, cfg.dataset.max_length, template, prefix)
                                       for part in (splits.train, splits.val, splits.test))
    model.to(device)
    return _Run(cfg=cfg, method=method, multi=multi, device=device, amp_dtype=amp_dtype, out=out,
                source=splits.source, mem=mem, model=model, model_name=model_name,
                pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0, num_labels=num_labels,
                train_data=train_data, val_data=val_data, test_data=test_data, dist=d)


def _first_batches(ctx: _Run, tr) -> list[dict]:
    """The first ``methods.PATCH_BATCHES`` global batches of the first epoch's order (the same on
    every rank), for a patch that initialises from training batches (``HarnessMethod.needs_batches``)."""
    order = torch.randperm(len(ctx.train_data), generator=torch.Generator().manual_seed(tr.seed * 100_003)).tolist()
    n = tr.batch_size * ctx.dist.world_size
    return [collate([ctx.train_data[j] for j in order[i:i + n]], ctx.pad_id, ctx.device)
            for i in range(0, min(len(order), n * hmethods.PATCH_BATCHES), n)]


def _start_phase(ctx: _Run, index: int, n: int, phase: tuple, ckpt: Path | None = None) -> _Phase:
    """Merge the previous phase's adapters, apply this phase's method, load ``ckpt``'s weights (resume),
    wrap the model (DDP / FSDP2 on several processes), set up its optimizer, schedule and scaler (the
    first phase also creates the output folder, on rank 0)."""
    pname, pargs, plr, tr = phase
    tag = f"{ctx.method} phase {index + 1}/{n}: {pname}" if ctx.multi else ctx.method
    _, args, lr = hmethods.resolve(pname, pargs, plr, tr.optimizer)
    model = ctx.model
    if spu_kernels.is_patched(lm_of(model)):        # the previous phase's adapters become weights
        spu_kernels.merge(lm_of(model))
    torch.manual_seed(tr.seed)
    hmethods.apply(model, pname, args, batches=lambda: _first_batches(ctx, tr))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ctx.trainable, ctx.total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    if not params:
        raise ValueError(f"method {pname!r} with {args} leaves nothing to train")
    if ckpt is not None:
        _resume_weights(ckpt, model, pname)
    d = ctx.dist
    if tr.optimizer == "mezo":                       # no backward: no DDP; same weights and seeds on every rank
        hdist.broadcast_module(d, model)
        if d.enabled:
            torch.set_rng_state(hdist.broadcast_object(d, torch.get_rng_state()))
        train_model = model
    else:
        train_model = hdist.wrap(model, lm_of(model), d, ctx.device, tr.fsdp)
    params = [p for p in model.parameters() if p.requires_grad]     # FSDP2 made them DTensors
    opt, use_mezo = _optimizer(model, tr, lr)
    train_step = TrainStep(train_model, resolve_compile(tr.compile, ctx.device, use_mezo), _log)
    if index == 0 and d.main:                        # nothing is written before the run is set up
        ctx.writer = _open_output(ctx.out, ctx.cfg.training.tensorboard, ctx.method)
    _log(f"[{tag}] {ctx.model_name} on {ctx.device} ({_precision_name(ctx.amp_dtype)}); {ctx.source}: "
         f"{len(ctx.train_data)} train / {len(ctx.val_data)} val / {len(ctx.test_data)} test, max_length "
         f"{ctx.cfg.dataset.max_length}; trainable {ctx.trainable:,} of {ctx.total:,} params; "
         f"{type(opt).__name__} lr {lr:g}; compile {train_step.used}; -> {ctx.out}"
         + (f"; {tr.gradient_accumulation_steps} micro-batches of {tr.batch_size} a step"
            if tr.gradient_accumulation_steps > 1 else "")
         + (f"; {d.world_size} processes ({'FSDP2' if tr.fsdp else 'MeZO' if use_mezo else 'DDP'}), global batch "
            f"{tr.batch_size * d.world_size * tr.gradient_accumulation_steps}" if d.enabled else ""))
    steps_per_epoch = math.ceil(len(ctx.train_data) / (tr.batch_size * d.world_size * tr.gradient_accumulation_steps))
    total_steps = steps_per_epoch * tr.epochs
    if tr.max_steps is not None:
        total_steps = min(total_steps, tr.max_steps)
    warmup = int(round(tr.warmup_ratio * total_steps))
    constant = tr.lr_schedule == "constant"
    sched = torch.optim.lr_scheduler.LambdaLR(        # linear warm-up, then linear decay to 0 or constant
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup
        else 1.0 if constant else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16 and not use_mezo)
    return _Phase(tag=tag, name=pname, args=args, lr=lr, tr=tr, opt=opt, use_mezo=use_mezo, train_step=train_step,
                  sched=sched, scaler=scaler, params=params, steps_per_epoch=steps_per_epoch,
                  total_steps=total_steps, train_model=train_model)


def _resume_phase(ctx: _Run, ph: _Phase, ckpt: Path | None) -> None:
    """Continue from ``ckpt`` (the newest complete checkpoint; its weights are in already), if any."""
    if ckpt is None:
        _log(f"[{ph.tag}] resume: no checkpoint in {ctx.out}/checkpoints; starting from scratch")
        return
    ctx.state, ph.best_weights = _resume(ckpt, ctx.model, ph.name, ph.opt, ph.sched, ph.scaler, ctx.device,
                                         _training_key(ph.tr))
    ph.epoch, ph.step, ph.best, ph.best_epoch = (ctx.state[k] for k in ("epoch", "step", "best", "best_epoch"))
    _log(f"[{ph.tag}] resumed from {ckpt} (epoch {ctx.state['epoch']}, step {ctx.state['step']})")


def _train_phase(ctx: _Run, index: int, n: int, phase: tuple, resume: bool) -> None:
    """One phase: its epochs, then its best epoch's weights back in the model."""
    ckpt = latest_checkpoint(ctx.out) if resume else None
    ph = _start_phase(ctx, index, n, phase, ckpt)
    if resume:
        _resume_phase(ctx, ph, ckpt)
    ph.named = [(name, p) for name, p in ctx.model.named_parameters() if p.requires_grad]
    for epoch in range(ph.epoch, ph.tr.epochs):
        if ph.step >= ph.total_steps:
            break
        _train_epoch(ctx, ph, epoch)
        _end_epoch(ctx, ph, epoch, index)
    if ph.best_weights is not None:                  # this phase's best epoch
        with torch.no_grad():
            current = dict(ph.named)
            for name, t in ph.best_weights.items():
                hdist.copy_full_(current[name], t)
    ctx.epochs_done += ph.step / ph.steps_per_epoch
    ctx.last = (ph.lr, ph.args, ph.name)
    ctx.compiles.append(ph.train_step.used)


def _train_epoch(ctx: _Run, ph: _Phase, epoch: int) -> None:
    """The optimizer steps of one epoch (a seeded batch order), with loss logging."""
    tr, state, d = ph.tr, ctx.state, ctx.dist
    g = torch.Generator().manual_seed(tr.seed * 100_003 + epoch)      # the same order on every rank
    order = torch.randperm(len(ctx.train_data), generator=g).tolist()
    n_steps = min(ph.steps_per_epoch, ph.total_steps - ph.step)
    bar = _tqdm()(range(n_steps), desc=f"{ph.tag} epoch {epoch + 1}/{tr.epochs}",
                  disable=not tr.progress or not d.main, file=sys.stderr, dynamic_ncols=True)
    loss_sum, loss_n = 0.0, 0
    for i in bar:
        parts, n_step = _step_parts(order, i, tr.batch_size, tr.gradient_accumulation_steps, d)
        # each micro-batch's loss weighted by its share of the step's samples (x world size: DDP / FSDP2
        # average over the ranks); a rank with no sample in a ragged micro-batch runs one with weight 0
        # (DDP / FSDP2 need every rank)
        micro = [(collate([ctx.train_data[j] for j in idx or order[:1]], ctx.pad_id, ctx.device),
                  len(idx) * d.world_size / n_step) for idx in parts]
        ctx.sync()
        t0 = time.perf_counter()
        loss = _step(ctx, ph, micro)
        ph.sched.step()
        ctx.sync()
        state["train_s"] += time.perf_counter() - t0
        state["samples"] += n_step
        state["step"] += 1
        ph.step += 1
        loss_sum += loss.item()
        loss_n += 1
        if state["step"] % tr.log_every == 0 or i == n_steps - 1:
            _log_train(ctx, ph, bar, hdist.mean(d, torch.tensor(loss_sum / loss_n)).item())
            loss_sum, loss_n = 0.0, 0
    bar.close()


def _rank_part(order: list[int], i: int, batch_size: int, d: hdist.Dist) -> tuple[list[int], int]:
    """(this rank's items of global batch ``i``, the global batch's size): the global batch is
    ``order[i*B*W:(i+1)*B*W]``, rank r's part its r-th run of B (one process: batch i, as always)."""
    start = i * batch_size * d.world_size
    n_global = min(batch_size * d.world_size, len(order) - start)
    lo = start + d.rank * batch_size
    return order[lo:min(lo + batch_size, start + n_global)], n_global


def _step_parts(order: list[int], i: int, batch_size: int, accumulate: int,
                d: hdist.Dist) -> tuple[list[list[int]], int]:
    """(this rank's items of each micro-batch of optimizer step ``i``, the step's size over all ranks):
    step i is global batches ``i*N .. i*N+N-1`` (``_rank_part``) of those the order has; the epoch's last
    step may have fewer, the same number on every rank (each runs as many forward / backward passes)."""
    first, per = i * accumulate, batch_size * d.world_size
    count = min(accumulate, math.ceil(len(order) / per) - first)
    if count < 1:
        raise IndexError(f"optimizer step {i} is past the epoch's {len(order)} samples")
    parts = [_rank_part(order, first + k, batch_size, d) for k in range(count)]
    return [idx for idx, _ in parts], sum(n for _, n in parts)


def _step(ctx: _Run, ph: _Phase, micro: list[tuple[dict, float]]) -> torch.Tensor:
    """One optimizer step on the micro-batches ``micro`` [(batch, weight)]: MeZO's two forward passes
    (each over every micro-batch), or a forward and backward per micro-batch (gradients reduced over
    the ranks at the last one only), then clipping and one optimizer step. ``weight`` (this rank's
    part of the micro-batch over the step's global size, x world size; 1 for one process without
    accumulation) scales each loss so that the summed gradients DDP / FSDP2 average over the ranks
    are the gradient of the step's mean loss; returns the summed weighted loss."""
    model = ctx.model
    if ph.use_mezo:
        # two forward passes at θ ± εz, no graph; dropout off so that both see one function
        model.eval()

        def closure():
            total = None
            for batch, weight in micro:
                with autocast(ctx.device, ctx.amp_dtype):
                    loss = model(**batch).loss
                loss = loss if weight == 1.0 else loss * weight
                total = loss if total is None else total + loss
            return hdist.mean(ctx.dist, total) if ctx.dist.enabled else total
        loss = ph.opt.step(closure)
        model.train()
        return loss

    def forward_backward(batch, weight, forward):
        with autocast(ctx.device, ctx.amp_dtype):
            loss = forward(**batch).loss
        if weight != 1.0:
            loss = loss * weight
        ph.scaler.scale(loss).backward()
        return loss.detach()
    loss = None
    for k, (batch, weight) in enumerate(micro):
        with hdist.grad_sync(ph.train_model, k == len(micro) - 1 or not ph.stepped):
            part = ph.train_step(functools.partial(forward_backward, batch, weight),
                                 functools.partial(ph.opt.zero_grad, set_to_none=True))
        loss = part.clone() if loss is None else loss + part     # a clone: CUDA graphs reuse their outputs
    ph.stepped = True
    if ph.tr.max_grad_norm:
        ph.scaler.unscale_(ph.opt)
        torch.nn.utils.clip_grad_norm_(ph.params, ph.tr.max_grad_norm)
    ph.scaler.step(ph.opt)
    ph.scaler.update()
    ph.opt.zero_grad(set_to_none=True)
    return loss


def _log_train(ctx: _Run, ph: _Phase, bar, avg_loss: float) -> None:
    lr, step = ph.sched.get_last_lr()[0], ctx.state["step"]
    bar.set_postfix(loss=f"{avg_loss:.4f}", lr=f"{lr:.2e}")
    if ctx.writer is not None:
        ctx.writer.add_scalar("train/loss", avg_loss, step)
        ctx.writer.add_scalar("train/lr", lr, step)
        ctx.writer.add_scalar("train/samples_per_s", ctx.state["samples"] / max(ctx.state["train_s"], 1e-9), step)
        ctx.writer.add_scalar("train/peak_memory_mb", ctx.mem.peak_mb(), step)


def _end_epoch(ctx: _Run, ph: _Phase, epoch: int, index: int) -> None:
    """After an epoch: validation (each epoch, or the last), the history record, the checkpoint."""
    ph.epoch = epoch + 1
    ctx.state["epoch"] += 1
    record = {"epoch": ctx.state["epoch"], "step": ctx.state["step"]} | ({"phase": index + 1} if ctx.multi else {})
    last = ph.epoch == ph.tr.epochs or ph.step >= ph.total_steps
    if ph.tr.eval_every_epoch or last:
        record.update(_validate(ctx, ph, epoch))
    ctx.state["history"].append(record)
    if ph.tr.save_checkpoints and not ctx.multi:
        _save_epoch(ctx, ph, epoch)
        hdist.barrier(ctx.dist)                      # the checkpoint is complete before any rank goes on


def _validate(ctx: _Run, ph: _Phase, epoch: int) -> dict:
    """The validation metrics (as history keys); keeps the best epoch's trainable weights."""
    val = evaluate(ctx.model, ctx.val_data, ctx.pad_id, ctx.device, ctx.amp_dtype, ph.tr.eval_batch_size,
                   ctx.num_labels, desc=f"{ph.tag} validation", progress=ph.tr.progress, dist=ctx.dist)
    if ctx.writer is not None:
        ctx.writer.add_scalar("val/accuracy", val["accuracy"], ctx.state["step"])
        ctx.writer.add_scalar("val/f1", val["f1"], ctx.state["step"])
    _log(f"[{ph.tag}] epoch {epoch + 1}: validation accuracy {val['accuracy']:.4f}, F1 {val['f1']:.4f}")
    score = val[ctx.cfg.metric]
    if ph.best is None or score > ph.best:
        ph.best, ph.best_epoch = score, epoch + 1
        ctx.state["best"], ctx.state["best_epoch"] = ph.best, ctx.state["epoch"]
        ph.best_weights = {name: full_tensor(p).detach().to("cpu", copy=True) for name, p in ph.named}
    return {"val_accuracy": val["accuracy"], "val_f1": val["f1"]}


def _save_epoch(ctx: _Run, ph: _Phase, epoch: int) -> None:
    """The epoch's checkpoint: weights, optimizer, schedule, scaler, RNGs, counters, best weights.
    Every rank enters (FSDP2 gathers the weights and the optimizer state); rank 0 writes."""
    cuda_rng = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
    optim_state = hdist.full_optimizer_state(ph.opt)
    model_state = _gathered_model_state(ctx.model, ph.name)
    with _saving(ctx.model, ph.name):
        if ctx.dist.main:
            save_checkpoint(ctx.out / "checkpoints", epoch + 1, ctx.model, ph.name,
                            {"optimizer": optim_state, "scheduler": ph.sched.state_dict(),
                             "scaler": ph.scaler.state_dict(), "rng_cpu": torch.get_rng_state(), "rng_cuda": cuda_rng,
                             "state": ctx.state, "method": ph.name, "args": ph.args, "training": _training_key(ph.tr)},
                            ph.best_weights, model_state)


def _finish(ctx: _Run, t_start: float) -> RunResult:
    """The test split, the final weights in ``out/best``, the result row (logged and written)."""
    tr0, state = ctx.cfg.training, ctx.state
    final_val = next((h for h in reversed(state["history"]) if h.get("epoch") == state["best_epoch"]), {})
    test = evaluate(ctx.model, ctx.test_data, ctx.pad_id, ctx.device, ctx.amp_dtype, tr0.eval_batch_size,
                    ctx.num_labels, desc=f"{ctx.method} test", progress=tr0.progress, dist=ctx.dist)
    last_lr, last_args, last_method = ctx.last
    if tr0.save_checkpoints:
        kind = "full" if ctx.multi else last_method
        model_state = _gathered_model_state(ctx.model, kind)         # FSDP2: gathered on every rank,
        with _saving(ctx.model, kind):                               # rank 0 writes
            if ctx.dist.main:
                best_dir = ctx.out / "best"
                best_dir.mkdir(parents=True, exist_ok=True)
                _save_weights(ctx.model, kind, best_dir, model_state)
    peak = ctx.mem.peak_mb()
    result = RunResult(
        name=ctx.cfg.name or "run", method=ctx.method, accuracy=test["accuracy"], f1=test["f1"],
        peak_memory_mb=peak, memory_kind=ctx.mem.kind, samples_per_s=state["samples"] / max(state["train_s"], 1e-9),
        trainable_params=ctx.trainable, total_params=ctx.total, wall_s=time.perf_counter() - t_start,
        train_s=state["train_s"], epochs=ctx.epochs_done, steps=state["step"], learning_rate=last_lr,
        method_args=last_args, val_accuracy=final_val.get("val_accuracy"), val_f1=final_val.get("val_f1"),
        best_epoch=state["best_epoch"], device=str(ctx.device), precision=_precision_name(ctx.amp_dtype),
        model=ctx.model_name, dataset=ctx.source, n_train=len(ctx.train_data), n_val=len(ctx.val_data),
        n_test=len(ctx.test_data), max_length=ctx.cfg.dataset.max_length, output_dir=str(ctx.out),
        history=state["history"], compile=" + ".join(ctx.compiles), world_size=ctx.dist.world_size,
        global_batch_size=tr0.batch_size * ctx.dist.world_size * tr0.gradient_accumulation_steps,
        gradient_accumulation_steps=tr0.gradient_accumulation_steps, fsdp=tr0.fsdp and ctx.dist.enabled)
    result.task = ctx.cfg.task
    result.text2text_eval = ctx.cfg.text2text.eval if ctx.cfg.task == "text2text" else None
    if ctx.writer is not None:
        for tag, value in (("test/accuracy", result.accuracy), ("test/f1", result.f1), ("memory/peak_mb", peak),
                           ("throughput/samples_per_s", result.samples_per_s)):
            ctx.writer.add_scalar(tag, value, state["step"])
        ctx.writer.close()
    if ctx.dist.main:
        (ctx.out / "results.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    hdist.barrier(ctx.dist)                          # everything is written before any rank returns
    _log(f"[{ctx.method}] test accuracy {result.accuracy:.4f}, F1 {result.f1:.4f}; peak memory {peak:.0f} MB "
         f"({ctx.mem.kind}); {result.samples_per_s:.1f} samples/s; wall {result.wall_s:.0f} s")
    return result


def run(cfg: Config, method: str | None = None, method_args: dict | None = None, learning_rate: float | None = None,
        output_dir: str | Path | None = None, resume: bool = False, splits: Splits | None = None) -> RunResult:
    """Fine-tune with one method (or ``cfg.phases`` in order); see the module docstring."""
    t_start = time.perf_counter()
    method, phases = _plan(cfg, method, method_args, learning_rate, resume)
    ctx = _build(cfg, method, len(phases) > 1, output_dir, splits)
    for index, phase in enumerate(phases):
        _train_phase(ctx, index, len(phases), phase, resume)
    result = _finish(ctx, t_start)
    device = ctx.device
    del ctx                                          # drops the model before the cache is emptied
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
