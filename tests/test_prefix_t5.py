"""Prefix tuning on T5 (patch(model, "prefix")): the encoder self-, decoder self- and decoder
cross-attention against softmax(q [P_k; K]^T + bias + mask) [P_v; V] written by hand (the relative
position bias places the prefix at positions 0..p-1, before the tokens), attentions="decoder_self"
against PEFT's own T5 prefix tuning, training, unpatch, generate() cached == uncached (save / load: the
per-family round trip in test_prefix.py)."""
import copy

import pytest
import torch
import transformers as tf
from models import VOCAB, make_batch, make_model, model_output

import spu_kernels
from spu_kernels.modules.prefix import PrefixAttention

P = 3


def _lm():
    """The tiny T5 with sharper logits (generate picks different tokens)."""
    torch.manual_seed(0)
    cfg = copy.deepcopy(make_model("t5").config)
    cfg.initializer_factor = 2.0
    return tf.T5ForConditionalGeneration(cfg).eval()


def _heads(t, n):                       # (B, S, n*D) -> (B, n, S, D)
    return t.view(*t.shape[:2], n, -1).transpose(1, 2)


def _bias(first, q_len, k_len, bidirectional):
    """T5's relative position bias with the p prefix keys at positions 0..p-1 and the tokens after
    them: query i is at p + i, key j at j (the prefix, j < p) or j (token j - p)."""
    rel = torch.arange(k_len)[None, :] - (torch.arange(q_len)[:, None] + P)
    bucket = first._relative_position_bucket(rel, bidirectional=bidirectional,
                                             num_buckets=first.relative_attention_num_buckets,
                                             max_distance=first.relative_attention_max_distance)
    return first.relative_attention_bias(bucket).permute(2, 0, 1)[None]


def _reference(model, name, wrapper, h, kv, enc_mask):
    """The wrapped T5Attention's output computed by hand with the prefix in front of the keys / values."""
    a = wrapper.base_layer
    b, s, _ = h.shape
    n = a.n_heads
    pk, pv = (t.permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1) for t in wrapper.prefix())
    src = h if kv is None else kv
    q, k, v = _heads(a.q(h), n), _heads(a.k(src), n), _heads(a.v(src), n)
    keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    scores = q @ keys.transpose(-1, -2)                     # T5 does not scale
    t = keys.shape[2]
    if name.startswith("encoder"):
        scores = scores + _bias(model.encoder.block[0].layer[0].SelfAttention.base_layer, s, t, True)
        visible = enc_mask[:, None, None, :].bool().expand(b, 1, s, s)
    elif name.endswith("SelfAttention"):
        first = model.decoder.block[0].layer[0].SelfAttention
        scores = scores + _bias(getattr(first, "base_layer", first), s, t, False)
        visible = torch.ones(s, s, dtype=torch.bool).tril().expand(b, 1, s, s)
    else:                                                   # cross-attention: no position bias
        visible = enc_mask[:, None, None, :].bool().expand(b, 1, s, kv.shape[1])
    visible = torch.cat([torch.ones(b, 1, s, P, dtype=torch.bool), visible], -1)
    out = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values).transpose(1, 2).reshape(b, s, -1)
    return a.o(out)


@pytest.mark.parametrize("attentions, reparam", [("all", False), ("all", True), ("decoder_self", False)])
def test_attentions_equal_hand_written_prefix_attention(attentions, reparam):
    model = make_model("t5")
    batch = make_batch("t5")
    want_names = [n for n, m in model.named_modules() if type(m).__name__ == "T5Attention"]
    if attentions == "decoder_self":
        want_names = [n for n in want_names if n.startswith("decoder") and n.endswith("SelfAttention")]
    spu_kernels.patch(model, "prefix", n_tokens=P, init_std=1.0, reparam=reparam, reparam_hidden=7,
                      attentions=attentions)
    names = {n: m for n, m in model.named_modules() if isinstance(m, PrefixAttention)}
    assert sorted(names) == sorted(want_names)
    assert len(names) == (6 if attentions == "all" else 2)
    seen = []
    handles = [w.register_forward_hook(lambda mod, args, kwargs, out, n=n: seen.append(
        (n, mod, args[0] if args else kwargs["hidden_states"], kwargs.get("key_value_states"), out[0])),
        with_kwargs=True) for n, w in names.items()]
    with torch.no_grad():
        model(**batch)
        for name, mod, h, kv, got in seen:
            want = _reference(model, name, mod, h, kv, batch["attention_mask"])
            keep = batch["attention_mask"].bool() if name.startswith("encoder") else slice(None)
            torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-4)
    for hd in handles:
        hd.remove()
    assert len(seen) == len(names)


