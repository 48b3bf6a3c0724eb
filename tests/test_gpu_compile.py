"""GPU only (skipped without CUDA): patched models under torch.compile with Inductor on the default
(triton) backend, whose ops are ``triton_op``s that Inductor traces into; and CUDA graphs
(``mode="reduce-overhead"``) with dropout drawing a new mask every replay."""
import pytest
import torch
from models import make_batch, make_model

import spu_kernels

pytestmark = pytest.mark.gpu

CASES = [("lora", "llama", {"r": 4}), ("siva", "roberta", {"r": 4}), ("ia3", "bert", {}), ("krona", "llama", {}),
         ("klst", "roberta", {"k": 3, "r": 4}), ("siva_kv", "gpt2", {"r": 4, "train_s": True})]


def _loss(model, batch):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(**batch).logits.float().square().mean()


def _model(method, family, opts):
    model = make_model(family).cuda().eval()    # eval: Inductor draws nn.Dropout masks from its own RNG
    spu_kernels.patch(model, method, **opts)
    return model


def _step(fn, model, batch):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method,family,opts", CASES, ids=[f"{m}-{f}" for m, f, _ in CASES])
def test_inductor_fullgraph_matches_eager(method, family, opts):
    model = _model(method, family, opts)
    batch = {k: v.cuda() for k, v in make_batch(family).items()}
    want_loss, want = _step(_loss, model, batch)
    got_loss, got = _step(torch.compile(_loss, fullgraph=True), model, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=1e-4)
    assert got.keys() == want.keys() and want
    for name, g in want.items():
        err = (got[name].float() - g.float()).abs().max() / g.float().abs().max().clamp_min(1e-6)
        assert err < 5e-2, f"{name}: relative error {err:.3g}"


def test_reduce_overhead_dropout_draws_new_masks():
    """CUDA graphs: the seed is drawn inside the captured graph, so replays differ; training runs."""
    model = make_model("llama").cuda().train()
    spu_kernels.patch(model, "lora", r=4, dropout=0.3)
    with torch.no_grad():   # B starts at zero, which would hide the mask: give the adapters an output
        for p in model.parameters():
            if p.requires_grad and p.dim() == 2 and not p.any():
                p.normal_()
    batch = {k: v.cuda() for k, v in make_batch("llama").items()}
    step = torch.compile(_loss, mode="reduce-overhead", fullgraph=True)
    losses = []
    for _ in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        loss = step(model, batch)
        loss.backward()
        losses.append(loss.item())
    assert len(set(losses[1:])) == 3, f"replays repeated a dropout mask: {losses}"
