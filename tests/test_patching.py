"""patch / unpatch / merge / save_adapter / load_adapter on tiny models of every supported family;
the adapter contract and shared options as the core sees them; each submodule imports alone."""
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from models import EXPECTED_TARGETS, FAMILY_MODELS, assert_restored, make_batch, make_model, model_output, snapshot

import spu_kernels
from spu_kernels.modules import AdapterModule, LoRALinear, SiVALinear
from spu_kernels.patching.architectures import HEAD_NAMES
from spu_kernels.patching.core import patch_state
from spu_kernels.patching.registry import (
    CORE_OPTIONS,
    SHARED_OPTION_NAMES,
    SHARED_OPTIONS,
    shared_option_handler,
    shared_options,
)

METHODS = ["lora", "siva", "siva_kv"]


def assert_same_as(model, snap, out_before, batch):
    assert_restored(model, snap)
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



# ---------------------------------------------------------------------------------------------
# the adapter contract and the shared options, as the core uses them
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, opts", [
    ("lora", dict(r=2)), ("siva", dict(r=2)), ("siva_kv", dict(r=2)), ("ia3", {}), ("krona", {}),
    ("lst", dict(r=4)), ("klst", dict(r=4)), ("prompt", dict(n_tokens=3)), ("lora", dict(r=2, soft_prompt=3)),
])
def test_every_replacement_is_an_adapter_module_whose_parameters_train(method, opts):
    model = make_model("bert")
    spu_kernels.patch(model, method, **opts)
    reps = patch_state(model).replacements
    assert reps
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for rep in reps:
        assert isinstance(rep.new, AdapterModule), rep.name
        params = [p for _, p in rep.new.adapter_parameters()]
        assert params and all(id(p) in trainable for p in params), rep.name
    spu_kernels.unpatch(model)


def test_shared_options_are_patchs_keyword_only_parameters():
    sig = inspect.signature(spu_kernels.patch)
    kw = {n: p.default for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert kw == {o.name: o.default for o in SHARED_OPTIONS} == shared_options()
    assert SHARED_OPTION_NAMES == tuple(kw)
    for name in set(SHARED_OPTION_NAMES) - set(CORE_OPTIONS):     # each has a handler once the package is in
        assert shared_option_handler(name).name == name
    assert "soft_prompt" not in shared_options("prompt") and "soft_prompt" in shared_options("lora")
    assert spu_kernels.describe_method("lora").endswith(
        "; plus train_head=True, trainable_modules=None, soft_prompt=None")


# ---------------------------------------------------------------------------------------------
# every submodule imports on its own: no import circle, no arrow back up
# ---------------------------------------------------------------------------------------------
# the layers below the package root, each with the layers above it that it may not import
LOWER_LAYERS = {
    "spu_kernels._version": (), "spu_kernels._cuda_build": (), "spu_kernels._extension": (),
    "spu_kernels.backends": (),
    "spu_kernels.triton": ("ops", "modules", "patching", "optim", "harness"),
    "spu_kernels.ops": ("modules", "patching", "optim", "harness"),
    "spu_kernels.optim": ("modules", "patching", "harness"),
    "spu_kernels.modules": ("patching", "optim", "harness"),
    "spu_kernels.patching": ("optim", "harness"),
}

# One child per module, forked from a process that imported only third-party packages (torch,
# transformers, triton: slow to import, and not ours), so each child starts with no spu_kernels
# module loaded. With a stub root, the package's __init__ does not run: a module of a lower layer
# must import without it (it may not reach back up to the root), and without the layers above it.
_IMPORT_EACH = r"""
import importlib, importlib.util, json, os, sys, traceback
import torch, transformers, triton  # noqa: F401
cases = json.loads(sys.argv[1])
out = {}
for name, stub, banned in cases:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if stub:
                sys.modules["spu_kernels"] = importlib.util.module_from_spec(importlib.util.find_spec("spu_kernels"))
            importlib.import_module(name)
            above = sorted(m for m in sys.modules if m.split(".")[:2][-1] in banned and m.startswith("spu_kernels."))
            msg = "ok" if not above else "imports a layer above it: " + ", ".join(above)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            msg = ("missing " + top) if top and top != "spu_kernels" else traceback.format_exc()
        except BaseException:
            msg = traceback.format_exc()
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    out[name + (" (no package root)" if stub else "")] = b"".join(chunks).decode()
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one child per module")
def test_each_submodule_imports_alone_in_a_fresh_process():
    names = [m.name for m in pkgutil.walk_packages(spu_kernels.__path__, "spu_kernels.")
             if m.name not in ("spu_kernels._C", "spu_kernels.__main__")]   # __main__ runs the CLI
    cases = [(n, False, []) for n in names]
    for n in names:
        layer = next((k for k in LOWER_LAYERS if n == k or n.startswith(k + ".")), None)
        if layer is not None:
            cases.append((n, True, list(LOWER_LAYERS[layer])))
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(cases)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    failed = {n: msg for n, msg in results.items() if msg != "ok" and not msg.startswith("missing ")}
    assert not failed, "\n\n".join(f"{n}:\n{msg}" for n, msg in failed.items())
    # an optional dependency may be missing here; none of the lower layers may need one
    skipped = {n for n, msg in results.items() if msg.startswith("missing ")}
    assert not {n for n in skipped if any(n.startswith(k) for k in LOWER_LAYERS)}, skipped


def test_failed_siva_patch_without_original_rolls_back():
    """keep_original=False drops W only once the whole patch succeeded: a patch that fails later
    (here: an unknown trainable module) still puts every layer back and raises its own error."""
    model = make_model("bert")
    batch = make_batch("bert")
    want = model(**batch).logits
    with pytest.raises(ValueError, match="nonexistent"):
        spu_kernels.patch(model, "siva", r=2, keep_original=False, trainable_modules=["nonexistent"])
    assert not spu_kernels.is_patched(model)
    assert not any(isinstance(m, spu_kernels.SiVALinear) for m in model.modules())
    assert torch.equal(model(**batch).logits, want)
    spu_kernels.patch(model, "siva", r=2, keep_original=False)
    with pytest.raises(RuntimeError, match="keep_original=False"):
        spu_kernels.unpatch(model)
