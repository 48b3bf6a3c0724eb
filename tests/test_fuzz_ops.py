"""Property-based tests (hypothesis) of the fused ops against an independent float64 implementation
written here from the formulas in README.md and the ops' docstrings (never the package's own
``*_reference`` functions): ``lowrank_linear``, ``kron_linear``, ``ia3_linear`` (output and input
side), ``ia3_scaled_act``, ``ia3_dynamic_linear``, ``bottleneck_adapter`` and ``ladder_cross_attention``,
forward and every gradient, on every backend this machine has (torch; triton under TRITON_INTERPRET=1).

What is drawn: leading dims, small sizes (T·K·N stays tiny), the layout of the input (contiguous,
a strided slice, transposed, broadcast with stride 0; transposed W), the dtype (fp32 / fp16 / bf16
on torch, fp32 / fp16 on triton, whose interpreter computes bf16 dots wrongly), fp32 master copies
of the trainable tensors or the activation dtype, bias or none, which inputs need a grad, scales
(0 and negative included), the dropout p and a seed anywhere in [0, 2**63) (the reference applies
the mask that ``spu_kernels.ops.dropout_rng.dropout_keep_mask`` gives), value magnitudes.

Tolerance: the op's largest error, relative to the size of the terms summed (for the linear ops
the same math on |inputs|, |scale|, |dy|: the classic bound of a sum's rounding, so that a result
that cancels to ~0 is not held to a relative bound it cannot meet; for the activation and the
attention, the result's largest magnitude), must be within 4x the worst of the rounding baselines --
plain torch computing the formula in that dtype (for the activation also torch's own F.gelu / F.silu,
for the attention also the log-sum-exp form the op documents), and the float64 math on the inputs
rounded to that dtype -- and is never held below max(REL_CEILING/10, 2 eps) of the dtype
(REL_CEILING from helpers.py). A wrong mask, scale, transpose or missing term errs by O(1).
The attention's scores are kept O(1..10): with |scores| >> 1 the softmax saturates and its grads are
ill-conditioned in the rounding of the projected keys (equally valid orders then differ by 10x).

Runs are reproducible (``derandomize=True``, no example database). The number of examples per op
comes from ``SPU_FUZZ_EXAMPLES`` (default 150 on the torch backend, a quarter of that, at least 3,
on triton under the interpreter: the whole file takes ~20 s on 2 cores). A longer manual run
(``SPU_FUZZ_RANDOM=1`` draws new examples each time instead of the fixed ones):

    SPU_FUZZ_EXAMPLES=500 TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_fuzz_ops.py
"""
import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from helpers import REL_CEILING
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from spu_kernels import (
    bottleneck_adapter,
    ia3_dynamic_linear,
    ia3_linear,
    ia3_scaled_act,
    kron_linear,
    ladder_cross_attention,
    lowrank_linear,
)
from spu_kernels.backends import available_backends
from spu_kernels.ops.dropout_rng import dropout_keep_mask

# hypothesis's cache (constants it collects) goes to the temp dir, not into the repository
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "spu_kernels_hypothesis"))

