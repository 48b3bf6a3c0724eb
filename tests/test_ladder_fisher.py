"""patch(model, "lst"/"klst", init="fisher", batches=...): the Fisher scores against mask gradients
taken by hand (explicit mask variables on each family's own modules), a constructed case where the
Fisher ranking must differ from L1's, the side network cut with the Fisher indices, the backbone's
state untouched, determinism, training, and save / load without batches."""
import pytest
import torch
from models import make_batch, make_model, save_tiny_bert

import spu_kernels
from spu_kernels.modules.ladder import select_units
from spu_kernels.patching.architectures import family_of
from spu_kernels.patching.ladder_fisher import unit_fisher_scores

FAMILIES = ["bert", "gpt2", "llama"]


def batches_for(family, n=2):
    out = []
    for i in range(n):
        b = make_batch(family, seed=10 + i)
        b["labels"] = b["input_ids"] if family == "llama" else torch.tensor([i % 2, 1 - i % 2])
        out.append(b)
    return out


def layers_of(model):
    return {"bert": lambda: model.bert.encoder.layer, "gpt2": lambda: model.transformer.h,
            "llama": lambda: model.model.layers}[model.config.model_type]()


def hand_scores(model, batches):
    """Per unit: sum over batches of (dL/dm)^2, with explicit masks m = 1 on the family's modules."""
    fam, L = model.config.model_type, len(layers_of(model))
    d, h = model.config.hidden_size, model.config.num_attention_heads
    hd = d // h
    m_d = torch.ones(d, requires_grad=True)
    m_q = [torch.ones(h * hd, requires_grad=True) for _ in range(L)]
    kv = h * hd if fam != "llama" else model.config.num_key_value_heads * hd
    m_k = [torch.ones(kv, requires_grad=True) for _ in range(L)]
    m_v = [torch.ones(kv, requires_grad=True) for _ in range(L)]
    m_ff = [None] * L
    hooks = []
    mul = lambda m: (lambda mod, args, out: (out[0] * m, *out[1:]) if isinstance(out, tuple) else out * m)
    pre_mul = lambda i: (lambda mod, args: (args[0] * m_ff[i], *args[1:]))
    if fam == "bert":
        hooks.append(model.bert.embeddings.register_forward_hook(mul(m_d)))
    elif fam == "gpt2":
        hooks.append(model.transformer.drop.register_forward_hook(mul(m_d)))
    else:
        hooks.append(model.model.embed_tokens.register_forward_hook(mul(m_d)))
    for i, layer in enumerate(layers_of(model)):
        hooks.append(layer.register_forward_hook(mul(m_d)))
        if fam == "bert":
            a = layer.attention.self
            for mod, m in ((a.query, m_q[i]), (a.key, m_k[i]), (a.value, m_v[i])):
                hooks.append(mod.register_forward_hook(mul(m)))
            down = layer.output.dense
        elif fam == "gpt2":
            hooks.append(layer.attn.c_attn.register_forward_hook(
                lambda mod, args, out, i=i: out * torch.cat((m_q[i], m_k[i], m_v[i]))))
            down = layer.mlp.c_proj
        else:
            a = layer.self_attn
            for mod, m in ((a.q_proj, m_q[i]), (a.k_proj, m_k[i]), (a.v_proj, m_v[i])):
                hooks.append(mod.register_forward_hook(mul(m)))
            down = layer.mlp.down_proj
        d_ff = down.weight.shape[0 if fam == "gpt2" else 1]
        m_ff[i] = torch.ones(d_ff, requires_grad=True)
        hooks.append(down.register_forward_pre_hook(pre_mul(i)))
    f_d, f_hd, f_ff = torch.zeros(d), [torch.zeros(h * hd) for _ in range(L)], [0.0] * L
    rep = (h * hd) // kv
    for b in batches:
        masks = [m_d, *m_q, *m_k, *m_v, *m_ff]
        g = dict(zip(map(id, masks), torch.autograd.grad(model(**b).loss, masks)))
        f_d += g[id(m_d)] ** 2
        for i in range(L):
            to_q = lambda t: t.view(-1, hd).repeat_interleave(rep, 0).reshape(-1)   # kv head -> its query heads
            f_hd[i] += (g[id(m_q[i])] + to_q(g[id(m_k[i])]) + to_q(g[id(m_v[i])])) ** 2
            f_ff[i] = f_ff[i] + g[id(m_ff[i])] ** 2
    for hk in hooks:
        hk.remove()
    return f_d, f_hd, f_ff


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_match_mask_gradients_by_hand(family):
    model = make_model(family)
    batches = batches_for(family)
    want = hand_scores(model, batches)
    fam = family_of(model)
    layers = layers_of(model)
    got = unit_fisher_scores(model, layers, list(range(1, len(layers) + 1)), lambda b: fam.side_block(b, model.config),
                        batches)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-10)
    for a, b in zip(got[1] + got[2], want[1] + want[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-10)
    assert all(s.sum() > 0 for s in [got[0], *got[1], *got[2]])


def test_fisher_ranking_differs_from_l1_where_it_must():
    """An FFN unit with huge input weights but a zero output column: first by L1, last by Fisher."""
    def cut(init, **kw):
        model = make_model("bert")
        with torch.no_grad():
            for layer in model.bert.encoder.layer:
                layer.intermediate.dense.weight[0].mul_(100.0)
                layer.output.dense.weight[:, 0].zero_()
        spu_kernels.patch(model, "lst", r=4, init=init, **kw)
        return [blk.fin.weight.abs().max().item() for blk in model.bert.side.blocks]
    big = make_model("bert").bert.encoder.layer[0].intermediate.dense.weight[0].abs().max().item() * 100
    assert all(v == pytest.approx(big, rel=0.5) for v in cut("prune"))      # L1 keeps the big unit
    assert all(v < big / 10 for v in cut("fisher", batches=batches_for("bert")))  # Fisher drops it


@pytest.mark.parametrize("family", FAMILIES)
def test_side_network_is_cut_with_fisher_indices(family):
    """Step 0 as the pruned ladder, with Fisher's units: ladders select d_idx, upsample is its
    transpose, side blocks hold the backbone's weights at the selected units."""
    model = make_model(family)
    batches = batches_for(family)
    fam, cfg = family_of(model), model.config
    layers = layers_of(model)
    canon = lambda b: fam.side_block(b, cfg)
    scores = unit_fisher_scores(model, layers, [1, 2], canon, batches)
    h, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    weights = [canon(layer) for layer in layers]
    spu_kernels.patch(model, "lst", r=4, init="fisher", batches=batches)
    side = getattr(model, model.base_model_prefix).side
    d_idx, per_block = select_units(*scores, h, hd, side.d_s, hd // 4, side.blocks[0].fin.out_features,
                                    rope=family == "llama")
    assert torch.equal(side.down_weight[0][:, d_idx], torch.eye(side.d_s))
    assert torch.equal(side.up.weight[d_idx], torch.eye(side.d_s))
    for blk, w, (hd_idx, ff_idx, _) in zip(side.blocks, weights, per_block):
        assert torch.equal(blk.q.weight, w["q"][0][hd_idx][:, d_idx])
        assert torch.equal(blk.fin.weight, w["fin"][0][ff_idx][:, d_idx])
        assert torch.equal(blk.fout.weight, w["fout"][0][d_idx][:, ff_idx])
    # deterministic given the batches
    again = make_model(family)
    spu_kernels.patch(again, "lst", r=4, init="fisher", batches=batches)
    side2 = getattr(again, again.base_model_prefix).side
    assert all(torch.equal(a, b) for a, b in zip(side.state_dict().values(), side2.state_dict().values()))


def test_backbone_state_untouched():
    model = make_model("bert").train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = layers_of(model)
    unit_fisher_scores(model, layers, [1, 2], lambda b: family_of(model).side_block(b, model.config),
                       batches_for("bert"))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    spu_kernels.patch(model, "klst", r=4, init="fisher", batches=batches_for("bert"))
    assert all(p.grad is None for p in model.parameters())
    spu_kernels.unpatch(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_options_raise_before_any_change():
    model = make_model("bert")
    with pytest.raises(ValueError, match="pass batches="):
        spu_kernels.patch(model, "lst", r=4, init="fisher")
    with pytest.raises(ValueError, match="only used by init='fisher'"):
        spu_kernels.patch(model, "klst", r=4, batches=batches_for("bert"))
    with pytest.raises(TypeError, match="iterable of dicts"):
        spu_kernels.patch(model, "lst", r=4, init="fisher", batches=batches_for("bert")[0])
    with pytest.raises(ValueError, match="empty"):
        spu_kernels.patch(model, "lst", r=4, init="fisher", batches=[])
    with pytest.raises(ValueError, match="carry labels"):
        spu_kernels.patch(model, "lst", r=4, init="fisher", batches=[make_batch("bert")])
    assert not spu_kernels.is_patched(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family, method", [("bert", "lst"), ("llama", "klst")])
def test_loss_falls(family, method):
    model = make_model(family).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = make_batch(family, batch=8, seq=12, seed=4)
    batch["labels"] = batch["input_ids"] if family == "llama" else torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    head = model.lm_head if family == "llama" else model.classifier
    with torch.no_grad():   # a head that passes signal: the side network alone must learn the task
        head.weight.normal_(std=1.0)
    spu_kernels.patch(model, method, r=4, init="fisher", batches=batches_for(family), train_head=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < (0.7 if family == "llama" else 0.5) * losses[0], losses


@pytest.mark.parametrize("family, opts", [("bert", {}), ("gpt2", {"layers": [2]}), ("llama", {})])
def test_save_load_and_pretrained_without_batches(family, opts, tmp_path):
    model = make_model(family)
    spu_kernels.patch(model, "klst", r=4, init="fisher", batches=batches_for(family), **opts)
    opts = spu_kernels.summary(model).options
    assert opts["init"] == "prune" and opts["batches"] is None       # what a load re-runs: shapes, no batches
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    batch = make_batch(family)
    want = model(**batch).logits
    fresh = spu_kernels.load_adapter(make_model(family), spu_kernels.save_adapter(model, tmp_path / "a.safetensors"))
    assert torch.equal(fresh(**batch).logits, want)
    model.save_pretrained(tmp_path / "folder")
    assert not list((tmp_path / "folder").glob("adapter_*"))       # no PEFT files: PEFT has no ladder
    got = spu_kernels.from_pretrained(tmp_path / "folder", model=make_model(family))
    assert torch.equal(got(**batch).logits, want)


def test_harness_passes_the_first_training_batches(tmp_path, monkeypatch):
    """A harness run with init: fisher patches with the first PATCH_BATCHES training batches (labels
    included); a config cannot set batches itself."""
    import json

    from spu_kernels.harness import methods as hmethods
    from spu_kernels.harness.config import ConfigError, from_dict
    from spu_kernels.harness.train import run
    from spu_kernels.patching import ladder_methods
    save_tiny_bert(tmp_path / "m")
    lines = [json.dumps({"text": f"a {'good' if i % 2 else 'bad'} film {i}", "label": i % 2}) + "\n" for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    seen = []
    real = ladder_methods.unit_fisher_scores
    monkeypatch.setattr(ladder_methods, "unit_fisher_scores",
                        lambda model, layers, ids, canon, batches: seen.extend(batches) or real(
                            model, layers, ids, canon, batches))
    raw = {"name": "t", "dataset": {"path": str(tmp_path / "d.jsonl"), "max_length": 16, "n_val": 4, "n_test": 4},
           "model": {"path": str(tmp_path / "m")}, "method": {"name": "klst", "args": {"r": 4, "init": "fisher"}},
           "training": {"epochs": 1, "max_steps": 1, "batch_size": 4, "eval_batch_size": 8, "progress": False,
                        "tensorboard": False, "device": "cpu", "output_dir": str(tmp_path / "out")}}
    res = run(from_dict(raw))
    assert res.steps == 1 and len(seen) == hmethods.PATCH_BATCHES
    assert all(b["labels"].shape == (4,) and b["input_ids"].shape[0] == 4 for b in seen)
    raw["method"]["args"]["batches"] = [[1]]
    with pytest.raises(ConfigError, match="unknown option"):
        from_dict(raw)
