// Launchers of the memory-bound CUDA kernels of the fused low-rank op (lowrank_kernels.cu).
// Plain pointers, sizes and strides only: no torch headers, so the .cu compiles fast.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace spu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One pass over a strided matrix M (rows x cols) in `dtype`, with the rank-R side products the
// op needs, accumulated in fp32. With dropout, element (t, c) of M counts only if
// dropout_keep(*seed, t, c, cols, threshold) (philox.cuh): the seed is read on the device (an int64 the op's
// caller drew there), so no host sync and CUDA graphs replay a fresh one. Each output is
// multiplied by out_scale.
//   ROW:    row_part[cb][t][r] = out_scale * sum_{c in column block cb} m(t, c) * rm(c, r)
//   COL:    col_part[s][c][r]  = out_scale * sum_{t in row split s}    m(t, c) * l(t, r)
//   COLSUM: sum_part[s][c]     =             sum_{t in row split s}    m(t, c)
// The caller sums the partials over cb / s (a deterministic reduction, no atomics).
struct SkinnyPass {
  DType dtype;
  const void* m; int64_t rows, cols, stride_mt, stride_mc;
  int rank;
  bool dropout; const int64_t* seed; uint32_t threshold;   // seed: device pointer, read when dropout
  float out_scale;
  const void* rm; int64_t stride_rmc, stride_rmr; float* row_part;   // ROW when row_part != nullptr; rm in dtype
  const float* l; int64_t stride_lt, stride_lr; float* col_part;     // COL when col_part != nullptr; l in fp32
  float* sum_part;                                                   // COLSUM when != nullptr
};

// How a pass is split over the GPU: the caller allocates row_part (col_blocks, rows, rank),
// col_part (row_splits, cols, rank) and sum_part (row_splits, cols) from it.
struct SkinnyPlan {
  int64_t cols_per_block, rows_per_split, col_blocks, row_splits;
};
SkinnyPlan skinny_plan(int64_t rows, int64_t cols, int rank, bool col_outputs, int device);
void skinny_pass(const SkinnyPass& a, const SkinnyPlan& plan, cudaStream_t stream);

// out (rows x cols, strided, dtype) += keep_scale * keep(t, c) * sum_r vg(t, r) * a(r, c):
// the dropout-masked rank-r term of dx (keep as for the element (t, c) of x, with the seed read
// from the device pointer `seed`). vg fp32, a in dtype.
void dropout_lowrank_add(DType dtype, void* out, int64_t rows, int64_t cols, int64_t stride_ot, int64_t stride_oc,
                         const float* vg, int64_t stride_vt, int64_t stride_vr, int rank,
                         const void* a, int64_t stride_ar, int64_t stride_ac,
                         const int64_t* seed, uint32_t threshold, float keep_scale, cudaStream_t stream);

}  // namespace spu
