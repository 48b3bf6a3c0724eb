"""The patch methods that only choose what trains: last_n and bitfit, on every family."""
import pytest
import torch
from models import FAMILY_MODELS, make_batch, make_model

import spu_kernels
from spu_kernels.patching.architectures import HEAD_NAMES

# name of the last / first block's parameters, per family
LAYER_PREFIX = {"bert": "bert.encoder.layer.", "roberta": "roberta.encoder.layer.",
                "distilbert": "distilbert.transformer.layer.", "gpt2": "transformer.h.",
                "t5": ("encoder.block.", "decoder.block."),
                "llama": "model.layers.", "mistral": "model.layers.", "qwen2": "model.layers."}


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _is_head(name):
    return name.split(".")[0] in HEAD_NAMES


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_last_n_trains_the_last_layers_and_unpatch_restores(family):
    model = make_model(family)
    if family == "bert":      # a flag that is not the default must come back too
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    spu_kernels.patch(model, "last_n", n=1)
    names = _trainable(model)
    prefixes = LAYER_PREFIX[family] if isinstance(LAYER_PREFIX[family], tuple) else (LAYER_PREFIX[family],)
    for pre in prefixes:
        assert any(n.startswith(pre + "1.") for n in names), f"{pre}1 should train"
        assert not any(n.startswith(pre + "0.") for n in names), f"{pre}0 should be frozen"
    assert not any("embed" in n or "wte" in n or "shared" in n for n in names)
    top = {"bert": "pooler", "gpt2": "ln_f", "llama": "model.norm", "t5": "final_layer_norm"}
    if family in top:
        assert any(top[family] in n for n in names)
    assert all(any(n.startswith(p) for p in prefixes) or _is_head(n) or "pooler" in n or "norm" in n
               or "ln_f" in n for n in names)
    assert spu_kernels.summary(model).replaced == []
    assert spu_kernels.summary(model).trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # it trains: a backward step reaches the last layer only
    out = model(**make_batch(family)).logits.float().sum()
    out.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)
    spu_kernels.unpatch(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_last_n_zero_and_errors():
    model = make_model("bert")
    spu_kernels.patch(model, "last_n", n=0)
    assert _trainable(model) and all(_is_head(n) for n in _trainable(model))     # a linear probe
    spu_kernels.unpatch(model)
    with pytest.raises(ValueError, match="n=5 but bert.encoder.layer has 2 layers"):
        spu_kernels.patch(model, "last_n", n=5)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        spu_kernels.patch(model, "last_n", n=-1)
    assert not spu_kernels.is_patched(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_bitfit_trains_biases_and_unpatch_restores(family):
    model = make_model(family)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    has_bias = any(n.endswith(".bias") for n, _ in model.named_parameters())
    if not has_bias:
        with pytest.raises(ValueError, match="has no bias parameters"):
            spu_kernels.patch(model, "bitfit")
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before
        return
    spu_kernels.patch(model, "bitfit")
    names = _trainable(model)
    assert names and all(n.endswith(".bias") or _is_head(n) for n in names)
    assert {n for n, _ in model.named_parameters() if n.endswith(".bias")} <= names
    spu_kernels.merge(model)                     # nothing replaced: merge only restores the flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_freeze_methods_save_and_load(tmp_path):
    model = make_model("bert")
    spu_kernels.patch(model, "last_n", n=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    fresh = make_model("bert")
    spu_kernels.load_adapter(fresh, tmp_path / "a.safetensors")
    batch = make_batch("bert")
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)
    assert spu_kernels.summary(fresh).method == "last_n"
