"""patch(model, "adapter"): bottleneck adapters (modules/bottleneck.py, patching/bottleneck_methods.py).

Step 0 is the original model BIT FOR BIT (the up projection and its bias start at zero: out + 0).
Outputs are compared under torch.no_grad() (see test_ia3_dynamic.py: with grad-requiring tensors torch
may take another matmul path for 3-d inputs)."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as tf
from models import (
    FAMILY_MODELS,
    assert_merge_refused,
    assert_restored,
    make_batch,
    make_model,
    model_output,
    perturb_params,
    snapshot,
)

import spu_kernels
from spu_kernels.modules import BottleneckAdapterLinear
from spu_kernels.patching.peft_format import peft_adapter_files
from spu_kernels.patching.pretrained import PEFT_CONFIG_NAME

# module-name endings of the wrapped projections: (attention output, FFN output)
PLACES = {
    "bert": (".attention.output.dense", ".output.dense"),
    "roberta": (".attention.output.dense", ".output.dense"),
    "distilbert": (".attention.out_lin", ".ffn.lin2"),
    "t5": ("Attention.o", ".DenseReluDense.wo"),          # SelfAttention.o and the decoder's EncDecAttention.o
    "gpt2": (".attn.c_proj", ".mlp.c_proj"),
    "llama": (".self_attn.o_proj", ".mlp.down_proj"),
    "mistral": (".self_attn.o_proj", ".mlp.down_proj"),
    "qwen2": (".self_attn.o_proj", ".mlp.down_proj"),
}
FAMILIES = list(FAMILY_MODELS)


def perturb(model, seed=0):
    perturb_params(model, "adapter_", 0.3, seed)


@torch.no_grad()
def output(model, batch):
    return model_output(model, batch)


def test_families_covered():
    assert set(PLACES) == set(FAMILY_MODELS)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_step0_train_disable_save_unpatch(family, tmp_path):
    model = make_model(family)
    batch = make_batch(family)
    out_before = output(model, batch)
    snap = snapshot(model)

    spu_kernels.patch(model, "adapter", r=4, non_linearity="gelu", train_head=False)
    replaced = spu_kernels.summary(model).replaced
    attn_end, ffn_end = PLACES[family]
    attn = [n for n in replaced if n.endswith(attn_end)]
    ffn = [n for n in replaced if n.endswith(ffn_end) and n not in attn]
    layers = model.config.num_hidden_layers if family != "t5" else model.config.num_layers * 2
    assert len(ffn) == layers and len(attn) >= layers and len(attn) + len(ffn) == len(replaced), replaced
    for n in replaced:
        mod = model.get_submodule(n)
        assert isinstance(mod, BottleneckAdapterLinear) and mod.r == 4 and mod.non_linearity == "gelu"
        assert mod.adapter_down.dtype == torch.float32 and not mod.adapter_up.any()
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias"}
    assert torch.equal(output(model, batch), out_before)             # step 0: bit for bit

    # loss falls in a few steps towards a reachable target (a copy with random adapter weights)
    teacher = copy.deepcopy(model)
    perturb(teacher, seed=5)
    target = output(teacher, batch)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(4):
        loss = ((model_output(model, batch) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    trained = output(model, batch)
    assert not torch.equal(trained, out_before)

    with spu_kernels.disable_adapter(model):                           # the base model, bit for bit
        assert torch.equal(output(model, batch), out_before)

    assert peft_adapter_files(model) is None                           # PEFT has no bottleneck adapter
    path = spu_kernels.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = spu_kernels.load_adapter(make_model(family), path)
    assert spu_kernels.summary(fresh).options == spu_kernels.summary(model).options
    assert torch.equal(output(fresh, batch), trained)

    spu_kernels.unpatch(model)                                           # bit-identical
    assert_restored(model, snap)
    assert torch.equal(output(model, batch), out_before)


def test_pfeiffer_places_ffn_only():
    model = make_model("bert")
    spu_kernels.patch(model, "adapter", r=3, placement="pfeiffer")
    replaced = spu_kernels.summary(model).replaced
    assert replaced and all(n.endswith(".output.dense") and "attention" not in n for n in replaced)
    assert len(replaced) == model.config.num_hidden_layers


def reference_adapter(mod, x):
    """An independent computation of BottleneckAdapterLinear's output from its tensors (float64)."""
    w = mod.base_layer.weight.double()
    w = w.t() if w.shape != (mod.out_features, mod.in_features) else w
    out = x.double() @ w.t() + mod.base_layer.bias.double()
    z = out @ mod.adapter_down.double().t() + mod.adapter_down_bias.double()
    act = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[mod.non_linearity]
    return out + act(z) @ mod.adapter_up.double().t() + mod.adapter_up_bias.double()


@pytest.mark.parametrize("kind,act", [("linear", "relu"), ("conv1d", "tanh"), ("linear", "silu")])
def test_module_against_independent_math(kind, act):
    torch.manual_seed(0)
    base = nn.Linear(7, 9) if kind == "linear" else tf.pytorch_utils.Conv1D(9, 7)
    with torch.no_grad():
        base.bias.normal_()
    mod = BottleneckAdapterLinear(base, 3, act, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 5, 7)
    assert torch.equal(mod(x), base(x))                                    # up = 0: the base layer exactly
    with torch.no_grad():
        for p in (mod.adapter_up, mod.adapter_up_bias, mod.adapter_down_bias):
            p.normal_()
    torch.testing.assert_close(mod(x).double(), reference_adapter(mod, x), rtol=1e-5, atol=1e-5)
    assert not base.weight.requires_grad


