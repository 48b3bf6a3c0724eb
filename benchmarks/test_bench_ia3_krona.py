"""pytest-benchmark: forward+backward of an (IA)³ layer (output scale: keys / values; input scale:
a gated MLP's down projection) and a KronA layer, bf16, spu_kernels vs PEFT IA3 / LoKr (r=16) vs
the frozen base nn.Linear, at benchmarks/_layers.py's SHAPES. Skips without a CUDA GPU (conftest).
`pytest benchmarks/test_bench_ia3_krona.py --benchmark-group-by=group`; bench_ia3_krona.py prints
the ratios to the base as a table."""
import pytest
import torch

from _layers_ia3_krona import GROUPS, SHAPES, build, step_fn

CASES = [(group, kind) for group, kinds in GROUPS.items() for kind in kinds]


@pytest.mark.parametrize("group,kind", CASES, ids=[f"{g}-{k}" for g, k in CASES])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ia3_krona_fwd_bwd(benchmark, shape, group, kind):
    T, k, n = shape
    f = step_fn(build(kind, k, n), T, k, n)

    def run():
        f()
        torch.cuda.synchronize()

    for _ in range(3):
        run()
    benchmark.group = f"{group} {T}x{k}x{n}"
    benchmark.pedantic(run, rounds=30, iterations=5, warmup_rounds=2)
