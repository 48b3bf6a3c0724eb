// The memory-bound CUDA kernels of the fused low-rank op y = x Wᵀ + b + s·((drop(x) Aᵀ) ⊙ g) Bᵀ.
// The dense GEMMs (x Wᵀ, dy W) and the beta = 1 accumulation of the rank-r term into them go to
// cuBLAS through ATen (lowrank_linear.cpp); what is here streams one big tensor once:
//   forward   u  = drop(x) Aᵀ                       skinny_pass ROW over x (mask from the seed)
//   backward  v  = dy B, grad_B = dyᵀ(s u ⊙ g),     skinny_pass ROW + COL + COLSUM over dy
//             grad_bias = Σ_t dy
//             grad_A = (s v ⊙ g)ᵀ drop(x)            skinny_pass COL over x (mask regenerated)
//             dx += keep ⊙ ((s v ⊙ g) A) / (1 - p)   dropout_lowrank_add (only when p > 0)
// No torch headers here (fast to compile). Accumulation is fp32; partial sums over column blocks
// (ROW) and row splits (COL) go to fp32 workspaces that the caller sums: deterministic, no atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "lowrank_kernels.h"
#include "philox.cuh"

namespace spu {
namespace {

constexpr int kThreads = 256;
constexpr int kBT = 64;       // rows of M per tile
constexpr int kBC = 64;       // columns of M per tile
constexpr int kRT = 16;       // ranks per block; grid.z walks the rank tiles
constexpr int kPad = 4;       // keeps float4 rows 16-byte aligned and spreads shared-memory banks
constexpr int kSubCol = 4;    // column tiles per block when COL accumulators live in registers
constexpr int kSubRow = 16;   // column tiles per block for a ROW-only pass

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Block: 256 threads, a range of rows [t_begin, t_end) of M walked in tiles of kBT rows, and NSUB
// column tiles of kBC columns. Thread (grp = tid / 16, lr = tid % 16) owns rank r = z*16 + lr and
//   ROW: rows grp*4 .. grp*4+3 of the current row tile (reset every row tile, written as it ends)
//   COL: columns grp*4 .. grp*4+3 of every column tile (kept over all row tiles, written at the end)
template <typename T, bool ROW, bool COL, bool COLSUM, bool DROP, int NSUB>
__global__ void __launch_bounds__(kThreads) skinny_pass_kernel(const SkinnyPass a, const int64_t rows_per_split) {
  __shared__ __align__(16) float ms[kBT][kBC + kPad];                // M tile in fp32, dropout applied
  __shared__ __align__(16) float rs_t[ROW ? kRT : 1][kBC + kPad];    // rm tile, transposed: rs_t[r][c]
  __shared__ __align__(16) float ls_t[COL ? kRT : 1][kBT + kPad];    // l tile, transposed: ls_t[r][t]

  const int tid = threadIdx.x;
  const int lr = tid % kRT;
  const int grp = tid / kRT;
  const int r0 = blockIdx.z * kRT;
  const int r = r0 + lr;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * NSUB * kBC;
  const int64_t c_end = min(c_begin + static_cast<int64_t>(NSUB) * kBC, a.cols);
  const int64_t t_begin = static_cast<int64_t>(blockIdx.x) * rows_per_split;
  const int64_t t_end = min(t_begin + rows_per_split, a.rows);
  const uint64_t seed = DROP ? static_cast<uint64_t>(*a.seed) : 0;   // drawn on the device by the caller
  const T* m = static_cast<const T*>(a.m);
  const T* rm = static_cast<const T*>(a.rm);

  float col_acc[COL ? NSUB : 1][4];
  float col_sum[COLSUM ? NSUB : 1][4];
#pragma unroll
  for (int s = 0; s < (COL ? NSUB : 1); ++s)
#pragma unroll
    for (int j = 0; j < 4; ++j) col_acc[s][j] = 0.f;
#pragma unroll
  for (int s = 0; s < (COLSUM ? NSUB : 1); ++s)
#pragma unroll
    for (int j = 0; j < 4; ++j) col_sum[s][j] = 0.f;

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kBT) {
    __syncthreads();   // every reader of the previous row tile is done
    if (COL) {
      for (int e = tid; e < kBT * kRT; e += kThreads) {
        const int tt = e / kRT, rl = e % kRT;
        const int64_t t = t0 + tt;
        ls_t[rl][tt] = (t < t_end && r0 + rl < a.rank) ? a.l[t * a.stride_lt + (r0 + rl) * a.stride_lr] : 0.f;
      }
    }
    float row_acc[4] = {0.f, 0.f, 0.f, 0.f};
    // unrolled when COL accumulators are indexed by sub (they must stay in registers)
#pragma unroll((COL || COLSUM) ? NSUB : 1)
    for (int sub = 0; sub < NSUB; ++sub) {
      const int64_t c0 = c_begin + static_cast<int64_t>(sub) * kBC;
      if (c0 < c_end) {   // the same for every thread of the block
        if (sub > 0) __syncthreads();   // every reader of the previous column tile is done
        for (int e = tid; e < kBT * kBC; e += kThreads) {
          const int tt = e / kBC, cc = e % kBC;
          const int64_t t = t0 + tt, c = c0 + cc;
          float v = 0.f;
          if (t < t_end && c < c_end) {
            v = to_f32(m[t * a.stride_mt + c * a.stride_mc]);
            if (DROP && !dropout_keep(seed, static_cast<uint64_t>(t), static_cast<uint64_t>(c),
                                      static_cast<uint64_t>(a.cols), a.threshold)) v = 0.f;
          }
          ms[tt][cc] = v;
        }
        if (ROW) {
          for (int e = tid; e < kBC * kRT; e += kThreads) {
            const int cc = e / kRT, rl = e % kRT;
            const int64_t c = c0 + cc;
            rs_t[rl][cc] = (c < c_end && r0 + rl < a.rank) ? to_f32(rm[c * a.stride_rmc + (r0 + rl) * a.stride_rmr]) : 0.f;
          }
        }
        __syncthreads();
        if (ROW) {   // row_acc[i] += Σ_c ms[grp*4+i][c] · rm(c, r)
#pragma unroll 4
          for (int c = 0; c < kBC; c += 4) {
            const float4 w = *reinterpret_cast<const float4*>(&rs_t[lr][c]);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float4 v = *reinterpret_cast<const float4*>(&ms[grp * 4 + i][c]);
              row_acc[i] = fmaf(v.x, w.x, fmaf(v.y, w.y, fmaf(v.z, w.z, fmaf(v.w, w.w, row_acc[i]))));
            }
          }
        }
        if (COL || COLSUM) {   // col_acc[sub][j] += Σ_t ms[t][grp*4+j] · l(t, r)
#pragma unroll 4
          for (int t = 0; t < kBT; t += 4) {
            float lv[4] = {0.f, 0.f, 0.f, 0.f};
            if (COL) {
              const float4 l4 = *reinterpret_cast<const float4*>(&ls_t[lr][t]);
              lv[0] = l4.x; lv[1] = l4.y; lv[2] = l4.z; lv[3] = l4.w;
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float4 v = *reinterpret_cast<const float4*>(&ms[t + i][grp * 4]);
              if (COL) {
                col_acc[COL ? sub : 0][0] = fmaf(v.x, lv[i], col_acc[COL ? sub : 0][0]);
                col_acc[COL ? sub : 0][1] = fmaf(v.y, lv[i], col_acc[COL ? sub : 0][1]);
                col_acc[COL ? sub : 0][2] = fmaf(v.z, lv[i], col_acc[COL ? sub : 0][2]);
                col_acc[COL ? sub : 0][3] = fmaf(v.w, lv[i], col_acc[COL ? sub : 0][3]);
              }
              if (COLSUM) {
                col_sum[COLSUM ? sub : 0][0] += v.x;
                col_sum[COLSUM ? sub : 0][1] += v.y;
                col_sum[COLSUM ? sub : 0][2] += v.z;
                col_sum[COLSUM ? sub : 0][3] += v.w;
              }
            }
          }
        }
      }
    }
    if (ROW && r < a.rank) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t t = t0 + grp * 4 + i;
        if (t < t_end) a.row_part[(static_cast<int64_t>(blockIdx.y) * a.rows + t) * a.rank + r] = row_acc[i] * a.out_scale;
      }
    }
  }

  if (COL && r < a.rank) {
#pragma unroll
    for (int sub = 0; sub < NSUB; ++sub)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c_begin + static_cast<int64_t>(sub) * kBC + grp * 4 + j;
        if (c < c_end)
          a.col_part[(static_cast<int64_t>(blockIdx.x) * a.cols + c) * a.rank + r] = col_acc[COL ? sub : 0][j] * a.out_scale;
      }
  }
  if (COLSUM && lr == 0 && blockIdx.z == 0) {
#pragma unroll
    for (int sub = 0; sub < NSUB; ++sub)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c_begin + static_cast<int64_t>(sub) * kBC + grp * 4 + j;
        if (c < c_end) a.sum_part[static_cast<int64_t>(blockIdx.x) * a.cols + c] = col_sum[COLSUM ? sub : 0][j];
      }
  }
}

