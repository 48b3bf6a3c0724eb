"""The fused low-rank op, every available backend against the fp64 reference: forward and every
grad, awkward shapes, all dtypes, dropout; what it saves; what it refuses."""
import re

import pytest
import torch
from helpers import DEVICE, LOWRANK_BACKENDS, assert_close_rel

from spu_kernels import use_backend
from spu_kernels.ops import dropout_keep_mask, lowrank_linear, lowrank_linear_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (leading dims, K, N, r, bias, g, dropout p, layout of x / W, which inputs need grads)
CASES = {
    "odd":          ((37,), 70, 53, 5, True, True, 0.0, "contig", "all"),
    "T=1":          ((1,), 33, 17, 3, False, False, 0.0, "contig", "all"),
    "lead-dims":    ((2, 3), 48, 40, 16, True, False, 0.25, "contig", "all"),
    "x-strided":    ((19,), 65, 130, 7, False, True, 0.1, "x_strided", "all"),
    "x-transposed": ((5, 4), 40, 24, 20, True, True, 0.5, "x_transposed", "all"),
    "W-transposed": ((23,), 36, 45, 4, True, True, 0.2, "w_transposed", "all"),   # GPT-2 Conv1D layout
    "r=1":          ((70,), 64, 64, 1, True, False, 0.0, "contig", "all"),
    "frozen-x-A":   ((9, 2), 50, 31, 6, True, True, 0.3, "contig", "B,g"),        # no dx, no grad_A
    "frozen-x":     ((31,), 48, 36, 6, False, True, 0.2, "contig", "A,B,g"),      # grad_A without dx
    "bias-only":    ((13,), 29, 18, 2, True, False, 0.0, "contig", "bias"),
}


def make_inputs(case, dtype, device=DEVICE):
    lead, K, N, r, has_bias, has_g, p, layout, needs = case
    g = torch.Generator().manual_seed(hash((lead, K, N, r)) % 2**31)
    rnd = lambda *s: torch.randn(*s, generator=g)
    if layout == "x_strided":
        x = rnd(*lead, 2 * K)[..., ::2]
    elif layout == "x_transposed":
        x = rnd(K, *lead).movedim(0, -1)
    else:
        x = rnd(*lead, K)
    w = rnd(K, N).t() if layout == "w_transposed" else rnd(N, K)
    t = dict(x=x, w=w / K**0.5, bias=rnd(N) if has_bias else None, a=rnd(r, K) / K**0.5, b=rnd(N, r) * 0.5,
             g=torch.rand(r, generator=g) + 0.5 if has_g else None)
    t = {k: (v.to(device=device, dtype=dtype) if v is not None else None) for k, v in t.items()}
    if layout == "x_strided":    # keep the stride through the cast
        t["x"] = torch.empty(*lead, 2 * K, device=device, dtype=dtype)[..., ::2].copy_(t["x"])
    if layout == "w_transposed":
        t["w"] = t["w"].t().contiguous().t()
    grads = {"all": ("x", "bias", "a", "b", "g"), "A,B,g": ("a", "b", "g"), "B,g": ("b", "g"),
             "bias": ("bias",)}[needs]
    for k in grads:
        if t[k] is not None:
            t[k].requires_grad_(True)
    dy = torch.randn(*lead, N, generator=g).to(device=device, dtype=dtype)
    return t, p, dy


def forward_backward(fn, t, p, dy, seed=1234):
    leaves = {k: v for k, v in t.items() if v is not None and v.requires_grad}
    y = fn(t["x"], t["w"], t["bias"], t["a"], t["b"], t["g"], p, seed)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return y, dict(zip(leaves, grads))


def ref_fn(x, w, bias, a, b, g, p, seed):
    return lowrank_linear_reference(x, w, bias, a, b, scale=0.7, rank_scale=g, dropout_p=p, seed=seed)


def as_double(t):
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in t.items()}


