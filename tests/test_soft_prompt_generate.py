"""generate() through a soft prompt: cached == uncached == a greedy reference run by hand on
[prompt embeddings; tokens] (the wrapper bypassed), with left padding; the output is input_ids +
new tokens (no virtual tokens)."""
import copy

import pytest
import torch
import transformers as tf
from models import VOCAB, make_model
from transformers.modeling_outputs import BaseModelOutput

import spu_kernels

P, NEW = 4, 6


def _decoder_lm(family: str) -> tf.PreTrainedModel:
    """A tiny causal LM with sharp (large-init) logits, so a wrong position or mask changes them."""
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = copy.deepcopy(make_model("gpt2").config)
        cfg.initializer_range = 0.3
        lm = tf.GPT2LMHeadModel(cfg)
    else:
        cfg = copy.deepcopy(make_model(family).config)
        cfg.initializer_range, cfg.pad_token_id, cfg.eos_token_id = 0.3, 0, None
        lm = type(make_model(family))(cfg)
    return lm.eval()


def _inputs(batch=3, seq=7, seed=2):
    """Token ids with left padding (row 1: 3 pads, row 2: 1 pad)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 1, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2 % batch, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _generate(lm, ids, mask, **kw):
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def _reference(wrapper, head, ids, mask):
    """Greedy decoding by hand: the backbone on [prompt; tokens] via inputs_embeds, full sequence each step."""
    prompt = wrapper.soft_prompt.detach().unsqueeze(0).expand(ids.shape[0], -1, -1)
    logits = []
    with torch.no_grad():
        for _ in range(NEW):
            full_mask = torch.cat([torch.ones_like(mask[:, :P]), mask], 1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            embeds = torch.cat([prompt, wrapper.backbone.get_input_embeddings()(ids)], 1)
            hidden = wrapper.backbone(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions,
                                      use_cache=False).last_hidden_state
            step = head(hidden[:, -1])
            logits.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids, torch.stack(logits, 1)


@pytest.mark.parametrize("family,method", [("gpt2", "prompt"), ("llama", "prompt"), ("qwen2", "lora")])
def test_generate_matches_reference(family, method):
    lm = _decoder_lm(family)
    ids, mask = _inputs()
    plain, plain_logits = _generate(lm, ids, mask)
    if method == "prompt":
        spu_kernels.patch(lm, "prompt", n_tokens=P, init="random")
    else:
        spu_kernels.patch(lm, "lora", r=2, soft_prompt={"n_tokens": P, "init": "random"})
    wrapper = lm.get_submodule(lm.base_model_prefix)
    cached, cached_logits = _generate(lm, ids, mask)
    uncached, uncached_logits = _generate(lm, ids, mask, use_cache=False)
    chunked, _ = _generate(lm, ids, mask, prefill_chunk_size=3)
    ref, ref_logits = _reference(wrapper, lm.lm_head, ids, mask)

    assert cached.shape == (3, ids.shape[1] + NEW) and torch.equal(cached[:, :ids.shape[1]], ids)
    assert torch.equal(cached, ref) and torch.equal(uncached, ref) and torch.equal(chunked, ref)
    torch.testing.assert_close(cached_logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(uncached_logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain_logits, ref_logits, atol=1e-2)     # the prompt does change the output


def test_generate_t5_prompt_on_the_encoder():
    model = make_model("t5")
    for p in model.parameters():        # sharper logits than the default init
        p.data.mul_(8)
    ref_model = copy.deepcopy(model)
    ids, mask = _inputs()
    spu_kernels.patch(model, "prompt", n_tokens=P, init="random")
    cached, cached_logits = _generate(model, ids, mask)
    uncached, uncached_logits = _generate(model, ids, mask, use_cache=False)

    prompt = model.encoder.soft_prompt.detach().unsqueeze(0).expand(ids.shape[0], -1, -1)
    with torch.no_grad():
        enc = ref_model.encoder(inputs_embeds=torch.cat([prompt, ref_model.shared(ids)], 1),
                                attention_mask=torch.cat([torch.ones_like(mask[:, :P]), mask], 1))
    ref, ref_logits = _generate(ref_model, None, mask,
                                encoder_outputs=BaseModelOutput(last_hidden_state=enc.last_hidden_state[:, P:]))
    assert torch.equal(cached, ref) and torch.equal(uncached, ref)
    torch.testing.assert_close(cached_logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(uncached_logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_generate_unsupported_caches_fail_clearly():
    lm = _decoder_lm("llama")
    spu_kernels.patch(lm, "prompt", n_tokens=P)
    ids, mask = _inputs()
    with pytest.raises(ValueError, match="4-D mask"):
        lm.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, cache_implementation="static")
    out = lm.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="restarting generate"):
        lm.generate(out.sequences, attention_mask=torch.cat([mask, torch.ones_like(mask[:, :2])], 1),
                    past_key_values=out.past_key_values, max_new_tokens=2, do_sample=False)


def test_generate_past_the_position_table_fails_clearly():
    lm = _decoder_lm("gpt2")        # 64 positions
    spu_kernels.patch(lm, "prompt", n_tokens=P)
    ids = torch.randint(3, VOCAB - 1, (1, 56))
    with pytest.raises(ValueError, match="exceed the model's 64 positions"):
        lm.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)


def test_generate_from_inputs_embeds_and_with_beam_search():
    lm = _decoder_lm("llama")
    spu_kernels.patch(lm, "prompt", n_tokens=P, init="random")
    ids, mask = _inputs()
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    from_ids = lm.generate(ids, **kw)
    from_embeds = lm.generate(inputs_embeds=lm.get_input_embeddings()(ids), **kw)   # returns the new tokens only
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])
    assert torch.equal(lm.generate(ids, num_beams=3, **kw), lm.generate(ids, num_beams=3, use_cache=False, **kw))
