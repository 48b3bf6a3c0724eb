"""The bottleneck adapter op, y = h + act(h W_dᵀ + b_d) W_uᵀ + b_u: every available backend against the
fp64 reference (forward and every grad, awkward shapes, all dtypes), the reference against hand-derived
fp64 gradients and gradcheck, step 0 (W_u = b_u = 0) exactly h, what backward keeps, what the op refuses."""
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_close_rel

from spu_kernels.backends import available_backends, triton_interpret
from spu_kernels.ops.bottleneck_adapter import (
    ACTIVATIONS,
    IMPLEMENTED,
    bottleneck_adapter,
    bottleneck_adapter_reference,
)

BACKENDS = [b for b in available_backends() if b in IMPLEMENTED]
INTERPRET = triton_interpret()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("h", "wd", "bd", "wu", "bu")

# (leading dims, d, r, biases, layout, activation)
CASES = {
    "odd":        ((37,), 45, 24, True, "contig", "gelu"),
    "r=1":        ((19,), 33, 1, True, "contig", "relu"),
    "lead-dims":  ((2, 3), 40, 8, False, "contig", "silu"),
    "h-strided":  ((21,), 26, 5, True, "h_strided", "tanh"),
    "wide-r":     ((5,), 20, 130, True, "contig", "gelu"),        # r > MAX_FUSED_RANK: the torch decomposition
}


def make_inputs(case, dtype, master=False):
    lead, d, r, biases, layout, act = case
    g = torch.Generator().manual_seed(d * 1000 + r)
    rnd = lambda *s: torch.randn(*s, generator=g)
    h = rnd(*lead, 2 * d)[..., ::2] if layout == "h_strided" else rnd(*lead, d)
    t = dict(h=h, wd=rnd(r, d) / d**0.5, bd=rnd(r) if biases else None, wu=rnd(d, r) / r**0.5,
             bu=rnd(d) if biases else None)
    wdt = torch.float32 if master else dtype
    t = {k: (v.to(DEVICE, dtype if k == "h" else wdt) if v is not None else None) for k, v in t.items()}
    if layout == "h_strided":
        t["h"] = torch.empty(*lead, 2 * d, device=DEVICE, dtype=dtype)[..., ::2].copy_(t["h"])
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    return t, rnd(*lead, d).to(DEVICE, dtype), act


def run(fn, t, dy):
    leaves = {k: v for k, v in t.items() if v is not None and v.requires_grad}
    y = fn(*(t[k] for k in NAMES))
    return y, dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy)))


def as_dtype(t, dtype):
    return {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if v is not None else None) for k, v in t.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_matches_reference(backend, dtype, case):
    t, dy, act = make_inputs(CASES[case], dtype)
    y, grads = run(lambda *a: bottleneck_adapter(*a, act, backend=backend), t, dy)
    y_ref, g_ref = run(lambda *a: bottleneck_adapter_reference(*a, act), as_dtype(t, torch.float64), dy.double())
    y_low, g_low = run(lambda *a: bottleneck_adapter_reference(*a, act), t, dy)   # plain torch: the rounding baseline
    # the interpreter truncates fp32 -> bf16 stores (a GPU rounds to nearest): z, dz and act(z) are
    # stored rounded, so hold bf16 there to the dtype's ceiling only
    loose = backend == "triton" and dtype == torch.bfloat16 and INTERPRET
    assert y.dtype == dtype and y.shape == t["h"].shape
    assert_close_rel(y, y_ref, dtype, f"{backend} y", None if loose else y_low)
    assert set(grads) == set(g_ref)
    for k in grads:
        assert grads[k].dtype == t[k].dtype, k
        assert_close_rel(grads[k], g_ref[k], dtype, f"{backend} grad_{k}", None if loose else g_low[k])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_master_weights_with_half_activations(backend):
    """Adapter weights kept in fp32 beside fp16 activations: cast inside, grads in fp32."""
    t, dy, act = make_inputs(CASES["odd"], torch.float16, master=True)
    y, grads = run(lambda *a: bottleneck_adapter(*a, act, backend=backend), t, dy)
    y_ref, g_ref = run(lambda *a: bottleneck_adapter_reference(*a, act), as_dtype(t, torch.float64), dy.double())
    assert y.dtype == torch.float16
    assert_close_rel(y, y_ref, torch.float16, "y")
    for k in grads:
        assert grads[k].dtype == t[k].dtype, k
        assert_close_rel(grads[k], g_ref[k], torch.float16, f"grad_{k}")


