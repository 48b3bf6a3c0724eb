"""patch(model, "ia3") and patch(model, "krona") on tiny models of every supported family: default
targets, step 0 = the original model, unpatch bit-identical, merge, the kernels, save/load, errors."""
import pytest
import torch
from models import FAMILY_MODELS, assert_restored, make_batch, make_model, model_output, snapshot

import spu_kernels
from spu_kernels.backends import available_backends
from spu_kernels.modules import IA3Linear, IA3ScaledActivation, KronALinear
from spu_kernels.patching.architectures import HEAD_NAMES

ADAPTERS = (IA3Linear, IA3ScaledActivation, KronALinear)

# what "ia3" replaces by default: module-name endings -> module class (and side for IA3Linear)
IA3_EXPECTED = {
    "bert": {"attention.self.key": "output", "attention.self.value": "output",
             "intermediate.intermediate_act_fn": "act"},
    "distilbert": {"k_lin": "output", "v_lin": "output", "ffn.activation": "act"},
    "t5": {"k": "output", "v": "output", "DenseReluDense.act": "act"},
    "gpt2": {"attn.c_attn": "output", "mlp.act": "act"},
}
IA3_EXPECTED["roberta"] = IA3_EXPECTED["bert"]
for _fam in ("llama", "mistral", "qwen2"):   # gated MLP: the scale sits on down_proj's input
    IA3_EXPECTED[_fam] = {"k_proj": "output", "v_proj": "output", "mlp.down_proj": "input"}
KRONA_EXPECTED = {"bert": ("attention.self.query", "attention.self.value"), "distilbert": ("q_lin", "v_lin"),
                  "t5": ("q", "v"), "gpt2": ("attn.c_attn",)}
KRONA_EXPECTED["roberta"] = KRONA_EXPECTED["bert"]
for _fam in ("llama", "mistral", "qwen2"):
    KRONA_EXPECTED[_fam] = ("q_proj", "v_proj")


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand_like(p) * 1.5)
            elif "krona_B" in name:
                p.add_(torch.randn_like(p) * 0.5)


def check_targets(model, family, method):
    replaced = spu_kernels.summary(model).replaced
    if method == "ia3":
        want = IA3_EXPECTED[family]
        ends = {e: [n for n in replaced if n.endswith("." + e)] for e in want}
        assert all(ends.values()) and sum(map(len, ends.values())) == len(replaced), (replaced, want)
        for e, names in ends.items():
            for n in names:
                mod = model.get_submodule(n)
                if want[e] == "act":
                    assert isinstance(mod, IA3ScaledActivation), n
                else:
                    assert isinstance(mod, IA3Linear) and mod.side == want[e], n
        if family == "gpt2":   # the k and v thirds of c_attn, q untouched
            mod = model.get_submodule(ends["attn.c_attn"][0])
            d = mod.in_features
            assert list(mod.out_slices) == [(d, 2 * d), (2 * d, 3 * d)]
            assert torch.equal(mod.scale_vector()[:d], torch.ones(d))
    else:
        want = KRONA_EXPECTED[family]
        assert replaced and all(any(n.endswith("." + e) for e in want) for n in replaced), replaced
        assert all(isinstance(model.get_submodule(n), KronALinear) for n in replaced)
        if family == "gpt2":
            mod = model.get_submodule(replaced[0])
            d = mod.in_features
            assert list(mod.out_slices) == [(0, d), (2 * d, 3 * d)] and mod.krona_A.shape[0] == 2
    prefix = ("ia3_l",) if method == "ia3" else ("krona_A", "krona_B")
    for n, p in model.named_parameters():
        assert p.requires_grad == (n.rsplit(".", 1)[-1] in prefix or n.split(".")[0] in HEAD_NAMES), n


@pytest.mark.parametrize("method", ["ia3", "krona"])
@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_patch_step0_unpatch_merge(family, method):
    model = make_model(family)
    batch = make_batch(family)
    out_before = model_output(model, batch)
    snap = snapshot(model)

    assert spu_kernels.patch(model, method) is model
    check_targets(model, family, method)
    assert not any(m.training for m in model.modules())
    s = spu_kernels.summary(model)
    assert s.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert rel_diff(model_output(model, batch), out_before) < 1e-5       # step 0 = the original model

    perturb(model)
    # (the BERT-family heads sit behind LayerNorm + a tanh pooler: scales move their logits less)
    assert rel_diff(model_output(model, batch), out_before) > 1e-3

    spu_kernels.unpatch(model)                                           # bit-identical
    assert_restored(model, snap)
    assert torch.equal(model_output(model, batch), out_before)

    spu_kernels.patch(model, method)
    perturb(model)
    out_patched = model_output(model, batch)
    spu_kernels.merge(model)
    assert not any(isinstance(m, ADAPTERS) for m in model.modules())
    _, flags, types = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert rel_diff(model_output(model, batch), out_patched) < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("method", ["ia3", "krona"])
