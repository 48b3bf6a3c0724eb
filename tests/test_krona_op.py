"""The KronA op, every available backend against the fp64 reference (which forms A ⊗ B): forward and
every grad, awkward factor shapes, stacked slices, all dtypes; what backward keeps; bad input."""
import pytest
import torch
from helpers import DEVICE, assert_close_rel

from spu_kernels.backends import available_backends
from spu_kernels.modules.krona import KronALinear, kron_shapes
from spu_kernels.ops.kron_linear import IMPLEMENTED, kron_linear, kron_linear_reference, split_near_sqrt

BACKENDS = [b for b in available_backends() if b in IMPLEMENTED]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (leading dims, (a1, a2), (b1, b2), slice offsets or None, N, bias, layout, grads)
CASES = {
    "odd":          ((13,), (3, 5), (7, 4), None, 21, True, "contig", "all"),
    "T=1":          ((1,), (2, 3), (5, 11), None, 10, False, "contig", "all"),
    "lead-dims":    ((2, 5), (4, 4), (6, 5), None, 24, True, "contig", "all"),
    "tall-A":       ((11,), (24, 6), (2, 10), None, 48, False, "contig", "all"),   # A padded to (32, 16)
    "wide-B":       ((7,), (2, 2), (37, 19), None, 74, True, "contig", "all"),    # b1 > BLOCK_J, b2 > BLOCK_Q
    "slices":       ((9,), (4, 3), (5, 6), (0, 25), 45, True, "contig", "all"),   # q and v thirds-like, gap between
    "x-transposed": ((4, 3), (3, 4), (4, 5), None, 12, True, "x_transposed", "all"),
    "W-transposed": ((10,), (5, 3), (3, 6), None, 15, True, "w_transposed", "all"),
    "factors-only": ((8, 2), (2, 4), (8, 4), None, 16, True, "contig", "AB"),
}


def make_inputs(case, dtype):
    lead, (a1, a2), (b1, b2), offs, N, has_bias, layout, needs = case
    K = a2 * b2
    g = torch.Generator().manual_seed(hash((lead, a1, a2, b1, b2)) % 2**31)
    rnd = lambda *s: torch.randn(*s, generator=g)
    x = rnd(K, *lead).movedim(0, -1) if layout == "x_transposed" else rnd(*lead, K)
    w = rnd(K, N).t() if layout == "w_transposed" else rnd(N, K)
    S = (len(offs),) if offs else ()
    t = dict(x=x.to(DEVICE, dtype), w=(w / K**0.5).to(DEVICE, dtype),
             bias=rnd(N).to(DEVICE, dtype) if has_bias else None,
             a=(rnd(*S, a1, a2) / a2**0.5).to(DEVICE), b=(rnd(*S, b1, b2) / b2**0.5).to(DEVICE))
    if layout == "w_transposed":
        t["w"] = t["w"].t().contiguous().t()
    for k in (("x", "bias", "a", "b") if needs == "all" else ("a", "b")):
        if t[k] is not None:
            t[k].requires_grad_(True)
    dy = torch.randn(*lead, N, generator=g).to(DEVICE, dtype)
    return t, offs, dy


def run(fn, t, dy):
    leaves = {k: v for k, v in t.items() if v is not None and v.requires_grad}
    y = fn(t["x"], t["w"], t["bias"], t["a"], t["b"])
    return y, dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy)))


def as_double(t):
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in t.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_kron_linear_matches_reference(backend, dtype, case):
    t, offs, dy = make_inputs(CASES[case], dtype)
    ref = lambda x, w, b, A, B: kron_linear_reference(x, w, b, A, B, scale=0.7, out_offsets=offs)
    y, grads = run(lambda x, w, b, A, B: kron_linear(x, w, b, A, B, scale=0.7, out_offsets=offs, backend=backend),
                   t, dy)
    y_ref, g_ref = run(ref, as_double(t), dy.double())
    low = {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if k in "ab" else v) for k, v in t.items()}
    y_low, g_low = run(ref, low, dy)
    assert y.dtype == dtype
    assert_close_rel(y, y_ref, dtype, f"{backend} y", y_low)
    assert set(grads) == set(g_ref)
    for k in grads:
        assert grads[k].dtype == t[k].dtype, k
        assert_close_rel(grads[k], g_ref[k], dtype, f"{backend} grad_{k}", g_low[k])


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["odd", "slices", "W-transposed", "factors-only"])
def test_kron_linear_triton_with_cublas_base_gemms(monkeypatch, dtype, case):
    """With the base GEMMs on cuBLAS (torch.addmm / mm; SPU_KERNELS_GEMM=cublas forces the per-shape
    choice of triton/choice.py) the Kronecker terms are added into their outputs: the same results
    as the reference."""
    monkeypatch.setenv("SPU_KERNELS_GEMM", "cublas")
    test_kron_linear_matches_reference("triton", dtype, case)


