"""The seeded perturbation op (every backend vs the z spec) and the MeZO optimiser: restore to
rounding, the projected gradient equal to autograd's directional derivative, convergence on a
convex problem, repeatability, errors."""
import re

import pytest
import torch
from helpers import DEVICE

from spu_kernels.backends import available_backends, triton_interpret
from spu_kernels.ops.zo_perturb import IMPLEMENTED, base_offsets, zo_axpby_, zo_normal
from spu_kernels.optim import MeZO

BACKENDS = [b for b in available_backends() if b in IMPLEMENTED]
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _tensors():
    shapes = [((2500,), torch.float32), ((5, 7), torch.bfloat16), ((0,), torch.float32), ((33, 40), torch.float16),
              ((1,), torch.float32)]
    return [torch.zeros(s, dtype=dt, device=DEVICE) for s, dt in shapes]


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_is_the_spec(backend):
    ts = _tensors()
    zo_axpby_(ts, 1234567, 0.0, 1.0, backend=backend)
    for t, base in zip(ts, base_offsets(ts)):
        want = zo_normal(1234567, base, t.numel(), DEVICE).view(t.shape)
        # one rounding to the dtype (+ log/cos ulps; the interpreter truncates to bf16)
        tol = 2 * ULP[t.dtype] * want.abs() + 1e-6
        assert ((t.float() - want).abs() <= tol).all(), (t.dtype, (t.float() - want).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_of_a_tensor_depends_only_on_its_base_offset(backend):
    a, b = torch.zeros(300, device=DEVICE), torch.zeros(70, device=DEVICE)
    zo_axpby_([a, b], 9, 0.0, 1.0, backend=backend)
    b2 = torch.zeros(70, device=DEVICE)
    zo_axpby_([b2], 9, 0.0, 1.0, bases=[300], backend=backend)
    assert torch.equal(b, b2)
    zo_axpby_([b2], 10, 0.0, 1.0, bases=[300], backend=backend)
    assert not torch.equal(b, b2)


def test_z_statistics():
    z = zo_normal(77, 0, 400_000)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01 and torch.isfinite(z).all()
    assert abs((z[:-1] * z[1:]).mean()) < 0.01          # neighbours uncorrelated


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_minus_plus_restores(backend):
    theta = torch.randn(3000, device=DEVICE)
    orig = theta.clone()
    eps = 1e-3
    zo_axpby_([theta], 5, 1.0, eps, backend=backend)
    assert not torch.equal(theta, orig)
    zo_axpby_([theta], 5, 1.0, -2 * eps, backend=backend)
    zo_axpby_([theta], 5, 1.0, eps, backend=backend)
    assert ((theta - orig).abs() <= 4 * ULP[torch.float32] * orig.abs() + 1e-8).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_projected_gradient_is_the_directional_derivative(backend):
    """g = (L(θ+εz) − L(θ−εz)) / 2ε equals ∇L·z (autograd, with z from the spec) to O(ε²)."""
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(6, 5, device=DEVICE))
    w2 = torch.nn.Parameter(torch.randn(5, device=DEVICE))
    frozen = torch.nn.Parameter(torch.randn(3, device=DEVICE), requires_grad=False)
    x = torch.randn(8, 6, device=DEVICE)

    def loss():
        return ((x @ w1).tanh() @ w2).square().mean() + frozen.sum()

    before = [w1.detach().clone(), w2.detach().clone(), frozen.detach().clone()]
    opt = MeZO([w1, frozen, w2], lr=0.0, eps=1e-3, backend=backend)
    opt.step(loss)
    seed, g = opt.last_step["seed"], opt.last_step["projected_grad"]
    # bases follow the optimiser's parameter order (w1, frozen, w2), frozen ones included
    z1 = zo_normal(seed, 0, w1.numel(), DEVICE).view_as(w1)
    z2 = zo_normal(seed, w1.numel() + frozen.numel(), w2.numel(), DEVICE)
    g1, g2 = torch.autograd.grad(loss(), [w1, w2])
    exact = (g1 * z1).sum() + (g2 * z2).sum()
    assert abs(g - exact.item()) < 2e-3 * max(1.0, abs(exact.item())), (g, exact.item())
    # lr = 0: the step restores θ (to rounding) and never touches frozen parameters
    assert torch.equal(frozen, before[2])
    for p, b in zip((w1, w2), before):
        assert ((p - b).abs() <= 4 * ULP[torch.float32] * b.abs() + 1e-7).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mezo_converges_on_a_quadratic(backend):
    if backend == "triton" and triton_interpret():
        pytest.skip("1200 launches: too slow for the Triton interpreter (the kernel is checked against the spec above)")
    torch.manual_seed(0)
    target = torch.randn(50, device=DEVICE)
    w = torch.nn.Parameter(torch.zeros(50, device=DEVICE))
    opt = MeZO([w], lr=0.005, eps=1e-3, weight_decay=0.0, backend=backend)
    start = ((w - target) ** 2).sum().item()
    for _ in range(400):
        opt.step(lambda: ((w - target) ** 2).sum())
    assert ((w - target) ** 2).sum().item() < 0.02 * start


def test_mezo_weight_decay_and_repeatability():
    def run(seed):
        torch.manual_seed(seed)
        w = torch.nn.Parameter(torch.ones(20))
        opt = MeZO([w], lr=0.1, eps=1e-3, weight_decay=0.5)
        for _ in range(5):
            opt.step(lambda: torch.tensor(0.0))           # flat loss: only the decay acts
        return w.detach()
    a, b = run(1), run(1)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, torch.full((20,), (1 - 0.1 * 0.5) ** 5), rtol=1e-5, atol=1e-6)