def _act(z, act):
    return {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[act](z)


def _act_grad(z, act):
    if act == "relu":
        return (z > 0).double()
    if act == "gelu":
        return 0.5 * (1 + torch.erf(z / 2**0.5)) + z * torch.exp(-z * z / 2) / (2 * torch.pi) ** 0.5
    if act == "silu":
        s = torch.sigmoid(z)
        return s + z * s * (1 - s)
    return 1 - torch.tanh(z) ** 2


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_reference_against_hand_derived_float64_gradients(act):
    """The reference's autograd against the backward written out by hand (fp64)."""
    g = torch.Generator().manual_seed(3)
    h, wd, bd = torch.randn(11, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(3, generator=g)
    wu, bu, dy = torch.randn(7, 3, generator=g), torch.randn(7, generator=g), torch.randn(11, 7, generator=g)
    t = {k: v.double().requires_grad_() for k, v in zip(NAMES, (h, wd, bd, wu, bu))}
    y, grads = run(lambda *a: bottleneck_adapter_reference(*a, act), t, dy.double())
    h, wd, bd, wu, bu, dy = (v.double() for v in (h, wd, bd, wu, bu, dy))
    z = torch.einsum("md,rd->mr", h, wd) + bd
    a = _act(z, act)
    torch.testing.assert_close(y, h + torch.einsum("mr,dr->md", a, wu) + bu, rtol=1e-12, atol=1e-12)
    dz = torch.einsum("md,dr->mr", dy, wu) * _act_grad(z, act)
    want = {"h": dy + torch.einsum("mr,rd->md", dz, wd), "wd": torch.einsum("mr,md->rd", dz, h), "bd": dz.sum(0),
            "wu": torch.einsum("md,mr->dr", dy, a), "bu": dy.sum(0)}
    for k in NAMES:
        torch.testing.assert_close(grads[k], want[k], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_float64(act):
    g = torch.Generator().manual_seed(5)
    args = [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
            for s in ((2, 3, 6), (4, 6), (4,), (6, 4), (6,))]
    with torch.no_grad():
        args[1].mul_(0.5)
    for backend in BACKENDS:     # float64 runs the torch decomposition with the op's own backward
        assert torch.autograd.gradcheck(lambda *a: bottleneck_adapter(*a, act, backend=backend), args)
    if act != "relu":      # relu's kink: a finite difference across z = 0 would not match
        assert torch.autograd.gradgradcheck(lambda *a: bottleneck_adapter_reference(*a, act), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_up_projection_is_h_bit_for_bit(backend, dtype):
    """Step 0: W_u = b_u = 0 gives exactly h (h + 0), in any dtype; zero tokens work."""
    h = (3 * torch.randn(2, 9, 40)).to(DEVICE, dtype)
    wd, bd = torch.randn(6, 40, device=DEVICE), torch.randn(6, device=DEVICE)
    wu, bu = torch.zeros(40, 6, device=DEVICE), torch.zeros(40, device=DEVICE)
    for act in ACTIVATIONS:
        assert torch.equal(bottleneck_adapter(h, wd, bd, wu, bu, act, backend=backend), h)
    assert bottleneck_adapter(h[:, :0], wd, bd, wu, bu, backend=backend).shape == (2, 0, 40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_for_backward_is_h_and_the_bottleneck_only(backend):
    """Backward keeps h (the caller's tensor) and z (tokens × r): no activation, no (tokens × d) tensor."""
    t, _, act = make_inputs(CASES["odd"], torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        bottleneck_adapter(*(t[k] for k in NAMES), act, backend=backend)
    tokens, d, r = 37, 45, 24
    big = [x for x in saved if x.numel() > d * r]
    assert [x.data_ptr() for x in big] == [t["h"].data_ptr()], [tuple(x.shape) for x in big]
    assert sorted(tuple(x.shape) for x in saved if x.numel() <= d * r) == sorted([(tokens, r), (r, d), (d, r)])


def test_autocast_runs_in_the_autocast_dtype():
    h = torch.randn(5, 16, requires_grad=True)
    wd, wu = torch.randn(4, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bottleneck_adapter(h, wd, None, wu, None, "relu", backend="torch")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert h.grad.dtype == wd.grad.dtype == wu.grad.dtype == torch.float32
    want = bottleneck_adapter_reference(h.double(), wd.double(), None, wu.double(), None, "relu")
    assert_close_rel(y, want, torch.bfloat16, "autocast y")


def test_bad_input_is_a_clear_error():
    h, wd, wu = torch.randn(4, 8), torch.randn(3, 8), torch.randn(8, 3)
    with pytest.raises(ValueError, match="unknown activation 'swish'; choose one of relu, gelu, silu, tanh"):
        bottleneck_adapter(h, wd, None, wu, None, "swish")
    with pytest.raises(ValueError, match=r"w_down must be \(r, d=8\)"):
        bottleneck_adapter(h, torch.randn(3, 7), None, wu, None)
    with pytest.raises(ValueError, match=r"w_up must be \(8, 3\)"):
        bottleneck_adapter(h, wd, None, wu.t(), None)
    with pytest.raises(ValueError, match=r"b_down must be \(3,\)"):
        bottleneck_adapter(h, wd, torch.zeros(8), wu, None)
    with pytest.raises(ValueError, match=r"b_up must be \(8,\)"):
        bottleneck_adapter(h, wd, None, wu, torch.zeros(3))
    with pytest.raises(TypeError, match="h must be float32, float16, bfloat16 or float64"):
        bottleneck_adapter(h.long(), wd, None, wu, None)
    with pytest.raises(TypeError, match="w_up must be a floating tensor"):
        bottleneck_adapter(h, wd, None, wu.long(), None)
    if "cuda" not in available_backends():
        with pytest.raises(RuntimeError, match="backend 'cuda'.*not implemented"):
            bottleneck_adapter(h, wd, None, wu, None, backend="cuda")
