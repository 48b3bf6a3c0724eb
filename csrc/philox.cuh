// Philox4x32-10 and the dropout keep mask: the spec in spu_kernels/ops/dropout_rng.py, so that one
// seed gives one mask on the torch, triton and cuda backends. Host and device (the host build lets
// the tests compare this very code with the Python spec on a machine without a GPU).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SPU_HD __host__ __device__ __forceinline__
#else
#define SPU_HD inline
#endif

namespace spu {

// The four output words of Philox4x32-10 with key (seed_lo, seed_hi) and counter
// (ctr_lo, ctr_hi, 0, 0): the constants and round structure of triton.language.philox.
struct Philox4 {
  uint32_t w[4];
};

SPU_HD Philox4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;   // round multiplier B
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;   // round multiplier A
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;   // Weyl key increments
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

SPU_HD uint32_t philox4x32_10_first(uint64_t seed, uint64_t counter) { return philox4x32_10(seed, counter).w[0]; }

// Element (row, col) of a (rows, cols) input is kept iff word col % 4 of the Philox output for
// counter g = row * ceil(cols / 4) + col / 4 is >= threshold = min(floor(p * 2^32), 2^32 - 1):
// one Philox call serves four consecutive columns of a row.
// dropout_keep4: the keep bits of columns 4·group .. 4·group + 3 of `row` (bit j: column 4·group + j;
// bits past the last column are meaningless), from one Philox call. The kernels' fast paths use it.
SPU_HD uint32_t dropout_keep4(uint64_t seed, uint64_t row, uint64_t group, uint64_t cols, uint32_t threshold) {
  const Philox4 r = philox4x32_10(seed, row * ((cols + 3) / 4) + group);
  return static_cast<uint32_t>(r.w[0] >= threshold) | (static_cast<uint32_t>(r.w[1] >= threshold) << 1) |
         (static_cast<uint32_t>(r.w[2] >= threshold) << 2) | (static_cast<uint32_t>(r.w[3] >= threshold) << 3);
}

// One element's keep bit (a Philox call for one element: the strided, unvectorised paths).
SPU_HD bool dropout_keep(uint64_t seed, uint64_t row, uint64_t col, uint64_t cols, uint32_t threshold) {
  return (dropout_keep4(seed, row, col / 4, cols, threshold) >> (col & 3)) & 1u;
}

}  // namespace spu
