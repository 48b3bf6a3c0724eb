"""patch(t5, "lst" / "klst"): an encoder side network and a decoder side network that cross-attends to
it (modules/ladder_seq2seq.py), on the tiny T5 of tests/models.py (relu FFN, tied embeddings) and a
gated-gelu v1.1 / Flan-T5-style variant (wi_0 / wi_1, untied LM head). Checks: training with the backbone
frozen and no backbone graph, unpatch, merge refused, save / load, the decoder side reads the encoder
side, the side blocks equal the backbone's blocks at r = 1 (an independent computation: transformers'
own T5 blocks), the pruned init's slices, init="fisher"'s cross-attention scores by hand, relative position
buckets as T5's, generate(use_cache=False), T5ForSequenceClassification."""
import pytest
import torch
import transformers as tf
from models import VOCAB, assert_restored, make_batch, make_model, snapshot

import spu_kernels
from spu_kernels.modules.ladder import RelativePositionBias
from spu_kernels.modules.ladder_seq2seq import LadderDecoder, LadderEncoder
from spu_kernels.patching.ladder_fisher import unit_fisher_scores
from spu_kernels.patching.peft_format import peft_adapter_files

METHODS = [("lst", {}), ("klst", {"k": 3})]


def t5(gated=False):
    if not gated:
        return make_model("t5")
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=3, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)).eval()


def blocks(model):
    return [*model.encoder.base_layer.block, *model.decoder.base_layer.block]


@pytest.mark.parametrize("gated, method, opts", [(False, *METHODS[0]), (False, *METHODS[1]), (True, *METHODS[1])])
def test_trains_frozen_no_graph_unpatch(gated, method, opts):
    model = t5(gated)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = make_batch("t5", batch=4, seq=8, seed=3)
    labels = batch.pop("decoder_input_ids")
    ref, snap = model(**batch, labels=labels).logits, snapshot(model)
    spu_kernels.patch(model, method, r=2, **opts)
    assert isinstance(model.encoder, LadderEncoder) and isinstance(model.decoder, LadderDecoder)
    assert peft_adapter_files(model) is None
    seen = []
    hooks = [b.register_forward_hook(lambda mod, a, out: seen.append((torch.is_grad_enabled(), out[0].requires_grad)))
             for b in blocks(model)]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(8):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        if step == 0:
            for h in hooks:
                h.remove()
            assert len(seen) == len(blocks(model)) and all(g is False and rg is False for g, rg in seen), seen
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert ".side." in n and p.grad is not None, n
                else:
                    assert p.grad is None, n
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    with pytest.raises(RuntimeError, match="cannot be merged"):
        spu_kernels.merge(model)
    assert isinstance(model.encoder, LadderEncoder)             # merge refused before anything changed
    spu_kernels.unpatch(model)
    assert_restored(model, snap)
    assert torch.equal(model(**batch, labels=labels).logits, ref)


def test_decoder_side_reads_the_encoder_side():
    model = t5()
    spu_kernels.patch(model, "klst", k=3, r=2)
    batch = make_batch("t5")
    model(**batch).logits.sum().backward()
    # the encoder side's only way to the output is the decoder side's cross-attention
    enc = [p for p in model.encoder.side.parameters()]
    assert enc and all(p.grad is not None for p in enc) and any(p.grad.abs().sum() > 0 for p in enc)
    with torch.no_grad():
        a = model(**batch).logits
        ids = batch["input_ids"].clone()
        ids[1, 3] = ids[1, 3] % (VOCAB - 3) + 2              # an encoder-only token (row 1 has no padding)
        b = model(**dict(batch, input_ids=ids)).logits
        assert not torch.allclose(a[1], b[1]) and torch.equal(a[0], b[0])
        for blk in model.decoder.side.blocks:                 # no side cross-attention: another output
            blk.xo.weight.zero_()
            blk.xo.bias.zero_()
        c = model(**batch).logits
    assert not torch.allclose(a, c)
    # padded encoder positions do not matter
    ids = batch["input_ids"].clone()
    ids[0, -2:] = 7
    torch.testing.assert_close(model(**dict(batch, input_ids=ids)).logits, c)


