"""Shared test helpers: the backends to compare, tolerances and a comparison that says what failed;
a harness run interrupted in its second epoch (the resume tests)."""
import pytest
import torch

from spu_kernels.backends import available_backends
from spu_kernels.ops.lowrank_linear import IMPLEMENTED as LOWRANK_IMPLEMENTED

# Every backend this machine can run that the op implements (the torch one always).
LOWRANK_BACKENDS = [b for b in available_backends() if b in LOWRANK_IMPLEMENTED]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# A backend's error against the fp64 reference, relative to the reference's largest magnitude,
# must stay within a few times what plain torch makes in the same dtype, and under this ceiling.
# A wrong mask, scale, transpose or missing term errs by O(1); rounding by ~eps * sqrt(K).
REL_CEILING = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def assert_close_rel(got, want, dtype, name="", baseline=None):
    """got vs the fp64 reference ``want``; ``baseline`` = plain torch's result in ``dtype``."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rel_err(got, want)
    limit = REL_CEILING[dtype]
    if baseline is not None:
        limit = min(limit, max(4 * rel_err(baseline, want), REL_CEILING[dtype] / 10))
    assert err <= limit, f"{name}: relative error {err:.2e} > {limit:.2e} ({dtype})"


def run_interrupted_in_epoch_2(cfg, **run_kwargs):
    """``spu_kernels.harness.train.run(cfg, **run_kwargs)`` stopped by a KeyboardInterrupt at epoch 2's
    evaluation (epoch 1's checkpoint is written by then); fails if the run is not interrupted there.
    ``train.evaluate`` is restored afterwards."""
    from spu_kernels.harness import train
    real_eval, calls = train.evaluate, []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_eval(*a, **k)
    train.evaluate = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            train.run(cfg, **run_kwargs)
    finally:
        train.evaluate = real_eval
