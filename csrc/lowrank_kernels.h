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
// caller drew there), so no host sync and CUDA graphs replay a fresh one. ROW and COL outputs are
// multiplied by out_scale. Row split s covers rows [s·rows_per_split, (s+1)·rows_per_split).
//   ROW:    row_part[cb][t][r]                       = out_scale · Σ_{c in column block cb} m(t, c) rm(c, r)
//   COL:    col_part[s·split_stride + c·pc + r·pr]    = out_scale · Σ_{t in split s} m(t, c) l(t, r) ls(r)
//           with ls(r) = l_scale · (g ? g[r] : 1)
//   COLSUM: sum_part[s·split_stride + c]              = Σ_{t in split s} m(t, c)
//   UV:     uv_part[s·split_stride + r]               = uv_scale · Σ_{t in split s} u(t, r) l(t, r)
//           (needs COL: it rides on the pass's l tiles; written by column block 0)
// The caller sums the partials over cb / s in a fixed order (deterministic, no atomics). COL,
// COLSUM and UV of one pass share split_stride, so they can fill one workspace laid out as the
// op's packed grads.
struct SkinnyPass {
  DType dtype;
  const void* m; int64_t rows, cols, stride_mt, stride_mc;
  int rank;
  bool dropout; const int64_t* seed; uint32_t threshold;   // seed: device pointer, read when dropout
  float out_scale;
  // ROW when row_part != nullptr; rm in rm_dtype
  const void* rm; DType rm_dtype; int64_t stride_rmc, stride_rmr; float* row_part;
  // COL when col_part != nullptr; l in fp32, g (nullable) in g_dtype
  const float* l; int64_t stride_lt, stride_lr; const void* g; DType g_dtype; float l_scale;
  float* col_part; int64_t stride_pc, stride_pr;
  float* sum_part;                                          // COLSUM when != nullptr
  const float* u; int64_t stride_ut, stride_ur; float uv_scale; float* uv_part;   // UV when uv_part != nullptr
  int64_t split_stride;
};

// How a pass is split over the GPU: the caller allocates row_part (col_blocks, rows, rank) and
// the COL / COLSUM / UV partials (row_splits rows of split_stride) from it.
struct SkinnyPlan {
  int64_t cols_per_block, rows_per_split, col_blocks, row_splits;
};
// rows_per_split > 0 imposes a split (a multiple of 64 rows), so that two passes can write one
// workspace; 0 lets the plan choose.
SkinnyPlan skinny_plan(int64_t rows, int64_t cols, int rank, bool col_outputs, int device, int64_t rows_per_split = 0);
void skinny_pass(const SkinnyPass& a, const SkinnyPlan& plan, cudaStream_t stream);

// The rank-r term written into a dense output, the first half of a beta = 1 GEMM:
//   out(t, c) = bias(c) + keep_scale · keep(t, c) · Σ_r L(t, r) gs(r) R(r, c)
// with L(t, r) = Σ_{q < parts} lp[q·part_stride + t·stride_lt + r·stride_lr] summed in order q = 0, 1, ...
// (the ROW partials of a skinny pass), gs(r) = scale · (g ? g[r] : 1), keep(t, c) the dropout
// mask of element (t, c) of a (rows, cols) input (1 without dropout). When l_out != nullptr, column
// block 0 also writes L to l_out ((rows, rank) fp32, contiguous). out and bias in dtype, R in r_dtype.
struct RankTerm {
  DType dtype; void* out; int64_t rows, cols, stride_ot, stride_oc;
  const void* bias;
  const float* lp; int64_t parts, part_stride, stride_lt, stride_lr; int rank;
  const void* g; DType g_dtype; float scale;
  const void* rf; DType r_dtype; int64_t stride_rr, stride_rc;
  bool dropout; const int64_t* seed; uint32_t threshold; float keep_scale;
  float* l_out;
};
void rank_term(const RankTerm& a, cudaStream_t stream);

// out[i] = Σ_{s < splits} parts[s·len + i], summed in order s = 0, 1, ... (fp32).
void sum_partials(const float* parts, int64_t splits, int64_t len, float* out, cudaStream_t stream);

}  // namespace spu
