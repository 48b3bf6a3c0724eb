"""What the dropout keep mask costs in compiled code, without a GPU: compiles a kernel that only
makes a (64, 128) keep-mask tile with ``dropout_keep_tile`` and stores it (4 warps: 64 elements a
thread), for sm_90 through Triton's own ptxas, and prints the SASS instructions per element
(cuobjdump -sass, Triton's bundled binary). The former spec (one Philox4x32-10 call per element,
one of its four words used) compiled the same way to 55 instructions per element (3,528); the
spec of ops/dropout_rng.py (one call per four columns) to 19 (1,200) (Triton 3.8.0, 2026-11-24).

    python tests/dropout_mask_sass.py      # prints "sass per element: N"
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="spu-mask-sass-")   # a fresh build, not a cached one

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from spu_kernels.triton._common import dropout_keep_tile  # noqa: E402
from spu_kernels.triton.stub_driver import compile_only  # noqa: E402

ROWS, COLS, WARPS = 64, 128, 4


@triton.jit
def _mask_tile(out_ptr, seed, threshold, K, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    keep = dropout_keep_tile(seed, rows, 0, K, threshold, BR, BC)
    tl.store(out_ptr + rows[:, None] * K + tl.arange(0, BC)[None, :], keep.to(tl.int8))


def main() -> int:
    compile_only(90)
    _mask_tile[(1,)](torch.empty(ROWS * COLS, dtype=torch.int8), 5, 7, COLS, BR=ROWS, BC=COLS, num_warps=WARPS)
    cubin = glob.glob(os.path.join(os.environ["TRITON_CACHE_DIR"], "*", "_mask_tile.cubin"))[0]
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    count = sum(1 for line in sass.splitlines() if line.strip().startswith("/*") and line.strip()[6:8] == "*/")
    print(f"sass instructions: {count}; per element: {count / (ROWS * COLS / (32 * WARPS)):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