def test_zero_factor_is_exactly_the_base_layer():
    """A zero factor adds exact zeros to the backend's own base GEMM (torch: F.linear; triton: the
    package's GEMM core, whose summation order is not cuBLAS's)."""
    x, w, b = torch.randn(2, 7, 12), torch.randn(20, 12), torch.randn(20)
    for backend in BACKENDS:
        if backend == "triton":
            from spu_kernels.triton.gemm import gemm
            base = torch.empty(14, 20)
            gemm(x.reshape(14, 12), w.t(), base, bias=b)
            base = base.view(2, 7, 20)
        else:
            base = torch.nn.functional.linear(x, w, b)
        y = kron_linear(x, w, b, torch.randn(4, 3), torch.zeros(5, 4), backend=backend)
        assert torch.equal(y, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_for_backward_is_x_and_the_factors(backend):
    x = torch.randn(30, 12, requires_grad=True)
    w = torch.randn(20, 12)
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kron_linear(x, w, None, a, b, backend=backend)
    assert {t.data_ptr() for t in saved if t.numel() >= 30 * 12} == {x.data_ptr()}
    assert all(t.numel() <= 20 * 12 for t in saved if t.data_ptr() != x.data_ptr())   # W, A, B


def test_factor_choice():
    assert split_near_sqrt(4096) == (64, 64)
    assert split_near_sqrt(768) == (24, 32)
    assert split_near_sqrt(11008) == (86, 128)
    assert split_near_sqrt(13) == (1, 13)
    assert kron_shapes(768, 3072) == ((24, 48), (32, 64))
    assert kron_shapes(768, 3072, (16, 32)) == ((16, 32), (48, 96))
    mod = KronALinear(torch.nn.Linear(12, 20), a_shape=(4, 3))
    assert mod.krona_A.shape == (1, 4, 3) and mod.krona_B.shape == (1, 5, 4) and not mod.krona_B.any()


def test_bad_input_is_a_clear_error():
    x, w = torch.randn(4, 12), torch.randn(20, 12)
    with pytest.raises(ValueError, match=r"a2·b2 = 15 must equal K = 12"):
        kron_linear(x, w, None, torch.randn(4, 3), torch.randn(5, 5))
    with pytest.raises(ValueError, match=r"a1·b1 = 4·4 = 16 must equal N = 20"):
        kron_linear(x, w, None, torch.randn(4, 3), torch.randn(4, 4))
    with pytest.raises(ValueError, match="must both be 2-D"):
        kron_linear(x, w, None, torch.randn(1, 4, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="pass out_offsets"):
        kron_linear(x, w, None, torch.randn(2, 2, 3), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="non-overlapping"):
        kron_linear(x, w, None, torch.randn(2, 2, 3), torch.randn(2, 5, 4), out_offsets=[0, 5])
    with pytest.raises(ValueError, match="requires grad"):
        kron_linear(x, w.clone().requires_grad_(), None, torch.randn(4, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"a1=3 does not divide N=20 .*divisors: 1, 2, 4, 5, 10, 20"):
        KronALinear(torch.nn.Linear(12, 20), a_shape=(3, 3))
    with pytest.raises(ValueError, match="a2=5 does not divide K=12"):
        KronALinear(torch.nn.Linear(12, 20), a_shape=(4, 5))
    with pytest.raises(ValueError, match="two positive ints"):
        KronALinear(torch.nn.Linear(12, 20), a_shape=(4,))
    if "triton" in BACKENDS:
        with pytest.raises(ValueError, match="sides <= 256"):
            kron_linear(torch.randn(2, 600), torch.randn(600, 600), None, torch.zeros(300, 300),
                        torch.zeros(2, 2), backend="triton")
