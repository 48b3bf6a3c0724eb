"""pytest-benchmark over the ``layers`` suite's own cases (benchmarks/suites/layers.py: one definition
of each case): ``pytest benchmarks --benchmark-group-by=param:case``. Needs a CUDA GPU (skipped
otherwise). The runner (``python -m benchmarks.run layers``) measures the same cases into the CSV."""
import pytest
import torch

from benchmarks.measure import Skip
from benchmarks.suites import layers

CASES = layers.cases(smoke=False, device="cuda")
PARAMS = [pytest.param(case, variant, id=f"{case.name}:{variant.kind}") for case in CASES for variant in case.variants]


@pytest.mark.parametrize("case,variant", PARAMS)
def test_layer_fwd_bwd(benchmark, case, variant):
    try:
        fn = variant.setup()
    except Skip as e:
        pytest.skip(str(e))

    def call():
        fn()
        torch.cuda.synchronize()

    for _ in range(3):
        call()
    benchmark.group = case.name
    benchmark.pedantic(call, rounds=30, iterations=5, warmup_rounds=2)
