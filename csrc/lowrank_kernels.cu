// The memory-bound CUDA kernels of the fused low-rank op y = x Wᵀ + b + s·((drop(x) Aᵀ) ⊙ g) Bᵀ.
// The dense GEMMs (x Wᵀ, dy W) go to cuBLAS through ATen with beta = 1 onto an output these
// kernels wrote first (lowrank_linear.cpp); what is here streams one big tensor once:
//   forward   u  = drop(x) Aᵀ                        skinny_pass ROW over x (mask from the seed)
//             y  = b + s (u ⊙ g) Bᵀ                  rank_term (sums u's partials; cuBLAS adds x Wᵀ)
//   backward  v  = dy B, grad_B = dyᵀ(s u ⊙ g),      skinny_pass ROW + COL + COLSUM over dy
//             grad_bias = Σ_t dy
//             dx = keep ⊙ ((s v ⊙ g) A) / (1 - p)     rank_term (sums v's partials; cuBLAS adds dy W)
//             grad_A = (s v ⊙ g)ᵀ drop(x),            skinny_pass COL (+ UV) over x (mask regenerated)
//             grad_g = s Σ_t u ⊙ v
//             the grads' split partials               sum_partials (one ordered sum)
// No torch headers here (fast to compile). Accumulation is fp32; partial sums over column blocks
// (ROW) and row splits (COL, COLSUM, UV) go to fp32 workspaces summed in a fixed order:
// deterministic, no atomics. Contiguous 16-byte-aligned rows are read with 16-byte vector loads,
// and the dropout mask of four consecutive columns comes from one Philox call there.
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

