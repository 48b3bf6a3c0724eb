"""Prefix tuning (patch(model, "prefix")): each self-attention against softmax(q [P_k; K]^T) [P_v; V]
written by hand, every family's shapes, training, unpatch, save / load, generate() cached ==
uncached, and the refusals (merge, unsupported families, bad options). T5: tests/test_prefix_t5.py."""
import copy
import math

import pytest
import torch
import transformers as tf
from models import VOCAB, make_batch, make_model, model_output

import spu_kernels
from spu_kernels.modules.prefix import PrefixAttention

P = 3
SUPPORTED = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2")


def _lm(family):
    """A tiny causal LM (GPT-2 with its LM head) with sharp logits."""
    torch.manual_seed(0)
    cfg = copy.deepcopy(make_model(family).config)
    cfg.initializer_range, cfg.pad_token_id = 0.3, 0
    if family == "gpt2":
        return tf.GPT2LMHeadModel(cfg).eval()
    cfg.eos_token_id = None
    return type(make_model(family))(cfg).eval()


def _heads(t, n):                       # (B, S, n*D) -> (B, n, S, D)
    return t.view(*t.shape[:2], n, -1).transpose(1, 2)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


def _reference(family, wrapper, h, mask, pos_emb):
    """The wrapped attention's output computed by hand with the prefix in front of the keys / values."""
    a = wrapper.base_layer
    b, s, _ = h.shape
    pk, pv = wrapper.prefix()
    pk = pk.permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)
    pv = pv.permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)
    if family == "bert":
        n = a.num_attention_heads
        q, k, v = _heads(a.query(h), n), _heads(a.key(h), n), _heads(a.value(h), n)
        causal = False
    elif family == "distilbert":
        n = a.n_heads
        q, k, v = _heads(a.q_lin(h), n), _heads(a.k_lin(h), n), _heads(a.v_lin(h), n)
        causal = False
    elif family == "gpt2":
        n = a.num_heads
        q, k, v = (_heads(t, n) for t in a.c_attn(h).split(a.embed_dim, dim=2))
        causal = True
    else:
        cfg = a.config
        q, k, v = _heads(a.q_proj(h), cfg.num_attention_heads), _heads(a.k_proj(h), cfg.num_key_value_heads), \
            _heads(a.v_proj(h), cfg.num_key_value_heads)
        q, k = _rope(q, *pos_emb), _rope(k, *pos_emb)
        causal = True
    keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    rep = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    visible = mask[:, None, None, :].bool().expand(b, 1, s, s)
    if causal:
        visible = visible & torch.ones(s, s, dtype=torch.bool).tril()
    visible = torch.cat([torch.ones(b, 1, s, P, dtype=torch.bool), visible], -1)
    out = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values).transpose(1, 2).reshape(b, s, -1)
    if family == "gpt2":
        return a.c_proj(out)
    if family in ("llama",):
        return a.o_proj(out)
    if family == "distilbert":
        return a.out_lin(out)
    return out


@pytest.mark.parametrize("family, padding, reparam", [(f, pad, False) for f in ("bert", "gpt2", "llama")
                                                     for pad in (True, False)]
                         + [("llama", True, True), ("distilbert", True, False), ("distilbert", False, True)])
def test_attention_equals_hand_written_prefix_attention(family, padding, reparam):
    model = _lm(family) if family == "gpt2" else make_model(family)
    batch = make_batch(family)
    if not padding:     # an all-ones mask: sdpa may get no mask at all (is_causal), the prefix needs one
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    spu_kernels.patch(model, "prefix", n_tokens=P, init_std=1.0, reparam=reparam, reparam_hidden=7)
    wrappers = [m for m in model.modules() if isinstance(m, PrefixAttention)]
    assert len(wrappers) == model.config.num_hidden_layers
    seen = []

    def hook(mod, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        seen.append((mod, h, kwargs.get("position_embeddings"), out[0]))
    handles = [w.register_forward_hook(hook, with_kwargs=True) for w in wrappers]
    with torch.no_grad():
        model(**batch)
        for mod, h, pos_emb, got in seen:
            if pos_emb is not None:     # RoPE positions do not shift for the prefix: 0..S-1
                want_cos, _ = model.model.rotary_emb(h, position_ids=torch.arange(h.shape[1])[None])
                torch.testing.assert_close(pos_emb[0].expand_as(want_cos.expand(h.shape[0], -1, -1)),
                                           want_cos.expand(h.shape[0], -1, -1))
            want = _reference(family, mod, h, batch["attention_mask"], pos_emb)
            keep = batch["attention_mask"].bool()     # padded query rows are unspecified
            torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-4)
    for hd in handles:
        hd.remove()
    assert len(seen) == len(wrappers)


