"""patch / unpatch / merge / save_adapter / load_adapter on tiny models of every supported family."""
import re

import pytest
import torch
import torch.nn as nn
from models import EXPECTED_TARGETS, FAMILY_MODELS, make_batch, make_model, model_output

import spu_kernels
from spu_kernels.modules import LoRALinear, SiVALinear
from spu_kernels.patching.architectures import HEAD_NAMES

METHODS = ["lora", "siva", "siva_kv"]


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m) for n, m in model.named_modules()})


def assert_same_as(model, snap, out_before, batch):
    state, flags, types = snap
    after_state = model.state_dict()
    assert set(after_state) == set(state)
    for k in state:
        assert torch.equal(after_state[k], state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert torch.equal(model_output(model, batch), out_before)


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def perturb_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "siva_" in name:
                p.add_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_patch_step0_unpatch_merge(family, method):
    model = make_model(family)
    batch = make_batch(family)
    out_before = model_output(model, batch)
    snap = snapshot(model)
    linear_names = {n for n, m in model.named_modules() if spu_kernels.modules.is_linear_like(m)}

    assert spu_kernels.patch(model, method, r=4) is model
    s = spu_kernels.summary(model)
    assert model.spu_summary is s and s.method == method
    expected = EXPECTED_TARGETS[(family, "kv" if method == "siva_kv" else "qv")]
    want = sorted(n for n in linear_names if any(n.endswith("." + e) for e in expected))
    assert sorted(s.replaced) == want and len(want) >= 2
    cls = LoRALinear if method == "lora" else SiVALinear
    assert all(isinstance(model.get_submodule(n), cls) for n in want)
    assert not any(m.training for m in model.modules())   # the model was in eval(): so are the adapters
    # only the adapters and the task head train
    for n, p in model.named_parameters():
        adapter = "lora_" in n or "siva_U" in n or "siva_Vh" in n
        assert p.requires_grad == (adapter or n.split(".")[0] in HEAD_NAMES), n
    assert s.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    if family == "gpt2":   # q/k/v are thirds of the fused c_attn: two adapters, the third block untouched
        mod = model.get_submodule(want[0])
        d = mod.in_features
        thirds = [(0, d), (2 * d, 3 * d)] if method != "siva_kv" else [(d, 2 * d), (2 * d, 3 * d)]
        assert list(mod.out_slices) == thirds
        b_full = mod.lowrank_factors()[1]
        untouched = ({0, 1, 2} - {lo // d for lo, _ in thirds}).pop()
        assert torch.equal(b_full[untouched * d:(untouched + 1) * d], torch.zeros(d, b_full.shape[1]))

    # step 0: the patched model computes what the original did
    assert rel_diff(model_output(model, batch), out_before) < 1e-5

    perturb_adapters(model)
    out_trained = model_output(model, batch)
    assert rel_diff(out_trained, out_before) > 1e-2

    spu_kernels.unpatch(model)
    assert not spu_kernels.is_patched(model) and not hasattr(model, "spu_summary")
    assert_same_as(model, snap, out_before, batch)

    # merge folds the (trained) adapters into plain layers
    spu_kernels.patch(model, method, r=4)
    perturb_adapters(model)
    out_patched = model_output(model, batch)
    spu_kernels.merge(model)
    assert not any(isinstance(m, (LoRALinear, SiVALinear)) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == snap[1]
    assert rel_diff(model_output(model, batch), out_patched) < 1e-5


def test_target_modules_override_and_regex():
    model = make_model("bert")
    spu_kernels.patch(model, "lora", r=2, target_modules=["key", "intermediate.dense"])
    assert sorted(spu_kernels.summary(model).replaced) == sorted(
        [f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)]
        + [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)])
    spu_kernels.unpatch(model)
    spu_kernels.patch(model, "siva", r=2, target_modules=r"bert\.encoder\.layer\.1\..*\.(query|value)")
    assert sorted(spu_kernels.summary(model).replaced) == [
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]


def test_head_and_trainable_modules_options():
    model = make_model("bert")
    spu_kernels.patch(model, "lora", r=2, train_head=False, trainable_modules=["pooler.dense"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("classifier") for n in trainable)
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= trainable
    assert all("lora_" in n or "pooler" in n for n in trainable)


def test_errors_are_clear_and_leave_the_model_untouched():
    model = make_model("bert")
    batch = make_batch("bert")
    out = model_output(model, batch)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unknown method 'loraa'; known methods: .*lora.*siva.*siva_kv"):
        spu_kernels.patch(model, "loraa")
    with pytest.raises(ValueError, match=r"r=64 is larger than min\(N, K\) = min\(32, 32\)"):
        spu_kernels.patch(model, "siva", r=64)
    with pytest.raises(ValueError, match="no module of this bert model matched target_modules=.*'nothing_here'"):
        spu_kernels.patch(model, "lora", target_modules=["nothing_here"])
    with pytest.raises(TypeError, match="unknown option 'rank'; lora takes r, alpha"):
        spu_kernels.patch(model, "lora", rank=4)
    with pytest.raises(TypeError, match="target module 'bert.encoder.layer.0.attention' is a BertAttention"):
        spu_kernels.patch(model, "lora", target_modules=["layer.0.attention"])
    with pytest.raises(ValueError, match="svd must be one of exact, randomized"):
        spu_kernels.patch(model, "siva", svd="lanczos")
    with pytest.raises(RuntimeError, match="not patched"):
        spu_kernels.unpatch(model)
    assert_same_as(model, snap, out, batch)
    spu_kernels.patch(model, "lora", r=2)
    with pytest.raises(RuntimeError, match="already patched with 'lora'; call spu_kernels.unpatch"):
        spu_kernels.patch(model, "siva")


def test_unknown_architecture_needs_target_modules():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="no default target modules for model_type 'Sequential'.*target_modules"):
        spu_kernels.patch(model, "lora")
    spu_kernels.patch(model, "lora", r=2, target_modules=["0", "2"])
    assert spu_kernels.summary(model).replaced == ["0", "2"]


def test_failure_half_way_rolls_back(monkeypatch):
    model = make_model("bert")
    batch = make_batch("bert")
    out = model_output(model, batch)
    snap = snapshot(model)
    import spu_kernels.patching.lowrank_methods as lm
    real, calls = lm.SiVALinear, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "SiVALinear", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        spu_kernels.patch(model, "siva", r=4)
    assert not spu_kernels.is_patched(model)
    assert_same_as(model, snap, out, batch)   # the two SiVA splits already made were undone


@pytest.mark.parametrize("method, opts", [("lora", {"dropout": 0.1}), ("siva", {"train_s": True}),
                                          ("siva_kv", {"svd": "exact"})])
def test_save_and_load_adapter(tmp_path, method, opts):
    model = make_model("roberta")
    batch = make_batch("roberta")
    spu_kernels.patch(model, method, r=3, **opts)
    perturb_adapters(model)
    with torch.no_grad():
        model.classifier.out_proj.weight.add_(1.0)
    want = model_output(model, batch)
    path = spu_kernels.save_adapter(model, tmp_path / "adapter.safetensors")

    fresh = make_model("roberta")
    spu_kernels.load_adapter(fresh, path)
    assert spu_kernels.summary(fresh).method == method
    assert spu_kernels.summary(fresh).options == spu_kernels.summary(model).options
    torch.testing.assert_close(model_output(fresh, batch), want, rtol=1e-5, atol=1e-6)

    other = make_model("roberta")
    spu_kernels.patch(other, "lora" if method != "lora" else "siva", r=3)
    with pytest.raises(ValueError, match=f"holds a '{method}' adapter but the model is patched with"):
        spu_kernels.load_adapter(other, path)
    wrong = make_model("bert")
    with pytest.raises(ValueError, match="does not fit this model"):
        spu_kernels.load_adapter(wrong, path)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in __import__("helpers").LOWRANK_BACKENDS])
