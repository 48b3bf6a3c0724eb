"""The dropout mask every backend regenerates from a seed, in plain torch (the reference).

Spec (shared by the torch, Triton and CUDA backends, so that one seed gives one mask everywhere):
element (t, k) of a (T, K) input (leading dims flattened into T, row-major) is kept iff

    philox4x32_10(key=(seed & 0xffffffff, seed >> 32), counter=(g & 0xffffffff, g >> 32, 0, 0))[k % 4]
        >= threshold,   g = t * ceil(K / 4) + k // 4,   threshold = min(floor(p * 2**32), 2**32 - 1)

so one Philox call gives the keep bits of four consecutive columns of a row (its four output
words, in order), and a kept element is scaled by 1 / (1 - p). The mask is never stored: forward
and backward both recompute it from (seed, t, k), so no T x K mask and no dropped-out copy of x is
kept for backward. Philox4x32-10 is the counter-based generator of Salmon et al. (SC'11,
"Random123"), with the same constants as ``triton.language.philox``; its four words are
independent uniform 32-bit draws (it passes BigCrush per word and jointly), so grouping columns
changes nothing in the mask's statistics.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85       # Weyl-sequence key increments
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57   # round multipliers
PHILOX_ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a*b for a < 2**32 (python int), b an int64 tensor in [0, 2**32).

    int64 cannot hold a 64-bit product, so a is split into 16-bit halves: every partial product
    stays below 2**49.
    """
    p1 = b * (a >> 16)            # < 2**48
    p0 = b * (a & 0xFFFF)         # < 2**48
    s = ((p1 & 0xFFFF) << 16) + p0
    return (p1 >> 16) + (s >> 32), s & _M32


def philox4x32_words(seed: int | torch.Tensor, counter: torch.Tensor, stream: int = 0,
                     rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """The four 32-bit output words of Philox4x32 with key (seed_lo, seed_hi) (``seed`` an int or a
    0-dim int64 tensor on counter's device: read on the device, no sync) and counter
    (counter_lo, counter_hi, stream, 0), for 64-bit ``counter`` values (int64 tensor, >= 0); each
    word an int64 tensor with values in [0, 2**32). ``stream`` (a uint32) separates the random
    streams of different uses of one seed (dropout uses 0)."""
    if counter.dtype != torch.int64:
        raise TypeError(f"philox4x32: counter must be int64, got {counter.dtype}")
    if isinstance(seed, torch.Tensor) and seed.device.type == "cpu" and not torch.compiler.is_compiling():
        seed = int(seed)   # a CPU value: reading it costs no sync, and the key schedule stays in ints
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = torch.full_like(counter, stream & _M32)
    c3 = torch.zeros_like(counter)
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox4x32(seed: int | torch.Tensor, counter: torch.Tensor, rounds: int = PHILOX_ROUNDS) -> torch.Tensor:
    """First 32-bit output word of Philox4x32 for 64-bit ``counter`` values (int64 tensor, >= 0),
    as int64 values in [0, 2**32): the word the dropout mask tests."""
    return philox4x32_words(seed, counter, 0, rounds)[0]


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which an element is dropped (probability p of dropping)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(p * 2**32), _M32)


KEEP_GROUP = 4   # columns of a row served by one Philox call (its four output words)


def dropout_keep_mask(seed: int | torch.Tensor, rows: int, cols: int, p: float, device: torch.device | str = "cpu",
                      row_start: int = 0) -> torch.Tensor:
    """Boolean keep mask of shape (rows, cols) for rows [row_start, row_start + rows) of an input
    with ``cols`` columns, exactly as the kernels regenerate it."""
    thr = dropout_threshold(p)
    groups = -(-cols // KEEP_GROUP)
    g = torch.arange(row_start * groups, (row_start + rows) * groups, device=device, dtype=torch.int64)
    words = torch.stack(philox4x32_words(seed, g), dim=-1)          # (rows * groups, 4): word k % 4 of group k // 4
    return (words.view(rows, groups * KEEP_GROUP)[:, :cols] >= thr)


SEED_HIGH = 2**63 - 1   # seeds are drawn from [0, 2**63 - 1): an int64 on every backend


def new_seed() -> int:
    """A fresh dropout seed as a Python int, from torch's CPU generator (``torch.manual_seed`` makes
    it repeat). The ops draw theirs on the device instead (``draw_seed``): no sync, and a fresh one
    per call under torch.compile and in CUDA graph replays."""
    return int(torch.randint(0, SEED_HIGH, ()).item())


def draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed as a 0-dim int64 tensor on ``device``, from that device's generator
    (``torch.manual_seed`` seeds it; activation checkpointing restores it, so a recomputed forward
    regenerates the same mask). A tensor, not an int: under torch.compile it is a runtime value of
    the graph, never a constant baked into it, and CUDA graph replays draw a new one each time."""
    return torch.randint(0, SEED_HIGH, (), device=device)
