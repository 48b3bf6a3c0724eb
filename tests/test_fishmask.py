"""FishMask on every family: the Fisher ranking against an independent computation, step 0 equal
to the original, training moves the selected entries only (MaskedAdamW, and a plain optimiser
through the gradient hook), loss falls, unpatch / merge, save / load and save_pretrained /
from_pretrained bit-identical, no PEFT files, errors before anything changes."""
import copy
import warnings
from pathlib import Path

import pytest
import torch
from models import FAMILY_MODELS, VOCAB, make_batch, make_model, model_output
from test_harness import tiny_config, tiny_model  # noqa: F401  (fixtures: a tiny BERT folder and its config)

import spu_kernels
from spu_kernels.patching.architectures import HEAD_NAMES
from spu_kernels.patching.fishmask_methods import ranked_parameters, select_top


def labelled(model, family, seed=1):
    b = make_batch(family, seed=seed)
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        b["labels"] = torch.tensor([0, 1])
    elif family == "t5":
        b["labels"] = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(seed))
    else:
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return b


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def independent_fisher(model, batches):
    """Mean over batches of the squared gradient, with loss.backward on a copy."""
    m = copy.deepcopy(model).eval().requires_grad_(True)
    acc = {n: torch.zeros_like(p) for n, p in ranked_parameters(m)}
    for b in batches:
        m.zero_grad(set_to_none=True)
        m(**b).loss.backward()
        for n, p in m.named_parameters():
            if n in acc and p.grad is not None:
                acc[n] += p.grad.square()
    return {n: a / len(batches) for n, a in acc.items()}


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_fishmask_on_every_family(family, tmp_path):
    model = make_model(family)
    batches = [labelled(model, family, s) for s in (1, 2)]
    x = inputs(batches[0])
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher = independent_fisher(model, batches)

    twin = copy.deepcopy(model)
    spu_kernels.patch(model, "fishmask", p=0.02, batches=batches)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    for (_, p), q in zip(model.named_parameters(), twin.parameters()):
        q.requires_grad_(p.requires_grad)      # T5's forward rounds differently with other requires_grad flags
    assert torch.equal(model_output(model, x), model_output(twin, x))   # step 0 = the original model
    mask = spu_kernels.summary(model).options["mask"]
    ranked = dict(ranked_parameters(model))
    total = sum(p.numel() for p in ranked.values())
    assert sum(len(v) for v in mask.values()) == round(0.02 * total)
    picked = torch.cat([fisher[n].reshape(-1)[torch.tensor(v)] for n, v in mask.items()])
    selected = {n: torch.zeros(f.numel(), dtype=torch.bool) for n, f in fisher.items()}
    for n, v in mask.items():
        selected[n][v] = True
    rest = torch.cat([fisher[n].reshape(-1)[~selected[n]] for n in fisher])
    assert picked.min() >= rest.max() * (1 - 1e-5)                     # the top entries of the independent Fisher
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(mask) | {n for n in flags if n.split(".")[0] in HEAD_NAMES}
    assert spu_kernels.peft_adapter_files(model) is None

    opt = spu_kernels.MaskedAdamW(spu_kernels.fishmask_masks(model), lr=3e-2, weight_decay=0.01)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batches[0]).loss
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n.split(".")[0] in HEAD_NAMES:
            continue
        moved = (p.detach() != original[n]).reshape(-1).nonzero().squeeze(1)
        assert set(moved.tolist()) <= set(mask.get(n, ())), n                 # nothing outside the mask moves
    trained = model_output(model, x)
    trained_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not torch.equal(trained, model_output(twin, x))

    spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    fresh = spu_kernels.load_adapter(make_model(family), tmp_path / "a.safetensors")
    assert torch.equal(model_output(fresh, x), trained)
    assert spu_kernels.summary(fresh).options["mask"] == mask
    model.save_pretrained(tmp_path / "folder")
    assert not (tmp_path / "folder" / "adapter_config.json").exists()
    got = spu_kernels.from_pretrained(tmp_path / "folder", model=make_model(family))
    assert torch.equal(model_output(got, x), trained)

    spu_kernels.unpatch(model)                    # as last_n / bitfit: flags back, the trained weights stay
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(p, trained_weights[n]) for n, p in model.named_parameters())
    n0 = next(iter(mask))
    model.zero_grad(set_to_none=True)
    model(**batches[0]).loss.backward()           # the hooks are gone: gradients outside the mask are back
    g = dict(model.named_parameters())[n0].grad.reshape(-1)
    outside = torch.ones_like(g, dtype=torch.bool)
    outside[mask[n0]] = False
    assert (g[outside] != 0).any()


