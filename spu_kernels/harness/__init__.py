"""The fine-tuning harness: YAML config -> train -> the Table 1 row (accuracy, F1, peak memory,
samples/s, trainable parameters, wall time). It sits above ``spu_kernels.patch`` and uses the public
API plus the method registry's option checks (``spu_kernels.patching.registry``); nothing in
spu_kernels imports it.

    spu-kernels finetune configs/siva_minilm_rt.yaml
    python -m spu_kernels finetune configs/siva_minilm_rt.yaml --methods full,lora,siva,last_n
"""
from .config import Config, ConfigError, load_config
from .methods import METHODS

__all__ = ["Config", "ConfigError", "load_config", "METHODS", "run"]


def run(*args, **kwargs):
    """spu_kernels.harness.train.run (imported lazily)."""
    from .train import run as _run
    return _run(*args, **kwargs)
