"""Kernels whose address products pass 2**31 elements: int32 index arithmetic would wrap there.

The frozen weight W (N, K) is a row slice of a buffer with a row stride S = 2**26 elements, so
that row n sits (n·S) elements in: past 2**31 from n = 32 on, what a contiguous (N, K) weight with
N·K >= 2**31 gives (a LoRA on a 256k-vocabulary lm_head). The buffer is 4.3 GB of virtual memory of
which only W's rows are touched. The low-rank and (IA)³ ops' triton backends (interpreter) must
match their torch backends on it, forward and backward (the dx GEMMs read W as (N, K) and step
through its rows). Likewise the ladder cross-attention with its k stacked features 2**30 elements
apart (feature j at j·2**30: what k·T·D >= 2**31 gives, LST over all layers of a large batch).
Run in a process of its own: wrapped addresses can crash it.

    TRITON_INTERPRET=1 python tests/int64_indexing.py     # exit 0 when every op matches
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

N, K, T, R = 40, 32, 16, 8
ROW_STRIDE = 2 ** 26       # (N - 1) * ROW_STRIDE >= 2**31


def _weight(dtype):
    buf = torch.empty(N * ROW_STRIDE, dtype=dtype)
    w = buf.as_strided((N, K), (ROW_STRIDE, 1))
    torch.manual_seed(0)
    w.copy_(torch.randn(N, K, dtype=dtype) / K ** 0.5)
    return w


def _grads(fn, leaves, dy):
    for t in leaves:
        t.grad = None
    y = fn()
    y.backward(dy)
    return [y.detach().clone()] + [t.grad.clone() for t in leaves]


def _ladder() -> int:
    """0 when the ladder cross-attention's triton backend matches torch with C's features 2**30 apart."""
    from spu_kernels.ops import ladder_cross_attention
    k, t, h, dh = 3, 8, 2, 16
    d = h * dh
    dtype = torch.float16
    buf = torch.empty((k - 1) * 2 ** 30 + t * d, dtype=dtype)
    c = buf.as_strided((k, t, d), (2 ** 30, d, 1))
    torch.manual_seed(2)
    c.copy_(torch.randn(k, t, d, dtype=dtype))
    c.requires_grad_()
    q = torch.randn(t, h, dh, dtype=dtype, requires_grad=True)
    wk = (torch.randn(d, d) / d ** 0.5).requires_grad_()
    wv = (torch.randn(d, d) / d ** 0.5).requires_grad_()
    dy = torch.randn(t, h, dh, dtype=dtype)
    leaves = [q, c, wk, wv]
    want = _grads(lambda: ladder_cross_attention(q, c, wk, wv, backend="torch"), leaves, dy)
    got = _grads(lambda: ladder_cross_attention(q, c, wk, wv, backend="triton"), leaves, dy)
    errs = [float((g.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-12))
            for g, e in zip(got, want)]
    ok = max(errs) < 2e-2      # fp16 on both sides; a wrapped address reads garbage (or crashes)
    print(f"{'ok  ' if ok else 'FAIL'} ladder_cross_attention: max relative error of o and grads {max(errs):.1e}")
    return 0 if ok else 1


def main() -> int:
    from spu_kernels.ops import ia3_linear, lowrank_linear
    dtype = torch.float32
    w = _weight(dtype)
    torch.manual_seed(1)
    x = torch.randn(T, K, dtype=dtype, requires_grad=True)
    a = (torch.randn(R, K) / K ** 0.5).requires_grad_()
    b = (torch.randn(N, R) * 0.1).requires_grad_()
    l_in = (torch.rand(K) + 0.5).requires_grad_()
    dy = torch.randn(T, N, dtype=dtype)
    cases = {
        "lowrank_linear": (lambda be: lowrank_linear(x, w, None, a, b, scale=0.5, backend=be), [x, a, b]),
        "lowrank_linear dropout": (lambda be: lowrank_linear(x, w, None, a, b, scale=0.5, dropout_p=0.2, seed=5,
                                                             backend=be), [x, a, b]),
        "ia3_linear input": (lambda be: ia3_linear(x, w, None, l_in, side="input", backend=be), [x, l_in]),
    }
    failed = _ladder()
    for name, (call, leaves) in cases.items():
        want = _grads(lambda: call("torch"), leaves, dy)
        got = _grads(lambda: call("triton"), leaves, dy)
        errs = [float((g - e).abs().max() / e.abs().max().clamp_min(1e-12)) for g, e in zip(got, want)]
        ok = all(err < 1e-4 for err in errs)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max relative error of y and grads {max(errs):.1e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
