"""Every op's custom ops (spu_kernels/ops/_library.py) pass torch.library.opcheck on every backend
this machine runs: schema, fake (meta) implementation, autograd registration and AOT dispatch with
dynamic shapes; and the compiled path (custom op) gives what the eager path (autograd.Function)
gives, forward and backward."""
import importlib

import pytest
import torch
from helpers import DEVICE

from spu_kernels.backends import available_backends
from spu_kernels.ops.bottleneck_adapter import BOTTLENECK_ADAPTER
from spu_kernels.ops.ia3 import IA3_LINEAR, IA3_SCALED_ACT
from spu_kernels.ops.ia3_dynamic import IA3_DYNAMIC_LINEAR
from spu_kernels.ops.kron_linear import KRON_LINEAR
from spu_kernels.ops.ladder_cross_attention import LADDER_CROSS_ATTENTION
from spu_kernels.ops.lowrank_linear import LOWRANK_LINEAR

T = 7   # tokens: small (the Triton interpreter runs ~ms a program), not a multiple of any block


def _t(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def _seed(value=12345):
    return torch.tensor(value, dtype=torch.int64, device=DEVICE)


def lowrank_cases():
    K, N, r = 12, 10, 3
    x, w, bias = _t(T, K, grad=True), _t(N, K), _t(N, grad=True)
    a, b, g = _t(r, K, grad=True), _t(N, r, grad=True), _t(r, grad=True)
    u, dy = _t(T, r), _t(T, N)
    yield "fwd", (x, w, bias, a, b, g, 0.5, 0.25, _seed())
    yield "fwd", (x, w, None, a, b, None, 2.0, 0.0, None)
    yield "bwd", (dy, x.detach(), w, a.detach(), b.detach(), g.detach(), u, 0.5, 0.25, _seed(), True, True, True,
                  True, True)
    yield "bwd", (dy, None, w, a.detach(), b.detach(), None, u, 0.5, 0.0, None, True, False, False, True, False)


def ia3_linear_cases():
    K, N = 12, 10
    x, w, bias = _t(T, K, grad=True), _t(N, K), _t(N, grad=True)
    ln, lk = _t(N, grad=True), _t(K, grad=True)
    for side, l in (("output", ln), ("input", lk)):
        yield "fwd", (x, w, bias, l, side)
        y = _t(T, N)
        yield "bwd", (_t(T, N), x.detach(), y, w, bias.detach(), l.detach(), side, True, True, True)
    yield "bwd", (_t(T, N), None, None, w, None, ln.detach(), "output", True, False, False)


def ia3_dynamic_cases():
    K, N, r = 12, 10, 3
    x, w, bias = _t(T, K, grad=True), _t(N, K), _t(N, grad=True)
    d, u = _t(r, K, grad=True), _t(N, r, grad=True)
    yield "fwd", (x, w, bias, d, u)
    yield "fwd", (x, w, None, d, u)
    yield "bwd", (_t(T, N), x.detach(), _t(T, N), w, d.detach(), u.detach(), _t(T, r), True, True, True, True)
    yield "bwd", (_t(T, N), None, _t(T, N), None, d.detach(), u.detach(), _t(T, r), False, False, False, True)


def ia3_act_cases():
    h, l = _t(T, 9, grad=True), _t(9, grad=True)
    for act in ("gelu", "silu"):
        yield "fwd", (h, l, act)
        yield "bwd", (_t(T, 9), h.detach(), l.detach(), act, True, True)


def kron_cases():
    # N = a1·b1 = 6 per slice, two slices on a 14-wide output; K = a2·b2 = 12
    x, w, bias = _t(T, 12, grad=True), _t(14, 12), _t(14, grad=True)
    a, b = _t(2, 2, 3, grad=True), _t(2, 3, 4, grad=True)
    yield "fwd", (x, w, bias, a, b, 0.5, [0, 7])
    yield "bwd", (_t(T, 14), x.detach(), w, a.detach(), b.detach(), 0.5, [0, 7], True, True, True, True)


def bottleneck_cases():
    d, r = 10, 3
    h, wd, bd = _t(T, d, grad=True), _t(r, d, grad=True), _t(r, grad=True)
    wu, bu = _t(d, r, grad=True), _t(d, grad=True)
    yield "fwd", (h, wd, bd, wu, bu, "gelu")
    yield "fwd", (h, wd, None, wu, None, "tanh")
    yield "bwd", (_t(T, d), h.detach(), _t(T, r), wd.detach(), wu.detach(), "silu", True, True, True, True, True)
    yield "bwd", (_t(T, d), None, _t(T, r), wd.detach(), wu.detach(), "relu", True, False, False, True, False)


def ladder_cases():
    heads, dh, nk = 2, 4, 3
    d = heads * dh
    q, c = _t(T, d, grad=True), _t(nk, T, d, grad=True)
    wk, wv = _t(d, d, grad=True), _t(d, d, grad=True)
    yield "fwd", (q, c, wk, wv, heads, 0.35)
    lse = torch.randn(T, heads, device=DEVICE)
    yield "bwd", (_t(T, d), q.detach(), c.detach(), wk.detach(), wv.detach(), lse, heads, 0.35, True)


OPS = {"lowrank_linear": (LOWRANK_LINEAR, lowrank_cases), "ia3_linear": (IA3_LINEAR, ia3_linear_cases),
       "ia3_scaled_act": (IA3_SCALED_ACT, ia3_act_cases),
       "ia3_dynamic_linear": (IA3_DYNAMIC_LINEAR, ia3_dynamic_cases), "kron_linear": (KRON_LINEAR, kron_cases),
       "ladder_cross_attention": (LADDER_CROSS_ATTENTION, ladder_cases),
       "bottleneck_adapter": (BOTTLENECK_ADAPTER, bottleneck_cases)}
PARAMS = [(name, be) for name, (pair, _) in OPS.items() for be in pair.fwd if be in available_backends()]


@pytest.mark.parametrize("name,backend", PARAMS)
def test_opcheck(name, backend):
    pair, cases = OPS[name]
    for direction, args in cases():
        op = (pair.fwd if direction == "fwd" else pair.bwd)[backend]
        torch.library.opcheck(op, args)


def test_every_op_has_a_pair_per_backend():
    """Each op defines its fwd / bwd custom ops for exactly the backends it implements."""
    for name, pairs in (("lowrank_linear", [LOWRANK_LINEAR]), ("ia3", [IA3_LINEAR, IA3_SCALED_ACT]),
                        ("ia3_dynamic", [IA3_DYNAMIC_LINEAR]), ("bottleneck_adapter", [BOTTLENECK_ADAPTER]),
                        ("kron_linear", [KRON_LINEAR]), ("ladder_cross_attention", [LADDER_CROSS_ATTENTION])):
        mod = importlib.import_module(f"spu_kernels.ops.{name}")
        for pair in pairs:
            assert set(pair.fwd) == set(pair.bwd) == set(mod.IMPLEMENTED)
            for be in mod.IMPLEMENTED:
                assert pair.fwd[be] is getattr(torch.ops.spu_kernels, f"{pair.name}_fwd_{be}").default


@pytest.mark.parametrize("name", list(OPS))
def test_compiled_path_matches_eager(name):
    """The custom op with its registered autograd (what torch.compile runs) against the eager
    autograd.Function: the same outputs and the same grads, on the torch backend."""
    pair, cases = OPS[name]
    args = next(cases())[1]

    def run(call):
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                  for a in args]
        out = call(leaves)
        out = out[0] if isinstance(out, (tuple, list)) else out
        torch.manual_seed(0)
        out.backward(torch.randn_like(out))
        return out.detach(), [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]

    y_op, g_op = run(lambda a: pair.fwd["torch"](*a))
    y_fn, g_fn = run(lambda a: pair.function.apply(*a, "torch"))
    torch.testing.assert_close(y_op, y_fn, rtol=0, atol=0)
    assert len(g_op) == len(g_fn) > 0
    for got, want in zip(g_op, g_fn):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [b for b in ("torch", "triton") if b in available_backends()])