def test_decoder_self_equals_peft_prefix_tuning():
    """attentions='decoder_self' with PEFT's effective prefixes gives PEFT's T5 logits."""
    peft = pytest.importorskip("peft")
    batch = make_batch("t5")
    pm = peft.get_peft_model(make_model("t5"), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 1.0)
        want = pm(**batch).logits
        cache = pm.get_prompt(batch_size=1)
    model = spu_kernels.patch(make_model("t5"), "prefix", n_tokens=P, attentions="decoder_self")
    wrappers = [model.decoder.block[i].layer[0].SelfAttention for i in range(2)]
    with torch.no_grad():
        for i, w in enumerate(wrappers):
            layer = cache.self_attention_cache.layers[i]
            w.prefix_key.copy_(layer.keys[0].permute(1, 0, 2))
            w.prefix_value.copy_(layer.values[0].permute(1, 0, 2))
        got = model_output(model, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attentions", ["all", "decoder_self"])
@torch.no_grad()        # T5's sdpa path differs in the last bit with and without parameters that need grad
def test_trains_only_the_prefix_and_unpatches_exactly(attentions):
    model = make_model("t5")
    batch = make_batch("t5")
    before = model_output(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spu_kernels.patch(model, "prefix", n_tokens=P, init_std=0.5, attentions=attentions)
    out = model_output(model, batch)
    assert torch.isfinite(out).all() and not torch.allclose(out, before)   # step 0 differs
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith(("prefix_key", "prefix_value")) for n in trained)
    with spu_kernels.disable_adapter(model):
        assert torch.equal(model_output(model, batch), before)
    spu_kernels.unpatch(model)
    assert not any(isinstance(m, PrefixAttention) for m in model.modules())
    assert torch.equal(model_output(model, batch), before)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_loss_falls():
    model = make_model("t5")
    batch = make_batch("t5")
    spu_kernels.patch(model, "prefix", n_tokens=P)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(6):
        loss = model(**batch, labels=batch["decoder_input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in opt.param_groups[0]["params"])
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_generate_cached_equals_uncached():
    """The cached run reuses the cross-attention cache, which holds [P; K_enc], from its second step."""
    lm = _lm()
    spu_kernels.patch(lm, "prefix", n_tokens=P, init_std=1.0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB - 1, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0                 # padding in the encoder input
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    cached, uncached = lm.generate(ids, **kw), lm.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences) and cached.sequences.shape == (3, 6)
    assert len(set(cached.sequences[:, 1:].flatten().tolist())) > 1       # not one token over and over
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=1e-4)
    with torch.no_grad():       # each step's logits are what a plain forward of the patched model gives
        full = lm(input_ids=ids, attention_mask=mask, decoder_input_ids=cached.sequences[:, :-1]).logits
    torch.testing.assert_close(torch.stack(cached.logits, 1), full, atol=1e-4, rtol=1e-4)


def test_init_from_real_tokens():
    """init_token_ids: encoder / decoder self-attention prefixes are the keys / values of the tokens,
    cross-attention prefixes those of the encoder's output for them."""
    model = make_model("t5")
    ids = torch.tensor([5, 17, 42])
    want = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: want.__setitem__(n, out))
             for n, m in model.named_modules() if n.endswith((".SelfAttention.v", ".EncDecAttention.v"))]
    with torch.no_grad():
        cyc = ids[[0, 1, 2, 0]][None]
        model(input_ids=cyc, decoder_input_ids=cyc, use_cache=False)
    for hd in hooks:
        hd.remove()
    spu_kernels.patch(model, "prefix", n_tokens=4, init_token_ids=ids.tolist())
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, PrefixAttention)}
    assert len(wrappers) == len(want) == 6
    for n, w in wrappers.items():
        torch.testing.assert_close(w.prefix_value, want[f"{n}.v"][0].view(w.prefix_value.shape),
                                   atol=0, rtol=0)


def test_bad_attentions_option():
    with pytest.raises(ValueError, match="attentions must be one of"):
        spu_kernels.patch(make_model("t5"), "prefix", attentions="cross")
    model = make_model("bert")
    with pytest.raises(ValueError, match="is for encoder-decoder models"):
        spu_kernels.patch(model, "prefix", attentions="decoder_self")
    assert not spu_kernels.is_patched(model)