@pytest.mark.parametrize("backend", LOWRANK_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_matches_reference(backend, dtype, case):
    t, p, dy = make_inputs(CASES[case], dtype)
    op = lambda x, w, bias, a, b, g, p, seed: lowrank_linear(x, w, bias, a, b, scale=0.7, rank_scale=g,
                                                             dropout_p=p, seed=seed, backend=backend)
    y, grads = forward_backward(op, t, p, dy)
    y_ref, g_ref = forward_backward(ref_fn, as_double(t), p, dy.double())
    y_low, g_low = forward_backward(ref_fn, t, p, dy)      # plain torch in this dtype: the rounding baseline
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close_rel(y, y_ref, dtype, f"{backend} y", y_low)
    assert set(grads) == set(g_ref)
    for k in grads:
        assert grads[k].dtype == t[k].dtype, k
        assert_close_rel(grads[k], g_ref[k], dtype, f"{backend} grad {k}", g_low[k])


@pytest.mark.parametrize("backend", LOWRANK_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_is_the_seeds(backend, p):
    """With W = 0, A = B = I and s = 1 the op is y = drop(x): the mask shows in y, dx and grad_A."""
    T, K = 3 * 7, 24
    x = torch.randn(3, 7, K, device=DEVICE, requires_grad=True)
    eye = torch.eye(K, device=DEVICE)
    a = eye.clone().requires_grad_(True)
    w = torch.zeros(K, K, device=DEVICE)
    dy = torch.randn(3, 7, K, device=DEVICE)
    seed = 987654
    keep = dropout_keep_mask(seed, T, K, p, DEVICE).view(3, 7, K)
    assert 0 < keep.sum() < keep.numel()
    y = lowrank_linear(x, w, None, a, eye, dropout_p=p, seed=seed, backend=backend)
    dx, da = torch.autograd.grad(y, [x, a], dy)
    torch.testing.assert_close(y, x * keep / (1 - p))
    assert (y[~keep] == 0).all()
    torch.testing.assert_close(dx, dy * keep / (1 - p))
    torch.testing.assert_close(da, (dy.reshape(T, K).t() @ (x * keep / (1 - p)).reshape(T, K)))
    # the same seed gives the same mask, another seed another
    y2 = lowrank_linear(x, w, None, a, eye, dropout_p=p, seed=seed, backend=backend)
    assert torch.equal(y, y2)
    y3 = lowrank_linear(x, w, None, a, eye, dropout_p=p, seed=seed + 1, backend=backend)
    assert not torch.equal(y != 0, y3 != 0)


@pytest.mark.parametrize("backend", LOWRANK_BACKENDS)
def test_dropout_seed_from_torch_generator(backend):
    x = torch.randn(8, 16, device=DEVICE)
    w, a, b = torch.zeros(16, 16, device=DEVICE), torch.eye(16, device=DEVICE), torch.eye(16, device=DEVICE)
    torch.manual_seed(5)
    y1 = lowrank_linear(x, w, None, a, b, dropout_p=0.5, backend=backend)
    y2 = lowrank_linear(x, w, None, a, b, dropout_p=0.5, backend=backend)
    torch.manual_seed(5)
    y3 = lowrank_linear(x, w, None, a, b, dropout_p=0.5, backend=backend)
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)


@pytest.mark.parametrize("backend", LOWRANK_BACKENDS)
def test_saves_only_x_and_u(backend):
    """Backward keeps x (the caller's tensor, not a copy), u (T×r) and the 0-dim seed: no mask, no
    dropped-out x, no T×N branch output."""
    T, K, N, r = 33, 40, 48, 4
    x = torch.randn(T, K, device=DEVICE, requires_grad=True)
    w = torch.randn(N, K, device=DEVICE)
    a = torch.randn(r, K, device=DEVICE, requires_grad=True)
    b = torch.randn(N, r, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lowrank_linear(x, w, None, a, b, dropout_p=0.3, backend=backend)
    activations = [t for t in saved if t.dim() and t.shape[0] == T]
    assert [tuple(t.shape) for t in activations] == [(T, K), (T, r)]
    assert [t.dtype for t in saved if t.dim() == 0] == [torch.int64]
    assert activations[0].data_ptr() == x.data_ptr()
    y.sum().backward()
    assert x.grad is not None and a.grad is not None and b.grad is not None


@pytest.mark.parametrize("backend", LOWRANK_BACKENDS)
def test_empty_input(backend):
    x = torch.randn(0, 5, 12, device=DEVICE, requires_grad=True)
    w = torch.randn(7, 12, device=DEVICE)
    a = torch.randn(2, 12, device=DEVICE, requires_grad=True)
    b = torch.randn(7, 2, device=DEVICE, requires_grad=True)
    y = lowrank_linear(x, w, None, a, b, backend=backend)
    assert y.shape == (0, 5, 7)
    y.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and x.grad.shape == x.shape


def test_autocast_casts_like_linear():
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(8, 16)
    a = torch.randn(3, 16, requires_grad=True)
    b = torch.randn(8, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lowrank_linear(x, w, None, a, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_adapters_in_fp32_compute_in_activation_dtype():
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    a = torch.randn(3, 16, requires_grad=True)
    b = torch.randn(8, 3, requires_grad=True)
    y = lowrank_linear(x, w, None, a, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


@pytest.mark.parametrize("bad, match", [
    (dict(w=torch.randn(8, 15)), r"weight must be \(N, K=16\)"),
    (dict(a=torch.randn(3, 15)), r"lora_a \(A\) must be \(r, K=16\)"),
    (dict(b=torch.randn(8, 4)), r"lora_b \(B\) must be \(N=8, r=3\)"),
    (dict(g=torch.randn(4)), r"rank_scale \(g\) must be \(r=3,\)"),
    (dict(bias=torch.randn(9)), r"bias must be \(N=8,\)"),
    (dict(x=torch.randint(0, 3, (5, 16))), "x must be float32, float16 or bfloat16"),
    (dict(w=torch.randn(8, 16, dtype=torch.float16)), "x is torch.float32 but weight is torch.float16"),
    (dict(w=torch.randn(8, 16, requires_grad=True)), "weight requires grad"),
    (dict(p=1.0), r"dropout_p must be a number in \[0, 1\)"),
    (dict(p=-0.1), r"dropout_p must be a number in \[0, 1\)"),
    (dict(scale=float("nan")), "scale must be a finite number"),
])
def test_bad_input_is_a_clear_error(bad, match):
    t = dict(x=torch.randn(5, 16), w=torch.randn(8, 16), bias=None, a=torch.randn(3, 16), b=torch.randn(8, 3),
             g=None, p=0.0, scale=1.0)
    t.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        lowrank_linear(t["x"], t["w"], t["bias"], t["a"], t["b"], scale=t["scale"], rank_scale=t["g"],
                       dropout_p=t["p"])


def test_backend_selection(monkeypatch):
    x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        lowrank_linear(x, w, None, a, b, backend="cudnn")
    monkeypatch.setenv("SPU_BACKEND", "nope")
    with pytest.raises(ValueError, match="SPU_BACKEND: unknown backend 'nope'"):
        lowrank_linear(x, w, None, a, b)
    # the cuda backend never runs on CPU tensors: asking for it is an error naming the source
    monkeypatch.setenv("SPU_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' .from SPU_BACKEND. cannot run on cpu tensors"):
        lowrank_linear(x, w, None, a, b)
    monkeypatch.delenv("SPU_BACKEND")
    with use_backend("cuda"), pytest.raises(RuntimeError, match="use_backend"):
        lowrank_linear(x, w, None, a, b)
    # asking for triton on CPU tensors without the interpreter is an error, not a fallback
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend .triton. .from backend=. cannot run on cpu tensors"):
        lowrank_linear(x, w, None, a, b, backend="triton")


@pytest.mark.parametrize("backend", LOWRANK_BACKENDS)
@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, 1.5, True])
def test_dropout_seed_must_be_in_the_philox_key_range(backend, seed):
    x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\).*got " + re.escape(repr(seed))):
        lowrank_linear(x, w, None, a, b, dropout_p=0.5, seed=seed, backend=backend)
    y = lowrank_linear(x, w, None, a, b, dropout_p=0.5, seed=2**63 - 1, backend=backend)   # the largest valid
    assert torch.isfinite(y).all()