@pytest.mark.parametrize("gated", [False, True])
def test_side_blocks_at_r1_are_the_backbone_blocks(gated):
    """r = 1 keeps every unit: side block i is backbone block i (relative bias, unscaled logits, RMS
    norms, FFN; the decoder's self- and cross-attention) computed by transformers' T5 code."""
    model = t5(gated)
    batch = make_batch("t5")
    with torch.no_grad():
        enc = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True)
        dec = model.decoder(input_ids=batch["decoder_input_ids"], encoder_hidden_states=enc.last_hidden_state,
                            encoder_attention_mask=batch["attention_mask"], output_hidden_states=True)
    spu_kernels.patch(model, "lst", r=1)
    es, ds = model.encoder.side, model.decoder.side
    b, s, _ = enc.hidden_states[0].shape
    t = dec.hidden_states[0].shape[1]
    real = batch["attention_mask"].bool()     # a padded query sees itself in the side network: compare the rest
    with torch.no_grad():
        mask, _ = es._mask(batch["attention_mask"], b, s, "cpu")
        h1 = es.blocks[0](enc.hidden_states[0], mask, False)
        torch.testing.assert_close(h1[real], enc.hidden_states[1][real], rtol=1e-5, atol=1e-5)
        out = es.final_norm(es.blocks[1](enc.hidden_states[1], mask, False))     # the last state is final-normed
        torch.testing.assert_close(out[real], enc.hidden_states[2][real], rtol=1e-5, atol=1e-5)
        dmask, _ = ds._mask(None, b, t, "cpu")
        for i, blk in enumerate(ds.blocks):
            got = blk(dec.hidden_states[i], dmask, False, memory=enc.last_hidden_state,
                      memory_mask=batch["attention_mask"])
            if i == len(ds.blocks) - 1:
                got = ds.final_norm(got)
            torch.testing.assert_close(got, dec.hidden_states[i + 1], rtol=1e-5, atol=1e-5)


def test_pruned_init_is_the_backbone_sliced():
    model = t5(gated=True)
    spu_kernels.patch(model, "klst", k=3, r=2)
    es, ds = model.encoder.side, model.decoder.side
    enc_idx = es.down_weight[0].argmax(1)
    assert torch.equal(es.down_weight[0][:, enc_idx], torch.eye(es.d_s)) and es.up is None
    dec_idx = ds.down_weight[0].argmax(1)
    assert torch.equal(ds.up.weight[dec_idx], torch.eye(ds.d_s))
    for side, stack, idx in ((es, model.encoder.base_layer, enc_idx), (ds, model.decoder.base_layer, dec_idx)):
        table = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert torch.equal(side.rel_bias.weight, table)
        assert torch.equal(side.final_norm.weight, stack.final_layer_norm.weight[idx])
        for blk, orig in zip(side.blocks, stack.block):
            att, ff = orig.layer[0].SelfAttention, orig.layer[-1].DenseReluDense
            q = att.q.weight[:, idx]          # which rows (attention columns) were kept: found by value
            hd_idx = torch.tensor([next(r for r in range(q.shape[0]) if torch.equal(q[r], row))
                                   for row in blk.q.weight])
            assert len(set(hd_idx.tolist())) == blk.q.weight.shape[0]
            assert torch.equal(blk.k.weight, att.k.weight[hd_idx][:, idx])
            assert torch.equal(blk.o.weight, att.o.weight[idx][:, hd_idx])
            assert torch.equal(blk.ln1.weight, orig.layer[0].layer_norm.weight[idx])
            ff_idx = torch.tensor([next(u for u in range(ff.wo.weight.shape[1])
                                        if torch.equal(ff.wo.weight[idx, u], col)) for col in blk.fout.weight.t()])
            assert torch.equal(blk.gate.weight, ff.wi_0.weight[ff_idx][:, idx])
            assert torch.equal(blk.fin.weight, ff.wi_1.weight[ff_idx][:, idx])
            assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in (blk.q, blk.o, blk.fin, blk.fout))
            if side is ds:
                x = orig.layer[1].EncDecAttention
                xq = x.q.weight[:, dec_idx]
                xhd = torch.tensor([next(r for r in range(xq.shape[0]) if torch.equal(xq[r], row))
                                    for row in blk.xq.weight])
                assert torch.equal(blk.xk.weight, x.k.weight[xhd][:, enc_idx])      # k / v read the encoder side
                assert torch.equal(blk.xv.weight, x.v.weight[xhd][:, enc_idx])
                assert torch.equal(blk.xo.weight, x.o.weight[dec_idx][:, xhd])
                assert torch.equal(blk.lnx.weight, orig.layer[1].layer_norm.weight[dec_idx])


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_are_t5s(bidirectional):
    rel = torch.arange(-300, 301)[None, :]
    want = tf.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(RelativePositionBias(4, 32, 128, bidirectional).buckets(rel), want)


def test_random_init_and_save_load(tmp_path):
    model = t5(gated=True)
    spu_kernels.patch(model, "lst", r=2, init="random")
    assert torch.equal(model.encoder.side.rel_bias.weight, torch.zeros_like(model.encoder.side.rel_bias.weight))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    batch = make_batch("t5")
    want = model(**batch).logits
    fresh = spu_kernels.load_adapter(t5(gated=True), spu_kernels.save_adapter(model, tmp_path / "a.safetensors"))
    assert torch.equal(fresh(**batch).logits, want)
    model.save_pretrained(tmp_path / "folder")
    assert not list((tmp_path / "folder").glob("adapter_*"))       # no PEFT files: PEFT has no ladder
    got = spu_kernels.from_pretrained(tmp_path / "folder", model=t5(gated=True))
    assert torch.equal(got(**batch).logits, want)


