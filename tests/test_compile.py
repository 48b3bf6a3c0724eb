"""Patched models under torch.compile(fullgraph=True): zero graph breaks, forward and backward, for
every method on every family of tests/models.py that the method supports; the compiled step gives
eager's loss and grads. On the CPU (CI) with the torch backend and dynamo's "aot_eager" backend:
dynamo captures the forward, AOTAutograd traces the joint forward+backward graph, and spu_kernels'
ops appear in it as custom ops (any graph break fails ``fullgraph=True``). Inductor runs on one case
only (tens of seconds on 2 cores); on a GPU, tests/test_gpu.py compiles with Inductor and triton.

Dropout under compilation: the seed is a tensor drawn inside the graph, so two compiled steps draw
different masks and backward regenerates the forward's (compiled grads equal eager's under the same
torch.manual_seed)."""
import pytest
import torch
from models import FAMILY_MODELS, make_batch, make_model

import spu_kernels

METHOD_OPTS = {
    "lora": {"r": 2, "dropout": 0.1}, "siva": {"r": 2}, "siva_kv": {"r": 2, "train_s": True}, "ia3": {},
    "krona": {}, "lst": {"r": 4}, "klst": {"k": 3, "r": 4}, "last_n": {"n": 1}, "bitfit": {},
    "prompt": {"n_tokens": 3},
}
LADDER_FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2")   # not T5 (yet)
BIASLESS_FAMILIES = ("t5", "llama", "mistral")   # patch refuses BitFit there: it would train nothing


def _supported(method, family):
    if method in ("lst", "klst"):
        return family in LADDER_FAMILIES
    return method != "bitfit" or family not in BIASLESS_FAMILIES


CASES = [(m, f) for m in METHOD_OPTS for f in FAMILY_MODELS if _supported(m, f)]


def _loss(model, batch):
    out = model(**batch).logits
    return out.float().square().mean()


def _patched(method, family):
    model = make_model(family).train()
    spu_kernels.patch(model, method, **METHOD_OPTS[method])
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _step(fn, model, batch, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = fn(model, batch)
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method,family", CASES)
def test_fullgraph_compile_matches_eager(method, family):
    model = _patched(method, family)
    batch = make_batch(family)
    with spu_kernels.use_backend("torch"):   # the compiled step first: a user's first call may be compiled
        compiled = torch.compile(_loss, backend="aot_eager", fullgraph=True)
        got_loss, got_grads = _step(compiled, model, batch, seed=3)
        want_loss, want_grads = _step(_loss, model, batch, seed=3)
    assert want_grads, "no parameter got a grad"
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_compiled_dropout_draws_a_new_mask_each_step():
    """The seed is a runtime value of the graph: two compiled calls differ, and each equals eager
    under the same torch.manual_seed (forward and the grads backward gets from the regenerated mask)."""
    model = _patched("lora", "bert")
    batch = make_batch("bert")
    compiled = torch.compile(_loss, backend="aot_eager", fullgraph=True)
    with spu_kernels.use_backend("torch"), torch._dynamo.config.patch(error_on_recompile=True):
        torch.manual_seed(11)
        first, second = compiled(model, batch), compiled(model, batch)
        torch.manual_seed(11)
        eager_first, eager_second = _loss(model, batch), _loss(model, batch)
    assert not torch.equal(first, second)
    torch.testing.assert_close(first, eager_first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, eager_second, rtol=1e-5, atol=1e-6)


def test_explain_counts_no_breaks_on_the_default_backend():
    """torch._dynamo.explain on a patched LoRA + IA3 model (the default backend on the CPU is torch)."""
    for method in ("lora", "ia3"):
        model = _patched(method, "llama")
        batch = make_batch("llama")
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(_loss)(model, batch)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def test_inductor_compiles_a_patched_model():
    """One Inductor compile (CPU codegen; the torch backend's ops stay opaque custom ops). In eval
    mode: Inductor draws the model's own nn.Dropout masks from its own generator, not eager's."""
    model = _patched("siva", "distilbert").eval()
    batch = make_batch("distilbert")
    with spu_kernels.use_backend("torch"):
        want_loss, want_grads = _step(_loss, model, batch, seed=0)
        got_loss, got_grads = _step(torch.compile(_loss, fullgraph=True), model, batch, seed=0)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-3, atol=1e-5)
