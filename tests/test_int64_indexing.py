"""Address products past 2**31 elements (issue #14): the triton kernels index in int64 where an
offset times a stride can pass it (tests/int64_indexing.py, in a process of its own because a
wrapped int32 address crashes it: it did, with a segmentation fault, before the fix)."""
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the script runs the kernels under the interpreter")
def test_weight_rows_past_2_31_elements():
    script = os.path.join(os.path.dirname(__file__), "int64_indexing.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600, env=env)
    print(out.stdout)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    assert out.stdout.count("ok   ") == 4