BACKENDS = [b for b in available_backends() if b in ("torch", "triton")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
EXAMPLES = int(os.environ.get("SPU_FUZZ_EXAMPLES", "150"))
TRITON_EXAMPLES = max(3, EXAMPLES // 4)


def fuzz_settings(backend):
    return settings(max_examples=EXAMPLES if backend == "torch" or ON_GPU else TRITON_EXAMPLES,
                    derandomize=not os.environ.get("SPU_FUZZ_RANDOM"), database=None, deadline=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def dtypes_for(backend):
    if backend == "triton" and not ON_GPU:
        return [torch.float32, torch.float16]        # the interpreter computes bf16 tl.dot wrongly
    return [torch.float32, torch.float16, torch.bfloat16]


def small(backend):
    """Size bound per dim: the interpreter runs a Triton program in ~ms, so triton stays tinier."""
    return 6 if backend == "triton" and not ON_GPU else 10


# --------------------------------------------------------------------------------------------
# the comparison
# --------------------------------------------------------------------------------------------
def err_vs(got, want, mag):
    """max |got - want| relative to ``mag``'s largest value (the size of the result's terms)."""
    return ((got.double() - want).abs().max() / mag.abs().max().clamp_min(1e-300)).item()


def check_close(got, want, mag, dtype, name, baselines):
    """``got`` (the op) vs ``want`` (float64 math), errors relative to ``mag``: within 4x the worst
    of ``baselines`` (what plain torch and input rounding give in ``dtype``), and never held below
    max(REL_CEILING/10, 2 eps) of the dtype."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = err_vs(got, want, mag)
    floor = max(REL_CEILING[dtype] / 10, 2 * torch.finfo(dtype).eps)
    base = max(err_vs(b, want, mag) for b in baselines)
    limit = max(4 * base, floor)
    assert err <= limit, f"{name}: relative error {err:.3e} > {limit:.3e} ({dtype}; the baseline errs {base:.3e})"


def run_grads(fn, leaves, dy):
    """fn(leaves) -> y; (y, {name: grad}) for the leaves that require a grad."""
    y = fn(leaves)
    want = {k: v for k, v in leaves.items() if v is not None and v.requires_grad}
    grads = torch.autograd.grad(y, list(want.values()), dy, allow_unused=True)
    return y, {k: (g if g is not None else torch.zeros_like(want[k])) for k, g in zip(want, grads)}


def clone_leaves(leaves, dtype, fn=None):
    """Detached copies cast to ``dtype`` (``fn`` applied), with the same requires_grad."""
    return {k: (None if v is None else (fn(v.detach()) if fn else v.detach()).to(dtype).requires_grad_(v.requires_grad))
            for k, v in leaves.items()}


def compare(op, math_fn, leaves, dy, dtype, tag, multilinear=True, baseline_fns=()):
    """op(leaves) against ``math_fn`` in float64 (the truth), forward and the grad of every leaf that
    requires one. Rounding baselines: ``math_fn`` (and ``baseline_fns``) run by plain torch in
    ``dtype``, and ``math_fn`` in float64 on the inputs rounded to ``dtype``. Errors are relative to
    the size of the terms summed: for a ``multilinear`` op the same math on |inputs|, |scale|, |dy|
    (the classic bound of a sum's rounding: cancellation in the result does not make it unfair),
    else the result's own largest magnitude."""
    y, grads = run_grads(op, leaves, dy)
    d64 = clone_leaves(leaves, torch.float64)
    y64, g64 = run_grads(math_fn, d64, dy.double())
    if multilinear:
        a64 = clone_leaves(leaves, torch.float64, torch.abs)
        ymag, gmag = run_grads(lambda t: math_fn(t, mag=True), a64, dy.double().abs())
    else:
        ymag, gmag = y64, g64
    rounded = clone_leaves(clone_leaves(leaves, dtype), torch.float64)
    baselines = [run_grads(math_fn, rounded, dy.double())]
    for fn in (math_fn, *baseline_fns):
        baselines.append(run_grads(fn, clone_leaves(leaves, dtype), dy))
    assert y.dtype == dtype, f"{tag}: output dtype {y.dtype}, want {dtype}"
    check_close(y, y64, ymag, dtype, f"{tag} y", [b[0] for b in baselines])
    assert set(grads) == set(g64)
    for k in grads:
        assert grads[k].dtype == leaves[k].dtype, f"{tag} grad_{k}: dtype {grads[k].dtype} != {leaves[k].dtype}"
        check_close(grads[k], g64[k], gmag[k], dtype, f"{tag} grad_{k}", [b[1][k] for b in baselines])


# --------------------------------------------------------------------------------------------
# drawing inputs: the leaf tensors and the view the op sees
# --------------------------------------------------------------------------------------------
LAYOUTS = ["contig", "strided", "transposed", "broadcast"]


@st.composite
def lead_dims(draw, max_tokens):
    dims = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    while math.prod(dims) > max_tokens:
        dims[dims.index(max(dims))] -= 1
    return tuple(dims)


def make_x_leaf(gen, lead, k, layout, dtype, mag):
    """(leaf, view): the op gets ``view(leaf)`` of shape (*lead, k); grads flow back to the leaf."""
    rnd = lambda *s: (mag * torch.randn(*s, generator=gen)).to(DEVICE, dtype)
    if layout == "strided":
        return rnd(*lead, 2 * k), lambda t: t[..., ::2]
    if layout == "transposed":
        return rnd(k, *lead), lambda t: t.movedim(0, -1)
    if layout == "broadcast" and len(lead) >= 2:       # stride 0 on the first leading dim
        return rnd(1, *lead[1:], k), lambda t: t.expand(*lead, k)
    return rnd(*lead, k), lambda t: t


@st.composite
def common(draw, backend):
    return dict(dtype=draw(st.sampled_from(dtypes_for(backend))),
                seed=draw(st.integers(0, 2**31 - 1)),
                layout=draw(st.sampled_from(LAYOUTS)),
                mag=draw(st.sampled_from([1.0, 1.0, 0.05, 8.0])),
                master_fp32=draw(st.booleans()))


def _param(gen, shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen)


def frozen_linear_inputs(c, K, N):
    """(generator, dtype of the adapters' master weights, x leaf, the view the op gets, W) of a
    frozen-linear case: x of width K in the case's layout, W (N, K) or, for GPT-2's Conv1D layout
    (``w_t``), the transpose of a (K, N) tensor; the generator goes on to draw the rest."""
    dt = c["dtype"]
    gen = torch.Generator().manual_seed(c["seed"])
    xleaf, view = make_x_leaf(gen, c["lead"], K, c["layout"], dt, c["mag"])
    w = _param(gen, (K, N) if c["w_t"] else (N, K), K ** -0.5).to(DEVICE, dt)
    return gen, (torch.float32 if c["master_fp32"] else dt), xleaf, view, (w.t() if c["w_t"] else w)


def _leaf(t, dtype, grad):
    return t.to(DEVICE, dtype).requires_grad_(grad)


# --------------------------------------------------------------------------------------------
# lowrank_linear:  y = x Wᵀ + b + s · ((drop(x) Aᵀ) ⊙ g) Bᵀ
# --------------------------------------------------------------------------------------------
@st.composite
def lowrank_cases(draw, backend):
    c = draw(common(backend))
    m = small(backend)
    c.update(lead=draw(lead_dims(m)), K=draw(st.integers(1, m)), N=draw(st.integers(1, m)), r=draw(st.integers(1, 4)),
             bias=draw(st.booleans()), g=draw(st.sampled_from([None, "pos", "signed", "zeros"])),
             w_t=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 0.7, -1.3, 0.0, 2.5])),
             p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]) | st.floats(0.0, 0.95)),
             drop_seed=draw(st.integers(0, 2**63 - 1)),
             grads=draw(st.sets(st.sampled_from(["x", "bias", "a", "b", "g"]), min_size=1)))
    return c


