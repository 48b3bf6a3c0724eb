"""Every Triton kernel, with its GPU tile configs (all autotune configs), compiles for sm_90
(Hopper) — checked without a GPU by tests/triton_gpu_compile.py in a subprocess. The interpreter
tests check numerics; this catches what only a GPU compile would (tile shapes, dot constraints,
dtypes, register-hungry configs that fail in ptxas), and fails a kernel whose register spills grow
past its budget (SPILL_BUDGET there). Skipped where a GPU runs the kernels for real.
SPU_COMPILE_CHECK_DTYPES picks the dtypes (default bf16, the training dtype: ~2.5 min on 2 cores; fp16 and
fp32 pass too, see the script)."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles and runs the kernels in the other tests")
def test_triton_kernels_compile_for_sm90():
    script = os.path.join(os.path.dirname(__file__), "triton_gpu_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    dtypes = os.environ.get("SPU_COMPILE_CHECK_DTYPES", "bf16")
    out = subprocess.run([sys.executable, script, "--arch", "90", "--dtypes", dtypes], capture_output=True, text=True,
                         timeout=1800, env=env)
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "FAIL" not in out.stdout and "compiled" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests/test_gpu_compile.py compiles them on the GPU")
def test_triton_ops_trace_under_torch_compile():
    """The triton backend's triton_op bodies trace under torch.compile(fullgraph=True) with fake tensors
    (tests/triton_op_trace.py: the GPU code path on CPU tensors, Triton's launches stubbed)."""
    script = os.path.join(os.path.dirname(__file__), "triton_op_trace.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900, env=env)
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.count("traced ") == 8 and "FAIL" not in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a process without a visible GPU is needed for the stub driver")
def test_cached_launches_match_tritons_path():
    """The cached launch path and the low-rank, (IA)³ and KronA ops' replayed plans hand each kernel's launcher
    the same compiled kernel, grid and arguments as Triton's own path (tests/triton_launch_replay.py)."""
    script = os.path.join(os.path.dirname(__file__), "triton_launch_replay.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900, env=env)
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.count("same launches: ") == 17 and "plan replays: " in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="compile-only check for machines without a GPU")
def test_dropout_mask_costs_under_24_sass_instructions_per_element():
    """The keep mask (one Philox4x32-10 call per four columns, ops/dropout_rng.py) compiles for sm_90 to
    about 19 SASS instructions per element, mask store included (tests/dropout_mask_sass.py); the former
    one-call-per-element spec took 55."""
    script = os.path.join(os.path.dirname(__file__), "dropout_mask_sass.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    per_element = float(out.stdout.rsplit("per element:", 1)[1].split()[0])
    assert per_element < 24, out.stdout
