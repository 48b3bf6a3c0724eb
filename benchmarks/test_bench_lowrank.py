"""pytest-benchmark: forward+backward of an r=16 LoRA layer, bf16, spu_kernels vs PEFT vs the frozen
base nn.Linear, at issue #2's shapes, dropout 0 and 0.1. Compare groups with
`pytest benchmarks --benchmark-group-by=param:shape,param:dropout`. bench_lowrank.py prints the
ratios to the base as a table."""
import pytest
import torch

from _layers import SHAPES, build, step_fn

KINDS = ["base", "spu_triton", "spu_cuda", "spu_torch", "peft_lora"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lowrank_fwd_bwd(benchmark, shape, dropout, kind):
    T, k, n = shape
    if kind == "spu_cuda":
        import spu_kernels
        state = spu_kernels.backend_status()["cuda"]
        if state != "available":
            pytest.skip(f"cuda backend: {state}")
    f = step_fn(build(kind, k, n, dropout), T, k, n)

    def run():
        f()
        torch.cuda.synchronize()

    for _ in range(3):
        run()
    benchmark.group = f"{T}x{k}x{n} p={dropout}"
    benchmark.pedantic(run, rounds=30, iterations=5, warmup_rounds=2)
