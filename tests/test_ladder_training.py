"""A 20-step training loop through a ladder side network: the loss falls (the task head frozen, so the
side network alone learns), the frozen backbone does not move and never gets a grad; k-LST on every
backend (the Triton kernel runs on the CPU through the interpreter)."""
import pytest
import torch
from models import make_batch, make_model

import spu_kernels
from spu_kernels.backends import available_backends
from spu_kernels.ops.ladder_cross_attention import IMPLEMENTED

CASES = [("bert", "lst", {}, "torch"), ("gpt2", "lst", {}, "torch")]
CASES += [("bert", "klst", {"k": 3}, b) for b in available_backends() if b in IMPLEMENTED]
CASES += [("llama", "klst", {"k": 5}, "torch")]


@pytest.mark.parametrize("family, method, opts, backend", CASES)
def test_loss_falls_in_20_steps(family, method, opts, backend):
    model = make_model(family).train()
    for m in model.modules():      # the backbone's dropout off: a clean signal
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    causal_lm = family == "llama"
    batch = make_batch(family, batch=8, seq=12, seed=4)
    labels = batch["input_ids"] if causal_lm else torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    head = model.lm_head if causal_lm else model.classifier if hasattr(model, "classifier") else model.score
    with torch.no_grad():   # a head that passes signal: the side network alone must learn the task
        head.weight.normal_(std=1.0)
    spu_kernels.patch(model, method, r=4, train_head=False, **opts)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(".side." in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    with spu_kernels.use_backend(backend):
        for _ in range(20):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    assert losses[-1] < (0.7 if causal_lm else 0.5) * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