// out(t, c) += keep_scale · keep(t, c) · Σ_r vg(t, r) a(r, c), one 64×64 tile of out per block;
// each thread owns 16 elements (rows i*4 + tid/64, column tid%64: coalesced along columns).
template <typename T>
__global__ void __launch_bounds__(kThreads) dropout_lowrank_add_kernel(
    T* out, int64_t rows, int64_t cols, int64_t so_t, int64_t so_c, const float* vg, int64_t sv_t, int64_t sv_r,
    int rank, const T* a, int64_t sa_r, int64_t sa_c, const int64_t* seed_ptr, uint32_t threshold, float keep_scale) {
  __shared__ float vs[kBT][kRT + 1];
  __shared__ float as[kRT][kBC + 1];
  const int tid = threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kBT;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBC;
  const int cc = tid % kBC;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  float acc[kBT * kBC / kThreads];
#pragma unroll
  for (int i = 0; i < kBT * kBC / kThreads; ++i) acc[i] = 0.f;
  for (int r0 = 0; r0 < rank; r0 += kRT) {
    __syncthreads();
    for (int e = tid; e < kBT * kRT; e += kThreads) {
      const int tt = e / kRT, rl = e % kRT;
      vs[tt][rl] = (t0 + tt < rows && r0 + rl < rank) ? vg[(t0 + tt) * sv_t + (r0 + rl) * sv_r] : 0.f;
    }
    for (int e = tid; e < kRT * kBC; e += kThreads) {
      const int rl = e / kBC, c = e % kBC;
      as[rl][c] = (c0 + c < cols && r0 + rl < rank) ? to_f32(a[(r0 + rl) * sa_r + (c0 + c) * sa_c]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kBT * kBC / kThreads; ++i) {
      const int tt = i * (kThreads / kBC) + tid / kBC;
#pragma unroll
      for (int rl = 0; rl < kRT; ++rl) acc[i] = fmaf(vs[tt][rl], as[rl][cc], acc[i]);
    }
  }
  const int64_t c = c0 + cc;
  if (c >= cols) return;
#pragma unroll
  for (int i = 0; i < kBT * kBC / kThreads; ++i) {
    const int64_t t = t0 + i * (kThreads / kBC) + tid / kBC;
    if (t < rows && dropout_keep(seed, static_cast<uint64_t>(t), static_cast<uint64_t>(c),
                                  static_cast<uint64_t>(cols), threshold)) {
      T* p = out + t * so_t + c * so_c;
      *p = from_f32<T>(to_f32(*p) + acc[i] * keep_scale);
    }
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("spu_kernels: ") + what + " launch failed: " + cudaGetErrorString(err));
}

int sm_count(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    cudaGetLastError();   // clear it: a later launch check must not report this
    n = 108;
  }
  if (device >= 0 && device < 64) cache[device] = n;
  return n;
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, bool ROW, bool COL, bool COLSUM, bool DROP, int NSUB>
void launch_pass(const SkinnyPass& a, const SkinnyPlan& plan, cudaStream_t stream) {
  if (plan.cols_per_block != static_cast<int64_t>(NSUB) * kBC || plan.rows_per_split % kBT != 0)
    throw std::invalid_argument("spu_kernels: skinny_pass plan does not match the kernel (skinny_plan's col_outputs "
                                "must be true exactly when COL or COLSUM outputs are asked for)");
  const dim3 grid(static_cast<unsigned>(plan.row_splits), static_cast<unsigned>(plan.col_blocks),
                  static_cast<unsigned>(cdiv(a.rank, kRT)));
  skinny_pass_kernel<T, ROW, COL, COLSUM, DROP, NSUB><<<grid, kThreads, 0, stream>>>(a, plan.rows_per_split);
}

// The passes the op uses: ROW-only (u = drop(x)Aᵀ), ROW+COL(+COLSUM) over dy, COL-only (grad_A).
template <typename T>
void dispatch_pass(const SkinnyPass& a, const SkinnyPlan& plan, cudaStream_t stream) {
  const bool row = a.row_part != nullptr, col = a.col_part != nullptr, sum = a.sum_part != nullptr;
  if (row && !col && !sum) {
    if (a.dropout) launch_pass<T, true, false, false, true, kSubRow>(a, plan, stream);
    else launch_pass<T, true, false, false, false, kSubRow>(a, plan, stream);
  } else if (row && !a.dropout) {
    if (col && sum) launch_pass<T, true, true, true, false, kSubCol>(a, plan, stream);
    else if (col) launch_pass<T, true, true, false, false, kSubCol>(a, plan, stream);
    else launch_pass<T, true, false, true, false, kSubCol>(a, plan, stream);
  } else if (!row && col && !sum) {
    if (a.dropout) launch_pass<T, false, true, false, true, kSubCol>(a, plan, stream);
    else launch_pass<T, false, true, false, false, kSubCol>(a, plan, stream);
  } else {
    throw std::invalid_argument("spu_kernels: skinny_pass has no kernel for this combination of outputs");
  }
  check_launch("skinny_pass");
}

}  // namespace

