"""The dropout RNG spec: a known-answer test of the reference Philox, the Triton helper against it
(offsets past 2**32 included), and the keep rate."""
import pytest
import torch
from helpers import DEVICE, LOWRANK_BACKENDS

from spu_kernels.ops.dropout_rng import draw_seed, dropout_keep_mask, dropout_threshold, new_seed, philox4x32


def test_philox_known_answer():
    # Random123's known-answer vector for Philox4x32-10: key (0, 0), counter (0, 0, 0, 0)
    assert philox4x32(0, torch.tensor([0])).item() == 0x6627E8D5


def test_threshold_and_keep_rate():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**31
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        dropout_threshold(1.0)
    keep = dropout_keep_mask(123, 400, 500, 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.005
    assert dropout_keep_mask(123, 4, 5, 0.0).all()   # p = 0 keeps all
    # rows are addressed by their global index: a block of rows is a slice of the whole mask
    assert torch.equal(dropout_keep_mask(7, 3, 50, 0.5, row_start=10), dropout_keep_mask(7, 13, 50, 0.5)[10:])


def test_seed_follows_torch_manual_seed():
    torch.manual_seed(3)
    a, t = new_seed(), draw_seed(torch.device("cpu"))
    torch.manual_seed(3)
    assert new_seed() == a and 0 <= a < 2**63 - 1
    assert torch.equal(draw_seed(torch.device("cpu")), t) and t.dim() == 0 and t.dtype == torch.int64


def test_tensor_seed_gives_the_int_seeds_mask():
    """The ops read the seed as a 0-dim tensor on the device; its mask is the int's, all 64 bits."""
    for seed in (0, 5, 2**31 + 7, 2**63 - 2):
        assert torch.equal(dropout_keep_mask(torch.tensor(seed), 7, 9, 0.4), dropout_keep_mask(seed, 7, 9, 0.4))


if "triton" in LOWRANK_BACKENDS:
    import triton
    import triton.language as tl

    from spu_kernels.triton._common import dropout_keep

    @triton.jit
    def _mask_kernel(out_ptr, start, n, seed, threshold, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = dropout_keep(seed, start + offs.to(tl.int64), threshold)
        tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < n)


@pytest.mark.skipif("triton" not in LOWRANK_BACKENDS, reason="triton backend not available here")
@pytest.mark.parametrize("seed", [0, 1, 2**31 - 2, 2**40 + 17])
def test_triton_mask_equals_reference(seed):
    n, p = 300, 0.37
    thr = dropout_threshold(p)
    for start in (0, 2**32 - 150, 2**33 + 5):      # counters crossing into the high word
        out = torch.empty(n, dtype=torch.int8, device=DEVICE)
        _mask_kernel[(triton.cdiv(n, 128),)](out, start, n, seed, thr, BLOCK=128)
        ref = philox4x32(seed, torch.arange(start, start + n, dtype=torch.int64, device=DEVICE)) >= thr
        assert torch.equal(out.bool(), ref), (seed, start)
