"""The cached launch path (spu_kernels/triton/_launcher.py: CachedLauncher, and the low-rank, (IA)³ and KronA
ops' recorded plans) hands every kernel launcher exactly what Triton's own path hands it: the same
compiled kernel, grid and arguments, call after call, while shapes, dtypes, strides, alignment,
optional tensors and dropout change and cache hits and misses interleave.

No GPU is needed: Triton's real compiler builds the kernels for sm_90 and every launch ends in the
stand-in driver (spu_kernels/triton/stub_driver.py), which records what it was handed. Each case
runs forward+backward once with the cache off (SPU_KERNELS_CACHED_LAUNCH's switch: Triton's path)
and twice with it on (first call: a miss, second: a hit); the three launch lists must be equal,
with each tensor argument named by what it is: the case's input it points into (and where), or the
order in which a new buffer first appears in the call.

    python tests/triton_launch_replay.py      # one line per case; exit 1 on the first mismatch
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

from spu_kernels.triton.stub_driver import install_stub_launches  # noqa: E402

BF16, F32 = torch.bfloat16, torch.float32


def _labelled(recorded, inputs):
    """Each launch as (kernel, hash, grid, args) with every tensor replaced by a label."""
    spans = [(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes(), i) for i, t in enumerate(inputs)]
    new: dict = {}
    out = []
    for name, digest, grid, args in recorded:
        row = []
        for a in args:
            if isinstance(a, torch.Tensor):
                p = a.data_ptr()
                label = next((("input", i, p - lo) for lo, hi, i in spans if lo <= p < hi), None)
                if label is None:
                    label = new.setdefault(p, ("new", len(new)))
                row.append((label, a.dtype))
            else:
                row.append(a)
        out.append((name, digest, grid, tuple(row)))
    return out


def _lowrank(dtype, shape, *, bias=True, g=False, p=0.0, x_grad=True, adapters=F32, misaligned=False):
    from spu_kernels.ops import lowrank_linear
    torch.manual_seed(0)
    *lead, k = shape
    n, r = 48, 8
    if misaligned:      # x starts one element into its buffer: not 16-byte aligned
        x = torch.randn(1 + int(torch.tensor(shape).prod()), dtype=dtype)[1:].view(shape)
    else:
        x = torch.randn(shape, dtype=dtype)
    x.requires_grad_(x_grad)
    w = torch.randn(n, k, dtype=dtype)
    bb = torch.randn(n, dtype=dtype).requires_grad_() if bias else None
    a = torch.randn(r, k, dtype=adapters).requires_grad_()
    b = torch.randn(n, r, dtype=adapters).requires_grad_()
    gg = torch.rand(r, dtype=adapters).requires_grad_() if g else None
    seed = torch.tensor(1234, dtype=torch.int64)
    dy = torch.randn(*lead, n, dtype=dtype)
    leaves = [t for t in (x, bb, a, b, gg) if t is not None and t.requires_grad]

    def call():
        for t in leaves:
            t.grad = None
        y = lowrank_linear(x, w, bb, a, b, scale=0.5, rank_scale=gg, dropout_p=p, seed=seed if p else None,
                           backend="triton")
        y.backward(dy)
    return call, [t for t in (x, w, bb, a, b, gg, seed, dy) if t is not None]


def _ia3(side, tokens=5):
    from spu_kernels.ops import ia3_linear
    torch.manual_seed(0)
    x = torch.randn(2, tokens, 40, dtype=BF16, requires_grad=True)
    w = torch.randn(24, 40, dtype=BF16)
    bias = torch.randn(24, dtype=BF16, requires_grad=True)
    lv = torch.rand(40 if side == "input" else 24, requires_grad=True)
    dy = torch.randn(2, tokens, 24, dtype=BF16)

    def call():
        x.grad = bias.grad = lv.grad = None
        ia3_linear(x, w, bias, lv, side=side, backend="triton").backward(dy)
    return call, [x, w, bias, lv, dy]


def _act(tokens=7):
    from spu_kernels.ops import ia3_scaled_act
    torch.manual_seed(0)
    h = torch.randn(tokens, 40, dtype=BF16, requires_grad=True)
    lv = torch.rand(40, requires_grad=True)
    dy = torch.randn(tokens, 40, dtype=BF16)

    def call():
        h.grad = lv.grad = None
        ia3_scaled_act(h, lv, "gelu", backend="triton").backward(dy)
    return call, [h, lv, dy]


def _kron(slices=None, x_grad=True, tokens=9):
    from spu_kernels.ops import kron_linear
    torch.manual_seed(0)
    n = 32 * (slices or 1)
    x = torch.randn(tokens, 48, dtype=BF16, requires_grad=x_grad)
    w = torch.randn(n, 48, dtype=BF16)
    stack = (slices,) if slices else ()
    a = torch.randn(*stack, 4, 6, requires_grad=True)
    b = torch.randn(*stack, 8, 8, requires_grad=True)
    offsets = [32 * s for s in range(slices)] if slices else None
    dy = torch.randn(tokens, n, dtype=BF16)

    def call():
        x.grad = a.grad = b.grad = None
        kron_linear(x, w, None, a, b, scale=2.0, out_offsets=offsets, backend="triton").backward(dy)
    return call, [x, w, a, b, dy]


def _ladder():
    from spu_kernels.ops import ladder_cross_attention
    torch.manual_seed(0)
    q = torch.randn(6, 4, 16, dtype=BF16, requires_grad=True)
    c = torch.randn(3, 6, 64, dtype=BF16, requires_grad=True)
    wk = torch.randn(64, 64, requires_grad=True)
    wv = torch.randn(64, 64, requires_grad=True)
    dy = torch.randn(6, 4, 16, dtype=BF16)

    def call():
        q.grad = c.grad = wk.grad = wv.grad = None
        ladder_cross_attention(q, c, wk, wv, backend="triton").backward(dy)
    return call, [q, c, wk, wv, dy]


# (name, case): the low-rank cases in an order that makes the cached path miss and hit in turn
CASES = [
    ("lowrank bf16 T=8", lambda: _lowrank(BF16, (8, 64))),
    ("lowrank bf16 (3, 7, 64)", lambda: _lowrank(BF16, (3, 7, 64))),
    ("lowrank bf16 T=8 no bias, g", lambda: _lowrank(BF16, (8, 64), bias=False, g=True)),
    ("lowrank bf16 T=8 dropout", lambda: _lowrank(BF16, (8, 64), p=0.1)),
    ("lowrank bf16 T=8 x misaligned", lambda: _lowrank(BF16, (8, 64), misaligned=True)),
    ("lowrank bf16 T=8 x frozen, bf16 adapters", lambda: _lowrank(BF16, (8, 64), x_grad=False, adapters=BF16)),
    ("lowrank fp32 T=20 dropout g", lambda: _lowrank(F32, (20, 40), g=True, p=0.25)),
    ("lowrank bf16 T=8 (again)", lambda: _lowrank(BF16, (8, 64))),
    ("ia3 output", lambda: _ia3("output")),
    ("ia3 input", lambda: _ia3("input")),
    ("ia3 output, token splits (partial sums)", lambda: _ia3("output", tokens=60)),
    ("ia3 scaled act", _act),
    ("ia3 scaled act, token splits (partial sums)", lambda: _act(tokens=300)),
    ("kron", _kron),
    ("kron stacked slices, x frozen", lambda: _kron(slices=2, x_grad=False)),
    ("kron stacked slices, token splits (partial sums)", lambda: _kron(slices=2, tokens=50)),
    ("ladder", _ladder),
]


def main() -> int:
    stub = install_stub_launches(90)
    from spu_kernels.triton import _launcher, ia3, kron_linear, lowrank_linear
    plans = (lowrank_linear._FORWARD_PLANS, lowrank_linear._BACKWARD_PLANS, kron_linear._FORWARD_PLANS,
             kron_linear._BACKWARD_PLANS, *ia3._PLANS.values())

    def launches(call, inputs, cached: bool):
        _launcher.ENABLED = cached
        stub.recorded = []
        try:
            call()
        finally:
            recorded, stub.recorded = stub.recorded, None
            _launcher.ENABLED = True
        return _labelled(recorded, inputs)

    replays = 0
    for name, make in CASES:
        call, inputs = make()
        reference = launches(call, inputs, cached=False)
        for attempt in ("first", "second"):
            before = sum(p.replays for p in plans)
            got = launches(call, inputs, cached=True)
            replays += sum(p.replays for p in plans) - before
            if got != reference:
                print(f"FAIL {name}, {attempt} cached call: launches differ from Triton's path")
                for i, (ref, new) in enumerate(zip(reference, got)):
                    if ref != new:
                        print(f"  launch {i}:\n    triton {ref}\n    cached {new}")
                        break
                else:
                    print(f"  {len(reference)} launches on Triton's path, {len(got)} cached")
                return 1
        print(f"same launches: {name} ({len(reference)} launches)")
    planned = sum(name.startswith(("lowrank", "kron", "ia3")) for name, _ in CASES)
    if replays < 2 * planned:         # each planned case's second call replays both directions
        print(f"FAIL only {replays} plan replays for {planned} cases of ops with plans")
        return 1
    print(f"plan replays: {replays}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