def test_generate_without_cache_is_greedy_forward():
    model = t5()
    spu_kernels.patch(model, "klst", k=3, r=2)
    with torch.no_grad():
        for p in model.decoder.side.up.parameters():
            p.add_(torch.randn_like(p))
    model.generation_config.eos_token_id = None
    batch = make_batch("t5")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, use_cache=False, do_sample=False,
                         num_beams=1)
    cur = torch.zeros(2, 1, dtype=torch.long)          # decoder_start_token_id
    with torch.no_grad():
        for _ in range(4):
            nxt = model(input_ids=ids, attention_mask=mask, decoder_input_ids=cur).logits[:, -1].argmax(-1)
            cur = torch.cat((cur, nxt[:, None]), dim=1)
    assert torch.equal(got, cur) and len(set(cur[:, 1:].flatten().tolist())) > 1
    beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, use_cache=False, num_beams=2)
    assert beams.shape == (2, 4)
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


def t5_batches(n=2):
    out = []
    for i in range(n):
        b = make_batch("t5", seed=10 + i)
        out.append(dict(b, labels=b.pop("decoder_input_ids")))
    return out


def test_fisher_init_cross_attention_scores_by_hand():
    """The decoder side's cross-attention columns are ranked by (dL/dm)^2 summed over the batches, m a
    mask on the columns of the backbone's cross-attention q, k and v outputs (hooks: independent of
    the W * dL/dW form); the patch cuts the side blocks by those and records init="prune"."""
    model = t5(gated=True)
    batches = t5_batches()
    dec = model.decoder
    fam = spu_kernels.patching.architectures.family_of(model)
    got = unit_fisher_scores(model, dec.block, [1, 2, 3], lambda b: fam.side_block(b, model.config), batches,
                             with_cross=True)[3]
    masks = [torch.ones(32, requires_grad=True) for _ in dec.block]
    hooks = [getattr(blk.layer[1].EncDecAttention, n).register_forward_hook(lambda mod, a, out, m=m: out * m)
             for blk, m in zip(dec.block, masks) for n in ("q", "k", "v")]
    want = [torch.zeros(32) for _ in masks]
    for b in batches:
        for w, g in zip(want, torch.autograd.grad(model(**b).loss, masks)):
            w += g ** 2
    for h in hooks:
        h.remove()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())
    spu_kernels.patch(model, "klst", r=2, init="fisher", batches=iter(batches))   # a one-shot iterable will do
    opts = spu_kernels.summary(model).options
    assert opts["init"] == "prune" and opts["batches"] is None
    for blk, orig, score in zip(model.decoder.side.blocks, dec.block, want):
        x = orig.layer[1].EncDecAttention
        within = torch.topk(score.view(4, 8).sum(0), 4).indices.sort().values
        hd_idx = (torch.arange(4)[:, None] * 8 + within).reshape(-1)
        dec_idx = model.decoder.side.down_weight[0].argmax(1)
        assert torch.equal(blk.xq.weight, x.q.weight[hd_idx][:, dec_idx])
    out = model(**batches[0])
    assert torch.isfinite(out.loss)


def test_clear_errors():
    with pytest.raises(ValueError, match="leave layers=None"):
        spu_kernels.patch(t5(gated=True), "lst", r=2, layers=[1])
    encoder_only = tf.T5EncoderModel(t5().config)
    with pytest.raises(ValueError, match="need the encoder and the decoder"):
        spu_kernels.patch(encoder_only, "lst", r=2)
    model = t5()
    spu_kernels.patch(model, "lst", r=2)
    with pytest.raises(ValueError, match="ladder-patched encoder's output"):
        model.decoder(input_ids=torch.ones(1, 3, dtype=torch.long), encoder_hidden_states=torch.randn(1, 4, 32))


def test_t5_for_sequence_classification():
    """The side networks go on the T5Model backbone child; the classification head reads the decoder side."""
    cfg = t5().config
    cfg.num_labels, cfg.eos_token_id = 2, 1
    torch.manual_seed(0)
    model = tf.T5ForSequenceClassification(cfg).eval()
    ids = torch.randint(2, VOCAB, (2, 7))
    ids[:, -1] = 1                                       # the head reads the eos position
    ref, snap = model(input_ids=ids).logits, snapshot(model)
    spu_kernels.patch(model, "klst", k=3, r=2)
    assert isinstance(model.transformer.encoder, LadderEncoder) and isinstance(model.transformer.decoder, LadderDecoder)
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None for p in model.classification_head.parameters())
    assert all(p.grad is not None for p in model.transformer.encoder.side.parameters())
    spu_kernels.unpatch(model)
    assert_restored(model, snap)
    assert torch.equal(model(input_ids=ids).logits, ref)
