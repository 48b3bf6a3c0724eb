"""Helpers shared by the Triton kernels: the dropout keep mask (a tile at a time), the dot that
the interpreter gets right, and launch-side facts (interpreter mode, SM count, dtype maps). How
kernels are launched is triton/_launcher.py."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends import triton_interpret

INTERPRET = triton_interpret()

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def dropout_keep_tile(seed, rows, col0, cols, threshold, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Keep mask (BLOCK_ROWS, BLOCK_COLS) of the elements (rows[i], col0 + j) of an input with
    ``cols`` columns (rows: int64 row indices; col0 a multiple of 4): the spec in
    ops/dropout_rng.py. One Philox call per four columns, its four words spread over them."""
    groups = (cols + 3) // 4
    g = rows[:, None] * groups + (col0 // 4 + tl.arange(0, BLOCK_COLS // 4))[None, :]     # (R, C/4) int64
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    # w[i, j, a, b] = r_(2a+b): row-major over (j, a, b) puts word w of group j at column 4j + w
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_ROWS, BLOCK_COLS))
    return words >= threshold.to(tl.uint32)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b. UPCAST feeds fp32 operands to tl.dot: the Triton interpreter computes bf16
    dots wrongly (it stores bf16 as uint16), so launchers set it for bf16 under TRITON_INTERPRET=1
    only; on a GPU the operands go to the tensor cores as they are."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


def upcast_dot(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul setting: TF32 only where torch would use it."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of the GPU (a small stand-in under the interpreter, so that the
    split/atomic paths of the kernels still run in CPU tests)."""
    if INTERPRET or not torch.cuda.is_available():
        return 2
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints. triton.cdiv / next_power_of_2 are constexpr functions that cost
    ~2-3 µs a call on the host; launchers make dozens of these calls per step."""
    return -(-a // b)


def block_layout(counts, chunk: int):
    """For a multi-tensor sweep whose program k covers ``chunk`` elements of one tensor: (blk_tensor
    (int32: each program's tensor), blk_start (int64: its first element in that tensor), programs),
    on the host, for tensors of ``counts`` elements."""
    blocks = [cdiv(n, chunk) for n in counts]
    blk_tensor = torch.repeat_interleave(torch.arange(len(blocks), dtype=torch.int32), torch.tensor(blocks))
    firsts = torch.tensor([0] + blocks[:-1]).cumsum(0)
    blk_start = (torch.arange(int(sum(blocks)), dtype=torch.int64)
                 - torch.repeat_interleave(firsts, torch.tensor(blocks))) * chunk
    return blk_tensor, blk_start, int(sum(blocks))


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as triton.next_power_of_2), host-side. A
    symbolic size (a triton_op traced with dynamic shapes) is specialised to its value."""
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0


def rank_pad(r: int) -> int:
    """tl.dot needs every dimension >= 16 and a power of two: a rank (or a Kronecker factor's side)
    is zero-padded to that."""
    return max(16, next_pow2(r))


def device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.type == "cuda" and t.device.index is not None else 0


def split_rows(T: int, splits: int, block: int) -> int:
    """Tokens per split when T is cut into ``splits`` splits of whole ``block``-token blocks (the
    last splits may be empty: a kernel still writes their rows, as zeros)."""
    return cdiv(cdiv(T, splits), block) * block


def token_splits(T: int, col_programs: int, like: torch.Tensor, per_sm: int, block: int = 1,
                 min_rows: int = 1) -> tuple[int, int]:
    """(splits, tokens per split) for a kernel that splits T tokens over a second grid dimension
    beside ``col_programs`` column programs: about ``per_sm`` programs per SM (on ``like``'s GPU),
    each split a whole number of ``block``-token blocks and at least ``min_rows`` tokens."""
    t_blocks = cdiv(T, block)
    wanted = cdiv(per_sm * num_sms(device_index(like)), col_programs)
    splits = max(1, min(cdiv(t_blocks, cdiv(min_rows, block)), wanted))
    rows = split_rows(T, splits, block)
    return cdiv(T, rows), rows