// Element i of a small operand whose dtype is known only at run time (A, B, g: the parameters'
// own dtype, which may differ from x's). Used for tiles of at most kRT × kBC elements.
__device__ __forceinline__ float load_f32(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// The M tile rows [t0, t0 + kBT) × columns [c0, c0 + kBC) in fp32, zero outside [.., t_end) ×
// [.., c_end), dropout applied. vec: unit column stride and 16-byte aligned rows (checked on the
// host), so a thread reads 16 bytes (8 half / 4 float) at once and takes the keep bits of four
// columns from one Philox call; otherwise one element and one keep test at a time.
template <typename T, bool DROP>
__device__ __forceinline__ void load_m_tile(float (&ms)[kBT][kBC + kPad], const SkinnyPass& a, bool vec, int64_t t0,
                                            int64_t t_end, int64_t c0, int64_t c_end, uint64_t seed) {
  const T* m = static_cast<const T*>(a.m);
  const int tid = threadIdx.x;
  if (vec) {
    constexpr int VW = 16 / sizeof(T);   // elements per 16-byte load
    constexpr int VPR = kBC / VW;        // loads per tile row
    for (int e = tid; e < kBT * VPR; e += kThreads) {
      const int tt = e / VPR, cc = (e % VPR) * VW;
      const int64_t t = t0 + tt, c = c0 + cc;
      float v[VW];
      if (t < t_end && c + VW <= c_end) {
        alignas(16) T buf[VW];
        *reinterpret_cast<uint4*>(buf) = __ldg(reinterpret_cast<const uint4*>(m + t * a.stride_mt + c));
#pragma unroll
        for (int j = 0; j < VW; ++j) v[j] = to_f32(buf[j]);
      } else {
#pragma unroll
        for (int j = 0; j < VW; ++j) v[j] = (t < t_end && c + j < c_end) ? to_f32(m[t * a.stride_mt + c + j]) : 0.f;
      }
      if (DROP && t < t_end) {
#pragma unroll
        for (int q = 0; q < VW; q += 4) {   // c + q is a multiple of 4: one Philox call, four columns
          const uint32_t bits = dropout_keep4(seed, static_cast<uint64_t>(t), static_cast<uint64_t>((c + q) / 4),
                                              static_cast<uint64_t>(a.cols), a.threshold);
#pragma unroll
          for (int j = 0; j < 4; ++j)
            if (!((bits >> j) & 1u)) v[q + j] = 0.f;
        }
      }
#pragma unroll
      for (int q = 0; q < VW; q += 4)
        *reinterpret_cast<float4*>(&ms[tt][cc + q]) = make_float4(v[q], v[q + 1], v[q + 2], v[q + 3]);
    }
    return;
  }
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
}

// Block: 256 threads, a range of rows [t_begin, t_end) of M walked in tiles of kBT rows, and NSUB
// column tiles of kBC columns. Thread (grp = tid / 16, lr = tid % 16) owns rank r = z*16 + lr and
//   ROW: rows grp*4 .. grp*4+3 of the current row tile (reset every row tile, written as it ends)
//   COL: columns grp*4 .. grp*4+3 of every column tile (kept over all row tiles, written at the end)
//   UV:  rows grp*4 .. grp*4+3 of every row tile (column block 0 only; summed over grp at the end)
// l is kept unscaled in shared memory; ls(r) multiplies the COL sums as they are written.
template <typename T, bool ROW, bool COL, bool COLSUM, bool DROP, int NSUB>
__global__ void __launch_bounds__(kThreads, (COL || COLSUM) ? 1 : 2) skinny_pass_kernel(const SkinnyPass a, const int64_t rows_per_split,
                                                                const bool vec) {
  __shared__ __align__(16) float ms[kBT][kBC + kPad];                // M tile in fp32, dropout applied
  __shared__ __align__(16) float rs_t[ROW ? kRT : 1][kBC + kPad];    // rm tile, transposed: rs_t[r][c]
  __shared__ __align__(16) float ls_t[COL ? kRT : 1][kBT + kPad];    // l tile, transposed: ls_t[r][t]
  __shared__ __align__(16) float us_t[COL ? kRT : 1][kBT + kPad];    // u tile (UV), transposed
  __shared__ float uv_red[COL ? kThreads : 1];                       // UV: per-thread sums, reduced in order

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
  const bool uv = COL && a.uv_part != nullptr && blockIdx.y == 0;   // the same for the whole block

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
  float uv_acc = 0.f;

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kBT) {
    __syncthreads();   // every reader of the previous row tile is done
    if (COL) {
      for (int e = tid; e < kBT * kRT; e += kThreads) {
        const int tt = e / kRT, rl = e % kRT;
        const int64_t t = t0 + tt;
        const bool in = t < t_end && r0 + rl < a.rank;
        ls_t[rl][tt] = in ? a.l[t * a.stride_lt + (r0 + rl) * a.stride_lr] : 0.f;
        if (uv) us_t[rl][tt] = in ? a.u[t * a.stride_ut + (r0 + rl) * a.stride_ur] : 0.f;
      }
    }
    float row_acc[4] = {0.f, 0.f, 0.f, 0.f};
    // unrolled when COL accumulators are indexed by sub (they must stay in registers)
#pragma unroll((COL || COLSUM) ? NSUB : 1)
    for (int sub = 0; sub < NSUB; ++sub) {
      const int64_t c0 = c_begin + static_cast<int64_t>(sub) * kBC;
      if (c0 < c_end) {   // the same for every thread of the block
        if (sub > 0) __syncthreads();   // every reader of the previous column tile is done
        load_m_tile<T, DROP>(ms, a, vec, t0, t_end, c0, c_end, seed);
        if (ROW) {
          for (int e = tid; e < kBC * kRT; e += kThreads) {
            const int cc = e / kRT, rl = e % kRT;
            const int64_t c = c0 + cc;
            rs_t[rl][cc] = (c < c_end && r0 + rl < a.rank)
                               ? load_f32(a.rm, a.rm_dtype, c * a.stride_rmc + (r0 + rl) * a.stride_rmr) : 0.f;
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
    if (uv) {   // the l and u tiles were loaded before the first __syncthreads of this row tile
#pragma unroll
      for (int i = 0; i < 4; ++i) uv_acc = fmaf(us_t[lr][grp * 4 + i], ls_t[lr][grp * 4 + i], uv_acc);
    }
    if (ROW && r < a.rank) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t t = t0 + grp * 4 + i;
        if (t < t_end) a.row_part[(static_cast<int64_t>(blockIdx.y) * a.rows + t) * a.rank + r] = row_acc[i] * a.out_scale;
      }
    }
  }

  const int64_t split_off = static_cast<int64_t>(blockIdx.x) * a.split_stride;
  if (COL && r < a.rank) {
    const float ls = a.out_scale * a.l_scale * (a.g != nullptr ? load_f32(a.g, a.g_dtype, r) : 1.f);
#pragma unroll
    for (int sub = 0; sub < NSUB; ++sub)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c_begin + static_cast<int64_t>(sub) * kBC + grp * 4 + j;
        if (c < c_end) a.col_part[split_off + c * a.stride_pc + r * a.stride_pr] = col_acc[COL ? sub : 0][j] * ls;
      }
  }
  if (COLSUM && lr == 0 && blockIdx.z == 0) {
#pragma unroll
    for (int sub = 0; sub < NSUB; ++sub)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = c_begin + static_cast<int64_t>(sub) * kBC + grp * 4 + j;
        if (c < c_end) a.sum_part[split_off + c] = col_sum[COLSUM ? sub : 0][j];
      }
  }
  if (uv) {   // Σ over the 16 row groups in a fixed order
    uv_red[tid] = uv_acc;
    __syncthreads();
    if (tid < kRT && r < a.rank) {
      float s = 0.f;
      for (int gi = 0; gi < kThreads / kRT; ++gi) s += uv_red[gi * kRT + tid];
      a.uv_part[split_off + r] = s * a.uv_scale;
    }
  }
}