SkinnyPlan skinny_plan(int64_t rows, int64_t cols, int rank, bool col_outputs, int device) {
  SkinnyPlan p;
  p.cols_per_block = static_cast<int64_t>(col_outputs ? kSubCol : kSubRow) * kBC;
  p.col_blocks = cdiv(cols, p.cols_per_block);
  const int64_t row_tiles = cdiv(std::max<int64_t>(rows, 1), kBT);
  if (!col_outputs) {
    p.rows_per_split = kBT;   // nothing is kept across row tiles: one tile per block
  } else {
    // a few blocks per SM; each row split adds one (cols, rank) fp32 partial to sum afterwards
    const int64_t blocks_per_split = p.col_blocks * cdiv(rank, kRT);
    const int64_t want = std::max<int64_t>(1, std::min<int64_t>(row_tiles, cdiv(2 * sm_count(device), blocks_per_split)));
    p.rows_per_split = cdiv(row_tiles, want) * kBT;
  }
  p.row_splits = cdiv(std::max<int64_t>(rows, 1), p.rows_per_split);
  return p;
}

void skinny_pass(const SkinnyPass& a, const SkinnyPlan& plan, cudaStream_t stream) {
  if (a.rows <= 0 || a.cols <= 0 || a.rank <= 0) return;
  if (plan.col_blocks > 65535 || cdiv(a.rank, kRT) > 65535 || plan.row_splits > 2147483647LL)
    throw std::invalid_argument("spu_kernels: skinny_pass grid too large for this shape");
  switch (a.dtype) {
    case DType::kFloat32: dispatch_pass<float>(a, plan, stream); break;
    case DType::kFloat16: dispatch_pass<__half>(a, plan, stream); break;
    case DType::kBFloat16: dispatch_pass<__nv_bfloat16>(a, plan, stream); break;
  }
}