def lowrank_math(t, view, scale, p, seed):
    x = view(t["x"])
    k = x.shape[-1]
    h = x
    if p > 0:
        keep = dropout_keep_mask(seed, x.numel() // k, k, p, x.device).view(x.shape)
        h = torch.where(keep, x / (1 - p), torch.zeros_like(x))
    u = h @ t["a"].to(x.dtype).t()
    if t["g"] is not None:
        u = u * t["g"].to(x.dtype)
    y = x @ t["w"].to(x.dtype).t() + scale * (u @ t["b"].to(x.dtype).t())
    if t["bias"] is not None:
        y = y + t["bias"]
    return y


@pytest.mark.parametrize("backend", BACKENDS)
def test_lowrank_linear_matches_float64_math(backend):
    @fuzz_settings(backend)
    @given(c=lowrank_cases(backend))
    def check(c):
        dt, K, N, r = c["dtype"], c["K"], c["N"], c["r"]
        gen, pdt, xleaf, view, w = frozen_linear_inputs(c, K, N)
        g = None
        if c["g"] is not None:
            g = {"pos": torch.rand(r, generator=gen) + 0.5, "signed": torch.randn(r, generator=gen),
                 "zeros": torch.zeros(r)}[c["g"]]
        leaves = dict(x=_leaf(xleaf, dt, "x" in c["grads"]), w=w,
                      bias=_leaf(_param(gen, (N,)), dt, "bias" in c["grads"]) if c["bias"] else None,
                      a=_leaf(_param(gen, (r, K), K ** -0.5), pdt, "a" in c["grads"]),
                      b=_leaf(_param(gen, (N, r), 0.5), pdt, "b" in c["grads"]),
                      g=_leaf(g, pdt, "g" in c["grads"]) if g is not None else None)
        if not any(v is not None and v.requires_grad for v in leaves.values()):
            leaves["a"].requires_grad_(True)
        dy = torch.randn(*c["lead"], N, generator=gen).to(DEVICE, dt)
        s, p, seed = c["scale"], c["p"], c["drop_seed"]

        def op(t):
            return lowrank_linear(view(t["x"]), t["w"], t["bias"], t["a"], t["b"], scale=s, rank_scale=t["g"],
                                  dropout_p=p, seed=seed, backend=backend)

        def math_fn(t, mag=False):
            return lowrank_math(t, view, abs(s) if mag else s, p, seed)
        compare(op, math_fn, leaves, dy, dt, f"{backend} lowrank_linear")
    check()


# --------------------------------------------------------------------------------------------
# kron_linear:  y = x Wᵀ + b + s · x (A ⊗ B)ᵀ   (stacked: one term per column slice)
# --------------------------------------------------------------------------------------------
@st.composite
def kron_cases(draw, backend):
    c = draw(common(backend))
    f = 3 if backend == "triton" and not ON_GPU else 4
    a1, a2, b1, b2 = (draw(st.integers(1, f)) for _ in range(4))
    stacked = draw(st.sampled_from([None, 1, 2]))
    width = a1 * b1
    if stacked is None:
        offsets, N = None, width
    else:
        gaps = [draw(st.integers(0, 2)) for _ in range(stacked + 1)]
        offsets, pos = [], gaps[0]
        for gap in gaps[1:]:
            offsets.append(pos)
            pos += width + gap
        N = pos
    c.update(lead=draw(lead_dims(small(backend))), a_shape=(a1, a2), b_shape=(b1, b2), stacked=stacked,
             offsets=offsets, N=N, bias=draw(st.booleans()), w_t=draw(st.booleans()),
             scale=draw(st.sampled_from([1.0, 0.7, -2.0, 0.0])),
             grads=draw(st.sets(st.sampled_from(["x", "bias", "A", "B"]), min_size=1)))
    return c


def kron_math(t, view, scale, offsets):
    x = view(t["x"])
    y = x @ t["w"].to(x.dtype).t()
    if t["bias"] is not None:
        y = y + t["bias"]
    A, B = t["A"].to(x.dtype), t["B"].to(x.dtype)
    if A.dim() == 2:
        A, B, offsets = A[None], B[None], [0]
    pieces, prev = [], 0
    for s, off in enumerate(offsets):
        a1, a2 = A[s].shape
        b1, b2 = B[s].shape
        kron = torch.einsum("ip,jq->ijpq", A[s], B[s]).reshape(a1 * b1, a2 * b2)    # (A ⊗ B)
        pieces += [y[..., prev:off], y[..., off:off + a1 * b1] + scale * (x @ kron.t())]
        prev = off + a1 * b1
    pieces.append(y[..., prev:])
    return torch.cat(pieces, dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_linear_matches_float64_math(backend):
    @fuzz_settings(backend)
    @given(c=kron_cases(backend))
    def check(c):
        dt, N = c["dtype"], c["N"]
        (a1, a2), (b1, b2) = c["a_shape"], c["b_shape"]
        K = a2 * b2
        gen, pdt, xleaf, view, w = frozen_linear_inputs(c, K, N)
        S = () if c["stacked"] is None else (c["stacked"],)
        leaves = dict(x=_leaf(xleaf, dt, "x" in c["grads"]), w=w,
                      bias=_leaf(_param(gen, (N,)), dt, "bias" in c["grads"]) if c["bias"] else None,
                      A=_leaf(_param(gen, (*S, a1, a2), a2 ** -0.5), pdt, "A" in c["grads"]),
                      B=_leaf(_param(gen, (*S, b1, b2), b2 ** -0.5), pdt, "B" in c["grads"]))
        if not any(v is not None and v.requires_grad for v in leaves.values()):
            leaves["A"].requires_grad_(True)
        dy = torch.randn(*c["lead"], N, generator=gen).to(DEVICE, dt)
        s, offs = c["scale"], c["offsets"]

        def op(t):
            return kron_linear(view(t["x"]), t["w"], t["bias"], t["A"], t["B"], scale=s, out_offsets=offs,
                               backend=backend)

        def math_fn(t, mag=False):
            return kron_math(t, view, abs(s) if mag else s, offs)
        compare(op, math_fn, leaves, dy, dt, f"{backend} kron_linear")
    check()


# --------------------------------------------------------------------------------------------
# ia3_linear:  output side y = (x Wᵀ + b) ⊙ l;  input side y = (x ⊙ l) Wᵀ + b
# --------------------------------------------------------------------------------------------
@st.composite
def ia3_cases(draw, backend):
    c = draw(common(backend))
    m = small(backend)
    c.update(lead=draw(lead_dims(m)), K=draw(st.integers(1, m)), N=draw(st.integers(1, m)),
             side=draw(st.sampled_from(["output", "input"])), bias=draw(st.booleans()), w_t=draw(st.booleans()),
             l_kind=draw(st.sampled_from(["ones", "pos", "signed", "some_zeros", "zeros"])),
             grads=draw(st.sets(st.sampled_from(["x", "bias", "l"]), min_size=1)))
    return c


def make_l(gen, n, kind):
    if kind == "ones":
        return torch.ones(n)
    if kind == "pos":
        return torch.rand(n, generator=gen) + 0.5
    if kind == "signed":
        return torch.randn(n, generator=gen)
    if kind == "zeros":
        return torch.zeros(n)
    l = torch.rand(n, generator=gen) + 0.5
    l[torch.rand(n, generator=gen) < 0.4] = 0.0
    return l


def ia3_math(t, view, side):
    x = view(t["x"])
    w, l = t["w"].to(x.dtype), t["l"].to(x.dtype)
    if side == "input":
        y = (x * l) @ w.t()
        return y + t["bias"] if t["bias"] is not None else y
    z = x @ w.t()
    if t["bias"] is not None:
        z = z + t["bias"]
    return z * l


@pytest.mark.parametrize("backend", BACKENDS)
def test_ia3_linear_matches_float64_math(backend):
    @fuzz_settings(backend)
    @given(c=ia3_cases(backend))
    def check(c):
        dt, K, N, side = c["dtype"], c["K"], c["N"], c["side"]
        gen, pdt, xleaf, view, w = frozen_linear_inputs(c, K, N)
        leaves = dict(x=_leaf(xleaf, dt, "x" in c["grads"]), w=w,
                      bias=_leaf(_param(gen, (N,)), dt, "bias" in c["grads"]) if c["bias"] else None,
                      l=_leaf(make_l(gen, N if side == "output" else K, c["l_kind"]), pdt, "l" in c["grads"]))
        if not any(v is not None and v.requires_grad for v in leaves.values()):
            leaves["l"].requires_grad_(True)
        dy = torch.randn(*c["lead"], N, generator=gen).to(DEVICE, dt)

        def op(t):
            return ia3_linear(view(t["x"]), t["w"], t["bias"], t["l"], side=side, backend=backend)

        def math_fn(t, mag=False):
            return ia3_math(t, view, side)
        compare(op, math_fn, leaves, dy, dt, f"{backend} ia3_linear[{side}]")
    check()


# --------------------------------------------------------------------------------------------
# ia3_dynamic_linear:  y = (x Wᵀ + b) ⊙ (1 + tanh((x Dᵀ) Uᵀ))
# --------------------------------------------------------------------------------------------
@st.composite
def ia3_dynamic_cases(draw, backend):
    c = draw(common(backend))
    m = small(backend)
    c.update(lead=draw(lead_dims(m)), K=draw(st.integers(1, m)), N=draw(st.integers(1, m)), r=draw(st.integers(1, 5)),
             bias=draw(st.booleans()), w_t=draw(st.booleans()), u_scale=draw(st.sampled_from([0.0, 0.3, 1.0, 4.0])),
             grads=draw(st.sets(st.sampled_from(["x", "bias", "down", "up"]), min_size=1)))
    return c


@pytest.mark.parametrize("backend", BACKENDS)
def test_ia3_dynamic_linear_matches_float64_math(backend):
    @fuzz_settings(backend)
    @given(c=ia3_dynamic_cases(backend))
    def check(c):
        dt, K, N, r = c["dtype"], c["K"], c["N"], c["r"]
        gen, pdt, xleaf, view, w = frozen_linear_inputs(c, K, N)
        leaves = dict(x=_leaf(xleaf, dt, "x" in c["grads"]), w=w,
                      bias=_leaf(_param(gen, (N,)), dt, "bias" in c["grads"]) if c["bias"] else None,
                      down=_leaf(_param(gen, (r, K), K ** -0.5), pdt, "down" in c["grads"]),
                      up=_leaf(_param(gen, (N, r), c["u_scale"]), pdt, "up" in c["grads"]))
        if not any(v is not None and v.requires_grad for v in leaves.values()):
            leaves["up"].requires_grad_(True)
        dy = torch.randn(*c["lead"], N, generator=gen).to(DEVICE, dt)

        def op(t):
            return ia3_dynamic_linear(view(t["x"]), t["w"], t["bias"], t["down"], t["up"], backend=backend)

        def math_fn(t):
            x = view(t["x"])
            z = x @ t["w"].to(x.dtype).t()
            if t["bias"] is not None:
                z = z + t["bias"]
            return z * (1 + torch.tanh((x @ t["down"].to(x.dtype).t()) @ t["up"].to(x.dtype).t()))
        compare(op, math_fn, leaves, dy, dt, f"{backend} ia3_dynamic_linear", multilinear=False)
    check()


# --------------------------------------------------------------------------------------------
# bottleneck_adapter:  y = h + act(h W_dᵀ + b_d) W_uᵀ + b_u
# --------------------------------------------------------------------------------------------
BOTTLENECK_ACT = {"relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
                  "gelu": lambda z: 0.5 * z * torch.erfc(-z / math.sqrt(2.0)),
                  "silu": lambda z: z * torch.sigmoid(z), "tanh": torch.tanh}


@st.composite
def bottleneck_cases(draw, backend):
    c = draw(common(backend))
    m = small(backend)
    c.update(lead=draw(lead_dims(2 * m)), D=draw(st.integers(1, 2 * m)), r=draw(st.integers(1, 5)),
             biases=draw(st.booleans()), activation=draw(st.sampled_from(sorted(BOTTLENECK_ACT))),
             up_scale=draw(st.sampled_from([0.0, 0.3, 1.0])),
             grads=draw(st.sets(st.sampled_from(["h", "wd", "bd", "wu", "bu"]), min_size=1)))
    return c


@pytest.mark.parametrize("backend", BACKENDS)
def test_bottleneck_adapter_matches_float64_math(backend):
    @fuzz_settings(backend)
    @given(c=bottleneck_cases(backend))
    def check(c):
        dt, D, r, act = c["dtype"], c["D"], c["r"], c["activation"]
        gen = torch.Generator().manual_seed(c["seed"])
        pdt = torch.float32 if c["master_fp32"] else dt
        hleaf, view = make_x_leaf(gen, c["lead"], D, c["layout"], dt, c["mag"])
        leaves = dict(h=_leaf(hleaf, dt, "h" in c["grads"]),
                      wd=_leaf(_param(gen, (r, D), D ** -0.5 / c["mag"]), pdt, "wd" in c["grads"]),
                      bd=_leaf(_param(gen, (r,)), pdt, "bd" in c["grads"]) if c["biases"] else None,
                      wu=_leaf(_param(gen, (D, r), c["up_scale"]), pdt, "wu" in c["grads"]),
                      bu=_leaf(_param(gen, (D,)), pdt, "bu" in c["grads"]) if c["biases"] else None)
        if not any(v is not None and v.requires_grad for v in leaves.values()):
            leaves["wu"].requires_grad_(True)
        dy = torch.randn(*c["lead"], D, generator=gen).to(DEVICE, dt)

        def op(t):
            return bottleneck_adapter(view(t["h"]), t["wd"], t["bd"], t["wu"], t["bu"], act, backend=backend)

        def math_fn(t):
            h = view(t["h"])
            cast = lambda v: v.to(h.dtype) if v is not None else None
            z = h @ cast(t["wd"]).t()
            if t["bd"] is not None:
                z = z + cast(t["bd"])
            y = h + BOTTLENECK_ACT[act](z) @ cast(t["wu"]).t()
            return y + cast(t["bu"]) if t["bu"] is not None else y
        compare(op, math_fn, leaves, dy, dt, f"{backend} bottleneck_adapter[{act}]", multilinear=False)
    check()


# --------------------------------------------------------------------------------------------
# ia3_scaled_act:  y = act(h) ⊙ l
# --------------------------------------------------------------------------------------------
def act_math(h, activation):
    """act(h); written with erfc / sigmoid, where 1 + erf(h/√2) and 1 + tanh(u) cancel for h << 0."""
    if activation == "gelu":                     # h Φ(h)
        return 0.5 * h * torch.erfc(-h / math.sqrt(2.0))
    if activation == "gelu_tanh":                # 0.5 h (1 + tanh(u)) = h σ(2u)
        return h * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))
    if activation == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    return h * torch.sigmoid(h)