@pytest.mark.skipif("triton" not in available_backends(), reason="triton cannot run here")
def test_kernel_backends_step0(family, method):
    """Through the triton kernels: Conv1D's transposed weight and slices (GPT-2), GQA, 3-D
    activations and the gated MLP (LLaMA), encoder-decoder and ReLU (T5); then a training step."""
    model = make_model(family)
    batch = make_batch(family)
    out_before = model_output(model, batch)
    spu_kernels.patch(model, method)
    with spu_kernels.use_backend("triton"):
        assert rel_diff(model_output(model, batch), out_before) < 1e-5
        perturb(model)
        got = model_output(model, batch)
        got.float().pow(2).mean().backward()
    grads_triton = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    want = model_output(model, batch)                                   # the torch backend agrees
    want.float().pow(2).mean().backward()
    assert rel_diff(got, want) < 1e-5
    for n, p in model.named_parameters():
        if p.requires_grad and ("ia3_" in n or "krona_" in n):
            assert rel_diff(grads_triton[n], p.grad) < 1e-4, n


def test_options_and_errors_leave_the_model_untouched():
    model = make_model("bert")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"krona: .*attention\.self\.query: .*a1=5 does not divide N=32"):
        spu_kernels.patch(model, "krona", a_shape=(5, 4))
    with pytest.raises(ValueError, match="in both target_modules and feedforward_modules"):
        spu_kernels.patch(model, "ia3", target_modules=["key", "output.dense"], feedforward_modules=["output.dense"])
    with pytest.raises(TypeError, match="unknown option 'r'"):
        spu_kernels.patch(model, "ia3", r=4)
    assert not spu_kernels.is_patched(model)
    assert {n: type(m) for n, m in model.named_modules()} == snap[2]
    assert all(torch.equal(v, snap[0][k]) for k, v in model.state_dict().items())

    spu_kernels.patch(model, "ia3", feedforward=False)
    assert all(isinstance(model.get_submodule(n), IA3Linear) for n in spu_kernels.summary(model).replaced)
    assert len(spu_kernels.summary(model).replaced) == 4
    spu_kernels.unpatch(model)
    spu_kernels.patch(model, "ia3", target_modules=["value"], feedforward_modules=["output.dense"])
    sides = {n: model.get_submodule(n).side for n in spu_kernels.summary(model).replaced}
    assert sorted(set(sides.values())) == ["input", "output"]
    assert all(s == "input" for n, s in sides.items() if n.endswith("output.dense"))
    spu_kernels.unpatch(model)
    spu_kernels.patch(model, "krona", a_shape=(4, 8), scale=2.0)
    mod = model.get_submodule(spu_kernels.summary(model).replaced[0])
    assert mod.a_shape == (4, 8) and mod.b_shape == (8, 4) and mod.scaling == 2.0


def test_unknown_architecture():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    with pytest.raises(ValueError, match="no default target modules"):
        spu_kernels.patch(model, "ia3")
    spu_kernels.patch(model, "ia3", target_modules=["0"], feedforward_modules=["2"])
    assert model[0].side == "output" and model[2].side == "input"
    spu_kernels.unpatch(model)
    with pytest.raises(ValueError, match="no default feed-forward targets"):
        spu_kernels.patch(model, "ia3", target_modules=["0"])
    spu_kernels.patch(model, "krona", target_modules=["0", "2"])
    assert model[0].a_shape == (4, 2) and model[2].a_shape == (2, 4)


@pytest.mark.parametrize("method", ["ia3", "krona"])
def test_save_and_load_adapter(tmp_path, method):
    model = make_model("distilbert")
    batch = make_batch("distilbert")
    spu_kernels.patch(model, method)
    perturb(model)
    want = model_output(model, batch)
    path = spu_kernels.save_adapter(model, tmp_path / f"{method}.safetensors")
    fresh = make_model("distilbert")
    spu_kernels.load_adapter(fresh, path)
    torch.testing.assert_close(model_output(fresh, batch), want, rtol=1e-5, atol=1e-6)


def test_t5_gated_mlp_scales_the_down_projection_input():
    import transformers as tf
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=97, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_decoder_layers=1, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, feed_forward_proj="gated-gelu")).eval()
    batch = make_batch("t5")
    before = model_output(model, batch)
    spu_kernels.patch(model, "ia3")
    wo = [n for n in spu_kernels.summary(model).replaced if n.endswith("DenseReluDense.wo")]
    assert len(wo) == 2 and all(model.get_submodule(n).side == "input" for n in wo)
    assert not any(isinstance(m, IA3ScaledActivation) for m in model.modules())
    assert rel_diff(model_output(model, batch), before) < 1e-5