def test_dropout_branch_only_in_training():
    torch.manual_seed(0)
    mod = BottleneckAdapterLinear(nn.Linear(6, 8), 4, dropout=0.5)
    with torch.no_grad():
        mod.adapter_up.normal_()
    x = torch.randn(3, 6)
    mod.eval()
    want = reference_adapter(mod, x)
    torch.testing.assert_close(mod(x).double(), want, rtol=1e-5, atol=1e-5)
    mod.train()
    torch.manual_seed(1)
    y = mod(x)
    base = mod.base_layer(x)
    branch = (want - base.double()).float()
    kept = torch.isclose(y - base, 2 * branch, rtol=1e-4, atol=1e-5)    # kept: scaled by 1 / (1 - p)
    dropped = (y - base).abs() < 1e-6
    assert bool((kept | dropped).all()) and kept.any() and dropped.any()


def test_merge_refused_before_anything_changes():
    model = make_model("llama")
    batch = make_batch("llama")
    spu_kernels.patch(model, "adapter", r=4)
    perturb(model)
    assert_merge_refused(model, batch, "bottleneck adapters cannot be merged: the non-linearity")


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    batch = make_batch("gpt2")
    base_dir = tmp_path / "base"
    make_model("gpt2").save_pretrained(base_dir)
    model = spu_kernels.patch(tf.GPT2LMHeadModel.from_pretrained(base_dir).eval(), "adapter", r=5,
                              non_linearity="silu", placement="pfeiffer", init_std=0.1, seed=3)
    perturb(model, seed=1)
    want = output(model, batch)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    assert not (folder / PEFT_CONFIG_NAME).exists()
    got = spu_kernels.from_pretrained(folder)
    opts = spu_kernels.summary(got).options
    assert opts == spu_kernels.summary(model).options
    assert json.loads(json.dumps(opts))["placement"] == "pfeiffer"
    assert torch.equal(output(got, batch), want)


def test_seed_makes_the_init_reproducible():
    a = spu_kernels.patch(make_model("bert"), "adapter", r=4, seed=7)
    b = spu_kernels.patch(make_model("bert"), "adapter", r=4, seed=7)
    c = spu_kernels.patch(make_model("bert"), "adapter", r=4, seed=8)
    sa, sb, sc = (spu_kernels.patching.checkpoint.adapter_state_dict(m) for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if k.endswith("adapter_down"))


@pytest.mark.parametrize("options,message", [
    ({"r": 0}, "r .the bottleneck width. must be a positive int"),
    ({"r": 2.5}, "r .the bottleneck width. must be a positive int"),
    ({"non_linearity": "swishy"}, "unknown non_linearity 'swishy'; choose one of relu, gelu, silu, tanh"),
    ({"placement": "both"}, "unknown placement 'both'; choose 'houlsby'"),
    ({"dropout": 1.0}, "dropout must be a number in"),
    ({"init_std": 0.0}, "init_std must be a finite number > 0"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"adapter_dtype": "int8"}, "adapter_dtype must be a floating torch dtype"),
])
def test_bad_options_leave_the_model_untouched(options, message):
    model = make_model("bert")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        spu_kernels.patch(model, "adapter", **options)
    assert_restored(model, snap)


def test_unsupported_model_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no default target modules"):
        spu_kernels.patch(model, "adapter", r=2)
    spu_kernels.patch(model, "adapter", r=2, target_modules=["0"])       # named targets work anywhere
    x = torch.randn(3, 4)
    assert isinstance(model[0], BottleneckAdapterLinear) and model(x).shape == (3, 2)


def test_describe_method_and_harness_registry():
    text = spu_kernels.describe_method("adapter")
    assert "r=64" in text and "non_linearity='relu'" in text and "placement='houlsby'" in text
    from spu_kernels.harness.methods import METHODS
    assert METHODS["adapter"].patch == "adapter"


def test_named_adapters_switch_exactly():
    model = make_model("gpt2")
    batch = make_batch("gpt2")
    base = output(model, batch)
    spu_kernels.patch(model, "adapter", r=4)
    perturb(model, seed=0)
    a = output(model, batch)
    spu_kernels.add_adapter(model, "other", "adapter", r=2, placement="pfeiffer", non_linearity="tanh")
    assert torch.equal(output(model, batch), a)                      # the active one stays active
    spu_kernels.set_adapter(model, "other")
    assert torch.equal(output(model, batch), base)                   # a fresh adapter: step 0
    perturb(model, seed=1)
    b = output(model, batch)
    assert not torch.equal(a, b)
    spu_kernels.set_adapter(model, "default")
    assert torch.equal(output(model, batch), a)
    spu_kernels.set_adapter(model, "other")
    assert torch.equal(output(model, batch), b)
    spu_kernels.unpatch(model)
    assert torch.equal(output(model, batch), base)