def test_zo_axpby_custom_op(backend):
    """The in-place MeZO perturbation as a custom op: opcheck, and the op updates as the function does."""
    from spu_kernels.ops.zo_perturb import ZO_AXPBY, zo_axpby_
    tensors = [torch.randn(5, 3, device=DEVICE), torch.randn(7, device=DEVICE, dtype=torch.bfloat16)]
    torch.library.opcheck(ZO_AXPBY[backend], ([t.clone() for t in tensors], [0, 15], 1234, 0.5, 1e-2))
    via_op, via_fn = [t.clone() for t in tensors], [t.clone() for t in tensors]
    ZO_AXPBY[backend](via_op, [0, 15], 1234, 0.5, 1e-2)
    zo_axpby_(via_fn, 1234, 0.5, 1e-2, backend=backend)
    for got, want in zip(via_op, via_fn):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(via_op[0], tensors[0])


@pytest.mark.parametrize("backend", [b for b in ("torch", "triton") if b in available_backends()])
def test_masked_adamw_custom_op(backend):
    """The in-place masked AdamW step as a custom op: opcheck, and the op updates as the function does."""
    from spu_kernels.ops.masked_adamw import MASKED_ADAMW, masked_adamw_
    ps = [torch.randn(5, 3, device=DEVICE), torch.randn(7, device=DEVICE, dtype=torch.bfloat16)]
    gs = [torch.randn_like(p) for p in ps]
    idx = [torch.tensor([0, 4, 14], device=DEVICE), torch.tensor([6], device=DEVICE)]

    def args():
        return ([p.clone() for p in ps], gs, idx, [torch.rand(i.numel(), device=DEVICE) for i in idx],
                [torch.rand(i.numel(), device=DEVICE) for i in idx], 1e-2, 0.9, 0.99, 1e-8, 0.1, 3)
    torch.manual_seed(0)
    torch.library.opcheck(MASKED_ADAMW[backend], args())
    torch.manual_seed(1)
    via_op = args()
    torch.manual_seed(1)
    via_fn = args()
    MASKED_ADAMW[backend](*via_op)
    masked_adamw_(*via_fn[:5], lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=3, backend=backend)
    for got, want in zip([*via_op[0], *via_op[3], *via_op[4]], [*via_fn[0], *via_fn[3], *via_fn[4]]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(via_op[0][0], ps[0])
