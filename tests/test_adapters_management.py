"""Named adapters (add / set / delete / list), disable_adapter, merge_adapter / unmerge_adapter and
SiVA's PiSSA factors, on tiny models: switching and disabling are bit-exact, merging exact to fp32
rounding, bad use raises before anything changes."""
import pytest
import torch
from models import assert_restored, make_batch, make_model, model_output, snapshot

import spu_kernels
from spu_kernels.modules import AdapterModule, LoRALinear, SiVALinear
from spu_kernels.patching.core import patch_state


def perturb(model, scale=0.3, seed=0):
    """Move every adapter parameter of the active adapter off its init (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for rep in patch_state(model).replacements:
            for _, p in rep.new.adapter_parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def bert():
    model, batch = make_model("bert"), make_batch("bert")
    return model, batch, model_output(model, batch), snapshot(model)


def adapter_params(model):
    return {n for n, _ in model.named_parameters() if any(k in n for k in ("lora_", "siva_", "ia3_", "krona_"))}


def test_named_adapters_switch_exactly_and_unpatch_restores(bert):
    model, batch, out0, snap = bert
    spu_kernels.patch(model, "lora", r=4)
    perturb(model, seed=1)
    out_a = model_output(model, batch)
    assert spu_kernels.active_adapter(model) == "default" and spu_kernels.list_adapters(model) == ["default"]
    # "b" wraps the same layers (SiVA: the base weight becomes W_res while it is active); "c" other ones
    spu_kernels.add_adapter(model, "b", "siva", r=4, train_head=False)
    spu_kernels.add_adapter(model, "c", "ia3")
    assert spu_kernels.list_adapters(model) == ["default", "b", "c"] and spu_kernels.active_adapter(model) == "default"
    assert torch.equal(model_output(model, batch), out_a)          # adding leaves the active one alone
    assert spu_kernels.summary(model).method == "lora"

    spu_kernels.set_adapter(model, "b")
    assert spu_kernels.active_adapter(model) == "b" and spu_kernels.summary(model).method == "siva"
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, SiVALinear)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n in adapter_params(model) if "siva_U" in n or "siva_Vh" in n}   # train_head=False
    torch.testing.assert_close(model_output(model, batch), out0, rtol=1e-4, atol=1e-5)      # SiVA step 0
    perturb(model, seed=2)
    out_b = model_output(model, batch)

    spu_kernels.set_adapter(model, "c")
    out_c = model_output(model, batch)
    assert model.classifier.weight.requires_grad                    # c trains the head, b did not
    for name, want in [("default", out_a), ("b", out_b), ("c", out_c), ("b", out_b), ("default", out_a)]:
        spu_kernels.set_adapter(model, name)
        assert torch.equal(model_output(model, batch), want), name
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LoRALinear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == (
        {n for n in adapter_params(model)} | {"classifier.weight", "classifier.bias"})

    spu_kernels.set_adapter(model, "b")
    spu_kernels.unpatch(model)                                      # from a non-default adapter: all go
    assert_restored(model, snap)
    assert torch.equal(model_output(model, batch), out0)
    assert "_spu_adapters" not in model.__dict__
    with pytest.raises(RuntimeError, match="not patched"):
        spu_kernels.list_adapters(model)


def test_adapter_errors_leave_the_model_as_it_was(bert):
    model, batch, out0, snap = bert
    spu_kernels.patch(model, "lora", r=4)
    perturb(model)
    out_a = model_output(model, batch)
    spu_kernels.add_adapter(model, "other", "krona")
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter named 'other'"):
        spu_kernels.add_adapter(model, "other", "lora")
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; the model has \['default', 'other'\]"):
        spu_kernels.set_adapter(model, "nope")
    with pytest.raises(ValueError, match="'default' is the active adapter and cannot be deleted.*set_adapter"):
        spu_kernels.delete_adapter(model, "default")
    with pytest.raises(TypeError, match="non-empty str"):
        spu_kernels.add_adapter(model, "", "lora")
    for method, match in [("bitfit", "trains the model's own weights"), ("prompt", "cannot be switched"),
                          ("lst", "cannot be switched")]:
        with pytest.raises(ValueError, match=match):
            spu_kernels.add_adapter(model, "x", method)
    with pytest.raises(ValueError, match="keep_original=True"):
        spu_kernels.add_adapter(model, "x", "siva", r=4, keep_original=False)
    with pytest.raises(ValueError, match="r=999"):
        spu_kernels.add_adapter(model, "x", "lora", r=999)
    assert_restored(model, before)
    assert torch.equal(model_output(model, batch), out_a)
    assert spu_kernels.list_adapters(model) == ["default", "other"]
    spu_kernels.delete_adapter(model, "other")
    assert spu_kernels.list_adapters(model) == ["default"]
    spu_kernels.unpatch(model)
    assert_restored(model, snap)

    # a model patched with a method that cannot switch refuses a second adapter
    spu_kernels.patch(model, "siva", r=4, keep_original=False)
    with pytest.raises(ValueError, match="keep_original=True"):
        spu_kernels.add_adapter(model, "b", "lora")
    spu_kernels.merge(model)
    # add_adapter on an unpatched model is patch under that name
    model = make_model("bert")
    spu_kernels.add_adapter(model, "first", "lora", r=2)
    assert spu_kernels.list_adapters(model) == ["first"] and spu_kernels.summary(model).options["r"] == 2


@pytest.mark.parametrize("method,options", [("lora", {"r": 4}), ("siva", {"r": 4}),
                                            ("siva", {"r": 4, "factors": "pissa"}), ("ia3", {}), ("krona", {})])
def test_disable_adapter_computes_the_original_model(bert, method, options):
    model, batch, out0, snap = bert
    spu_kernels.patch(model, method, train_head=False, **options)
    perturb(model)
    out_a = model_output(model, batch)
    assert not torch.equal(out_a, out0)
    with spu_kernels.disable_adapter(model):
        assert torch.equal(model_output(model, batch), out0)     # bit for bit, SiVA with its original W
    assert torch.equal(model_output(model, batch), out_a)
    with pytest.raises(KeyError):
        with spu_kernels.disable_adapter(model):
            raise KeyError("boom")
    assert torch.equal(model_output(model, batch), out_a)       # restored on the exception too
    with spu_kernels.disable_adapter(model):
        with pytest.raises(RuntimeError, match="inside spu_kernels.disable_adapter"):
            spu_kernels.merge_adapter(model)
    spu_kernels.unpatch(model)
    assert_restored(model, snap)


def test_disable_adapter_errors():
    model = make_model("bert")
    spu_kernels.patch(model, "siva", r=4, keep_original=False)
    with pytest.raises(ValueError, match="keep_original"):
        with spu_kernels.disable_adapter(model):
            pass
    spu_kernels.merge(model)
    spu_kernels.patch(model, "bitfit")
    with pytest.raises(ValueError, match="trains the model's own weights"):
        with spu_kernels.disable_adapter(model):
            pass


@pytest.mark.parametrize("method", ["lora", "siva", "ia3", "krona"])
def test_merge_adapter_unmerge_exact(bert, method, tmp_path):
    model, batch, out0, snap = bert
    spu_kernels.patch(model, method, **({"r": 4} if method in ("lora", "siva") else {}))
    perturb(model, scale=1.0)
    out_a = model_output(model, batch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    spu_kernels.merge_adapter(model)
    assert all(rep.new.merged for rep in patch_state(model).replacements)
    # fp32 rounding of W + ΔW: far below the adapter's own effect, on the last hidden states
    hidden = lambda: model(**batch, output_hidden_states=True).hidden_states[-1]
    out_m = hidden()
    spu_kernels.unmerge_adapter(model)
    h_a = hidden()
    with spu_kernels.disable_adapter(model):
        h_0 = hidden()
    spu_kernels.merge_adapter(model)
    err, effect = (out_m - h_a).abs().max().item(), (h_a - h_0).abs().max().item()
    assert err < 1e-4 * effect and effect > 1e-2, (err, effect)
    # while merged: no training, saving or switching
    model.train()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        model_output(model, batch)
    model.eval()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        with spu_kernels.disable_adapter(model):
            pass
    spu_kernels.unmerge_adapter(model)
    now = model.state_dict()
    assert all(torch.equal(now[k], weights[k]) for k in weights)   # bit for bit
    assert torch.equal(model_output(model, batch), out_a)
    # merge() and unpatch() after merge_adapter: as without it
    spu_kernels.merge_adapter(model)
    spu_kernels.unpatch(model)
    assert_restored(model, snap)


def test_merge_after_merge_adapter_merges_once(bert):
    model, batch, _, _ = bert
    spu_kernels.patch(model, "lora", r=4)
    perturb(model)
    twin = make_model("bert")
    spu_kernels.patch(twin, "lora", r=4)
    twin.load_state_dict(model.state_dict())
    spu_kernels.merge_adapter(model)
    spu_kernels.merge(model)
    spu_kernels.merge(twin)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_siva_pissa_factors_match_peft_pissa():
    """factors="pissa" is PEFT's PiSSA (lora_alpha = r, exact SVD): same factors, residual, outputs,
    and after one SGD step at the same learning rate, the same outputs."""
    peft = pytest.importorskip("peft")
    batch = make_batch("bert")
    ours = spu_kernels.patch(make_model("bert"), "siva", r=4, svd="exact", factors="pissa", train_head=False)
    theirs = peft.get_peft_model(make_model("bert"), peft.LoraConfig(
        r=4, lora_alpha=4, init_lora_weights="pissa", target_modules=["query", "value"]))
    for i in range(2):
        att = ours.bert.encoder.layer[i].attention.self.query
        ref = theirs.base_model.model.bert.encoder.layer[i].attention.self.query
        assert not att.siva_S.requires_grad and torch.equal(att.siva_S, torch.ones(4))
        torch.testing.assert_close(att.siva_U, ref.lora_B["default"].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(att.siva_Vh, ref.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(att.base_layer.weight, ref.base_layer.weight, rtol=1e-4, atol=1e-5)
    for m in (ours, theirs):
        m.requires_grad_(False)
        for n, p in m.named_parameters():
            p.requires_grad_("siva_U" in n or "siva_Vh" in n or "lora_" in n)
    outs = []
    for m in (ours, theirs):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        m(**batch).logits.pow(2).sum().backward()
        opt.step()
        with torch.no_grad():
            outs.append(m(**batch).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_siva_pissa_step0_merge_unpatch(bert):
    model, batch, out0, snap = bert
    spu_kernels.patch(model, "siva", r=4, factors="pissa")
    torch.testing.assert_close(model_output(model, batch), out0, rtol=1e-4, atol=1e-5)
    layer = model.bert.encoder.layer[0].attention.self.value
    assert isinstance(layer, SiVALinear) and layer.factors == "pissa"
    spu_kernels.unpatch(model)
    assert_restored(model, snap)
    spu_kernels.patch(model, "siva", r=4, factors="pissa")
    spu_kernels.merge(model)
    torch.testing.assert_close(model_output(model, batch), out0, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no S to train"):
        spu_kernels.patch(make_model("bert"), "siva", r=4, factors="pissa", train_s=True)
    with pytest.raises(ValueError, match="factors must be one of svd, pissa"):
        spu_kernels.patch(make_model("bert"), "siva", r=4, factors="PiSSA")


def test_contract_defaults():
    assert AdapterModule.switchable is False and AdapterModule.enabled and not AdapterModule.merged
    assert LoRALinear.switchable and SiVALinear.switchable


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
@torch.no_grad()   # T5's attention on the CPU picks another kernel when grads are wanted: compare like with like
def test_switch_disable_unpatch_other_families(family):
    """Conv1D with q/k/v thirds (GPT-2), a gated MLP (LLaMA: IA3 on down_proj's input), encoder-decoder (T5)."""
    model, batch = make_model(family), make_batch(family)
    out0, snap = model_output(model, batch), snapshot(model)
    spu_kernels.patch(model, "lora", r=2)
    perturb(model, seed=1)
    out_a = model_output(model, batch)
    spu_kernels.add_adapter(model, "b", "siva_kv", r=2)
    spu_kernels.add_adapter(model, "c", "ia3")
    outs = {"default": out_a}
    for name in ("b", "c", "default", "c", "b"):
        spu_kernels.set_adapter(model, name)
        if name not in outs:
            perturb(model, seed=len(outs) + 2)
            outs[name] = model_output(model, batch)
        assert torch.equal(model_output(model, batch), outs[name]), name
        with spu_kernels.disable_adapter(model):
            assert torch.equal(model_output(model, batch), out0), name
    spu_kernels.unpatch(model)
    assert_restored(model, snap)
