"""The masked AdamW op (every backend) and MaskedAdamW against torch.optim.AdamW run on the
gathered entries: state and selected entries to fp32 rounding (bf16 parameters: to one rounding
of the same fp32 value), entries outside the mask bit for bit unchanged, one launch per dtype,
state_dict round trip, errors."""
import pytest
import torch
from helpers import DEVICE

import spu_kernels.triton  # noqa: F401
from spu_kernels.backends import available_backends
from spu_kernels.ops.masked_adamw import IMPLEMENTED, masked_adamw_
from spu_kernels.optim import MaskedAdamW

BACKENDS = [b for b in available_backends() if b in IMPLEMENTED]
HP = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def _problem(dtype, seed=0):
    """Awkward sizes: a mask of 1, an empty mask, a mask of everything, a tensor larger than a program's chunk."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 5), (1,), (300,), (4, 3), (1500,)]
    keep = [17, 1, 290, 0, 1200]
    ps = [torch.randn(s, generator=g).to(dtype).to(DEVICE) for s in shapes]
    idxs = [torch.randperm(p.numel(), generator=g)[:k].to(DEVICE) for p, k in zip(ps, keep)]
    idxs[2] = torch.arange(300, device=DEVICE)
    return ps, idxs


def _ulp(x, dtype):
    return x.abs().float() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -23) + 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_adamw_on_the_gathered_entries(backend, dtype):
    ps, idxs = _problem(dtype)
    before = [p.clone() for p in ps]
    opt = MaskedAdamW(list(zip(ps, idxs)), backend=backend, **HP)
    ref = [p.reshape(-1)[i].float().clone().requires_grad_(True) for p, i in zip(ps, idxs)]
    ref_opt = torch.optim.AdamW(ref, foreach=False, **HP)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, r, i in zip(ps, ref, idxs):
            p.grad = (torch.randn(p.shape, generator=g) * 3).to(dtype).to(DEVICE)
            r.grad = p.grad.reshape(-1)[i].float()
        opt.step()
        ref_opt.step()
        for p, r, i in zip(ps, ref, idxs):
            got, want = p.reshape(-1)[i].float(), r.detach()
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
            else:   # one rounding of the fp32 value (the interpreter truncates: one ulp either way)
                assert ((got - want).abs() <= _ulp(want, dtype)).all()
            st, rst = opt.state[p], ref_opt.state[r]
            torch.testing.assert_close(st["exp_avg"], rst["exp_avg"], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(st["exp_avg_sq"], rst["exp_avg_sq"], rtol=1e-6, atol=1e-6)
            with torch.no_grad():
                r.copy_(got)   # the reference goes on from the parameter's rounded value, as the kernel does
    for p, b, i in zip(ps, before, idxs):   # outside the mask: bit for bit, despite grads and weight decay
        outside = torch.ones(p.numel(), dtype=torch.bool, device=DEVICE)
        outside[i] = False
        assert torch.equal(p.reshape(-1)[outside], b.reshape(-1)[outside])
        assert (p.reshape(-1)[i] != b.reshape(-1)[i]).any() or i.numel() == 0
    assert opt.state_numel() == 2 * sum(i.numel() for i in idxs)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend")
def test_triton_is_one_launch_per_dtype(monkeypatch):
    from spu_kernels.triton import masked_adamw as tk
    launches = []
    real = tk._masked_adamw_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]
    monkeypatch.setattr(tk, "_masked_adamw_kernel", Counting())
    ps32, i32 = _problem(torch.float32)
    ps16, i16 = _problem(torch.bfloat16, seed=3)
    ps, idxs = ps32 + ps16, i32 + i16
    grads = [torch.randn_like(p) for p in ps]
    ms = [torch.zeros(i.numel(), device=DEVICE) for i in idxs]
    vs = [torch.zeros(i.numel(), device=DEVICE) for i in idxs]
    masked_adamw_(ps, grads, idxs, ms, vs, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1,
                  backend="triton")
    assert len(launches) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_and_skips_params_without_grad(backend):
    ps, idxs = _problem(torch.float32)
    opt = MaskedAdamW(list(zip(ps, idxs)), backend=backend, **HP)
    for p in ps[:3]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[ps[0]]["step"] == 1 and opt.state[ps[4]]["step"] == 0   # no grad: skipped, as AdamW does
    sd = opt.state_dict()
    copies = [p.clone() for p in ps]
    twin = MaskedAdamW(list(zip(copies, idxs)), backend=backend, **HP)
    twin.load_state_dict(sd)
    assert twin.state[copies[0]]["index"].dtype == torch.int64
    assert twin.state[copies[0]]["exp_avg"].dtype == torch.float32
    for a, b in ((ps, opt), (copies, twin)):
        for p in a[:3]:
            p.grad = torch.full_like(p, -0.5)
        b.step()
    for p, c in zip(ps, copies):
        assert torch.equal(p, c)
    other = MaskedAdamW([(p, i.flip(0)[:1]) for p, i in zip([c.clone() for c in copies], idxs)], **HP)
    with pytest.raises(ValueError, match="mask differs"):
        other.load_state_dict(sd)


def test_errors():
    p = torch.zeros(10)
    with pytest.raises(TypeError, match=r"\(parameter, indices\) pairs"):
        MaskedAdamW([p])
    with pytest.raises(ValueError, match="outside"):
        MaskedAdamW([(p, torch.tensor([10]))])
    with pytest.raises(ValueError, match="repeated"):
        MaskedAdamW([(p, torch.tensor([1, 1]))])
    with pytest.raises(TypeError, match="int64"):
        MaskedAdamW([(p, torch.tensor([1], dtype=torch.int32))])
    with pytest.raises(ValueError, match="appears twice"):
        MaskedAdamW([(p, torch.tensor([1])), (p, torch.tensor([2]))])
    with pytest.raises(ValueError, match="betas"):
        MaskedAdamW([(p, torch.tensor([1]))], betas=(1.0, 0.9))
    idx, m, v = torch.tensor([1, 2]), torch.zeros(2), torch.zeros(2)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="pair up"):
        masked_adamw_([p], [p], [idx], [m], [], **kw)
    with pytest.raises(ValueError, match="exp_avgs\\[0\\] must be float32 of shape \\(2,\\)"):
        masked_adamw_([p], [p], [idx], [torch.zeros(3)], [v], **kw)
    with pytest.raises(ValueError, match="pass each parameter's own .grad"):
        masked_adamw_([p], [p.double()], [idx], [m], [v], **kw)
    with pytest.raises(ValueError, match="not contiguous"):
        q = torch.zeros(4, 5).t()
        masked_adamw_([q], [q], [idx], [m], [v], **kw)
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        masked_adamw_([p], [p], [idx], [m], [v], **{**kw, "step": 0})
