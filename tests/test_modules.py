"""LoRALinear and SiVALinear on their own: init, step-0 equality, merge, restore, Conv1D, slices."""
import re

import pytest
import torch
import torch.nn as nn
from helpers import LOWRANK_BACKENDS, rel_err
from transformers.pytorch_utils import Conv1D

import spu_kernels.modules as modules
from spu_kernels import use_backend
from spu_kernels.modules import (
    AdapterModule,
    IA3Linear,
    IA3ScaledActivation,
    KronALinear,
    LadderBackbone,
    LoRAEmbedding,
    LoRALinear,
    SiVALinear,
    SoftPromptBackbone,
    WrappedLinear,
    ladder_seq2seq,
)
from spu_kernels.modules.lowrank_base import LowRankAdapterLinear
from spu_kernels.modules.siva import top_r_svd


def linear(k=24, n=20, bias=True, dtype=torch.float32):
    torch.manual_seed(1)
    return nn.Linear(k, n, bias=bias).to(dtype)


def conv1d(k=24, n=60):
    torch.manual_seed(2)
    c = Conv1D(n, k)
    nn.init.normal_(c.weight, std=0.2)
    nn.init.normal_(c.bias, std=0.1)
    return c


def low_rank_spectrum(n=40, k=48, seed=3):
    """A matrix with a decaying spectrum, so 'top-r' is well defined."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
    s = 2.0 ** -torch.arange(min(n, k), dtype=torch.float32) * 10
    return (u[:, :len(s)] * s) @ v[:, :len(s)].t()


@pytest.mark.parametrize("backend", LOWRANK_BACKENDS)
def test_lora_init_equals_base_and_trains(backend):
    lin = linear()
    x = torch.randn(3, 5, 24)
    want = lin(x)
    mod = LoRALinear.from_linear(lin, r=4, alpha=8, dropout=0.1).eval()
    assert mod.scaling == 2.0 and not lin.weight.requires_grad
    assert torch.count_nonzero(mod.lora_B) == 0 and torch.count_nonzero(mod.lora_A) > 0
    with use_backend(backend):
        torch.testing.assert_close(mod(x), want)
        mod.train()
        mod(x).square().sum().backward()
    assert mod.lora_B.grad.abs().sum() > 0 and lin.weight.grad is None
    assert torch.count_nonzero(mod.lora_A.grad) == 0      # B = 0 at step 0, so A gets no gradient yet


def test_lora_rslora_and_defaults():
    assert LoRALinear(linear(), r=4).scaling == 2.0                     # alpha defaults to 2r
    assert LoRALinear(linear(), r=4, alpha=8, use_rslora=True).scaling == pytest.approx(4.0)
    assert LoRALinear(linear(), r=4).lora_A.dtype == torch.float32
    assert LoRALinear(linear(dtype=torch.bfloat16), r=4, adapter_dtype=None).lora_A.dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [LoRALinear, SiVALinear])
@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_merge_matches_the_adapted_layer(cls, base):
    layer = linear() if base == "linear" else conv1d()
    x = torch.randn(7, 24)
    mod = cls.from_linear(layer, r=3).eval()
    with torch.no_grad():
        for _, p in mod.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    want = mod(x)
    merged = mod.merge()
    assert merged is layer and type(merged) is (nn.Linear if base == "linear" else Conv1D)
    assert rel_err(merged(x), want) < 1e-5


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_siva_step0_equals_original(svd, base):
    layer = linear(bias=True) if base == "linear" else conv1d()
    x = torch.randn(4, 6, 24)
    want = layer(x)
    w0 = layer.weight.detach().clone()
    mod = SiVALinear.from_linear(layer, r=5, svd=svd)
    assert rel_err(mod(x), want) < 1e-5                     # fp32: W_res + U S Vh is W to rounding
    assert not torch.equal(layer.weight, w0)                # the base layer now holds the residual
    assert mod.siva_U.shape == (mod.out_features, 5) and mod.siva_Vh.shape == (5, 24)
    assert torch.equal(mod.restore().weight, w0)            # bit for bit


def test_siva_step0_bf16_within_rounding():
    layer = linear(dtype=torch.bfloat16)
    x = torch.randn(16, 24, dtype=torch.bfloat16)
    want = layer(x)
    mod = SiVALinear.from_linear(layer, r=6)
    assert rel_err(mod(x), want) < 2e-2


def test_siva_factors_are_the_top_singular_triplets():
    w = low_rank_spectrum()
    u, s, vh = top_r_svd(w, 4, "exact")
    ur, sr, vhr = top_r_svd(w, 4, "randomized", niter=4)
    torch.testing.assert_close(sr, s, rtol=1e-4, atol=1e-5)
    assert torch.all(s[:-1] >= s[1:])
    # the same subspaces (signs of singular vectors are arbitrary)
    torch.testing.assert_close((ur @ ur.t()), (u @ u.t()), atol=1e-4, rtol=0)
    torch.testing.assert_close((vhr.t() @ vhr), (vh.t() @ vh), atol=1e-4, rtol=0)
    # seeded: the same call gives the same factors
    assert torch.equal(top_r_svd(w, 4, "randomized", seed=1)[0], top_r_svd(w, 4, "randomized", seed=1)[0])


def test_siva_train_s_and_keep_original():
    mod = SiVALinear(linear(), r=3, train_s=True)
    assert isinstance(mod.siva_S, nn.Parameter) and {n for n, _ in mod.adapter_parameters()} == {
        "siva_U", "siva_Vh", "siva_S"}
    mod = SiVALinear(linear(), r=3)
    assert not isinstance(mod.siva_S, nn.Parameter) and "siva_S" in dict(mod.named_buffers())
    mod = SiVALinear(linear(), r=3, keep_original=False)
    with pytest.raises(RuntimeError, match="keep_original=False"):
        mod.restore()


@pytest.mark.parametrize("cls", [LoRALinear, SiVALinear])
def test_out_slices_adapt_only_their_rows(cls):
    layer = conv1d(k=24, n=60)               # fused [q; k; v] with d = 20
    x = torch.randn(5, 24)
    want = layer(x)
    mod = cls(layer, r=2, out_slices=[(20, 40), (40, 60)]).eval()
    with torch.no_grad():
        for _, p in mod.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    y = mod(x)
    assert torch.equal(y[:, :20], want[:, :20])      # the q rows: neither adapted nor split
    assert rel_err(y[:, 20:], want[:, 20:]) > 1e-2
    a, b_full, _ = mod.lowrank_factors()
    assert a.shape == (4, 24) and b_full.shape == (60, 4)
    assert torch.count_nonzero(b_full[:20]) == 0
    assert torch.count_nonzero(b_full[20:40, 2:]) == 0 and torch.count_nonzero(b_full[40:, :2]) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "rank r must be a positive int"),
    (dict(r=21), r"rank r=21 exceeds min\(out, in\) = min\(20, 24\)"),
    (dict(r=2, dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(r=2, out_slices=[(5, 3)]), "out_slices must be increasing"),
])
def test_module_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(linear(), **kwargs)
    with pytest.raises(TypeError, match="wraps nn.Linear or transformers Conv1D, got ReLU"):
        SiVALinear(nn.ReLU(), r=2)


# the module classes patch() puts in a model's place: each is an AdapterModule (modules/adapter.py)
# (IA3DynamicLinear and PrefixAttention are tested in full in tests/test_ia3_dynamic.py, tests/test_prefix.py)
REPLACING = (LoRALinear, LoRAEmbedding, SiVALinear, IA3Linear, IA3ScaledActivation, KronALinear, LadderBackbone,
             SoftPromptBackbone, modules.IA3DynamicLinear, modules.PrefixAttention, modules.BottleneckAdapterLinear,
             ladder_seq2seq.LadderEncoder, ladder_seq2seq.LadderDecoder)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_replacing_module_class_implements_the_adapter_contract():
    for cls in REPLACING:
        assert issubclass(cls, AdapterModule), cls
        assert cls.adapter_parameters is not AdapterModule.adapter_parameters, cls     # declared: each must say
        for name in ("restore", "merge"):
            assert callable(getattr(cls, name)), (cls, name)
    # no adapter class in spu_kernels.modules is left out of the list (bases that are never built aside)
    found = {c for c in _subclasses(AdapterModule) if c.__module__.startswith(modules.__name__)}
    assert found - {WrappedLinear, LowRankAdapterLinear} == set(REPLACING)
    assert not any(issubclass(getattr(modules, n), AdapterModule) for n in ("PromptClassifier", "PromptTemplate")
                   if isinstance(getattr(modules, n), type))


@pytest.mark.parametrize("make", [
    lambda: LoRALinear(linear(), r=2),
    lambda: SiVALinear(linear(), r=2),
    lambda: IA3Linear(linear()),
    lambda: IA3Linear(linear(), side="input"),
    lambda: KronALinear(linear()),
    lambda: IA3ScaledActivation(nn.GELU(), 24, next_linear=linear()),
], ids=["lora", "siva", "ia3_out", "ia3_in", "krona", "ia3_act"])
def test_adapter_contract_restore_and_merge(make):
    base_state = linear().state_dict()          # what every wrapped linear held before it was wrapped
    mod = make()
    base = mod.base_layer
    if isinstance(mod, IA3ScaledActivation):
        base_state = {}
    names = [n for n, _ in mod.adapter_parameters()]
    own = dict(mod.named_parameters())
    assert names and all(own[n] is p for n, p in mod.adapter_parameters())      # names relative to the module
    assert not {id(p) for _, p in mod.adapter_parameters()} & {id(p) for p in base.parameters()}
    assert mod.merge_error is None
    back = mod.restore()
    assert back is base and back.state_dict().keys() == base_state.keys()
    assert all(torch.equal(v, base_state[k]) for k, v in back.state_dict().items())
    mod = make()
    assert mod.merge() is mod.base_layer


def test_adapter_contract_unmergeable_modules_say_why():
    for cls in (LadderBackbone, SoftPromptBackbone):
        assert isinstance(cls.merge_error, str) and cls.merge_error
        with pytest.raises(RuntimeError, match=re.escape(cls.merge_error)):
            cls.merge(object.__new__(cls))
    act = IA3ScaledActivation(nn.GELU(), 24)           # no next linear to fold l into
    assert "needs the next linear" in act.merge_error
    with pytest.raises(RuntimeError, match="needs the next linear"):
        act.merge()
