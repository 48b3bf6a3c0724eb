"""LoRA on nn.Embedding (LoRAEmbedding): PEFT's lora.Embedding parameters, init, outputs and
gradients; patch / merge / unpatch / disable on a tiny BERT's word embeddings."""
import copy

import pytest
import torch
import torch.nn as nn
from models import make_batch, make_model, model_output

import spu_kernels
from spu_kernels.modules import LoRAEmbedding


class Tiny(nn.Module):
    def __init__(self, tie=False):
        super().__init__()
        self.emb = nn.Embedding(50, 12, padding_idx=3)
        self.out = nn.Linear(12, 50, bias=False)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_matches_peft_lora_embedding_outputs_and_grads():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Tiny()
    ours = spu_kernels.patch(copy.deepcopy(base), "lora", r=4, alpha=8, target_modules=["emb"])
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb"]))
    mine, ref = ours.emb, theirs.base_model.model.emb
    assert isinstance(mine, LoRAEmbedding)
    # PEFT's names, shapes and init: A (r, V) zeros, B (D, r) standard normal
    assert mine.lora_embedding_A.shape == ref.lora_embedding_A["default"].shape == (4, 50)
    assert mine.lora_embedding_B.shape == ref.lora_embedding_B["default"].shape == (12, 4)
    assert torch.count_nonzero(mine.lora_embedding_A) == 0
    assert 0.7 < mine.lora_embedding_B.std().item() < 1.3
    assert mine.scaling == ref.scaling["default"] == 2.0
    with torch.no_grad():   # same trained-looking tensors in both
        a, b = torch.randn(4, 50), torch.randn(12, 4)
        for m, (ka, kb) in ((mine, (mine.lora_embedding_A, mine.lora_embedding_B)),
                            (ref, (ref.lora_embedding_A["default"], ref.lora_embedding_B["default"]))):
            ka.copy_(a)
            kb.copy_(b)
    ids = torch.tensor([[1, 3, 7, 3, 49], [0, 5, 3, 2, 8]])   # 3 is the padding_idx
    outs, grads = [], []
    for m, (pa, pb) in ((mine, (mine.lora_embedding_A, mine.lora_embedding_B)),
                        (ref, (ref.lora_embedding_A["default"], ref.lora_embedding_B["default"]))):
        y = m(ids)
        y.pow(2).sum().backward()
        outs.append(y.detach())
        grads.append((pa.grad.clone(), pb.grad.clone()))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(grads[0][0][:, 3]) == 0       # no gradient for the padding row
    # merge folds the same ΔW PEFT's get_delta_weight gives
    torch.testing.assert_close(mine.delta_weight(), ref.get_delta_weight("default"), rtol=1e-6, atol=1e-6)


def test_patch_word_embeddings_step0_merge_unpatch_disable():
    model, batch = make_model("bert"), make_batch("bert")
    out0 = model_output(model, batch)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    spu_kernels.patch(model, "lora", r=4, target_modules=["word_embeddings", "query"])
    emb = model.bert.embeddings.word_embeddings
    assert isinstance(emb, LoRAEmbedding) and not emb.base_layer.weight.requires_grad
    assert emb.lora_embedding_A.requires_grad and emb.lora_embedding_B.requires_grad
    assert torch.equal(model_output(model, batch), out0)                 # A = 0: step 0 is exact
    with torch.no_grad():
        emb.lora_embedding_A.normal_()
    out_a = model_output(model, batch)
    with spu_kernels.disable_adapter(model):
        assert torch.equal(model_output(model, batch), out0)
    spu_kernels.merge_adapter(model)
    torch.testing.assert_close(model_output(model, batch), out_a, rtol=1e-5, atol=1e-6)
    spu_kernels.unmerge_adapter(model)
    assert torch.equal(model_output(model, batch), out_a)
    spu_kernels.unpatch(model)
    assert all(torch.equal(v, state0[k]) for k, v in model.state_dict().items())
    assert torch.equal(model_output(model, batch), out0)
    spu_kernels.patch(model, "lora", r=4, target_modules=["word_embeddings"])
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.lora_embedding_A.normal_()
    out_a = model_output(model, batch)
    spu_kernels.merge(model)
    assert type(model.bert.embeddings.word_embeddings) is nn.Embedding
    torch.testing.assert_close(model_output(model, batch), out_a, rtol=1e-5, atol=1e-6)


def test_embedding_errors():
    with pytest.raises(TypeError, match="only lora adapts nn.Embedding"):
        spu_kernels.patch(make_model("bert"), "siva", r=4, target_modules=["word_embeddings"])
    with pytest.raises(ValueError, match="r=64"):
        spu_kernels.patch(Tiny(), "lora", r=64, target_modules=["emb"])
    with pytest.raises(ValueError, match="trainable_modules.*frozen"):
        spu_kernels.patch(Tiny(), "lora", r=2, target_modules=["emb"], trainable_modules=["emb"])
    tied = spu_kernels.patch(Tiny(tie=True), "lora", r=2, target_modules=["emb"])
    assert tied.emb.tied
    for fn in (spu_kernels.merge, spu_kernels.merge_adapter):
        with pytest.raises(RuntimeError, match="tied to another module"):
            fn(tied)
    spu_kernels.unpatch(tied)
    assert tied.out.weight is tied.emb.weight