def test_plain_optimizer_moves_only_the_mask_and_merge():
    """The gradient hook is the plain-torch reference: SGD (no weight decay) changes only masked entries."""
    model = make_model("bert")
    batches = [labelled(model, "bert")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spu_kernels.patch(model, "fishmask", p=0.01, batches=batches, train_head=False)
    mask = spu_kernels.summary(model).options["mask"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(**batches[0]).loss.backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                out = torch.ones(p.numel(), dtype=torch.bool)
                out[mask[n]] = False
                assert not p.grad.reshape(-1)[out].any()
        opt.step()
    for n, p in model.named_parameters():
        changed = set((p.detach() != before[n]).reshape(-1).nonzero().squeeze(1).tolist())
        assert changed <= set(mask.get(n, ()))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    spu_kernels.merge(model)                      # nothing to fold in: the hooks go, the weights stay
    assert not spu_kernels.is_patched(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())


def test_fisher_scores_leaves_the_model_as_it_was():
    model = make_model("gpt2").train()
    model.transformer.wte.weight.requires_grad_(False)
    model.score.weight.grad = torch.ones_like(model.score.weight)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = [labelled(model, "gpt2", s) for s in (1, 2, 3)]
    scores = spu_kernels.fisher_scores(model, batches)
    want = independent_fisher(model, batches)
    assert set(scores) == set(want) and not any(n.startswith("score") for n in scores)
    assert "transformer.wte.weight" in scores                  # embeddings are ranked (frozen or not)
    for n in want:
        torch.testing.assert_close(scores[n], want[n], rtol=1e-5, atol=1e-12)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.score.weight.grad, torch.ones_like(model.score.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("score"))


def test_ties_and_explicit_scores_and_mask():
    scores = {"a": torch.zeros(4), "b": torch.tensor([0.0, 5.0, 0.0]), "c": torch.zeros(3)}
    got = select_top(scores, ["a", "b", "c"], 0.3)              # k = 3: the 5, then the first two zeros
    assert {k: v.tolist() for k, v in got.items()} == {"a": [0, 1], "b": [1], "c": []}
    model = make_model("bert")
    x = inputs(labelled(model, "bert"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    spu_kernels.patch(model, "fishmask", p=0.5, scores={name: torch.arange(32.0 * 32).view(32, 32)})
    mask = spu_kernels.summary(model).options["mask"]
    assert list(mask) == [name] and mask[name] == list(range(512, 1024))
    spu_kernels.unpatch(model)
    spu_kernels.patch(model, "fishmask", mask={name: [5, 3]})
    assert spu_kernels.summary(model).options["mask"] == {name: [3, 5]}
    assert spu_kernels.summary(model).trainable_params == 32 * 32 + sum(
        p.numel() for p in model.classifier.parameters())
    assert model_output(model, x) is not None


@pytest.mark.parametrize("opts, err, match", [
    ({"p": 0.0, "mask": {}}, ValueError, r"p must be a fraction in \(0, 1\]"),
    ({"p": 1.5, "mask": {}}, ValueError, r"p must be a fraction"),
    ({}, ValueError, "exactly one of batches"),
    ({"scores": {}, "mask": {}}, ValueError, "exactly one of.*got scores, mask"),
    ({"batches": []}, ValueError, "batches is empty"),
    ({"batches": [{"input_ids": torch.ones(1, 3, dtype=torch.long)}]}, ValueError, "no scalar loss.*need labels"),
    ({"batches": {"input_ids": 1}}, TypeError, "not one dict"),
    ({"scores": {"nope": torch.zeros(1)}}, ValueError, "'nope', which is not a rankable parameter"),
    ({"scores": {"classifier.weight": torch.zeros(2, 32)}}, ValueError, "not a rankable parameter"),
    ({"scores": {"bert.pooler.dense.bias": torch.zeros(3)}}, ValueError, r"parameter's shape \(32,\)"),
    ({"scores": {"bert.pooler.dense.bias": torch.full((32,), float("nan"))}}, ValueError, "NaN"),
    ({"mask": {"bert.pooler.dense.bias": [32]}}, ValueError, r"outside \[0, 32\)"),
    ({"mask": {"bert.pooler.dense.bias": [1, 1]}}, ValueError, "repeated"),
    ({"mask": {"bert.pooler.dense.bias": []}}, ValueError, "selects no entry"),
])
def test_errors_leave_the_model_as_it_was(opts, err, match):
    model = make_model("bert")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(err, match=match):
        spu_kernels.patch(model, "fishmask", **opts)
    assert not spu_kernels.is_patched(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not p._backward_hooks for p in model.parameters() if getattr(p, "_backward_hooks", None) is not None)


def test_harness_run_ranks_on_training_batches_and_uses_masked_adamw(tiny_config, monkeypatch):
    """spu-kernels finetune with method fishmask: the first PATCH_BATCHES training batches rank, MaskedAdamW trains."""
    from spu_kernels.harness.config import from_dict
    from spu_kernels.harness.train import run
    seen = {}
    real_patch, real_opt = spu_kernels.patch, spu_kernels.MaskedAdamW

    def spy_patch(model, method, **kw):
        seen["batches"] = len(kw.get("batches") or [])
        return real_patch(model, method, **kw)

    def spy_opt(*a, **kw):
        seen["optimizer"] = real_opt(*a, **kw)
        return seen["optimizer"]
    monkeypatch.setattr(spu_kernels, "patch", spy_patch)
    monkeypatch.setattr(spu_kernels, "MaskedAdamW", spy_opt)
    cfg = tiny_config
    cfg["method"] = {"name": "fishmask", "args": {"p": 0.01}}
    res = run(from_dict(cfg))
    assert res.method == "fishmask" and res.steps == 2 and 0 < res.trainable_params < res.total_params
    assert seen["batches"] == 6        # 48 training sentences / batch_size 8 (PATCH_BATCHES = 8 is the cap)
    opt = seen["optimizer"]
    assert opt.state_numel() < 2 * res.trainable_params and all(s["step"] == 2 for s in opt.state.values())
    assert (Path(res.output_dir) / "best" / "adapter.safetensors").exists()


def test_a_failed_patch_removes_its_gradient_hooks():
    """An error after the method ran (here trainable_modules) rolls back: no hook is left zeroing gradients."""
    model = make_model("bert")
    name = "bert.pooler.dense.bias"
    with pytest.raises(ValueError, match="trainable_modules: no module name ends with 'nope'"):
        spu_kernels.patch(model, "fishmask", mask={name: [0]}, trainable_modules=["nope"])
    assert not spu_kernels.is_patched(model)
    model(**labelled(model, "bert")).loss.backward()
    assert (dict(model.named_parameters())[name].grad[1:] != 0).any()


# -- the sparse adapter file (fishmask_format.py) --------------------------------------------------
def trained_fishmask(family="bert", p=0.01, steps=2, **patch_kw):
    model = make_model(family)
    batches = [labelled(model, family)]
    if "mask" not in patch_kw:
        patch_kw["batches"] = batches
    spu_kernels.patch(model, "fishmask", p=p, **patch_kw)
    opt = spu_kernels.MaskedAdamW(spu_kernels.fishmask_masks(model), lr=3e-2)
    for _ in range(steps):
        model(**batches[0]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval(), inputs(batches[0])


def test_sparse_file_holds_the_selected_entries_only(tmp_path):
    import json

    from safetensors import safe_open
    model, x = trained_fishmask(p=0.005)
    mask = spu_kernels.summary(model).options["mask"]
    k = sum(len(v) for v in mask.values())
    params = dict(model.named_parameters())
    head = sum(p.numel() * p.element_size() for n, p in params.items() if n.split(".")[0] in HEAD_NAMES)
    dense = head + sum(params[n].numel() * params[n].element_size() for n in mask)   # the v2 file's tensor bytes
    spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    size = (tmp_path / "a.safetensors").stat().st_size
    assert size < k * (8 + 4) + head + len(mask) * (32 + 400) + 2048     # index + fp32 value, digest, header
    assert size < dense / 4
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    with warnings.catch_warnings():                                        # a deep copy keeps the base digests
        warnings.simplefilter("error")
        spu_kernels.save_adapter(copy.deepcopy(model), tmp_path / "copy.safetensors")
    with safe_open(str(tmp_path / "copy.safetensors"), framework="pt") as f:
        assert set(f.keys()) == keys and f.metadata() == meta
    assert meta["format"] == "spu_kernels.adapter.v3" and meta["encoding"] == "fishmask.sparse.v1"
    assert "mask" not in json.loads(meta["options"])
    assert not keys & set(mask)                                            # no masked tensor is stored whole
    for n, idx in mask.items():
        assert {f"{n}::fishmask.values", f"{n}::fishmask.base_sha256"} <= keys
        assert (f"{n}::fishmask.index" in keys) != (f"{n}::fishmask.bitmap" in keys)
    model.save_pretrained(tmp_path / "folder")
    cfg = json.loads((tmp_path / "folder" / "spu_config.json").read_text())
    assert "mask" not in cfg["options"]
    fresh = spu_kernels.from_pretrained(tmp_path / "folder", model=make_model("bert"))
    assert torch.equal(model_output(fresh, x), model_output(model, x))
    assert spu_kernels.summary(fresh).options["mask"] == mask
    assert all(torch.equal(p, params[n]) for n, p in fresh.named_parameters())


def test_index_and_bitmap_layouts_round_trip(tmp_path):
    """A mask above 1/64 of a tensor is stored as a bitmap (numpy's little-endian packbits), a sparser one as
    indices."""
    import numpy as np

    from spu_kernels.patching.fishmask_format import pack_bits, unpack_bits
    idx = torch.tensor([0, 3, 8, 9, 20])
    want = np.zeros(21, dtype=bool)
    want[idx.numpy()] = True
    assert pack_bits(idx, 21).tolist() == np.packbits(want, bitorder="little").tolist()
    assert unpack_bits(pack_bits(idx, 21), 21).tolist() == idx.tolist()
    with pytest.raises(ValueError, match="past the tensor's end"):
        unpack_bits(torch.tensor([0, 0, 0b10000000], dtype=torch.uint8), 21)
    dense, sparse = "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.weight"
    model, x = trained_fishmask(mask={dense: list(range(0, 1024, 3)), sparse: [7, 100, 1000]})
    spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    _, _, tensors, _ = spu_kernels.patching.checkpoint.read_adapter(tmp_path / "a.safetensors")
    assert f"{dense}::fishmask.bitmap" in tensors and f"{sparse}::fishmask.index" in tensors
    assert tensors[f"{sparse}::fishmask.index"].tolist() == [7, 100, 1000]
    fresh = spu_kernels.load_adapter(make_model("bert"), tmp_path / "a.safetensors")
    assert torch.equal(model_output(fresh, x), model_output(model, x))
    assert spu_kernels.summary(fresh).options["mask"] == spu_kernels.summary(model).options["mask"]


def test_v2_files_with_whole_tensors_still_load(tmp_path, monkeypatch):
    """A file as spu_kernels wrote it before the sparse layout: format v2, the mask in the options, tensors whole."""
    from spu_kernels.patching import checkpoint
    model, x = trained_fishmask()
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint, "_CODECS", {})
        spu_kernels.save_adapter(model, tmp_path / "v2.safetensors")
    _, options, tensors, fmt = checkpoint.read_adapter(tmp_path / "v2.safetensors")
    mask = spu_kernels.summary(model).options["mask"]
    assert fmt == "spu_kernels.adapter.v2" and options["mask"] == mask and set(mask) <= set(tensors)
    fresh = spu_kernels.load_adapter(make_model("bert"), tmp_path / "v2.safetensors")
    assert torch.equal(model_output(fresh, x), model_output(model, x))
    assert spu_kernels.summary(fresh).options["mask"] == mask


def test_a_different_base_is_an_error_before_anything_changes(tmp_path):
    model, _ = trained_fishmask()
    spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    mask = spu_kernels.summary(model).options["mask"]
    name = next(iter(mask))
    outside = next(i for i in range(10**6) if i not in set(mask[name]))
    other = make_model("bert")
    with torch.no_grad():
        dict(other.named_parameters())[name].view(-1)[outside] += 1.0
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match=f"base weights differ.*{name}"):
        spu_kernels.load_adapter(other, tmp_path / "a.safetensors")
    assert not spu_kernels.is_patched(other)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    with pytest.raises(ValueError, match="base weights differ.*bfloat16"):
        spu_kernels.load_adapter(make_model("bert").to(torch.bfloat16), tmp_path / "a.safetensors")


def test_entries_moved_outside_the_mask_are_saved_whole(tmp_path):
    """A plain AdamW with weight decay moves every entry of a touched tensor: the file keeps those tensors whole."""
    model = make_model("bert")
    batch = labelled(model, "bert")
    spu_kernels.patch(model, "fishmask", p=0.01, batches=[batch])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model(**batch).loss.backward()
    opt.step()
    model.eval()
    mask = spu_kernels.summary(model).options["mask"]
    with pytest.warns(UserWarning, match="outside the mask changed since patch"):
        spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    _, _, tensors, _ = spu_kernels.patching.checkpoint.read_adapter(tmp_path / "a.safetensors")
    assert set(mask) <= set(tensors)
    fresh = spu_kernels.load_adapter(make_model("bert"), tmp_path / "a.safetensors")
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fresh.named_parameters())


def test_load_into_a_patched_model_checks_the_mask(tmp_path):
    model, x = trained_fishmask(steps=1)
    spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    model2, _ = trained_fishmask(steps=1)       # same base, same mask, trained further: resuming loads the file
    spu_kernels.load_adapter(model2, tmp_path / "a.safetensors")
    assert torch.equal(model_output(model2, x), model_output(model, x))
    name = next(iter(spu_kernels.summary(model).options["mask"]))
    other = make_model("bert")
    spu_kernels.patch(other, "fishmask", mask={name: [0]})
    with pytest.raises(ValueError, match="another FishMask mask"):
        spu_kernels.load_adapter(other, tmp_path / "a.safetensors")


def test_an_unknown_encoding_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    model, _ = trained_fishmask(steps=0)
    spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={**meta, "encoding": "fishmask.sparse.v9"})
    with pytest.raises(ValueError, match="'fishmask.sparse.v9', which this version"):
        spu_kernels.load_adapter(make_model("bert"), tmp_path / "b.safetensors")
