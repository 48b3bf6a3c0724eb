"""The CUDA C++ backend (spu_kernels._C) on a machine without a GPU: the build configuration, that
the extension imports and registers its ops with shape-only (Meta) kernels, and that the kernels'
Philox code (built for the host too) gives the mask of the Python spec. Its numerics against the
reference run in test_lowrank_linear_op.py / test_gpu.py wherever a GPU is visible.

SPU_EXPECT_CUDA_EXT=1 (set by `make test` when it built the extension) turns "not built" from a
skip into a failure, so CI cannot pass with a silently missing build."""
import os
import re
import subprocess
import sys

import pytest
import torch

from spu_kernels import _cuda_build
from spu_kernels._extension import extension_error, load_extension
from spu_kernels.backends import backend_status
from spu_kernels.ops.dropout_rng import dropout_keep_mask, dropout_threshold, philox4x32
from spu_kernels.ops.lowrank_linear import grad_layout

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


@pytest.mark.parametrize("grouped", [True, False], ids=["four-per-call", "per-element"])
@pytest.mark.parametrize("seed", [0, 77, 2**40 + 7])
def test_kernel_keep_mask_is_the_spec(ext, seed, grouped):
    rows, cols, p = 6, 23, 0.3          # 23 columns: each row ends in a partial group of four
    thr = dropout_threshold(p)
    got = torch.tensor(ext.dropout_keep_mask(seed, rows, cols, thr, grouped), dtype=torch.bool).view(rows, cols)
    want = dropout_keep_mask(seed, rows, cols, p)
    assert 0.5 < want.float().mean() < 0.9
    assert torch.equal(got, want)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


@pytest.mark.parametrize("has_bias, has_g", [(True, True), (False, False)])
def test_meta_kernels_give_shapes(ext, has_bias, has_g):
    T, K, N, r = 7, 12, 5, 3
    x, w, a, b = _meta(T, K), _meta(N, K), _meta(r, K), _meta(N, r)
    bias, g = (_meta(N) if has_bias else None), (_meta(r) if has_g else None)
    seed = torch.tensor(3, device="meta")
    y, u = torch.ops.spu_kernels.lowrank_linear_fwd(x, w, bias, a, b, g, 0.5, 0.1, seed, 5)
    assert (y.shape, y.dtype, u.shape, u.dtype) == ((T, N), torch.bfloat16, (T, r), torch.float32)
    for need_dx in (True, False):
        need = (need_dx, has_bias, True, True, has_g)
        dx, grads = torch.ops.spu_kernels.lowrank_linear_bwd(_meta(T, N), x, w, a, b, g, u, 0.5, 0.1, seed, 5, *need)
        assert dx.dtype == torch.bfloat16 and tuple(dx.shape) == ((T, K) if need_dx else (0,))
        _, total = grad_layout(r, K, N, has_bias, True, True, has_g)
        assert grads.dtype == torch.float32 and tuple(grads.shape) == (total,)
        assert total == r * K + N * r + (N if has_bias else 0) + (r if has_g else 0)


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


# -- what the compiler says (nvcc + ptxas for sm_90; no GPU needed) ------------------------------

def test_cuda_kernels_compile_without_spills_for_sm90(tmp_path):
    """Every kernel of csrc/lowrank_kernels.cu for sm_90: no spill stores (local memory in the inner
    loops of a memory-bound pass costs what it was meant to save), shared memory within the
    48 KB static limit. Prints registers and shared memory per kernel."""
    home = _cuda_build.default_cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    if not nvcc or not os.path.exists(nvcc):
        if EXPECT_EXT:
            pytest.fail("SPU_EXPECT_CUDA_EXT=1 but nvcc is not found")
        pytest.skip("nvcc not found")
    src = os.path.join(os.path.dirname(__file__), "..", "csrc", "lowrank_kernels.cu")
    out = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-Xptxas", "-v", "-c", src, "-o",
                          str(tmp_path / "k.o")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    kernels = {}
    name = None
    for line in out.stderr.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            name = m.group(1)
        elif name and (m := re.search(r"(\d+) bytes spill stores", line)):
            kernels[name] = {"spill": int(m.group(1))}
        elif name and name in kernels and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            kernels[name].update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
    for kernel in ("skinny_pass_kernel", "rank_term_kernel", "sum_partials_kernel"):
        assert any(kernel in n for n in kernels), f"{kernel} missing from ptxas's report"
    for n, facts in sorted(kernels.items()):
        print(f"{n[-90:]}: {facts}")
    spilling = {n: f for n, f in kernels.items() if f["spill"] > 0}
    assert not spilling, spilling
    assert all("regs" in f for f in kernels.values()), kernels
    assert max(f["smem"] for f in kernels.values()) <= 48 * 1024
