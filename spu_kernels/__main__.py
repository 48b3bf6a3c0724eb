"""``python -m spu_kernels finetune CONFIG.yaml ...``: the fine-tuning harness (spu_kernels/harness/cli.py)."""
import sys

from .harness.cli import main

sys.exit(main())
