"""GPU-only checks (skipped without CUDA): large shapes through the autotuned kernels, the default
backend on CUDA tensors, and the memory the op adds over the frozen layer."""
import pytest
import torch
from helpers import assert_close_rel, rel_err

from spu_kernels.backends import resolve_backend
from spu_kernels.ops import lowrank_linear, lowrank_linear_reference
from spu_kernels.ops.lowrank_linear import IMPLEMENTED

pytestmark = pytest.mark.gpu


def test_default_backend_on_cuda_is_a_kernel():
    assert resolve_backend("lowrank_linear", IMPLEMENTED, torch.device("cuda")) in ("cuda", "triton")
    assert resolve_backend("lowrank_linear", IMPLEMENTED, torch.device("cpu")) == "torch"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T, K, N, r, p, trained",
                         [(1000, 1024, 3000, 16, 0.0, "xabg"), (4097, 768, 768, 64, 0.1, "xabg"),
                          (1, 4096, 4096, 16, 0.0, "xabg"),
                          (2000, 512, 3000, 16, 0.2, "bg"),     # no dx, no grad_A: v and grad_g without them
                          (3000, 640, 2100, 8, 0.1, "ab")])     # grad_A without dx (x frozen)
def test_large_shapes(backend, dtype, T, K, N, r, p, trained):
    """Many token splits and column blocks (the partial sums), through every kernel backend."""
    from spu_kernels.backends import available_backends
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not available")
    dev = "cuda"
    x = torch.randn(T, K, device=dev, dtype=dtype)
    w = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
    bias = torch.randn(N, device=dev, dtype=dtype)
    a = torch.randn(r, K, device=dev) / K**0.5
    b = torch.randn(N, r, device=dev) * 0.1
    g = torch.rand(r, device=dev) + 0.5
    leaves = dict(zip("xabg", (x, a, b, g)))
    for name in trained:
        leaves[name].requires_grad_(True)
    dy = torch.randn(T, N, device=dev, dtype=dtype)
    y = lowrank_linear(x, w, bias, a, b, scale=2.0, rank_scale=g, dropout_p=p, seed=11, backend=backend)
    grads = torch.autograd.grad(y, [leaves[n] for n in trained], dy)
    ref = {n: t.detach().double().requires_grad_(n in trained) for n, t in leaves.items()}
    y_ref = lowrank_linear_reference(ref["x"], w.double(), bias.double(), ref["a"], ref["b"], 2.0, ref["g"], p, 11)
    g_ref = torch.autograd.grad(y_ref, [ref[n] for n in trained], dy.double())
    assert_close_rel(y, y_ref, dtype, f"{backend} y")
    for name, got, want in zip(trained, grads, g_ref):
        assert_close_rel(got, want, dtype, f"{backend} grad {name}")


def test_fp32_follows_torch_tf32_setting():
    x = torch.randn(512, 1024, device="cuda")
    w = torch.randn(1024, 1024, device="cuda") / 32
    a, b = torch.randn(16, 1024, device="cuda") / 32, torch.randn(1024, 16, device="cuda")
    ref = lowrank_linear_reference(x.double(), w.double(), None, a.double(), b.double())
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert rel_err(lowrank_linear(x, w, None, a, b), ref) < 1e-5
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def test_adds_no_activation_sized_memory():
    """Forward+backward peak over the frozen nn.Linear's: a few T×r and parameter-sized buffers,
    never a T×N branch output or a T×K mask / dropped x."""
    T, K, N, r = 8192, 1024, 1024, 16
    dt = torch.bfloat16
    x = torch.randn(T, K, device="cuda", dtype=dt, requires_grad=True)
    w = torch.randn(N, K, device="cuda", dtype=dt)
    a = torch.randn(r, K, device="cuda", dtype=dt, requires_grad=True)
    b = torch.zeros(N, r, device="cuda", dtype=dt, requires_grad=True)
    dy = torch.randn(T, N, device="cuda", dtype=dt)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    frozen = peak(lambda: torch.autograd.grad(torch.nn.functional.linear(x, w), [x], dy))
    ours = peak(lambda: torch.autograd.grad(lowrank_linear(x, w, None, a, b, dropout_p=0.1), [x, a, b], dy))
    t_by_n = T * N * 2
    assert ours - frozen < t_by_n // 4, (ours, frozen)


def _cuda_backend_or_skip():
    from spu_kernels.backends import backend_status
    state = backend_status()["cuda"]
    if state != "available":
        pytest.skip(f"cuda backend: {state}")


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cuda_ops_pass_opcheck(p):
    """Schema, fake (Meta) kernels and autograd registration of the CUDA ops, on real tensors."""
    _cuda_backend_or_skip()
    dev, dt = "cuda", torch.bfloat16
    T, K, N, r = 70, 96, 80, 8
    x, w, a, b = (torch.randn(T, K, device=dev, dtype=dt), torch.randn(N, K, device=dev, dtype=dt),
                  torch.randn(r, K, device=dev, dtype=dt), torch.randn(N, r, device=dev, dtype=dt))
    bias, g = torch.randn(N, device=dev, dtype=dt), torch.rand(r, device=dev, dtype=dt)
    thr = int(p * 2**32)
    seed = torch.tensor(7, device=dev)
    torch.library.opcheck(torch.ops.spu_kernels.lowrank_linear_fwd.default, (x, w, bias, a, b, g, 0.5, p, seed, thr))
    _, u = torch.ops.spu_kernels.lowrank_linear_fwd(x, w, bias, a, b, g, 0.5, p, seed, thr)
    dy = torch.randn(T, N, device=dev, dtype=dt)
    torch.library.opcheck(torch.ops.spu_kernels.lowrank_linear_bwd.default,
                          (dy, x, w, a, b, g, u, 0.5, p, seed, thr, True, True, True, True, True))


def test_cuda_backend_under_torch_compile():
    _cuda_backend_or_skip()
    dev, dt = "cuda", torch.float16
    x = torch.randn(3, 33, 64, device=dev, dtype=dt, requires_grad=True)
    w = torch.randn(48, 64, device=dev, dtype=dt) / 8
    a = (torch.randn(4, 64, device=dev) / 8).requires_grad_()
    b = torch.randn(48, 4, device=dev).requires_grad_()

    def f(x, a, b):
        return lowrank_linear(x, w, None, a, b, scale=2.0, backend="cuda").float().square().sum()

    eager = torch.autograd.grad(f(x, a, b), [x, a, b])
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, a, b), [x, a, b])
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=2e-2, atol=2e-2)
