"""patch(model, "ia3", dynamic=True): data-dependent (IA)³ (modules/ia3_dynamic.py, ops/ia3_dynamic.py).

Step 0 is the original model BIT FOR BIT: the generator's up projection starts at zero, so the
scale is exactly 1 + tanh(0) = 1 and z ⊙ 1 == z in any dtype (the base layer itself computes z).
Outputs are compared under torch.no_grad(): with tensors that require grad, torch.matmul may take
another (equally correct) path for 3-d inputs (T5's attention), which differs in the last bit."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import transformers as tf
from models import assert_merge_refused, assert_restored, make_batch, make_model, model_output, perturb_params, snapshot

import spu_kernels
from spu_kernels.modules import IA3DynamicLinear, IA3Linear, IA3ScaledActivation
from spu_kernels.ops.ia3_dynamic import dynamic_scale, dynamic_scale_reference
from spu_kernels.patching.peft_format import peft_adapter_files
from spu_kernels.patching.pretrained import PEFT_CONFIG_NAME

# module-name endings -> side of the IA3DynamicLinear there (the FFN scale: the FFN output linear's input)
EXPECTED = {
    "bert": {"attention.self.key": "output", "attention.self.value": "output", "output.dense": "input"},
    "gpt2": {"attn.c_attn": "output", "mlp.c_proj": "input"},
    "llama": {"k_proj": "output", "v_proj": "output", "mlp.down_proj": "input"},
    "t5": {"k": "output", "v": "output", "DenseReluDense.wo": "input"},
}
FAMILIES = list(EXPECTED)


def perturb(model, seed=0):
    perturb_params(model, "ia3_", 0.5, seed)


def reference_linear(mod, x):
    """An independent computation of IA3DynamicLinear's output from its tensors."""
    w = mod.base_layer.weight
    w = (w.t() if w.shape != (mod.out_features, mod.in_features) else w).to(x.dtype)
    b = mod.base_layer.bias.to(x.dtype)
    l = 1 + torch.tanh(x @ mod.ia3_down.t().to(x.dtype) @ mod.ia3_up.t().to(x.dtype))
    if mod.side == "input":
        return (x * l) @ w.t() + b
    z = x @ w.t() + b
    full = torch.ones(*x.shape[:-1], mod.out_features, dtype=x.dtype)
    off = 0
    for lo, hi in mod.out_slices or [(0, mod.out_features)]:
        full[..., lo:hi] = l[..., off:off + hi - lo]
        off += hi - lo
    return z * full


# -- the op and the module against independent computations -------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_op_matches_reference(dtype):
    torch.manual_seed(0)
    z = torch.randn(3, 5, 37, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 37, dtype=torch.float32, requires_grad=True)
    dy = torch.randn(3, 5, 37, dtype=dtype)
    y = dynamic_scale(z, g)
    y_ref = dynamic_scale_reference(z, g)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    got = torch.autograd.grad(y, (z, g), dy)
    want = torch.autograd.grad(y_ref, (z, g), dy)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    assert torch.equal(dynamic_scale(z, torch.zeros_like(g)), z)        # scale 1 exactly
    with pytest.raises(ValueError, match="same shape"):
        dynamic_scale(z, g[..., :5])


def _layer(kind, side, slices=None, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(6, 9) if kind == "linear" else tf.pytorch_utils.Conv1D(9, 6)
    with torch.no_grad():
        base.bias.normal_()
    base = base.double()
    mod = IA3DynamicLinear(base, side=side, out_slices=slices, rank=3, adapter_dtype=torch.float64)
    with torch.no_grad():
        mod.ia3_up.normal_()
    return mod


@pytest.mark.parametrize("kind,side,slices", [("linear", "output", None), ("linear", "input", None),
                                              ("conv1d", "output", [(3, 6), (6, 9)]), ("conv1d", "input", None)])
def test_module_forward_and_gradcheck(kind, side, slices):
    mod = _layer(kind, side, slices)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(mod(x), reference_linear(mod, x), rtol=1e-12, atol=1e-12)
    assert not mod.base_layer.weight.requires_grad
    d = mod.ia3_down.detach().clone().requires_grad_()
    u = mod.ia3_up.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, d, u: _functional(mod, x, d, u), (x, d, u))


