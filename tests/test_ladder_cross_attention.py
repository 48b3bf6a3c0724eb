"""The fused ladder cross-attention op (k-LST) against its fp64 reference: forward and every grad, on
every backend, for k = 1..9, awkward shapes (odd d_h, one head, T = 1, leading dims, a strided slice of
a ladder tensor), fp32 / fp16 / bf16; bad input."""
import pytest
import torch
from helpers import assert_close_rel

from spu_kernels.backends import available_backends
from spu_kernels.ops.ladder_cross_attention import IMPLEMENTED, ladder_cross_attention, ladder_cross_attention_reference

BACKENDS = [b for b in available_backends() if b in IMPLEMENTED]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(lead, h, dh, k, dtype, ladder_stride=False):
    d = h * dh
    q = torch.randn(*lead, h, dh, device=DEVICE).to(dtype).requires_grad_()
    if ladder_stride:   # the stack is a slice of all ladders (L+1, ..., D), as the side network passes it
        full = torch.randn(k + 3, *lead, d, device=DEVICE).to(dtype)
        c = full[1:k + 1].detach().requires_grad_()
    else:
        c = torch.randn(k, *lead, d, device=DEVICE).to(dtype).requires_grad_()
    wk = (torch.randn(d, d, device=DEVICE) / d ** 0.5).requires_grad_()     # fp32 masters
    wv = (torch.randn(d, d, device=DEVICE) / d ** 0.5).requires_grad_()
    return q, c, wk, wv


def check(backend, lead, h, dh, k, dtype, ladder_stride=False):
    q, c, wk, wv = make(lead, h, dh, k, dtype, ladder_stride)
    do = torch.randn(*lead, h, dh, device=DEVICE).to(dtype)
    inputs = (q, c, wk, wv)
    ref = ladder_cross_attention_reference(*(t.double() for t in inputs))
    ref_g = torch.autograd.grad(ref, inputs, do.double())
    base = ladder_cross_attention_reference(q, c, wk.to(dtype), wv.to(dtype))     # plain torch in dtype
    base_g = torch.autograd.grad(base, inputs, do)
    out = ladder_cross_attention(q, c, wk, wv, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    got_g = torch.autograd.grad(out, inputs, do)
    assert_close_rel(out, ref, dtype, "out", base)
    for name, g, r, b in zip(("dq", "dc", "dw_k", "dw_v"), got_g, ref_g, base_g):
        assert g.dtype == {"dw_k": torch.float32, "dw_v": torch.float32}.get(name, dtype), name
        if r.abs().max() == 0:          # k = 1: softmax over one layer, no grad for q or W_k
            assert g.abs().max() == 0, name
        else:
            assert_close_rel(g, r, dtype, name, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", range(1, 10))
def test_every_k(backend, k):
    check(backend, (6,), 2, 4, k, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead, h, dh, k", [
    ((1,), 1, 3, 3),          # one token, one head, odd d_h
    ((19,), 3, 5, 2),         # D = 15: nothing a power of two; even k is fine for the op
    ((2, 9), 4, 12, 5),       # leading dims; d_h = 12 > 16 // 2: several head groups (atomics in dC)
    ((17,), 16, 1, 3),        # d_h = 1: every column its own head
])
def test_awkward_shapes(backend, lead, h, dh, k):
    check(backend, lead, h, dh, k, torch.float32, ladder_stride=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, dtype):
    check(backend, (21,), 4, 8, 5, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_similar_ladders_bf16(backend):
    """Adjacent layers' ladder features are alike (and W_v starts as I): dP_j − Σ p dP cancels, so dq and
    dW_k must come from fp32 statistics, not from the bf16-rounded output."""
    T, h, dh, k = 32, 4, 8, 3
    d = h * dh
    c = (torch.randn(T, d, device=DEVICE) + 0.01 * torch.randn(k, T, d, device=DEVICE)).bfloat16().requires_grad_()
    q = torch.randn(T, h, dh, device=DEVICE).bfloat16().requires_grad_()
    wk = (torch.randn(d, d, device=DEVICE) / d ** 0.5).requires_grad_()
    wv = torch.eye(d, device=DEVICE).requires_grad_()
    do = torch.randn(T, h, dh, device=DEVICE).bfloat16()
    want = torch.autograd.grad(ladder_cross_attention_reference(q.double(), c.double(), wk.double(), wv.double()),
                               (q, wk), do.double())
    got = torch.autograd.grad(ladder_cross_attention(q, c, wk, wv, backend=backend), (q, wk), do)
    for g, w in zip(got, want):
        assert ((g.double() - w).norm() / w.norm()).item() < 3e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    q, c, wk, wv = make((0,), 2, 4, 3, torch.float32)
    out = ladder_cross_attention(q, c, wk, wv, backend=backend)
    out.sum().backward()
    assert out.shape == (0, 2, 4) and wk.grad.abs().sum() == 0


def test_saves_no_projected_keys_or_values():
    """What autograd keeps: the inputs and a T×h fp32 log-sum-exp, nothing k×T×D."""
    q, c, wk, wv = make((7,), 2, 4, 3, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ladder_cross_attention(q, c, wk, wv, backend="torch")
    sizes = sorted(t.numel() for t in saved)
    assert sizes == sorted([q.numel(), c.numel(), wk.numel(), wv.numel(), 7 * 2])
    assert any(t.data_ptr() == c.data_ptr() for t in saved)      # c itself, not a copy


def test_bad_input():
    q, c, wk, wv = make((5,), 2, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="c must be"):
        ladder_cross_attention(q, c[:, :4], wk, wv)
    with pytest.raises(ValueError, match="c must be"):
        ladder_cross_attention(q, c[..., :6], wk, wv)
    with pytest.raises(ValueError, match="w_v must be"):
        ladder_cross_attention(q, c, wk, wv[:4])
    with pytest.raises(TypeError, match="q is torch.float32 but c is torch.float16"):
        ladder_cross_attention(q, c.half(), wk, wv)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ladder_cross_attention(q, c, wk.double(), wv)
    with pytest.raises(ValueError, match="k >= 1"):
        ladder_cross_attention(q, c[:0], wk, wv)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead, h, dh, k", [((2048,), 16, 8, 3), ((4097,), 16, 8, 9), ((1000,), 32, 16, 5),
                                            ((333,), 12, 8, 5)])
def test_gpu_large_shapes(dtype, lead, h, dh, k):
    """The GPU tile configs (head groups of up to 128 columns, BLOCK_T 32/64) at k-LST sizes."""
    check("triton", lead, h, dh, k, dtype, ladder_stride=True)
