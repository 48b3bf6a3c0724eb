"""Determinism. (a) Two fine-tuning runs of the harness with the same seed (CPU) give bit-identical
metrics (results.json, timings and memory aside) and bit-identical adapter tensors, best and last;
another seed gives other ones. (b) The ops' outputs and gradients are bitwise reproducible call to
call (same inputs -> torch.equal) on the torch backend and on triton under the interpreter, with
enough tokens that the token-split paths of the triton kernels run: lowrank_linear with and
without dropout (fixed seed), kron_linear, ia3_linear (both sides), ia3_scaled_act and
ladder_cross_attention. The same check of triton on a CUDA GPU is marked ``gpu`` (skipped without
one). The interpreter runs programs one after another, so atomics would be reproducible there:
(c) checks the source instead: no Triton kernel adds with atomics; every op writes partial sums
and adds them in a fixed order (triton/partials.py)."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_harness import tiny_config, tiny_model  # noqa: F401  (fixtures)

from spu_kernels import ia3_linear, ia3_scaled_act, kron_linear, ladder_cross_attention, lowrank_linear
from spu_kernels.backends import available_backends
from spu_kernels.harness.config import from_dict
from spu_kernels.harness.train import run

VOLATILE = {"peak_memory_mb", "samples_per_s", "wall_s", "train_s", "output_dir"}
BACKENDS = [b for b in available_backends() if b in ("torch", "triton")]


# --------------------------------------------------------------------------------------------
# (a) the harness
# --------------------------------------------------------------------------------------------
def _run(raw, out):
    raw = json.loads(json.dumps(raw))
    raw["training"]["output_dir"] = str(out)
    run(from_dict(raw))
    res = {k: v for k, v in json.loads((out / "results.json").read_text()).items() if k not in VOLATILE}
    tensors = {f"best/{k}": v for k, v in load_file(out / "best" / "adapter.safetensors").items()}
    last = next((out / "checkpoints").iterdir())
    tensors.update({f"last/{k}": v for k, v in load_file(last / "adapter.safetensors").items()})
    return res, tensors


def test_two_runs_with_one_seed_give_identical_metrics_and_adapters(tiny_config, tmp_path):  # noqa: F811
    tiny_config["method"] = {"name": "lora", "args": {"r": 2, "dropout": 0.1}}   # dropout draws seeds too
    tiny_config["training"].update(epochs=2, max_steps=None, batch_size=16, seed=7, learning_rate=1e-2)
    res_a, w_a = _run(tiny_config, tmp_path / "a")
    res_b, w_b = _run(tiny_config, tmp_path / "b")
    assert res_a == res_b
    assert w_a.keys() == w_b.keys() and len(w_a) > 2
    differ = [k for k in w_a if not torch.equal(w_a[k], w_b[k])]
    assert not differ, f"adapter tensors differ between two runs with one seed: {differ}"
    tiny_config["training"]["seed"] = 8                      # and the comparison can tell runs apart
    _, w_c = _run(tiny_config, tmp_path / "c")
    assert any(not torch.equal(w_a[k], w_c[k]) for k in w_a)


# --------------------------------------------------------------------------------------------
# (b) the ops
# --------------------------------------------------------------------------------------------
def _inputs(device, dtype, T=130, K=24, N=20, r=4):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(device, dtype)   # noqa: E731
    return dict(x=rnd(2, T // 2, K), w=rnd(N, K, scale=K ** -0.5), bias=rnd(N), a=rnd(r, K, scale=K ** -0.5),
                b=rnd(N, r), g=rnd(r).abs() + 0.5, A=rnd(4, 6, scale=0.4), B=rnd(5, 4, scale=0.5),
                l_out=rnd(N).abs() + 0.5, l_in=rnd(K).abs() + 0.5, h=rnd(T, 33, scale=2.0), l_h=rnd(33).abs() + 0.5,
                q=rnd(T, 4, 6), c=rnd(3, T, 24), wk=rnd(24, 24, scale=0.2), wv=rnd(24, 24, scale=0.2),
                dy=rnd(2, T // 2, N), dh=rnd(T, 33), do=rnd(T, 4, 6))


def _cases(backend):
    """name -> fn(t) -> (output, inputs that get a grad, grad of the output)."""
    return {
        "lowrank_linear": lambda t: (lowrank_linear(t["x"], t["w"], t["bias"], t["a"], t["b"], scale=0.5,
                                                    rank_scale=t["g"], backend=backend),
                                     ("x", "bias", "a", "b", "g"), t["dy"]),
        "lowrank_linear_dropout": lambda t: (lowrank_linear(t["x"], t["w"], t["bias"], t["a"], t["b"], scale=0.5,
                                                            rank_scale=t["g"], dropout_p=0.3, seed=2024,
                                                            backend=backend),
                                             ("x", "bias", "a", "b", "g"), t["dy"]),
        "kron_linear": lambda t: (kron_linear(t["x"], t["w"], t["bias"], t["A"], t["B"], scale=0.7, backend=backend),
                                  ("x", "bias", "A", "B"), t["dy"]),
        "ia3_linear_output": lambda t: (ia3_linear(t["x"], t["w"], t["bias"], t["l_out"], side="output",
                                                   backend=backend), ("x", "bias", "l_out"), t["dy"]),
        "ia3_linear_input": lambda t: (ia3_linear(t["x"], t["w"], t["bias"], t["l_in"], side="input",
                                                  backend=backend), ("x", "bias", "l_in"), t["dy"]),
        "ia3_scaled_act": lambda t: (ia3_scaled_act(t["h"], t["l_h"], "gelu", backend=backend), ("h", "l_h"), t["dh"]),
        "ladder_cross_attention": lambda t: (ladder_cross_attention(t["q"], t["c"], t["wk"], t["wv"], backend=backend),
                                             ("q", "c", "wk", "wv"), t["do"]),
    }


def _forward_backward(case, device, dtype, T):
    t = _inputs(device, dtype, T)
    y, wants, dy = case({k: v.requires_grad_(k not in ("w", "dy", "dh", "do")) for k, v in t.items()})
    grads = torch.autograd.grad(y, [t[k] for k in wants], dy)
    return [y.detach()] + list(grads)


def _check_reproducible(backend, name, device, dtype, T=130):
    case = _cases(backend)[name]
    first = _forward_backward(case, device, dtype, T)
    for _ in range(2):
        again = _forward_backward(case, device, dtype, T)
        for i, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"{backend} {name}: {'output' if i == 0 else f'grad {i}'} differs between calls"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_cases("torch")))
def test_op_grads_are_bitwise_reproducible(backend, name):
    _check_reproducible(backend, name, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(_cases("triton")))
def test_op_grads_are_bitwise_reproducible_on_gpu_triton(name, dtype):
    if "triton" not in available_backends():
        pytest.skip("no triton backend")
    _check_reproducible("triton", name, "cuda", dtype, T=8192)       # many token splits and column blocks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["lowrank_linear", "lowrank_linear_dropout"])
def test_op_grads_are_bitwise_reproducible_on_gpu_cuda(name, dtype):
    if "cuda" not in available_backends():
        pytest.skip("no cuda backend")
    _check_reproducible("cuda", name, "cuda", dtype, T=8192)


# --------------------------------------------------------------------------------------------
# (c) no atomics where the order of a sum would depend on which program ran first
# --------------------------------------------------------------------------------------------
def test_no_triton_kernel_uses_atomics():
    import spu_kernels.triton as kernels
    sources = list(Path(kernels.__file__).parent.glob("*.py"))
    assert len(sources) > 8
    using = sorted(p.name for p in sources if re.search(r"\btl\.atomic_\w+\(", p.read_text()))
    assert using == [], f"Triton sources with atomics: {using}"


def test_no_cuda_kernel_uses_atomics():
    sources = list((Path(__file__).parent.parent / "csrc").glob("*.cu*"))
    assert len(sources) >= 2
    using = sorted(p.name for p in sources if re.search(r"\batomic[A-Z]\w*\(", p.read_text()))
    assert using == [], f"CUDA sources with atomics: {using}"
