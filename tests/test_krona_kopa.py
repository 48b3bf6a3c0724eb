"""patch(model, "krona", init="kopa"): W = s·(A ⊗ B) + W_res by the nearest Kronecker product
(Van Loan–Pitsianis). The decomposition against an independent float64 computation; on tiny models:
step 0 = the original model, loss falls, unpatch bit-identical, merge, disable_adapter / named
adapters, save/load bit-identical, no PEFT files, bad options."""
import math

import numpy as np
import pytest
import torch
import transformers as tf
from models import make_batch, make_model, model_output

import spu_kernels
from spu_kernels.modules import KronALinear
from spu_kernels.modules.krona import nearest_kronecker
from spu_kernels.patching.peft_format import NoPeftEquivalent, peft_mapping

FAMILIES = ["bert", "gpt2", "llama", "t5"]


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, snap):
    now = model.state_dict()
    return set(now) == set(snap) and all(torch.equal(now[k], snap[k]) for k in snap)


def kron_layers(model):
    return [m for m in model.modules() if isinstance(m, KronALinear)]


def perturb(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "krona_" in n:
                p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().max())


def van_loan_f64(w: np.ndarray, a_shape, b_shape):
    """Independent reference: R(W) built block by block, float64 SVD."""
    (a1, a2), (b1, b2) = a_shape, b_shape
    r = np.empty((a1 * a2, b1 * b2))
    for i in range(a1):
        for k in range(a2):
            r[i * a2 + k] = w[i * b1:(i + 1) * b1, k * b2:(k + 1) * b2].reshape(-1)
    u, s, vh = np.linalg.svd(r)
    best = np.kron(s[0] * u[:, 0].reshape(a1, a2), vh[0].reshape(b1, b2))
    return best, s


