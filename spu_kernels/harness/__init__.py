"""The fine-tuning harness: YAML config -> train -> the Table 1 row (accuracy, F1, peak memory,
samples/s, trainable parameters, wall time). It sits above ``spu_kernels.patch`` and uses the public
API (``import spu_kernels``), plus one thing below it: the method registry's option names, defaults
and ranges (``spu_kernels.patching.registry``, in ``methods._registry``) to check a config's method
options without a model. Nothing in spu_kernels imports it. Its own dependencies (pyyaml, tqdm,
tensorboard, matplotlib) are the ``harness`` extra: ``pip install 'spu_kernels[harness]'``.

Modules, each importing only ones listed before it: schema (ConfigError, value checks), deps (the
extra's imports), data, model (the model, prompt handling, batches), methods (the registry), config
(the YAML schema), compile, train (the loop), report (the table), cli.

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