def _functional(mod, x, d, u):
    """mod's forward with its generator weights as inputs (for gradcheck)."""
    saved = mod.ia3_down, mod.ia3_up
    try:
        del mod.ia3_down, mod.ia3_up
        mod.ia3_down, mod.ia3_up = d, u
        return mod(x)
    finally:
        del mod.ia3_down, mod.ia3_up
        mod.ia3_down, mod.ia3_up = saved


def test_module_errors():
    lin = nn.Linear(4, 6)
    with pytest.raises(ValueError, match="generator_rank must be a positive int"):
        IA3DynamicLinear(lin, rank=0)
    with pytest.raises(ValueError, match="side must be"):
        IA3DynamicLinear(lin, side="both")
    with pytest.raises(ValueError, match="out_slices only applies"):
        IA3DynamicLinear(lin, side="input", out_slices=[(0, 2)])
    with pytest.raises(TypeError, match="wraps nn.Linear"):
        IA3DynamicLinear(nn.ReLU())


# -- patch on every family ----------------------------------------------------------------------
@torch.no_grad()
def output(model, batch):
    return model_output(model, batch)


def _loss(model, batch, target):
    return ((model_output(model, batch) - target) ** 2).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_step0_train_disable_unpatch(family):
    model = make_model(family)
    batch = make_batch(family)
    out_before = output(model, batch)
    snap = snapshot(model)

    spu_kernels.patch(model, "ia3", dynamic=True, train_head=False)
    replaced = spu_kernels.summary(model).replaced
    want = EXPECTED[family]
    ends = {e: [n for n in replaced if n.endswith("." + e)] for e in want}
    assert all(ends.values()) and sum(map(len, ends.values())) == len(replaced), (replaced, want)
    for e, names in ends.items():
        for n in names:
            mod = model.get_submodule(n)
            assert isinstance(mod, IA3DynamicLinear) and mod.side == want[e] and mod.rank == 4, n
    assert not any(isinstance(m, (IA3Linear, IA3ScaledActivation)) for m in model.modules())
    if family == "gpt2":                                  # the k and v thirds of c_attn, q untouched
        mod = model.get_submodule(ends["attn.c_attn"][0])
        d = mod.in_features
        assert list(mod.out_slices) == [(d, 2 * d), (2 * d, 3 * d)] and mod.ia3_up.shape == (2 * d, 4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("ia3_down", "ia3_up") for n in trainable)
    assert torch.equal(output(model, batch), out_before)           # step 0: bit for bit

    # loss falls in a few steps, only the generators training, towards a reachable target: the
    # output of a copy whose generators were drawn at random
    teacher = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in teacher.named_parameters():
            if "ia3_up" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    target = output(teacher, batch).detach()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(6):
        loss = _loss(model, batch, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    assert not torch.equal(output(model, batch), out_before)

    with spu_kernels.disable_adapter(model):                          # the base model, bit for bit
        assert torch.equal(output(model, batch), out_before)
    assert not torch.equal(output(model, batch), out_before)

    spu_kernels.unpatch(model)                                           # bit-identical
    assert_restored(model, snap)
    assert torch.equal(output(model, batch), out_before)


def test_merge_refuses_before_anything_changes():
    model = make_model("llama")
    batch = make_batch("llama")
    spu_kernels.patch(model, "ia3", dynamic=True)
    perturb(model)
    assert_merge_refused(model, batch, "cannot be merged: its scale depends on each token")


def test_save_load_and_pretrained_round_trip(tmp_path):
    model = make_model("gpt2")
    batch = make_batch("gpt2")
    spu_kernels.patch(model, "ia3", dynamic=True, generator_rank=2)
    perturb(model)
    want = output(model, batch)
    assert peft_adapter_files(model) is None                           # no exact PEFT equivalent
    path = spu_kernels.save_adapter(model, tmp_path / "dyn.safetensors")
    fresh = spu_kernels.load_adapter(make_model("gpt2"), path)
    assert spu_kernels.summary(fresh).options["generator_rank"] == 2
    assert torch.equal(output(fresh, batch), want)

    base_dir = tmp_path / "base"
    make_model("gpt2").save_pretrained(base_dir)
    model = spu_kernels.patch(tf.GPT2LMHeadModel.from_pretrained(base_dir).eval(), "ia3", dynamic=True)
    perturb(model, seed=1)
    want = output(model, batch)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    assert not (folder / PEFT_CONFIG_NAME).exists()
    got = spu_kernels.from_pretrained(folder)
    assert spu_kernels.summary(got).options == spu_kernels.summary(model).options
    assert torch.equal(output(got, batch), want)
    assert json.loads(json.dumps(spu_kernels.summary(got).options))["dynamic"] is True


def test_option_errors_leave_the_model_untouched():
    model = make_model("bert")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="generator_rank only applies with dynamic=True"):
        spu_kernels.patch(model, "ia3", generator_rank=4)
    with pytest.raises(ValueError, match="generator_rank must be a positive int"):
        spu_kernels.patch(model, "ia3", dynamic=True, generator_rank=0)
    with pytest.raises(ValueError, match="dynamic must be True or False"):
        spu_kernels.patch(model, "ia3", dynamic="yes")
    state, flags, types = snap
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert "dynamic" in spu_kernels.describe_method("ia3")