def test_errors():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="needs a closure"):
        MeZO([w]).step()
    with pytest.raises(ValueError, match="eps must be > 0"):
        MeZO([w], eps=0.0)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        MeZO([torch.nn.Parameter(torch.zeros(2), requires_grad=False)]).step(lambda: 0.0)
    with pytest.raises(ValueError, match="not contiguous"):
        zo_axpby_([torch.zeros(4, 4).t()], 1, 1.0, 1.0)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        zo_axpby_([torch.zeros(4, dtype=torch.int32)], 1, 1.0, 1.0)
    with pytest.raises(ValueError, match="seed must be an int"):
        zo_axpby_([torch.zeros(4)], -1, 1.0, 1.0)


@pytest.mark.gpu
def test_mezo_step_memory_is_inference_memory():
    """Two no-grad forwards and three in-place sweeps: peak ≤ 1.1× one forward's peak."""
    import transformers as tf

    import spu_kernels
    model = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=256, num_hidden_layers=4,
                                                           num_attention_heads=4, intermediate_size=1024)).cuda()
    spu_kernels.patch(model, "lora", r=8)
    batch = dict(input_ids=torch.randint(0, 1000, (32, 128), device="cuda"), labels=torch.zeros(32, dtype=torch.long,
                                                                                                device="cuda"))
    opt = MeZO([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    with torch.no_grad():
        infer = peak(lambda: model(**batch).loss)
    step = peak(lambda: opt.step(lambda: model(**batch).loss))
    assert step <= 1.1 * infer, (step, infer)


class _Boom(Exception):
    pass


def _params(dtype):
    g = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(5, 7, generator=g).to(DEVICE, dtype)),
            torch.nn.Parameter(torch.randn(11, generator=g).to(DEVICE, dtype))]


def _assert_restored(ps, before, dtype):
    for p, b in zip(ps, before):
        if dtype == torch.float32:   # fp32 steps back by −εz: to rounding
            assert ((p - b).abs() <= 4 * ULP[dtype] * b.abs() + 1e-7).all()
        else:                        # half precision: from the saved copy, bit for bit
            assert torch.equal(p, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("failing_call", [1, 2])
def test_mezo_closure_error_restores_parameters(backend, dtype, failing_call):
    ps = _params(dtype)
    before = [p.detach().clone() for p in ps]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == failing_call:
            raise _Boom("data loader died")
        return sum(p.float().square().sum() for p in ps)

    opt = MeZO(ps, lr=0.1, eps=1e-2, backend=backend)
    with pytest.raises(_Boom, match="data loader died"):
        opt.step(closure)
    _assert_restored(ps, before, dtype)
    assert opt.last_step is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bad_call, value", [(1, float("nan")), (2, float("inf")), (2, float("-inf"))])
def test_mezo_non_finite_loss_restores_and_names_the_loss(backend, dtype, bad_call, value):
    ps = _params(dtype)
    before = [p.detach().clone() for p in ps]
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(value if len(calls) == bad_call else 1.0)

    which = "L₊" if bad_call == 1 else "L₋"
    with pytest.raises(FloatingPointError, match=rf"{which}.* is {value}.*smaller eps"):
        MeZO(ps, lr=0.1, eps=1e-2, backend=backend).step(closure)
    _assert_restored(ps, before, dtype)


@pytest.mark.parametrize("dtype, eps", [(torch.float16, 1e4), (torch.float32, 1e38), (torch.float32, 1e308)])
def test_mezo_eps_that_would_overflow_is_refused_before_moving(dtype, eps):
    ps = _params(dtype)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=rf"eps={re.escape(f'{eps:g}')} .*overflow {dtype}.*smaller eps"):
        MeZO(ps, lr=0.1, eps=eps).step(lambda: ps[0].float().sum())
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mezo_lr0_half_precision_restores_exactly(backend, dtype):
    ps = _params(dtype)
    before = [p.detach().clone() for p in ps]
    opt = MeZO(ps, lr=0.0, eps=1e-2, weight_decay=0.1, backend=backend)
    for _ in range(20):
        opt.step(lambda: sum(p.float().square().sum() for p in ps))
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


def test_mezo_half_precision_update_is_one_rounding_from_the_saved_theta():
    ps = _params(torch.bfloat16)
    before = [p.detach().clone() for p in ps]
    opt = MeZO(ps, lr=0.05, eps=1e-2, weight_decay=0.2)
    opt.step(lambda: sum(p.float().square().sum() for p in ps))
    seed, g = opt.last_step["seed"], opt.last_step["projected_grad"]
    for p, b, base in zip(ps, before, base_offsets(ps)):
        z = zo_normal(seed, base, p.numel(), DEVICE).view(p.shape)
        assert torch.equal(p, (b.float() * (1 - 0.05 * 0.2) + z * (-0.05 * g)).to(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mezo_non_contiguous_parameter_moves_like_a_contiguous_one(backend):
    g = torch.Generator().manual_seed(4)
    w_t = torch.nn.Parameter(torch.randn(7, 5, generator=g).to(DEVICE).t())    # (5, 7), not contiguous
    w_c = torch.nn.Parameter(w_t.detach().contiguous())
    assert not w_t.is_contiguous()
    target = torch.randn(5, 7, generator=g).to(DEVICE)
    for w in (w_t, w_c):
        torch.manual_seed(0)
        opt = MeZO([w], lr=0.05, eps=1e-3, backend=backend)
        for _ in range(3):
            opt.step(lambda: ((w.contiguous() - target) ** 2).sum())    # one summation order for both
    assert not w_t.is_contiguous() and torch.equal(w_t, w_c)