void dropout_lowrank_add(DType dtype, void* out, int64_t rows, int64_t cols, int64_t stride_ot, int64_t stride_oc,
                         const float* vg, int64_t stride_vt, int64_t stride_vr, int rank,
                         const void* a, int64_t stride_ar, int64_t stride_ac,
                         const int64_t* seed, uint32_t threshold, float keep_scale, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || rank <= 0) return;
  if (cdiv(cols, kBC) > 65535) throw std::invalid_argument("spu_kernels: dropout_lowrank_add: too many columns");
  const dim3 grid(static_cast<unsigned>(cdiv(rows, kBT)), static_cast<unsigned>(cdiv(cols, kBC)));
  switch (dtype) {
#define SPU_LAUNCH_ADD(T)                                                                                   \
  dropout_lowrank_add_kernel<T><<<grid, kThreads, 0, stream>>>(                                              \
      static_cast<T*>(out), rows, cols, stride_ot, stride_oc, vg, stride_vt, stride_vr, rank,                \
      static_cast<const T*>(a), stride_ar, stride_ac, seed, threshold, keep_scale);                         \
  break;
    case DType::kFloat32: SPU_LAUNCH_ADD(float)
    case DType::kFloat16: SPU_LAUNCH_ADD(__half)
    case DType::kBFloat16: SPU_LAUNCH_ADD(__nv_bfloat16)
#undef SPU_LAUNCH_ADD
  }
  check_launch("dropout_lowrank_add");
}

}  // namespace spu
