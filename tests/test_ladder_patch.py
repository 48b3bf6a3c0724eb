"""patch(model, "lst" / "klst") on tiny models of the encoder (BERT, RoBERTa, DistilBERT) and decoder
(GPT-2, LLaMA, Mistral, Qwen2) families: same output type and loss, the backbone frozen and run
without autograd, unpatch bit-identical, merge / bad options / unsupported families are errors."""
import inspect

import pytest
import torch
from models import make_batch, make_model, model_output

import spu_kernels
from spu_kernels.modules import LadderBackbone

FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2"]
METHODS = [("lst", {}), ("klst", {"k": 3})]


def labels_for(family, batch):
    if family in ("llama", "mistral", "qwen2"):
        return batch["input_ids"]
    return torch.tensor([0, 1])


def backbone_layers(model):
    wrapper = getattr(model, model.base_model_prefix)
    for name in ("encoder.layer", "transformer.layer", "h", "layers"):
        try:
            return list(wrapper.base_layer.get_submodule(name))
        except AttributeError:
            continue
    raise AssertionError("no layers found")


@pytest.mark.parametrize("method, opts", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_frozen_no_graph_unpatch(family, method, opts):
    model = make_model(family)
    batch = make_batch(family)
    out_before = model_output(model, batch)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    sig_before = inspect.signature(model.forward)
    ref = model(**batch, labels=labels_for(family, batch))

    spu_kernels.patch(model, method, r=4, **opts)
    assert isinstance(getattr(model, model.base_model_prefix), LadderBackbone)
    assert inspect.signature(model.forward) == sig_before
    # the backbone runs with grad mode off and hands back tensors outside any graph
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(
        (torch.is_grad_enabled(), (out[0] if isinstance(out, tuple) else out).requires_grad)))
        for m in backbone_layers(model)]
    out = model(**batch, labels=labels_for(family, batch))
    for h in hooks:
        h.remove()
    assert seen and all(g is False and rg is False for g, rg in seen), seen
    assert type(out) is type(ref) and out.logits.shape == ref.logits.shape and out.loss.dim() == 0
    out.loss.backward()
    for n, p in model.named_parameters():
        if ".base_layer." in n or n.startswith("base_layer."):
            assert not p.requires_grad and p.grad is None, n
    side = [p for n, p in model.named_parameters() if ".side." in n]
    assert side and all(p.requires_grad and p.grad is not None for p in side)
    assert any(p.grad.abs().sum() > 0 for p in side)
    s = spu_kernels.summary(model)
    assert s.method == method and 0 < s.trainable_params < s.total_params

    with pytest.raises(RuntimeError, match="cannot be merged"):
        spu_kernels.merge(model)
    spu_kernels.unpatch(model)
    assert torch.equal(model_output(model, batch), out_before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    after = model.state_dict()
    assert set(after) == set(state_before) and all(torch.equal(after[k], state_before[k]) for k in after)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_padding_is_respected(family):
    """Tokens behind the padding mask do not change the outputs of the real tokens."""
    model = make_model(family)
    spu_kernels.patch(model, "klst", k=3, r=4)
    batch = make_batch(family, batch=2, seq=9)
    out1 = model(**batch).logits
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][0, -2:] = 5       # row 0's padded positions (mask 0) get other tokens
    out2 = model(**batch).logits
    torch.testing.assert_close(out1, out2)


def test_causal_side_attention():
    """A decoder's side network is causal: changing the last token leaves earlier logits unchanged."""
    model = make_model("llama")
    spu_kernels.patch(model, "klst", k=3, r=4)
    ids = torch.randint(2, 90, (1, 8))
    a = model(input_ids=ids).logits
    ids[0, -1] = (ids[0, -1] + 1) % 90 + 2
    b = model(input_ids=ids).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_layers_option_and_windows():
    model = make_model("bert")
    spu_kernels.patch(model, "klst", k=5, r=4, layers=[2])
    side = model.bert.side
    assert side.layers == [2] and side.windows == [(0, 2)]      # 2 - 2 .. min(L = 2, 2 + 2): clipped
    assert side.ladder_ids == [0, 1, 2] and len(side.blocks) == 1
    model(**make_batch("bert")).logits.sum().backward()


def test_klst_triton_backend_matches_torch():
    model = make_model("roberta")
    spu_kernels.patch(model, "klst", k=3, r=4)
    batch = make_batch("roberta", batch=2, seq=7)
    with spu_kernels.use_backend("torch"):
        a = model(**batch).logits
    with spu_kernels.use_backend("triton"):
        b = model(**batch).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_save_load_adapter(tmp_path):
    model = make_model("distilbert")
    spu_kernels.patch(model, "klst", k=3, r=4)
    with torch.no_grad():
        for p in model.distilbert.side.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    batch = make_batch("distilbert")
    want = model(**batch).logits
    path = spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    fresh = spu_kernels.load_adapter(make_model("distilbert"), path)
    torch.testing.assert_close(fresh(**batch).logits, want)


@pytest.mark.parametrize("init", ["prune", "random"])
def test_init_options(init):
    model = make_model("gpt2")
    spu_kernels.patch(model, "lst", r=4, init=init)
    assert torch.isfinite(model(**make_batch("gpt2")).logits).all()


def test_bad_options():
    with pytest.raises(ValueError, match="k must be an odd int"):
        spu_kernels.patch(make_model("bert"), "klst", k=2)
    with pytest.raises(ValueError, match="k must be an odd int"):
        spu_kernels.patch(make_model("bert"), "klst", k=0)
    with pytest.raises(ValueError, match="r must be a positive int dividing"):
        spu_kernels.patch(make_model("bert"), "lst", r=5)
    with pytest.raises(ValueError, match="multiple of the head count"):
        spu_kernels.patch(make_model("bert"), "lst", r=16)
    with pytest.raises(ValueError, match="layers must be"):
        spu_kernels.patch(make_model("bert"), "lst", r=4, layers=[0, 3])
    with pytest.raises(ValueError, match="init must be"):
        spu_kernels.patch(make_model("bert"), "lst", r=4, init="magnitude")
    with pytest.raises(TypeError, match="unknown option"):
        spu_kernels.patch(make_model("bert"), "klst", rank=4)
    model = make_model("bert")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError):
        spu_kernels.patch(model, "klst", k=4)
    assert {n: type(m) for n, m in model.named_modules()} == before and not spu_kernels.is_patched(model)


def test_no_kv_cache():
    model = make_model("llama")
    spu_kernels.patch(model, "lst", r=4)
    from transformers import DynamicCache
    with pytest.raises(NotImplementedError, match="no KV cache"):
        model(input_ids=torch.randint(2, 90, (1, 4)), past_key_values=DynamicCache(config=model.config))