// One 64×64 tile of out per block. Thread (rg = tid / 16, cg = tid % 16) owns rows rg + 16 i
// (i < 4) and columns cg*4 .. cg*4+3: a warp stores two whole 64-column rows, and the dropout
// keep bits of a thread's four columns come from one Philox call. vec: unit column stride and
// rows aligned to four elements, so the four are one store.
template <typename T>
__global__ void __launch_bounds__(kThreads) rank_term_kernel(const RankTerm a, const bool vec) {
  __shared__ float ls[kBT][kRT + 1];                 // L · gs for the current rank tile
  __shared__ __align__(16) float rs[kRT][kBC + kPad];  // R tile
  const int tid = threadIdx.x;
  const int cg = tid % 16, rg = tid / 16;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kBT;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBC;
  const bool write_l = a.l_out != nullptr && blockIdx.y == 0;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int r0 = 0; r0 < a.rank; r0 += kRT) {
    __syncthreads();
    for (int e = tid; e < kBT * kRT; e += kThreads) {
      const int tt = e / kRT, rl = e % kRT;
      const int64_t t = t0 + tt;
      const int r = r0 + rl;
      float l = 0.f;
      if (t < a.rows && r < a.rank) {
        const float* p = a.lp + t * a.stride_lt + r * a.stride_lr;
        for (int64_t q = 0; q < a.parts; ++q) l += p[q * a.part_stride];   // the partials, in order
        if (write_l) a.l_out[t * a.rank + r] = l;
        l *= a.scale * (a.g != nullptr ? load_f32(a.g, a.g_dtype, r) : 1.f);
      }
      ls[tt][rl] = l;
    }
    for (int e = tid; e < kRT * kBC; e += kThreads) {
      const int rl = e / kBC, cc = e % kBC;
      const int64_t c = c0 + cc;
      const int r = r0 + rl;
      rs[rl][cc] = (r < a.rank && c < a.cols) ? load_f32(a.rf, a.r_dtype, r * a.stride_rr + c * a.stride_rc) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int rl = 0; rl < kRT; ++rl) {
      const float4 w = *reinterpret_cast<const float4*>(&rs[rl][cg * 4]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float l = ls[rg + 16 * i][rl];
        acc[i][0] = fmaf(l, w.x, acc[i][0]);
        acc[i][1] = fmaf(l, w.y, acc[i][1]);
        acc[i][2] = fmaf(l, w.z, acc[i][2]);
        acc[i][3] = fmaf(l, w.w, acc[i][3]);
      }
    }
  }

  const uint64_t seed = a.dropout ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t cb = c0 + cg * 4;   // a multiple of 4: one Philox group
  if (cb >= a.cols) return;
  float bias[4] = {0.f, 0.f, 0.f, 0.f};
  if (a.bias != nullptr) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (cb + j < a.cols) bias[j] = to_f32(static_cast<const T*>(a.bias)[cb + j]);
  }
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t t = t0 + rg + 16 * i;
    if (t >= a.rows) break;
    const uint32_t keep = a.dropout ? dropout_keep4(seed, static_cast<uint64_t>(t), static_cast<uint64_t>(cb / 4),
                                                    static_cast<uint64_t>(a.cols), a.threshold)
                                    : 0xFu;
    alignas(16) T val[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) val[j] = from_f32<T>(((keep >> j) & 1u ? acc[i][j] * a.keep_scale : 0.f) + bias[j]);
    T* row = out + t * a.stride_ot;
    if (vec && cb + 4 <= a.cols) {
      if (sizeof(T) == 2) *reinterpret_cast<uint2*>(row + cb) = *reinterpret_cast<const uint2*>(val);
      else *reinterpret_cast<uint4*>(row + cb) = *reinterpret_cast<const uint4*>(val);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (cb + j < a.cols) row[(cb + j) * a.stride_oc] = val[j];
    }
  }
}