def test_kernel_backends_step0(family, backend):
    """Through the kernels: Conv1D's transposed weight and q/k/v slices (GPT-2), GQA and 3-D
    activations (LLaMA), encoder-decoder (T5)."""
    model = make_model(family)
    batch = make_batch(family)
    out_before = model_output(model, batch)
    spu_kernels.patch(model, "siva_kv", r=4)
    with spu_kernels.use_backend(backend):
        assert rel_diff(model_output(model, batch), out_before) < 1e-5
        perturb_adapters(model)
        got = model_output(model, batch)
    assert rel_diff(got, model_output(model, batch)) < 1e-5    # the torch backend agrees


def test_target_modules_string_is_a_full_name_regex_and_the_error_says_so():
    model = make_model("bert")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"a string is a regex matched against the full module name.*"
                                         r"target_modules=\['query'\]"):
        spu_kernels.patch(model, "lora", target_modules="query")
    assert not spu_kernels.is_patched(model)
    assert_same_as(model, snap, model_output(model, make_batch("bert")), make_batch("bert"))


@pytest.mark.parametrize("name", ["attention.self.value", "value.base_layer", "layer.0.attention.self"])
def test_trainable_modules_may_not_unfreeze_an_adapted_layer(name):
    model = make_model("bert")
    batch = make_batch("bert")
    out = model_output(model, batch)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"trainable_modules: {re.escape(repr(name))} .*adapted.*frozen"):
        spu_kernels.patch(model, "lora", r=2, trainable_modules=[name])
    assert not spu_kernels.is_patched(model)
    assert_same_as(model, snap, out, batch)


def test_load_adapter_that_does_not_fit_leaves_the_model_as_it_was(tmp_path):
    model = make_model("roberta")
    spu_kernels.patch(model, "lora", r=3)
    path = spu_kernels.save_adapter(model, tmp_path / "adapter.safetensors")
    other = make_model("roberta")
    other.classifier.out_proj = nn.Linear(32, 2)      # a head for another number of labels
    batch = make_batch("roberta")
    out = model_output(other, batch)
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"classifier.out_proj.weight has shape \(3, 32\), the model's is \(2, 32\)"):
        spu_kernels.load_adapter(other, path)
    assert not spu_kernels.is_patched(other)
    assert_same_as(other, snap, out, batch)
    # already patched the same way: every shape is checked before any tensor is copied
    spu_kernels.patch(other, "lora", r=3)
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.add_(1.0)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="classifier.out_proj.weight has shape"):
        spu_kernels.load_adapter(other, path)
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())