def test_exact_kronecker_is_recovered():
    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(3, 4, generator=g), torch.randn(5, 2, generator=g)
    w = torch.kron(a0, b0)
    a, b, sv = nearest_kronecker(w, (3, 4), (5, 2))
    torch.testing.assert_close(torch.kron(a, b), w, rtol=1e-5, atol=1e-5)
    assert sv[1:].abs().max() < 1e-5 * sv[0]
    cos = (a * a0).sum() / (a.norm() * a0.norm())        # A = ±c·A0: up to sign and scale
    assert abs(abs(cos.item()) - 1) < 1e-6
    assert math.isclose(a.norm().item(), b.norm().item(), rel_tol=1e-5)   # balanced: both √σ₁

    # as a layer, with a scale: the residual is (almost) zero, s·A⊗B is W
    lin = torch.nn.Linear(8, 15, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = KronALinear(lin, a_shape=(3, 4), scale=-2.0, init="kopa")
    assert lin.weight.abs().max() < 1e-5 * w.abs().max()
    torch.testing.assert_close(mod.delta_weight(), w, rtol=1e-5, atol=1e-5)
    assert torch.equal(mod.restore().weight, w)


@pytest.mark.parametrize("a_shape,b_shape", [((3, 4), (4, 5)), ((1, 5), (12, 4)), ((12, 1), (1, 20))])
def test_random_weight_meets_the_van_loan_bound(a_shape, b_shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(a_shape[0] * b_shape[0], a_shape[1] * b_shape[1], generator=g)
    a, b, sv = nearest_kronecker(w, a_shape, b_shape)
    best, s64 = van_loan_f64(w.double().numpy(), a_shape, b_shape)
    np.testing.assert_allclose(sv.double().numpy(), s64[:len(sv)], rtol=1e-5, atol=1e-6)
    approx = torch.kron(a.double(), b.double()).numpy()
    np.testing.assert_allclose(approx, best, rtol=1e-4, atol=1e-5)    # the same product (sign-free)
    err, bound = np.linalg.norm(w.double().numpy() - approx), math.sqrt((s64[1:] ** 2).sum())
    assert math.isclose(err, bound, rel_tol=1e-5), (err, bound)
    u_first = a.reshape(-1)
    assert u_first[u_first.abs().argmax()] > 0                          # the sign convention
    again = nearest_kronecker(w.clone(), a_shape, b_shape)
    assert torch.equal(again[0], a) and torch.equal(again[1], b)       # deterministic, bit for bit


@pytest.mark.parametrize("family", FAMILIES)
def test_step0_training_unpatch_merge(family):
    model, batch = make_model(family), make_batch(family)
    with torch.no_grad():
        out0 = model_output(model, batch)
    snap = state(model)
    spu_kernels.patch(model, "krona", init="kopa", scale=2.0, train_head=False)
    layers = kron_layers(model)
    assert layers and all(m.init == "kopa" for m in layers)
    for m in layers:
        assert m.krona_A.abs().min() > 0 and m.krona_B.abs().max() > 0     # no factor starts at zero
        w = m._original_weight.float()
        w = w.t() if family == "gpt2" else w                                # Conv1D stores (K, N)
        # W_res + s·A⊗B = W to fp32 rounding (of W_res, stored in the weight's dtype)
        torch.testing.assert_close(m.weight.float().t() if family == "gpt2" else m.weight.float(),
                                   w - m.delta_weight(), rtol=0, atol=0)
        if family == "gpt2":                                               # the k third is not adapted
            d = m.in_features
            assert torch.equal(m.weight[:, d:2 * d], m._original_weight[:, d:2 * d])
    # step 0: W_res + s·A⊗B in fp32 instead of W: a few ulps per weight, ~1e-7 relative on the logits
    assert rel_diff(model_output(model, batch), out0) < 1e-5

    # training (only A and B: train_head=False): the loss to a fixed target falls (eval(): no dropout noise)
    target = out0 + 0.1 * out0.abs().max() * torch.randn(out0.shape, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = (model_output(model, batch) - target).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.98 * losses[0], losses
    assert all(m.base_layer.weight.grad is None for m in layers)
    assert all(n.split(".")[-1] in ("krona_A", "krona_B") for n, p in model.named_parameters() if p.requires_grad)
    out_t = model_output(model, batch)

    spu_kernels.merge(model)                                               # W_res + s·A⊗B into the weight
    assert not kron_layers(model)
    assert rel_diff(model_output(model, batch), out_t) < 1e-5

    model = make_model(family)
    spu_kernels.patch(model, "krona", init="kopa", scale=2.0)
    perturb(model)
    spu_kernels.unpatch(model)                                             # bit for bit
    assert same_state(model, snap)
    with torch.no_grad():                                                  # as out0 (T5 differs in bits with grad)
        assert torch.equal(model_output(model, batch), out0)


def test_save_pretrained_round_trip_is_bit_identical_and_writes_no_peft_files(tmp_path):
    make_model("bert").save_pretrained(tmp_path / "base")
    model = tf.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    spu_kernels.patch(model, "krona", init="kopa")
    perturb(model)
    batch = make_batch("bert")
    want = model_output(model, batch)
    with pytest.raises(NoPeftEquivalent, match=r"init='kopa'.*no single Kronecker product"):
        peft_mapping(model)
    model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_config.json").exists()
    got = spu_kernels.from_pretrained(tmp_path / "a")
    assert all(m.init == "kopa" for m in kron_layers(got))
    assert same_state(got, state(model))                                   # W_res recomputed bit for bit
    assert torch.equal(model_output(got, batch), want)


def test_save_and_load_adapter_gpt2_slices(tmp_path):
    model, batch = make_model("gpt2"), make_batch("gpt2")
    spu_kernels.patch(model, "krona", init="kopa")
    perturb(model)
    want = model_output(model, batch)
    path = spu_kernels.save_adapter(model, tmp_path / "k.safetensors")
    fresh = make_model("gpt2")
    spu_kernels.load_adapter(fresh, path)
    assert torch.equal(model_output(fresh, batch), want)


def test_disable_adapter_named_adapters_merge_adapter():
    model, batch = make_model("bert"), make_batch("bert")
    out0, snap = model_output(model, batch), state(model)
    spu_kernels.patch(model, "krona", init="kopa", train_head=False)
    perturb(model)
    out_a = model_output(model, batch)
    with spu_kernels.disable_adapter(model):
        assert torch.equal(model_output(model, batch), out0)               # the original W, bit for bit
    assert torch.equal(model_output(model, batch), out_a)

    weights = state(model)
    spu_kernels.merge_adapter(model)
    assert rel_diff(model_output(model, batch), out_a) < 1e-5
    spu_kernels.unmerge_adapter(model)
    assert same_state(model, weights) and torch.equal(model_output(model, batch), out_a)

    # a second adapter on the same layers: switching puts W back under it and W_res under "default"
    spu_kernels.add_adapter(model, "z", "krona", train_head=False)
    spu_kernels.set_adapter(model, "z")
    assert torch.equal(model_output(model, batch), out0)                   # "z" starts at B = 0 on W
    spu_kernels.set_adapter(model, "default")
    assert torch.equal(model_output(model, batch), out_a)
    # a second kopa adapter splits the original W (not "default"'s W_res)
    spu_kernels.add_adapter(model, "k2", "krona", init="kopa", a_shape=(2, 8), train_head=False)
    spu_kernels.set_adapter(model, "k2")
    assert rel_diff(model_output(model, batch), out0) < 1e-5
    spu_kernels.set_adapter(model, "default")
    assert torch.equal(model_output(model, batch), out_a)
    spu_kernels.unpatch(model)
    assert same_state(model, snap)


def test_keep_original_false():
    model, batch = make_model("bert"), make_batch("bert")
    spu_kernels.patch(model, "krona", init="kopa", keep_original=False)
    assert all(m._original_weight is None for m in kron_layers(model))
    with pytest.raises(ValueError, match="keep_original"):
        with spu_kernels.disable_adapter(model):
            pass
    perturb(model)
    out = model_output(model, batch)
    spu_kernels.merge(model)
    assert rel_diff(model_output(model, batch), out) < 1e-5


def test_bad_options_leave_the_model_untouched():
    model = make_model("bert")
    snap, types = state(model), {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="init must be one of zeros, kopa, got 'KoPA'"):
        spu_kernels.patch(model, "krona", init="KoPA")
    with pytest.raises(ValueError, match="needs scale != 0"):
        spu_kernels.patch(model, "krona", init="kopa", scale=0.0)
    with pytest.raises(ValueError, match="keep_original=False applies to init='kopa' only"):
        spu_kernels.patch(model, "krona", keep_original=False)
    with pytest.raises(TypeError, match="keep_original must be a bool"):
        spu_kernels.patch(model, "krona", init="kopa", keep_original="no")
    # the query layers split (W_res written) before intermediate.dense (N = 37) fails: all rolled back
    with pytest.raises(ValueError, match=r"krona: .*intermediate\.dense: .*a1=4 does not divide N=37"):
        spu_kernels.patch(model, "krona", init="kopa", a_shape=(4, 4), target_modules=["query", "intermediate.dense"])
    # a zero weight has zero factors, which would never train
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.value.weight.zero_()
    zeroed = state(model)
    with pytest.raises(ValueError, match=r"value: .*are zero.*use init='zeros'"):
        spu_kernels.patch(model, "krona", init="kopa")
    assert not spu_kernels.is_patched(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert same_state(model, zeroed)
    assert all(torch.equal(v, snap[k]) for k, v in zeroed.items() if "layer.1.attention.self.value.weight" not in k)


def test_describe_method_and_bf16_weights():
    assert "init" in spu_kernels.describe_method("krona")
    # bf16 base weights: W_res is stored in bf16, so step 0 equals the original to bf16 rounding of W_res
    model, batch = make_model("llama", torch.bfloat16), make_batch("llama")
    out0 = model_output(model, batch).float()
    spu_kernels.patch(model, "krona", init="kopa")
    m = kron_layers(model)[0]
    assert m.weight.dtype == torch.bfloat16 and m.krona_A.dtype == torch.float32
    assert rel_diff(model_output(model, batch).float(), out0) < 3e-2
    spu_kernels.unpatch(model)
    assert torch.equal(model_output(model, batch).float(), out0)
