"""The harness's own dependencies (pyyaml, tqdm, tensorboard, matplotlib): the ``harness`` extra,
not install requirements of spu_kernels. ``need`` imports one or says how to install them all."""
from __future__ import annotations

import importlib

INSTALL = "pip install 'spu_kernels[harness]'"


def missing_message(package: str, what: str) -> str:
    return f"the fine-tuning harness needs {package} for {what}, which is not installed: {INSTALL}"


def need(module: str, package: str, what: str):
    """``importlib.import_module(module)``, or an ImportError naming ``package`` and the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(missing_message(package, what)) from None
