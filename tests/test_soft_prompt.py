"""Soft prompts on every family: shapes and output types unchanged, only the prompt trains, the
prompt acts only through attention, combination with other methods, unpatch, save/load."""
import pytest
import torch
import transformers as tf
from models import FAMILY_MODELS, make_batch, make_model, model_output

import spu_kernels

FAMILIES = list(FAMILY_MODELS)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_patch_unpatch(family):
    model = make_model(family)
    batch = make_batch(family)
    before = model_output(model, batch)
    spu_kernels.patch(model, "prompt", n_tokens=5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith("soft_prompt") for n in trainable)
    assert all(n.endswith("soft_prompt") or n.split(".")[0] in ("classifier", "pre_classifier", "score")
               for n in trainable), trainable
    out = model(**batch)
    assert out.logits.shape == before.shape     # prompt positions are not in the output
    assert not torch.allclose(out.logits, before)
    out.logits.float().square().mean().backward()
    for n, p in model.named_parameters():
        if n.endswith("soft_prompt"):
            assert p.grad is not None and p.grad.abs().sum() > 0
        elif not p.requires_grad:
            assert p.grad is None
    spu_kernels.unpatch(model)
    assert torch.equal(model_output(model, batch), before)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prompt_acts_only_through_attention(family):
    """Rotary positions are relative: with the prompt masked out of the attention, the real tokens'
    outputs are the original model's."""
    model = make_model(family)
    batch = make_batch(family)
    before = model_output(model, batch)
    spu_kernels.patch(model, "prompt", n_tokens=4, init="random")
    wrapper = model.model
    orig_forward = wrapper.backbone.forward

    def masked(*args, attention_mask=None, **kw):
        attention_mask = attention_mask.clone()
        attention_mask[:, :4] = 0
        return orig_forward(*args, attention_mask=attention_mask, **kw)
    wrapper.backbone.forward = masked
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(model_output(model, batch)[real], before[real], rtol=1e-4, atol=1e-5)


def test_bert_pooler_reads_the_real_cls_and_positions_are_checked():
    model = make_model("bert")   # max_position_embeddings 64
    spu_kernels.patch(model, "prompt", n_tokens=60)
    with pytest.raises(ValueError, match="exceed the model's 64 positions"):
        model(**make_batch("bert", seq=9))
    spu_kernels.unpatch(model)
    spu_kernels.patch(model, "prompt", n_tokens=3)
    hidden = model.bert(**make_batch("bert"))
    torch.testing.assert_close(hidden.pooler_output, model.bert.backbone.pooler(hidden.last_hidden_state))


def test_causal_lm_labels_line_up():
    model = make_model("gpt2")
    lm = tf.GPT2LMHeadModel(model.config).eval()
    batch = make_batch("gpt2")
    spu_kernels.patch(lm, "prompt", n_tokens=3)
    out = lm(**batch, labels=batch["input_ids"])
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)


def test_soft_prompt_beside_another_method(tmp_path):
    model = make_model("bert")
    batch = make_batch("bert")
    before = model_output(model, batch)
    spu_kernels.patch(model, "lora", r=2, soft_prompt={"n_tokens": 4, "init": "random"})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any(n.endswith("soft_prompt") for n in names)
    assert "bert" in spu_kernels.summary(model).replaced
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("classifier"):   # the head keeps what it learns
                p.add_(0.01 * torch.randn_like(p))
    want = model_output(model, batch)
    path = spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    fresh = make_model("bert")
    spu_kernels.load_adapter(fresh, path)
    torch.testing.assert_close(model_output(fresh, batch), want)
    with pytest.raises(RuntimeError, match="cannot be folded"):
        spu_kernels.merge(model)
    spu_kernels.unpatch(model)
    assert torch.equal(model_output(model, batch), before)


@pytest.mark.parametrize("bad, match", [
    (dict(n_tokens=0), "n_tokens must be a positive int"),
    (dict(init="zeros"), "init must be one of vocab, random"),
    (dict(init_token_ids=[10**6]), "init_token_ids must be token ids"),
])
def test_bad_prompt_options(bad, match):
    model = make_model("bert")
    with pytest.raises((ValueError, TypeError), match=match):
        spu_kernels.patch(model, "prompt", **bad)
    assert not spu_kernels.is_patched(model)


def test_bad_soft_prompt_option():
    model = make_model("bert")
    with pytest.raises(TypeError, match="soft_prompt: unknown option 'tokens'"):
        spu_kernels.patch(model, "lora", soft_prompt={"tokens": 3})
    with pytest.raises(ValueError, match="is the soft prompt already"):
        spu_kernels.patch(model, "prompt", soft_prompt=3)
    with pytest.raises(ValueError, match="cannot be combined"):
        spu_kernels.patch(model, "lst", r=4, soft_prompt=3)
    assert not spu_kernels.is_patched(model)
