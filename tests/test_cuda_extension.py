"""The CUDA C++ backend (spu_kernels._C) on a machine without a GPU: the build configuration, that
the extension imports and registers its ops with shape-only (Meta) kernels, and that the kernels'
Philox code (built for the host too) gives the mask of the Python spec. Its numerics against the
reference run in test_lowrank_linear_op.py / test_gpu.py wherever a GPU is visible.

SPU_EXPECT_CUDA_EXT=1 (set by `make test` when it built the extension) turns "not built" from a
skip into a failure, so CI cannot pass with a silently missing build."""
import os
import subprocess
import sys

import pytest
import torch

from spu_kernels import _cuda_build
from spu_kernels._extension import extension_error, load_extension
from spu_kernels.backends import backend_status
from spu_kernels.ops.dropout_rng import dropout_keep_mask, dropout_threshold, philox4x32

EXPECT_EXT = os.environ.get("SPU_EXPECT_CUDA_EXT") == "1"


@pytest.fixture(scope="module")
def ext():
    err = extension_error()
    if err is not None:
        if EXPECT_EXT:
            pytest.fail(f"SPU_EXPECT_CUDA_EXT=1 but the extension does not load: {err}")
        pytest.skip(f"spu_kernels._C not built here: {err}")
    return load_extension()


def test_extension_loads_and_reports_its_build(ext):
    assert ext.cuda_archs.startswith("sm") and ext.build_info.startswith("cuda")
    assert hasattr(torch.ops.spu_kernels, "lowrank_linear_fwd")
    assert hasattr(torch.ops.spu_kernels, "lowrank_linear_bwd")
    state = backend_status()["cuda"]
    assert state == "available" if torch.cuda.is_available() else "no CUDA GPU is visible" in state


@pytest.mark.parametrize("seed", [0, 1234, 2**31 - 2, 2**40 + 7])
def test_kernel_philox_is_the_spec(ext, seed):
    g = torch.Generator().manual_seed(seed % 2**31)
    counters = torch.cat([torch.arange(0, 300), torch.randint(0, 2**62, (300,), generator=g),
                          torch.tensor([2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1])])
    got = torch.tensor(ext.philox_first_word(seed, counters.tolist()), dtype=torch.int64)
    assert torch.equal(got, philox4x32(seed, counters))


@pytest.mark.parametrize("seed", [0, 77, 2**40 + 7])
def test_kernel_keep_mask_is_the_spec(ext, seed):
    rows, cols, p = 6, 23, 0.3          # 23 columns: each row ends in a partial group of four
    thr = dropout_threshold(p)
    got = torch.tensor(ext.dropout_keep_mask(seed, rows, cols, thr), dtype=torch.bool).view(rows, cols)
    assert torch.equal(got, dropout_keep_mask(seed, rows, cols, p))


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("has_bias, has_g", [(True, True), (False, False)])
def test_meta_kernels_give_shapes(ext, has_bias, has_g):
    T, K, N, r = 7, 12, 5, 3
    x, w, a, b = _meta(T, K), _meta(N, K), _meta(r, K), _meta(N, r)
    bias, g = (_meta(N) if has_bias else None), (_meta(r) if has_g else None)
    seed = torch.tensor(3, device="meta")
    y, u = torch.ops.spu_kernels.lowrank_linear_fwd(x, w, bias, a, b, g, 0.5, 0.1, seed, 5)
    assert (y.shape, y.dtype, u.shape, u.dtype) == ((T, N), torch.bfloat16, (T, r), torch.bfloat16)
    need = (True, has_bias, True, True, has_g)
    out = torch.ops.spu_kernels.lowrank_linear_bwd(_meta(T, N), x, w, a, b, g, u, 0.5, 0.1, seed, 5, *need)
    want = [((T, K), torch.bfloat16), ((N,), torch.float32), ((r, K), torch.float32), ((N, r), torch.float32),
            ((r,), torch.float32)]
    for t, n, (shape, dt) in zip(out, need, want):
        assert t.dtype == dt and tuple(t.shape) == (shape if n else (0,))


def test_ops_refuse_cpu_tensors(ext):
    x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.spu_kernels.lowrank_linear_fwd(x, w, None, a, b, None, 1.0, 0.0, None, 0)


# -- build configuration (pure Python: runs everywhere) ------------------------------------------

def test_arch_parsing_and_flags():
    archs = _cuda_build.parse_archs("8.0; 9.0+PTX,90a")
    assert archs == [("80", False), ("90", True), ("90a", False)]
    assert _cuda_build.gencode_flags(archs) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90", "-gencode=arch=compute_90a,code=sm_90a"]
    assert _cuda_build.arch_label(archs) == "sm80_sm90+PTX_sm90a"
    for bad in ("sm_90", "9", "", "nine"):
        with pytest.raises(ValueError, match="SPU_CUDA_ARCHS"):
            _cuda_build.parse_archs(bad)


def test_local_version(monkeypatch):
    monkeypatch.delenv("SPU_LOCAL_VERSION", raising=False)
    assert _cuda_build.local_version("2.14.1+cu130", "13.0") == "cu130torch2.14"
    assert _cuda_build.local_version("2.13.0+cpu", None) == ""
    monkeypatch.setenv("SPU_LOCAL_VERSION", "mybuild1")
    assert _cuda_build.local_version("2.14.1", "13.0") == "mybuild1"


def test_env_report_runs():
    out = subprocess.run([sys.executable, "-m", "spu_kernels.env"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    for label in ("torch", "triton", "spu_kernels._C", "backend torch", "backend triton", "backend cuda"):
        assert label in out.stdout


def test_missing_extension_says_how_to_get_it():
    code = ("import sys; sys.modules['spu_kernels._C'] = None\n"
            "from spu_kernels._extension import extension_error; print(extension_error())")
    env = {k: v for k, v in os.environ.items() if k != "SPU_JIT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "spu_kernels._C is not built" in out.stdout and "SPU_JIT=1" in out.stdout
    assert "--no-build-isolation" in out.stdout
