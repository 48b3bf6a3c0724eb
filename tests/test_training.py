"""A 20-step training loop on a tiny BERT: the loss falls, through the adapters alone (the head
frozen), on every backend; the frozen weights do not move."""
import pytest
import torch
from helpers import LOWRANK_BACKENDS
from models import make_batch, make_model

import spu_kernels

TARGETS = r"bert\.encoder\.layer\.1\.attention\.self\.(query|value)"


@pytest.mark.parametrize("backend", LOWRANK_BACKENDS)
@pytest.mark.parametrize("method, opts", [("lora", {"dropout": 0.1, "alpha": 16}), ("siva", {"train_s": True})])
def test_loss_falls_in_20_steps(backend, method, opts):
    model = make_model("bert").train()
    batch = make_batch("bert", batch=8, seq=12, seed=4)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    with torch.no_grad():   # a head that passes signal: the adapters alone must learn the task
        model.classifier.weight.normal_(std=1.0)
    for m in model.modules():   # the model's own dropout off (the adapter's stays): a clean signal
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    # the last layer's query and value only: keeps the Triton interpreter run short on CPU
    spu_kernels.patch(model, method, r=4, train_head=False, target_modules=TARGETS, **opts)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(("lora_" in n or "siva_" in n) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=5e-2)
    losses = []
    with spu_kernels.use_backend(backend):
        for _ in range(20):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