def test_low_precision_base_keeps_its_dtype():
    torch.manual_seed(0)
    base = nn.Linear(8, 6).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    want = base(x)
    for side in ("output", "input"):
        mod = IA3DynamicLinear(base, side=side)
        assert mod.ia3_down.dtype == mod.ia3_up.dtype == torch.float32
        y = mod(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, want)           # step 0, bit for bit
        with torch.no_grad():
            mod.ia3_up.normal_()
        torch.testing.assert_close(mod(x).float(), reference_linear(mod, x.float()), rtol=3e-2, atol=3e-2)


def test_named_adapters_switch_exactly():
    model = make_model("gpt2")
    batch = make_batch("gpt2")
    base = output(model, batch)
    spu_kernels.patch(model, "ia3", dynamic=True)
    perturb(model, seed=0)
    a = output(model, batch)
    spu_kernels.add_adapter(model, "other", "ia3", dynamic=True, generator_rank=2)
    assert torch.equal(output(model, batch), a)                      # the active one stays active
    spu_kernels.set_adapter(model, "other")
    assert torch.equal(output(model, batch), base)                   # a fresh dynamic adapter: step 0
    perturb(model, seed=1)
    b = output(model, batch)
    assert not torch.equal(a, b)
    spu_kernels.set_adapter(model, "default")
    assert torch.equal(output(model, batch), a)
    spu_kernels.set_adapter(model, "other")
    assert torch.equal(output(model, batch), b)
    spu_kernels.unpatch(model)
    assert torch.equal(output(model, batch), base)



def test_fullgraph_compile_matches_eager():
    """Both sides under torch.compile(fullgraph=True) (aot_eager: the fused op's custom ops in the joint
    graph), GPT-2's Conv1D with k / v slices on the output side: eager's output and grads."""
    out = IA3DynamicLinear(tf.pytorch_utils.Conv1D(12, 8), side="output", out_slices=[(4, 8), (8, 12)], rank=2)
    inp = IA3DynamicLinear(nn.Linear(12, 8), side="input", rank=2)
    with torch.no_grad():
        for mod in (out, inp):
            mod.ia3_up.normal_()
    x = torch.randn(2, 3, 8)
    params = [out.ia3_down, out.ia3_up, inp.ia3_down, inp.ia3_up, out.base_layer.bias]

    def step(fn):
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        return (y.detach(), *torch.autograd.grad(y.square().sum(), [xx, *params]))
    torch._dynamo.reset()
    try:
        with spu_kernels.use_backend("torch"):
            got = step(torch.compile(lambda t: inp(out(t)), backend="aot_eager", fullgraph=True))
            want = step(lambda t: inp(out(t)))
    finally:
        torch._dynamo.reset()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