TORCH_ACT = {"gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu, "silu": F.silu}


@st.composite
def act_cases(draw, backend):
    c = draw(common(backend))
    c.update(lead=draw(lead_dims(3 * small(backend))), F=draw(st.integers(1, 2 * small(backend))),
             activation=draw(st.sampled_from(["gelu", "gelu_tanh", "relu", "silu"])),
             l_kind=draw(st.sampled_from(["ones", "pos", "signed", "some_zeros"])),
             grads=draw(st.sets(st.sampled_from(["h", "l"]), min_size=1)))
    c["mag"] = draw(st.sampled_from([2.0, 0.1, 6.0]))
    return c


@pytest.mark.parametrize("backend", BACKENDS)
def test_ia3_scaled_act_matches_float64_math(backend):
    @fuzz_settings(backend)
    @given(c=act_cases(backend))
    def check(c):
        dt, F, act = c["dtype"], c["F"], c["activation"]
        gen = torch.Generator().manual_seed(c["seed"])
        pdt = torch.float32 if c["master_fp32"] else dt
        hleaf, view = make_x_leaf(gen, c["lead"], F, c["layout"], dt, c["mag"])
        leaves = dict(h=_leaf(hleaf, dt, "h" in c["grads"]),
                      l=_leaf(make_l(gen, F, c["l_kind"]), pdt, "l" in c["grads"]))
        dy = torch.randn(*c["lead"], F, generator=gen).to(DEVICE, dt)

        def op(t):
            return ia3_scaled_act(view(t["h"]), t["l"], act, backend=backend)

        def math_fn(t):
            h = view(t["h"])
            return act_math(h, act) * t["l"].to(h.dtype)

        def torch_act(t):              # plain torch's own activation (F.gelu loses digits for h << 0)
            h = view(t["h"])
            return TORCH_ACT[act](h) * t["l"].to(h.dtype)
        compare(op, math_fn, leaves, dy, dt, f"{backend} ia3_scaled_act[{act}]", multilinear=False,
                baseline_fns=[torch_act])
    check()


# --------------------------------------------------------------------------------------------
# ladder_cross_attention:  o_{t,h} = Σ_j softmax_j(scale · q_{t,h} · (C_j W_kᵀ)_{t,h}) (C_j W_vᵀ)_{t,h}
# --------------------------------------------------------------------------------------------
@st.composite
def ladder_cases(draw, backend):
    c = draw(common(backend))
    tiny = backend == "triton" and not ON_GPU
    c.update(lead=draw(lead_dims(4 if tiny else 8)), k=draw(st.integers(1, 4 if tiny else 6)),
             heads=draw(st.integers(1, 3)), dh=draw(st.integers(1, 4 if tiny else 5)),
             q_layout=draw(st.sampled_from(["contig", "transposed"])),
             c_layout=draw(st.sampled_from(["contig", "ladder_slice", "strided"])),
             scale=draw(st.sampled_from([None, None, 1.0, 0.25, -0.5])),
             grads=draw(st.sets(st.sampled_from(["q", "c", "wk", "wv"]), min_size=1)))
    # scores O(1..10): with |scores| >> 1 the softmax saturates and the grads are ill-conditioned in
    # the rounding of the projected keys (equally valid fp16 orders then differ by 10x)
    c["mag"] = draw(st.sampled_from([1.0, 0.1, 0.5]))
    return c


def ladder_math(q, c, wk, wv, scale, lse=False):
    """``lse``: the softmax as exp(s − logsumexp(s)) in fp32, the formulation the op documents (it
    saves a T×h fp32 log-sum-exp); as a rounding baseline only."""
    heads, dh = q.shape[-2:]
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    kk = (c @ wk.t()).unflatten(-1, (heads, dh))                # (k, ..., h, d_h)
    vv = (c @ wv.t()).unflatten(-1, (heads, dh))
    s = (q.unsqueeze(0) * kk).sum(-1) * scale                   # (k, ..., h)
    s = s.float() if s.dtype != torch.float64 else s
    p = (torch.exp(s - torch.logsumexp(s, dim=0)) if lse else torch.softmax(s, dim=0)).to(q.dtype)
    return (p.unsqueeze(-1) * vv).sum(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ladder_cross_attention_matches_float64_math(backend):
    @fuzz_settings(backend)
    @given(c=ladder_cases(backend))
    def check(c):
        dt, k, heads, dh, lead = c["dtype"], c["k"], c["heads"], c["dh"], c["lead"]
        D = heads * dh
        gen = torch.Generator().manual_seed(c["seed"])
        pdt = torch.float32 if c["master_fp32"] else dt
        rnd = lambda *s: (c["mag"] * torch.randn(*s, generator=gen)).to(DEVICE, dt)
        if c["q_layout"] == "transposed":
            qleaf, qview = rnd(*lead, dh, heads), lambda t: t.transpose(-1, -2)
        else:
            qleaf, qview = rnd(*lead, heads, dh), lambda t: t
        if c["c_layout"] == "ladder_slice":      # a slice of all ladder features (L+1, ..., D)
            cleaf, cview = rnd(k + 2, *lead, D), lambda t: t[1:k + 1]
        elif c["c_layout"] == "strided":
            cleaf, cview = rnd(k, *lead, 2 * D), lambda t: t[..., 1::2]
        else:
            cleaf, cview = rnd(k, *lead, D), lambda t: t
        leaves = dict(q=_leaf(qleaf, dt, "q" in c["grads"]), c=_leaf(cleaf, dt, "c" in c["grads"]),
                      wk=_leaf(_param(gen, (D, D), D ** -0.5), pdt, "wk" in c["grads"]),
                      wv=_leaf(_param(gen, (D, D), D ** -0.5), pdt, "wv" in c["grads"]))
        do = torch.randn(*lead, heads, dh, generator=gen).to(DEVICE, dt)
        scale = c["scale"]

        def op(t):
            return ladder_cross_attention(qview(t["q"]), cview(t["c"]), t["wk"], t["wv"], scale=scale,
                                          backend=backend)

        def math_fn(t, lse=False):
            q = qview(t["q"])
            return ladder_math(q, cview(t["c"]), t["wk"].to(q.dtype), t["wv"].to(q.dtype), scale, lse)
        compare(op, math_fn, leaves, do, dt, f"{backend} ladder_cross_attention", multilinear=False,
                baseline_fns=[lambda t: math_fn(t, lse=True)])
    check()
