"""The dropout RNG spec: a known-answer test of the reference Philox, the Triton helper against it
(group counters past 2**32 included), the keep rate, and the independence of the keep bits that
share one Philox call."""
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


def test_keep_bits_are_independent_across_the_words_of_one_philox_call():
    """One Philox call gives the keep bits of four neighbouring columns: the mask must look like
    independent Bernoulli(1 - p) draws anyway. Over 2,000 x 1,001 elements (rows of 251 groups, the
    last one partial), at p = 0.3: the keep rate within 5 standard errors; for neighbours inside a
    group, across a group boundary and across rows, P(both kept) within 5 standard errors of
    (1 - p)^2; and the 16 patterns of a group's four bits uniform by a chi-square test."""
    p, rows, cols = 0.3, 2000, 1001
    keep = dropout_keep_mask(2024, rows, cols, p).double()
    q = 1 - p
    n = keep.numel()
    assert abs(keep.mean().item() - q) < 5 * (q * p / n) ** 0.5
    pairs = {"inside a group": (keep[:, 0:-1:4], keep[:, 1::4]),
             "across groups": (keep[:, 3:-1:4], keep[:, 4::4]),
             "across rows": (keep[:-1], keep[1:])}
    for name, (a, b) in pairs.items():
        m = min(a.shape[1], b.shape[1])
        both = (a[:, :m] * b[:, :m])
        se = (q * q * (1 - q * q) / both.numel()) ** 0.5
        assert abs(both.mean().item() - q * q) < 5 * se, (name, both.mean().item(), q * q)
    # the four words of each full group as a 4-bit pattern: 2,000 x 250 groups
    bits = keep[:, :1000].reshape(rows, 250, 4)
    pattern = (bits * torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)).sum(-1).long().flatten()
    counts = torch.bincount(pattern, minlength=16).double()
    ones = torch.tensor([bin(i).count("1") for i in range(16)], dtype=torch.float64)
    expected = pattern.numel() * q ** ones * p ** (4 - ones)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 44.3, chi2          # 15 degrees of freedom: P(chi2 > 44.3) = 1e-4


def test_mask_groups_four_columns_per_row():
    """Rows are padded to whole groups: a row's mask does not depend on the number of columns past
    its own group, and row t starts at group t * ceil(K / 4)."""
    wide = dropout_keep_mask(9, 5, 12, 0.5)
    assert torch.equal(dropout_keep_mask(9, 5, 10, 0.5), wide[:, :10])
    assert torch.equal(dropout_keep_mask(9, 5, 9, 0.5), wide[:, :9])
    assert not torch.equal(dropout_keep_mask(9, 5, 13, 0.5)[:, :12], wide)   # 4 groups a row, not 3


if "triton" in LOWRANK_BACKENDS:
    import triton
    import triton.language as tl

    from spu_kernels.triton._common import dropout_keep_tile

    @triton.jit
    def _mask_kernel(out_ptr, row_start, rows, cols, seed, threshold, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        col0 = tl.program_id(1) * BLOCK_C
        offs_c = col0 + tl.arange(0, BLOCK_C)
        keep = dropout_keep_tile(seed, row_start + offs_r.to(tl.int64), col0, cols, threshold, BLOCK_R, BLOCK_C)
        tl.store(out_ptr + offs_r[:, None] * cols + offs_c[None, :], keep.to(tl.int8),
                 mask=(offs_r < rows)[:, None] & (offs_c < cols)[None, :])


@pytest.mark.skipif("triton" not in LOWRANK_BACKENDS, reason="triton backend not available here")
@pytest.mark.parametrize("seed", [0, 1, 2**31 - 2, 2**40 + 17])
def test_triton_mask_equals_reference(seed):
    rows, cols, p = 9, 50, 0.37
    thr = dropout_threshold(p)
    for row_start in (0, 2**32 // 13 - 4, 2**33 + 5):      # group counters crossing into the high word
        out = torch.empty(rows, cols, dtype=torch.int8, device=DEVICE)
        _mask_kernel[(triton.cdiv(rows, 8), triton.cdiv(cols, 16))](out, row_start, rows, cols, seed, thr,
                                                                    BLOCK_R=8, BLOCK_C=16)
        ref = dropout_keep_mask(seed, rows, cols, p, DEVICE, row_start=row_start)
        assert torch.equal(out.bool(), ref), (seed, row_start)
