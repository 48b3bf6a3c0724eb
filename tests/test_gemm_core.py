"""The GEMM core (spu_kernels/triton/gemm.py) under the interpreter, hook by hook, against fp64 math:
through TMA descriptors (operands that qualify) and plain loads (operands that do not), B stored
either way round, every epilogue (bias, column scale, K scale, the rank-r term with dropout, the
Σ C ⊙ Z reduction, grad_A and grad_g as per-split partial sums) and the K = 0 pass the cuBLAS way
adds into. And the per-shape choice between the two ways (spu_kernels/triton/choice.py): timed
once, remembered in memory and on disk, forced by SPU_KERNELS_GEMM, robust to a bad cache file."""
import json
import warnings

import pytest
import torch
from helpers import DEVICE, LOWRANK_BACKENDS, assert_close_rel

pytestmark = pytest.mark.skipif("triton" not in LOWRANK_BACKENDS, reason="needs the triton backend")


def _mods():
    from spu_kernels.triton import choice, gemm
    return gemm, choice


def _operand(rows, cols, dtype, layout, gen):
    """(rows, cols) in ``layout``: "row" (row-major, TMA-able when aligned), "col" (a transposed
    view: unit stride along rows) or "gap" (a column slice of a wider tensor: rows 16-byte aligned
    only by chance)."""
    if layout == "row":
        return torch.randn(rows, cols, generator=gen).to(DEVICE, dtype)
    if layout == "col":
        return torch.randn(cols, rows, generator=gen).to(DEVICE, dtype).t()
    return torch.randn(rows, cols + 3, generator=gen).to(DEVICE, dtype)[:, 1:cols + 1]