// out[i] = Σ_s parts[s·len + i] in order s = 0, 1, ...; four elements per thread, kThreads apart.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const float* parts, int64_t splits, int64_t len,
                                                                  float* out) {
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kThreads * 4 + threadIdx.x;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t i = i0 + static_cast<int64_t>(j) * kThreads;
    if (i >= len) return;
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += parts[k * len + i];
    out[i] = s;
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
  const bool vec = a.stride_mc == 1 && reinterpret_cast<uintptr_t>(a.m) % 16 == 0 &&
                   (a.stride_mt * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  skinny_pass_kernel<T, ROW, COL, COLSUM, DROP, NSUB><<<grid, kThreads, 0, stream>>>(a, plan.rows_per_split, vec);
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

SkinnyPlan skinny_plan(int64_t rows, int64_t cols, int rank, bool col_outputs, int device, int64_t rows_per_split) {
  SkinnyPlan p;
  p.cols_per_block = static_cast<int64_t>(col_outputs ? kSubCol : kSubRow) * kBC;
  p.col_blocks = cdiv(cols, p.cols_per_block);
  const int64_t row_tiles = cdiv(std::max<int64_t>(rows, 1), kBT);
  if (rows_per_split > 0) {
    if (rows_per_split % kBT != 0)
      throw std::invalid_argument("spu_kernels: skinny_plan: rows_per_split must be a multiple of 64");
    p.rows_per_split = rows_per_split;
  } else if (!col_outputs) {
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
  if (a.uv_part != nullptr && a.col_part == nullptr)
    throw std::invalid_argument("spu_kernels: skinny_pass: the UV output rides on a COL pass");
  if (plan.col_blocks > 65535 || cdiv(a.rank, kRT) > 65535 || plan.row_splits > 2147483647LL)
    throw std::invalid_argument("spu_kernels: skinny_pass grid too large for this shape");
  switch (a.dtype) {
    case DType::kFloat32: dispatch_pass<float>(a, plan, stream); break;
    case DType::kFloat16: dispatch_pass<__half>(a, plan, stream); break;
    case DType::kBFloat16: dispatch_pass<__nv_bfloat16>(a, plan, stream); break;
  }
}

void rank_term(const RankTerm& a, cudaStream_t stream) {
  if (a.rows <= 0 || a.cols <= 0) return;
  if (cdiv(a.cols, kBC) > 65535 || cdiv(a.rows, kBT) > 2147483647LL)
    throw std::invalid_argument("spu_kernels: rank_term grid too large for this shape");
  const dim3 grid(static_cast<unsigned>(cdiv(a.rows, kBT)), static_cast<unsigned>(cdiv(a.cols, kBC)));
  const int64_t size = a.dtype == DType::kFloat32 ? 4 : 2;
  const bool vec = a.stride_oc == 1 && reinterpret_cast<uintptr_t>(a.out) % (4 * size) == 0 &&
                   (a.stride_ot * size) % (4 * size) == 0;
  switch (a.dtype) {
    case DType::kFloat32: rank_term_kernel<float><<<grid, kThreads, 0, stream>>>(a, vec); break;
    case DType::kFloat16: rank_term_kernel<__half><<<grid, kThreads, 0, stream>>>(a, vec); break;
    case DType::kBFloat16: rank_term_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(a, vec); break;
  }
  check_launch("rank_term");
}

void sum_partials(const float* parts, int64_t splits, int64_t len, float* out, cudaStream_t stream) {
  if (len <= 0) return;
  const int64_t blocks = cdiv(len, 4 * kThreads);
  if (blocks > 2147483647LL) throw std::invalid_argument("spu_kernels: sum_partials: too many elements");
  sum_partials_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(parts, splits, len, out);
  check_launch("sum_partials");
}

}  // namespace spu
