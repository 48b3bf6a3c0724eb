"""PEFT's adapter format both ways: peft_adapter_files -> peft.PeftModel.from_pretrained computes what
the patched model does; from_peft / to_peft round trips; patch refuses PEFT models."""
import copy
import json

import pytest
import torch
from models import make_batch, make_model

import spu_kernels
from spu_kernels.patching.hf_hooks import peft_layers
from spu_kernels.patching.peft_format import NoPeftEquivalent, peft_mapping

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = dict(rtol=1e-5, atol=1e-6)


def _perturb(model, seed=3):
    """Move every trainable tensor off its init (so B != 0, l != 1, ...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


def _out(model, fam):
    with torch.no_grad():
        return model(**make_batch(fam)).logits


def _patched(fam, method, **opts):
    base = make_model(fam)
    model = spu_kernels.patch(copy.deepcopy(base), method, **opts)
    _perturb(model)
    assert not torch.allclose(_out(model, fam), _out(base, fam), **TOL)   # the adapter does something
    return base, model


def _write(folder, config, tensors):
    (folder / "adapter_config.json").write_text(json.dumps(config))
    safetensors_torch.save_file(tensors, str(folder / "adapter_model.safetensors"))


CASES = [
    ("bert", "lora", {"r": 2, "alpha": 3.0}, "LORA"),
    ("t5", "lora", {"r": 2}, "LORA"),
    ("gpt2", "lora", {"r": 2}, "LORA"),              # fused c_attn, q and v thirds: block-diagonal B
    ("llama", "lora", {"r": 2, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "o_proj"]}, "LORA"),
    ("bert", "ia3", {}, "IA3"),                      # fused scaled activation -> feedforward on output.dense
    ("gpt2", "ia3", {}, "IA3"),                      # k, v thirds of c_attn: ones for q
    ("llama", "ia3", {}, "IA3"),                     # gated MLP: input side of down_proj
    ("llama", "krona", {}, "LOKR"),
    ("bert", "krona", {"a_shape": (4, 4), "scale": 0.5}, "LOKR"),
    ("bert", "siva", {"r": 2}, "LORA"),
    ("bert", "siva", {"r": 2, "factors": "pissa", "target_modules": ["query", "intermediate.dense"]}, "LORA"),
    ("bert", "lora", {"r": 2, "target_modules": ["word_embeddings", "key"]}, "LORA"),     # LoRAEmbedding
    ("bert", "ia3", {"trainable_modules": ["embeddings.LayerNorm"]}, "IA3"),            # -> modules_to_save
    ("gpt2", "siva_kv", {"r": 2, "train_s": True}, "LORA"),
    ("llama", "siva", {"r": 3, "svd": "exact"}, "LORA"),
]


@pytest.mark.parametrize("fam,method,opts,peft_type", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_peft_files_load_in_peft(tmp_path, fam, method, opts, peft_type):
    base, model = _patched(fam, method, **opts)
    files = spu_kernels.peft_adapter_files(model)
    assert files is not None
    config, tensors = files
    assert config["peft_type"] == peft_type and "base_model_name_or_path" not in config
    _write(tmp_path, config, tensors)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    loaded = peft.get_peft_model_state_dict(pm)
    assert set(loaded) == set(tensors)                 # every key is PEFT's own name
    torch.testing.assert_close(_out(pm, fam), _out(model, fam), **TOL)


def test_gpt2_lora_block_diagonal(tmp_path):
    _, model = _patched("gpt2", "lora", r=2)
    config, tensors = peft_mapping(model)
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert config["r"] == 4 and config["fan_in_fan_out"] and b.shape == (96, 4)
    assert (b[32:64] == 0).all() and (b[:32, 2:] == 0).all() and (b[64:, :2] == 0).all()


@pytest.mark.parametrize("fam,method,opts", [("bert", "lst", {}), ("bert", "bitfit", {}),
                                             ("bert", "lora", {"r": 2, "soft_prompt": 3}),
                                             ("gpt2", "krona", {}),      # Conv1D: LoKr has no Conv1D
                                             ("bert", "siva", {"r": 2, "keep_original": False})])
def test_no_peft_equivalent(fam, method, opts):
    model = spu_kernels.patch(make_model(fam), method, **opts)
    assert spu_kernels.peft_adapter_files(model) is None
    with pytest.raises(NoPeftEquivalent):
        peft_mapping(model)
    with pytest.raises(ValueError):
        spu_kernels.to_peft(model)
    assert spu_kernels.is_patched(model)              # refused before anything changed


@pytest.mark.parametrize("fam,method,opts", [("gpt2", "lora", {"r": 2}), ("llama", "ia3", {}),
                                             ("llama", "krona", {}), ("bert", "siva", {"r": 2})])
def test_to_peft(fam, method, opts):
    _, model = _patched(fam, method, **opts)
    want = _out(model, fam)
    pm = spu_kernels.to_peft(model)
    assert isinstance(pm, peft.PeftModel) and not spu_kernels.is_patched(pm.base_model.model)
    assert any(p.requires_grad for p in pm.parameters())
    torch.testing.assert_close(_out(pm.eval(), fam), want, **TOL)


@pytest.mark.parametrize("fam,config", [
    ("gpt2", lambda: peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn"], task_type="SEQ_CLS")),
    ("bert", lambda: peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True,
                                     target_modules=["word_embeddings", "query", "value"])),
    ("llama", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"])),
    ("llama", lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj"])),   # w2 = a·b
])
def test_from_peft_round_trip(tmp_path, fam, config):
    cfg = config()
    pm = peft.get_peft_model(make_model(fam), cfg).eval()
    _perturb(pm)
    want = _out(pm, fam)
    model = spu_kernels.from_peft(pm)
    assert spu_kernels.is_patched(model) and peft_layers(model) == []
    assert spu_kernels.summary(model).method == {"LORA": "lora", "IA3": "ia3", "LOKR": "krona"}[cfg.peft_type.value]
    torch.testing.assert_close(_out(model, fam), want, **TOL)
    spu_kernels.save_adapter(model, tmp_path / "a.safetensors")
    back = spu_kernels.to_peft(model).eval()
    torch.testing.assert_close(_out(back, fam), want, **TOL)


def test_from_peft_refuses_before_changing():
    pm = peft.get_peft_model(make_model("bert"), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                                 rank_pattern={"value": 3}))
    with pytest.raises(NotImplementedError, match="rank"):
        spu_kernels.from_peft(pm)
    assert len(peft.get_peft_model_state_dict(pm)) == 8          # the PEFT layers are still there
    pm = peft.get_peft_model(make_model("bert"), peft.LoraConfig(r=40, target_modules=["query"]))
    with pytest.raises(NotImplementedError, match="exceeds"):       # spu's rank limit, PEFT has none
        spu_kernels.from_peft(pm)
    pm.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        spu_kernels.from_peft(pm)
    assert len(peft_layers(pm.base_model.model)) == 2
    with pytest.raises(TypeError, match="PeftModel"):
        spu_kernels.from_peft(make_model("bert"))


def test_patch_refuses_peft_models():
    pm = peft.get_peft_model(make_model("bert"), peft.LoraConfig(r=2, target_modules=["query"]))
    for m in (pm, pm.base_model.model):
        with pytest.raises(TypeError, match="spu_kernels.from_peft"):
            spu_kernels.patch(m, "lora", r=2)
    assert not spu_kernels.is_patched(pm.base_model.model)


@pytest.mark.parametrize("method", ["lora", "siva", "ia3"])
def test_get_peft_model_on_a_patched_model_fails_loudly(method):
    """PEFT's layers inside spu's modules would be ignored by the fused op: the wrap is refused."""
    model = spu_kernels.patch(make_model("bert"), method, **({} if method == "ia3" else {"r": 2}))
    with pytest.raises(TypeError, match="spu_kernels.to_peft"):
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    if method != "ia3":     # the adapted q comes first in BERT's layer: PEFT changed nothing before it
        assert not peft_layers(spu_kernels.unpatch(model))