CASES = [  # (M, K, N, a layout, b layout)
    (37, 48, 40, "row", "row"),        # TMA for both; B stored (K, N)
    (37, 48, 40, "row", "col"),        # TMA; B the transpose of a row-major (N, K) weight
    (70, 48, 33, "col", "col"),        # A by plain loads
    (29, 45, 40, "gap", "row"),        # rows not 16-byte multiples: plain loads
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{c[4]}")
def test_gemm_epilogues_match_fp64(case, dtype):
    gemm, _ = _mods()
    M, K, N, la, lb = case
    gen = torch.Generator().manual_seed(M * K + N)
    a, b = _operand(M, K, dtype, la, gen), _operand(K, N, dtype, lb, gen)
    r = lambda *s, add=0.0: (torch.rand(*s, generator=gen) + add).to(DEVICE) if add else \
        torch.randn(*s, generator=gen).to(DEVICE)    # noqa: E731
    bias, ns, ks = r(N), r(N, add=0.5), r(K, add=0.5)
    low, right, g = r(M, 5), r(5, N), r(5, add=0.1)
    a64, b64 = a.double(), b.double()
    dense = (a64 * ks.double()) @ b64 + bias.double() + 0.5 * (low.double() * g.double()) @ right.double()

    out = torch.empty(M, N, dtype=dtype, device=DEVICE)
    gemm.gemm(a, b, out, bias=bias, k_scale=ks, low=low, right=right, g=g, scale=0.5)
    assert_close_rel(out, dense, dtype, "bias + K scale + rank term")

    z = r(M, N).to(dtype)
    zp = torch.empty(-(-M // gemm.reduce_block_m(dtype)), N, device=DEVICE)
    gemm.gemm(a, b, out, bias=bias, n_scale=ns, reduce_z=z, zp=zp)
    plain = a64 @ b64 + bias.double()
    assert_close_rel(out, plain * ns.double(), dtype, "bias, column scale")
    assert_close_rel(zp.sum(0), (plain * z.double()).sum(0), dtype, "Σ (C ⊙ Z) before the scale")

    gemm.gemm(None, None, out, bias=bias, low=low, right=right, g=g, scale=0.5)     # K = 0: no dense product
    assert_close_rel(out, bias.double() + 0.5 * (low.double() * g.double()) @ right.double(), dtype, "K = 0 pass")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gemm_grad_a_and_grad_g_partials(p):
    """dx's GEMM with grad_A = s (v ⊙ g)ᵀ drop(x) and grad_g = s Σ u ⊙ v written as per-split partial
    rows of one workspace (sums equal the fp64 math), and the dropout mask the spec's."""
    from spu_kernels.ops.dropout_rng import dropout_keep_mask, dropout_threshold
    gemm, _ = _mods()
    gen = torch.Generator().manual_seed(3)
    M, K, N, r = 150, 40, 70, 6          # dx (M, N) = dy (M, K) @ W (K, N): several row and column blocks
    t = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)    # noqa: E731
    dy, w, x, v, u, a = t(M, K), t(K, N), t(M, N), t(M, r), t(M, r), t(r, N)
    g = (torch.rand(r, generator=gen) + 0.5).to(DEVICE)
    seed = torch.tensor(77, device=DEVICE)
    splits = gemm.row_splits(M, N, torch.float32, dy)
    assert splits > 1 or DEVICE == "cuda", "the interpreter's shapes must exercise several row splits"
    ws = torch.full((splits, r * N + 2 + r), float("nan"), device=DEVICE)   # every partial written: no NaN survives
    out = torch.empty(M, N, device=DEVICE)
    gemm.gemm(dy, w, out, low=v, right=a, g=g, scale=0.5, dropout_p=p, seed=seed,
              threshold=dropout_threshold(p) if p else 0, x=x, grads=ws, grad_a_at=0, u=u,
              grad_g_at=r * N + 2, splits=splits)
    keep = (dropout_keep_mask(seed, M, N, p, DEVICE).double() / (1 - p) if p
            else torch.ones(M, N, dtype=torch.float64, device=DEVICE))
    vg = v.double() * g.double() * 0.5
    assert_close_rel(out, dy.double() @ w.double() + keep * (vg @ a.double()), torch.float32, "dx")
    assert_close_rel(ws[:, :r * N].sum(0).view(r, N), vg.t() @ (x.double() * keep), torch.float32, "grad_A")
    assert_close_rel(ws[:, r * N + 2:].sum(0), 0.5 * (u.double() * v.double()).sum(0), torch.float32, "grad_g")
    assert torch.isnan(ws[:, r * N:r * N + 2]).all(), "the gap between the two grads was written"


def test_row_splits_fill_the_gpu_without_a_second_wave():
    gemm, _ = _mods()
    like = torch.empty(0)
    for M, N in [(64, 64), (8192, 4096), (8192, 11008), (100, 3000)]:
        s = gemm.row_splits(M, N, torch.bfloat16, like)
        assert 1 <= s <= max(1, -(-M // 32))


# ---------------------------------------------------------------------------------------------
# the per-shape choice
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def choice_env(monkeypatch, tmp_path):
    _, choice = _mods()
    monkeypatch.setenv("SPU_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPU_KERNELS_GEMM", raising=False)
    monkeypatch.setattr(choice, "_DISK", None)
    monkeypatch.setattr(choice, "_WARNED", set())
    return choice, tmp_path


def test_choice_without_a_gpu_is_the_default_and_times_nothing(choice_env):
    choice, tmp = choice_env
    c = choice.ShapeChoice("t", default=lambda key: "cublas" if key[0] > 8 else "triton")
    assert c.choose((4,), lambda way: pytest.fail("timed")) == "triton"
    assert c.choose((16,), lambda way: pytest.fail("timed")) == "cublas"
    assert c.trials == 0 and not (tmp / "choices.json").exists()


def test_choice_times_once_remembers_and_persists(choice_env, monkeypatch):
    choice, tmp = choice_env
    ran = []
    monkeypatch.setattr(choice, "measurable", lambda: True)
    monkeypatch.setattr(choice, "time_us", lambda fn: (fn(), {"triton": 9.0, "cublas": 5.0}[ran[-1]])[1])
    c = choice.ShapeChoice("lowrank fwd", default=lambda key: "triton")
    assert c.choose((1024, 768), ran.append) == "cublas" and ran == ["triton", "cublas"] and c.trials == 1
    assert c.choose((1024, 768), ran.append) == "cublas" and len(ran) == 2       # memory
    saved = json.loads((tmp / "choices.json").read_text())
    (entry, record), = saved.items()
    assert "lowrank fwd" in entry and record == {"way": "cublas", "us": {"triton": 9.0, "cublas": 5.0}}
    monkeypatch.setattr(choice, "_DISK", None)                                     # a new process
    again = choice.ShapeChoice("lowrank fwd", default=lambda key: "triton")
    assert again.choose((1024, 768), ran.append) == "cublas" and again.trials == 0 and len(ran) == 2


def test_choice_forced_by_the_environment(choice_env, monkeypatch):
    choice, _ = choice_env
    c = choice.ShapeChoice("t", default=lambda key: "triton")
    monkeypatch.setenv("SPU_KERNELS_GEMM", "cublas")
    assert c.choose((1,), lambda way: pytest.fail("timed")) == "cublas"
    monkeypatch.setenv("SPU_KERNELS_GEMM", "fastest")
    with pytest.raises(ValueError, match="SPU_KERNELS_GEMM='fastest'.*auto, triton, cublas"):
        c.choose((1,), lambda way: None)


def test_choice_survives_a_bad_cache_file_and_an_unwritable_directory(choice_env, monkeypatch):
    choice, tmp = choice_env
    (tmp / "choices.json").write_text("{not json")
    monkeypatch.setattr(choice, "measurable", lambda: True)
    monkeypatch.setattr(choice, "time_us", lambda fn: 1.0)
    c = choice.ShapeChoice("t", default=lambda key: "cublas")
    with pytest.warns(UserWarning, match="cannot read"):
        assert c.choose((1,), lambda way: None) == "triton"       # a tie: the first way
    assert json.loads((tmp / "choices.json").read_text())        # rewritten whole
    monkeypatch.setenv("SPU_KERNELS_CACHE_DIR", str(tmp / "file" / "below"))
    (tmp / "file").write_text("a file where a directory should be")
    with pytest.warns(UserWarning, match="cannot write"):
        assert c.choose((2,), lambda way: None) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # said once
        assert c.choose((3,), lambda way: None) == "triton"


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_ops_agree_on_both_ways(monkeypatch, p):
    """lowrank_linear and kron_linear forced onto each way give the reference's outputs and grads."""
    import spu_kernels
    from spu_kernels.ops.kron_linear import kron_linear_reference
    from spu_kernels.ops.lowrank_linear import lowrank_linear_reference
    gen = torch.Generator().manual_seed(5)
    t = lambda *s: torch.randn(*s, generator=gen).to(DEVICE).requires_grad_(True)    # noqa: E731
    x, w, bias, a, b, g = t(2, 35, 48), torch.randn(40, 48, generator=gen).to(DEVICE), t(40), t(4, 48), t(40, 4), t(4)
    ka, kb = t(5, 6), t(8, 8)
    dy = torch.randn(2, 35, 40, generator=gen).to(DEVICE)
    runs = {
        "lowrank": (lambda **kw: spu_kernels.lowrank_linear(x, w, bias, a, b, scale=0.5, rank_scale=g, dropout_p=p,
                                                            seed=9, **kw),
                    lambda: lowrank_linear_reference(x, w, bias, a, b, 0.5, g, p, 9), (x, bias, a, b, g)),
        "kron": (lambda **kw: spu_kernels.kron_linear(x, w, bias, ka, kb, scale=0.5, **kw),
                 lambda: kron_linear_reference(x, w, bias, ka, kb, 0.5), (x, bias, ka, kb)),
    }
    for name, (op, ref, leaves) in runs.items():
        want = torch.autograd.grad(ref(), leaves, dy)
        want_y = ref().detach()
        for way in ("triton", "cublas"):
            monkeypatch.setenv("SPU_KERNELS_GEMM", way)
            y = op(backend="triton")
            got = torch.autograd.grad(y, leaves, dy)
            assert_close_rel(y.detach(), want_y.double(), torch.float32, f"{name} {way} y")
            for i, (gt, wt) in enumerate(zip(got, want)):
                assert_close_rel(gt, wt.double(), torch.float32, f"{name} {way} grad {i}")


def test_choice_leaves_no_temporary_file_when_a_write_fails(choice_env, monkeypatch):
    choice, tmp = choice_env
    monkeypatch.setattr(choice, "measurable", lambda: True)
    monkeypatch.setattr(choice, "time_us", lambda fn: 1.0)

    def failing_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(choice.os, "replace", failing_replace)
    with pytest.warns(UserWarning, match="cannot write"):
        assert choice.ShapeChoice("t", default=lambda key: "cublas").choose((1,), lambda way: None) == "triton"
    assert list(tmp.iterdir()) == []