@pytest.mark.parametrize("family", SUPPORTED)
def test_every_family_runs_trains_only_the_prefix_and_unpatches_exactly(family):
    model = make_model(family)
    batch = make_batch(family)
    before = model_output(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spu_kernels.patch(model, "prefix", n_tokens=P, init_std=0.5)
    out = model_output(model, batch)
    assert out.shape == before.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, before)          # step 0 differs: the queries attend to the prefix
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith(("prefix_key", "prefix_value"))
                           or n.startswith(("classifier", "pre_classifier", "score"))
                           for n in trained)
    with spu_kernels.disable_adapter(model):
        assert torch.equal(model_output(model, batch), before)
    spu_kernels.unpatch(model)
    assert not any(isinstance(m, PrefixAttention) for m in model.modules())
    assert torch.equal(model_output(model, batch), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and state.keys() == \
        model.state_dict().keys()


@pytest.mark.parametrize("family", ["bert", "distilbert", "llama"])
def test_loss_falls(family):
    model = make_model(family)       # eval: no dropout noise in a few steps
    batch = make_batch(family)
    labels = batch["input_ids"] if family == "llama" else torch.tensor([0, 1])
    spu_kernels.patch(model, "prefix", n_tokens=P, train_head=False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in opt.param_groups[0]["params"])
    assert all(b < a for a, b in zip(losses, losses[1:])), losses     # eval mode: deterministic steps


@pytest.mark.parametrize("padding", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_cached_equals_uncached(family, padding):
    lm = _lm(family)
    spu_kernels.patch(lm, "prefix", n_tokens=P, init_std=1.0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB - 1, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                 # left padding
    if not padding:
        mask.fill_(1)
    ids = ids.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    cached, uncached = lm.generate(ids, **kw), lm.generate(ids, use_cache=False, **kw)
    chunked = lm.generate(ids, prefill_chunk_size=4, **kw)     # prefill in chunks: causal mask offset by the cache
    assert torch.equal(cached.sequences, uncached.sequences) and cached.sequences.shape == (3, 11)
    assert torch.equal(chunked.sequences, cached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=1e-4)
    # and the first new token is what a plain forward of the patched model predicts
    with torch.no_grad():
        first = lm(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    torch.testing.assert_close(cached.logits[0], first, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family, reparam", [("bert", False), ("bert", True), ("distilbert", False), ("t5", False),
                                            ("t5", True)])
def test_save_load_round_trips_bit_identical_without_peft_files(tmp_path, family, reparam):
    base = tmp_path / "base"
    make_model(family).save_pretrained(base)
    load = lambda: type(make_model(family)).from_pretrained(base).eval()     # noqa: E731
    batch = make_batch(family)
    model = spu_kernels.patch(load(), "prefix", n_tokens=P, seed=3, reparam=reparam, reparam_hidden=5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    want = model_output(model, batch)
    fresh = load()
    spu_kernels.load_adapter(fresh, spu_kernels.save_adapter(model, tmp_path / "a.safetensors"))
    assert torch.equal(model_output(fresh, batch), want)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    got = spu_kernels.from_pretrained(folder)
    assert torch.equal(model_output(got, batch), want)
    assert spu_kernels.peft_adapter_files(model) is None
    assert not (folder / "adapter_config.json").exists()


def test_merge_refuses_and_model_is_unchanged():
    model = make_model("gpt2")
    batch = make_batch("gpt2")
    spu_kernels.patch(model, "prefix", n_tokens=P)
    want = model_output(model, batch)
    with pytest.raises(RuntimeError, match="cannot be folded into weights"):
        spu_kernels.merge(model)
    assert torch.equal(model_output(model, batch), want)


def test_unsupported_family_raises_before_changing_anything():
    torch.manual_seed(0)
    model = tf.AlbertForSequenceClassification(tf.AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64)).eval()
    with pytest.raises(ValueError, match="AlbertForSequenceClassification has none: use 'prompt' or 'lora'"):
        spu_kernels.patch(model, "prefix")
    assert not spu_kernels.is_patched(model) and not any(p.requires_grad is False for p in model.parameters())


@pytest.mark.parametrize("bad, match", [(dict(n_tokens=0), "n_tokens must be a positive int"),
                                        (dict(init_std=-1.0), "init_std must be a positive number"),
                                        (dict(reparam=True, reparam_hidden=0), "reparam_hidden must be a positive"),
                                        (dict(adapter_dtype="int8"), "adapter_dtype")])
def test_bad_options(bad, match):
    model = make_model("bert")
    with pytest.raises(ValueError, match=match):
        spu_kernels.patch(model, "prefix", **bad)
    assert not spu_kernels.is_patched(model)


def test_describe():
    text = spu_kernels.describe_method("prefix")
    assert "n_tokens" in text and "prefix" in text


def test_chunked_attention_without_a_mask_equals_one_pass():
    """A causal attention given no mask (sdpa's is_causal) and a cache already holding tokens."""
    model = make_model("llama")
    spu_kernels.patch(model, "prefix", n_tokens=P, init_std=1.0)
    wrapper = model.model.layers[0].self_attn
    h = torch.randn(2, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = model.model.rotary_emb(h, position_ids=torch.arange(6)[None])
    with torch.no_grad():
        whole = wrapper(h, position_embeddings=(cos, sin), attention_mask=None, past_key_values=None)[0]
        cache = tf.DynamicCache()
        parts = [wrapper(h[:, a:b], position_embeddings=(cos[:, a:b], sin[:, a:b]), attention_mask=None,
                         past_key_values=cache)[0] for a, b in ((0, 4), (4, 6))]
    assert cache.get_seq_length() == 6          # the cache holds the tokens, never the prefix
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama"])
def test_init_from_real_tokens(family):
    """init_token_ids: each layer's prefix is the keys / values the frozen model computes for the tokens."""
    model = make_model(family)
    ids = torch.tensor([5, 17, 42])
    want = []
    hooks = [m.register_forward_hook(lambda mod, a, out: want.append(out))
             for n, m in model.named_modules() if n.endswith(("attention.self.value", "self_attn.v_proj",
                                                              "attn.c_attn", "attention.v_lin"))]
    with torch.no_grad():
        getattr(model, model.base_model_prefix)(input_ids=ids[[0, 1, 2, 0, 1]][None], use_cache=False)  # cycled
    for hd in hooks:
        hd.remove()
    spu_kernels.patch(model, "prefix", n_tokens=5, init_token_ids=ids.tolist())
    wrappers = [m for m in model.modules() if isinstance(m, PrefixAttention)]
    assert len(wrappers) == len(want)
    for w, out in zip(wrappers, want):
        v = out[..., -out.shape[-1] // 3:] if family == "gpt2" else out      # c_attn: [q | k | v]
        torch.testing.assert_close(w.prefix_value, v[0].view(w.prefix_value.shape), atol=0, rtol=0)
    with pytest.raises(ValueError, match="init_token_ids must be token ids"):
        spu_kernels.patch(make_model(family), "prefix", init_token_ids=[VOCAB])


def test_named_adapters_switch_exactly_and_merge_adapter_refuses():
    model = make_model("llama")
    batch = make_batch("llama")
    spu_kernels.add_adapter(model, "a", "prefix", n_tokens=2, init_std=0.5)
    spu_kernels.add_adapter(model, "b", "prefix", n_tokens=3, init_std=0.5, seed=1)
    out_a = model_output(model, batch)
    spu_kernels.set_adapter(model, "b")
    out_b = model_output(model, batch)
    spu_kernels.set_adapter(model, "a")
    assert torch.equal(model_output(model, batch), out_a) and not torch.allclose(out_a, out_b)
    with pytest.raises(RuntimeError, match="cannot be folded into weights"):
        spu_kernels.merge_adapter(model)


def test_reparam_mlp_gives_every_layer_its_prefix_and_trains_once(tmp_path):
    """reparam=True: layer l's prefix is rows l of tanh(E W1^T + b1) W2^T + b2, the MLP is trained and
    saved once, and save / load, unpatch and generate behave as with plain prefixes."""
    model = _lm("llama")
    spu_kernels.patch(model, "prefix", n_tokens=P, reparam=True, reparam_hidden=7)
    wrappers = [m for m in model.modules() if isinstance(m, PrefixAttention)]
    enc = wrappers[0].encoder
    assert all(w.encoder is enc for w in wrappers)
    cfg = model.config
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    full = torch.tanh(enc.embedding @ enc.w1.T + enc.b1) @ enc.w2.T + enc.b2          # (p, L * 2 * kv * hd)
    full = full.view(P, len(wrappers), 2, kv, hd)
    for i, w in enumerate(wrappers):
        k, v = w.prefix()
        assert torch.equal(k, full[:, i, 0]) and torch.equal(v, full[:, i, 1])
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trained) == sorted(f"model.layers.0.self_attn.encoder.{n}" for n in ("embedding", "w1", "b1",
                                                                                    "w2", "b2"))
    ids = torch.randint(3, VOCAB - 1, (2, 5), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
        want = model(ids).logits
    fresh = _lm("llama")
    spu_kernels.load_adapter(fresh, spu_kernels.save_adapter(model, tmp_path / "a.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
    with pytest.raises(ValueError, match="cannot initialise the reparameterisation"):
        spu_kernels.patch(_lm("llama"), "prefix", reparam=True, init_token_ids=[3])
    before = _lm("llama")
    spu_kernels.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before(ids).logits)


def test_fold_prefix_gives_plain_prefixes_with_the_same_outputs(tmp_path):
    """fold_prefix: every layer's prefix_key / prefix_value is its MLP output, the MLP is gone, the outputs are
    bit for bit the same, and save / load and save_pretrained -> from_pretrained read the plain prefixes."""
    base = tmp_path / "base"
    make_model("bert").save_pretrained(base)
    load = lambda: tf.BertForSequenceClassification.from_pretrained(base).eval()     # noqa: E731
    batch = make_batch("bert")
    model = spu_kernels.patch(load(), "prefix", n_tokens=P, reparam=True, reparam_hidden=5)
    with pytest.raises(ValueError, match="reparam=False; it folds the MLP"):
        spu_kernels.fold_prefix(spu_kernels.patch(load(), "prefix", n_tokens=P))
    wrappers = [m for m in model.modules() if isinstance(m, PrefixAttention)]
    with torch.no_grad():
        for p in wrappers[0].encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
        mlp = [tuple(t.clone() for t in w.prefix()) for w in wrappers]
        want = model_output(model, batch)
    spu_kernels.fold_prefix(model)
    assert all(w.encoder is None for w in wrappers)
    assert not any("self.encoder." in n for n, _ in model.named_parameters())
    for w, (k, v) in zip(wrappers, mlp):
        assert torch.equal(w.prefix_key, k) and torch.equal(w.prefix_value, v) and w.prefix_key.requires_grad
    with torch.no_grad():
        assert torch.equal(model_output(model, batch), want)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad and "prefix" in n)
    assert len(trained) == 2 * len(wrappers)
    assert spu_kernels.summary(model).trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    fresh = spu_kernels.patch(load(), "prefix", n_tokens=P)
    spu_kernels.load_adapter(fresh, spu_kernels.save_adapter(model, tmp_path / "a.safetensors"))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(model_output(fresh, batch), want)
        assert torch.equal(model_output(spu_kernels.from_pretrained(folder), batch), want)
    with pytest.raises(ValueError, match="there is none to fold"):
        spu_kernels.fold_prefix(model)
    spu_kernels.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model_output(model, batch), model_output(load(), batch))
