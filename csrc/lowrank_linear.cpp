// The cuda backend of the fused low-rank op, registered as torch ops (TORCH_LIBRARY_FRAGMENT):
//
//   spu_kernels::lowrank_linear_fwd(x, W, b?, A, B, g?, s, p, seed?, threshold) -> (y, u)
//   spu_kernels::lowrank_linear_bwd(dy, x?, W?, A, B, g?, u, s, p, seed?, threshold, needs...) -> (dx, grads)
// (seed: a one-element int64 tensor on the device, read by the kernels; needed when p > 0)
//
// y = x Wᵀ + b + s·((drop(x) Aᵀ) ⊙ g) Bᵀ with x (T, K) and W (N, K). The kernels of
// lowrank_kernels.cu write the bias and the rank-r term into the output first, and the dense GEMM
// (cuBLAS through ATen's addmm_) adds into it with beta = 1: never a T×N branch output, and no
// small ATen ops in between (no casts: A, B, g are read in their own dtype). Forward returns
// u = drop(x) Aᵀ (T, r) in fp32, the one activation backward needs besides x. Backward returns dx
// (an empty tensor when not asked for) and the grads asked for, fp32, packed in one vector in the
// order grad_A (r, K), grad_B (N, r), grad_bias (N,), grad_g (r,) (ops/lowrank_linear.py:
// grad_layout; the autograd.Function casts them to the parameters' dtypes). Deterministic: no
// atomics. Meta kernels give shapes for torch.compile / FakeTensor.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lowrank_kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

spu::DType kernel_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return spu::DType::kFloat32;
    case at::kHalf: return spu::DType::kFloat16;
    case at::kBFloat16: return spu::DType::kBFloat16;
    default: TORCH_CHECK(false, "spu_kernels lowrank_linear (cuda): unsupported dtype ", t.scalar_type(),
                         "; use float32, float16 or bfloat16");
  }
}

void check_cuda(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "spu_kernels lowrank_linear (cuda): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "spu_kernels lowrank_linear (cuda): ", name, " is on ", t.device(),
              " but x is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "spu_kernels lowrank_linear (cuda): ", name, " is ",
              t.scalar_type(), " but x is ", like.scalar_type());
}

// The dropout seed the kernels read on the device: a one-element int64 tensor on `like`'s device
// (drawn there by the caller: reading it on the host would sync). nullptr without dropout.
const int64_t* seed_pointer(const OptTensor& seed, double p, const Tensor& like) {
  if (p <= 0) return nullptr;
  TORCH_CHECK(seed.has_value() && seed->defined(), "spu_kernels lowrank_linear (cuda): dropout p > 0 needs a seed tensor");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->device() == like.device(),
              "spu_kernels lowrank_linear (cuda): the seed must be one int64 on ", like.device(), ", got ",
              seed->scalar_type(), " of ", seed->numel(), " elements on ", seed->device());
  return seed->data_ptr<int64_t>();
}

const void* optional_ptr(const OptTensor& t) { return t.has_value() && t->defined() ? t->data_ptr() : nullptr; }

spu::DType optional_dtype(const OptTensor& t) {
  return t.has_value() && t->defined() ? kernel_dtype(*t) : spu::DType::kFloat32;
}

// A, B, g (parameters in their own float dtype, on x's device); g made contiguous (r elements).
void check_factor(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "spu_kernels lowrank_linear (cuda): ", name, " is on ",
              t.device(), " but x is on ", like.device());
  kernel_dtype(t);
}

// Offsets of the packed fp32 grads (ops/lowrank_linear.py: grad_layout): grad_A (r, K), grad_B (N, r),
// grad_bias (N,), grad_g (r,), those asked for, in this order.
struct GradLayout {
  int64_t a = -1, b = -1, bias = -1, g = -1, total = 0;
  GradLayout(int64_t r, int64_t K, int64_t N, bool need_dbias, bool need_da, bool need_db, bool need_dg) {
    if (need_da) { a = total; total += r * K; }
    if (need_db) { b = total; total += N * r; }
    if (need_dbias) { bias = total; total += N; }
    if (need_dg) { g = total; total += r; }
  }
};

// The rank-r term written into `out` ((rows, cols), the caller then adds a dense GEMM with
// beta = 1): out = bias + keep_scale · keep ⊙ (s (L ⊙ g) R) with L the sum of `parts` ROW
// partials of lp (parts, rows, r), R(r, c) = rf[r·stride_rr + c·stride_rc]. l_out: where L goes
// when there are several partials (else lp itself is L).
void rank_term_into(Tensor& out, const OptTensor& bias, const Tensor& lp, const OptTensor& g, double scale,
                    const Tensor& rf, int64_t stride_rr, int64_t stride_rc, bool dropout, const int64_t* seed,
                    int64_t threshold, double keep_scale, float* l_out) {
  spu::RankTerm t{};
  t.dtype = kernel_dtype(out);
  t.out = out.data_ptr(); t.rows = out.size(0); t.cols = out.size(1); t.stride_ot = out.stride(0); t.stride_oc = out.stride(1);
  t.bias = optional_ptr(bias);
  t.lp = lp.data_ptr<float>(); t.parts = lp.size(0); t.part_stride = lp.stride(0); t.stride_lt = lp.stride(1);
  t.stride_lr = lp.stride(2); t.rank = static_cast<int>(lp.size(2));
  t.g = optional_ptr(g); t.g_dtype = optional_dtype(g); t.scale = static_cast<float>(scale);
  t.rf = rf.data_ptr(); t.r_dtype = kernel_dtype(rf); t.stride_rr = stride_rr; t.stride_rc = stride_rc;
  t.dropout = dropout; t.seed = seed; t.threshold = static_cast<uint32_t>(threshold);
  t.keep_scale = static_cast<float>(keep_scale);
  t.l_out = l_out;
  spu::rank_term(t, c10::cuda::getCurrentCUDAStream());
}

// The forward: three launches. u's ROW partials over x; y = b + s (u ⊙ g) Bᵀ (also summing the
// partials into u); y += x Wᵀ by cuBLAS with beta = 1. A, B, g are read in their own dtype.
std::tuple<Tensor, Tensor> lowrank_linear_fwd_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                   const Tensor& a, const Tensor& b, const OptTensor& g_in, double scale,
                                                   double p, const OptTensor& seed, int64_t threshold) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && a.dim() == 2 && b.dim() == 2,
              "spu_kernels lowrank_linear_fwd (cuda): x, weight, A, B must be 2-D");
  const int64_t* seed_ptr = seed_pointer(seed, p, x);
  check_cuda(weight, "weight", x);
  if (bias.has_value() && bias->defined()) check_cuda(*bias, "bias", x);
  for (auto [t, name] : {std::pair{&a, "A"}, {&b, "B"}}) check_factor(*t, name, x);
  if (g_in.has_value() && g_in->defined()) check_factor(*g_in, "g", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const OptTensor g = g_in.has_value() && g_in->defined() ? OptTensor(g_in->contiguous()) : OptTensor();
  const OptTensor bias_c = bias.has_value() && bias->defined() ? OptTensor(bias->contiguous()) : OptTensor();
  const int64_t T = x.size(0), N = weight.size(0), r = a.size(0);
  const auto f32 = x.options().dtype(at::kFloat);

  // u = drop(x) Aᵀ / (1 - p): the ROW pass over x with rm(c, r) = A[r][c], partials per column block
  const auto plan = spu::skinny_plan(T, x.size(1), static_cast<int>(r), false, x.get_device());
  Tensor u_part = at::empty({plan.col_blocks, T, r}, f32);
  spu::SkinnyPass pass{};
  pass.dtype = kernel_dtype(x);
  pass.m = x.data_ptr(); pass.rows = T; pass.cols = x.size(1); pass.stride_mt = x.stride(0); pass.stride_mc = x.stride(1);
  pass.rank = static_cast<int>(r);
  pass.dropout = p > 0; pass.seed = seed_ptr; pass.threshold = static_cast<uint32_t>(threshold);
  pass.out_scale = static_cast<float>(p > 0 ? 1.0 / (1.0 - p) : 1.0);
  pass.rm = a.data_ptr(); pass.rm_dtype = kernel_dtype(a); pass.stride_rmc = a.stride(1); pass.stride_rmr = a.stride(0);
  pass.row_part = u_part.data_ptr<float>();
  spu::skinny_pass(pass, plan, stream);
  Tensor u = plan.col_blocks == 1 ? u_part.select(0, 0) : at::empty({T, r}, f32);

  // y = b + s (u ⊙ g) Bᵀ, then y += x Wᵀ (cuBLAS reads y as C: no T×N temporary, no second pass)
  Tensor y = at::empty({T, N}, x.options());
  rank_term_into(y, bias_c, u_part, g, scale, b, b.stride(1), b.stride(0), false, nullptr, 0, 1.0,
                 plan.col_blocks == 1 ? nullptr : u.data_ptr<float>());
  y.addmm_(x, weight.t());
  return {y, u};
}

// The backward: dx, and every grad asked for packed in one fp32 vector (GradLayout). Launches:
// the dy pass (v's partials, grad_B and grad_bias per row split), the rank term of dx (which
// also sums v) and dx += dy W (cuBLAS, beta = 1), the x pass (grad_A, grad_g per row split), one
// ordered sum of the split partials. The dy and x passes share their row splits, so all their
// partials fill one (splits, total) workspace laid out as the packed grads (the output itself
// when there is one split).
std::tuple<Tensor, Tensor> lowrank_linear_bwd_cuda(
    const Tensor& dy, const OptTensor& x, const OptTensor& weight, const Tensor& a, const Tensor& b,
    const OptTensor& g_in, const Tensor& u, double scale, double p, const OptTensor& seed, int64_t threshold,
    bool need_dx, bool need_dbias, bool need_da, bool need_db, bool need_dg) {
  TORCH_CHECK(dy.dim() == 2 && u.dim() == 2, "spu_kernels lowrank_linear_bwd (cuda): dy and u must be 2-D");
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.is_cuda() && u.device() == dy.device(),
              "spu_kernels lowrank_linear_bwd (cuda): u must be the forward's fp32 u on ", dy.device());
  for (auto [t, name] : {std::pair{&a, "A"}, {&b, "B"}}) check_factor(*t, name, dy);
  if (g_in.has_value() && g_in->defined()) check_factor(*g_in, "g", dy);
  TORCH_CHECK(!need_dx || (weight.has_value() && weight->defined()), "lowrank_linear_bwd: need_dx without weight");
  TORCH_CHECK(!need_da || (x.has_value() && x->defined()), "lowrank_linear_bwd: need_da without x");
  TORCH_CHECK(!need_dg || (g_in.has_value() && g_in->defined()), "lowrank_linear_bwd: need_dg without g");
  if (need_dx) check_cuda(*weight, "weight", dy);
  if (need_da) check_cuda(*x, "x", dy);
  const int64_t* seed_ptr = seed_pointer(seed, p, dy);
  const c10::cuda::CUDAGuard guard(dy.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t T = dy.size(0), N = dy.size(1), r = a.size(0), K = a.size(1);
  const auto f32 = dy.options().dtype(at::kFloat);
  const OptTensor g = g_in.has_value() && g_in->defined() ? OptTensor(g_in->contiguous()) : OptTensor();
  const GradLayout lay(r, K, N, need_dbias, need_da, need_db, need_dg);
  Tensor packed = at::empty({lay.total}, f32);
  Tensor dx = need_dx ? at::empty({T, K}, dy.options()) : at::empty({0}, dy.options());
  if (T == 0) {   // no tokens: nothing to stream; the grads are zeros
    packed.zero_();
    return {dx, packed};
  }

  // Row splits shared by the passes that write split partials (the dy pass for grad_B / grad_bias,
  // the x pass for grad_A / grad_g): the larger of their own choices.
  const bool dy_cols = need_db || need_dbias;
  int64_t rows_per_split = 0;
  if (dy_cols) rows_per_split = spu::skinny_plan(T, N, static_cast<int>(r), true, dy.get_device()).rows_per_split;
  if (need_da)
    rows_per_split = std::max(rows_per_split,
                              spu::skinny_plan(T, K, static_cast<int>(r), true, dy.get_device()).rows_per_split);
  const auto plan_dy = spu::skinny_plan(T, N, static_cast<int>(r), dy_cols, dy.get_device(), dy_cols ? rows_per_split : 0);
  const int64_t splits = rows_per_split > 0 ? (T + rows_per_split - 1) / rows_per_split : 1;
  Tensor ws = splits == 1 ? packed.view({1, lay.total}) : at::empty({splits, lay.total}, f32);
  float* const ws_ptr = ws.data_ptr<float>();

  // v = dy B (ROW partials per column block), grad_B = dyᵀ (s u ⊙ g) (COL), grad_bias = Σ_t dy (COLSUM)
  Tensor v_part = at::empty({plan_dy.col_blocks, T, r}, f32);
  spu::SkinnyPass pass{};
  pass.dtype = kernel_dtype(dy);
  pass.m = dy.data_ptr(); pass.rows = T; pass.cols = N; pass.stride_mt = dy.stride(0); pass.stride_mc = dy.stride(1);
  pass.rank = static_cast<int>(r);
  pass.out_scale = 1.f;
  pass.rm = b.data_ptr(); pass.rm_dtype = kernel_dtype(b); pass.stride_rmc = b.stride(0); pass.stride_rmr = b.stride(1);
  pass.row_part = v_part.data_ptr<float>();
  pass.split_stride = lay.total;
  if (need_db) {
    pass.l = u.data_ptr<float>(); pass.stride_lt = u.stride(0); pass.stride_lr = u.stride(1);
    pass.g = optional_ptr(g); pass.g_dtype = optional_dtype(g); pass.l_scale = static_cast<float>(scale);
    pass.col_part = ws_ptr + lay.b; pass.stride_pc = r; pass.stride_pr = 1;   // grad_B (N, r)
  }
  if (need_dbias) pass.sum_part = ws_ptr + lay.bias;
  spu::skinny_pass(pass, plan_dy, stream);

  // v summed: the partials themselves with one column block, else by the rank term of dx
  Tensor v = plan_dy.col_blocks == 1 ? v_part.select(0, 0) : Tensor();
  if (need_dx) {
    if (!v.defined()) v = at::empty({T, r}, f32);
    rank_term_into(dx, OptTensor(), v_part, g, scale, a, a.stride(0), a.stride(1), p > 0, seed_ptr, threshold,
                   p > 0 ? 1.0 / (1.0 - p) : 1.0, plan_dy.col_blocks == 1 ? nullptr : v.data_ptr<float>());
    dx.addmm_(dy, *weight);   // beta = 1: dx = dy W + the rank term
  } else if (!v.defined() && (need_da || need_dg)) {
    v = v_part.sum(0);   // no dx to ride on (x needs no grad): one ATen reduction
  }

  if (need_da) {
    // grad_A = (s v ⊙ g)ᵀ drop(x) / (1 - p): the COL pass over x with l = v, written (r, K);
    // grad_g = s Σ_t u ⊙ v rides on it (UV)
    const Tensor& xx = *x;
    const auto plan_x = spu::skinny_plan(T, K, static_cast<int>(r), true, dy.get_device(), rows_per_split);
    spu::SkinnyPass pa{};
    pa.dtype = kernel_dtype(xx);
    pa.m = xx.data_ptr(); pa.rows = T; pa.cols = K; pa.stride_mt = xx.stride(0); pa.stride_mc = xx.stride(1);
    pa.rank = static_cast<int>(r);
    pa.dropout = p > 0; pa.seed = seed_ptr; pa.threshold = static_cast<uint32_t>(threshold);
    pa.out_scale = static_cast<float>(p > 0 ? 1.0 / (1.0 - p) : 1.0);
    pa.l = v.data_ptr<float>(); pa.stride_lt = v.stride(0); pa.stride_lr = v.stride(1);
    pa.g = optional_ptr(g); pa.g_dtype = optional_dtype(g); pa.l_scale = static_cast<float>(scale);
    pa.col_part = ws_ptr + lay.a; pa.stride_pc = 1; pa.stride_pr = K;
    if (need_dg) {
      pa.u = u.data_ptr<float>(); pa.stride_ut = u.stride(0); pa.stride_ur = u.stride(1);
      pa.uv_scale = static_cast<float>(scale); pa.uv_part = ws_ptr + lay.g;
    }
    pa.split_stride = lay.total;
    spu::skinny_pass(pa, plan_x, stream);
  }
  if (splits > 1) spu::sum_partials(ws_ptr, splits, lay.total, packed.data_ptr<float>(), stream);
  if (need_dg && !need_da)   // no x pass to ride on (A frozen): ATen
    packed.narrow(0, lay.g, r).copy_((u * v).sum(0) * scale);
  return {dx, packed};
}

// Meta (shape-only) versions for FakeTensor / torch.compile.
std::tuple<Tensor, Tensor> lowrank_linear_fwd_meta(const Tensor& x, const Tensor& weight, const OptTensor&,
                                                   const Tensor& a, const Tensor&, const OptTensor&, double, double,
                                                   const OptTensor&, int64_t) {
  return {at::empty({x.size(0), weight.size(0)}, x.options()),
          at::empty({x.size(0), a.size(0)}, x.options().dtype(at::kFloat))};
}

std::tuple<Tensor, Tensor> lowrank_linear_bwd_meta(
    const Tensor& dy, const OptTensor&, const OptTensor&, const Tensor& a, const Tensor& b, const OptTensor&,
    const Tensor&, double, double, const OptTensor&, int64_t, bool need_dx, bool need_dbias, bool need_da, bool need_db,
    bool need_dg) {
  const int64_t T = dy.size(0), N = b.size(0), r = a.size(0), K = a.size(1);
  const GradLayout lay(r, K, N, need_dbias, need_da, need_db, need_dg);
  return {need_dx ? at::empty({T, K}, dy.options()) : at::empty({0}, dy.options()),
          at::empty({lay.total}, dy.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spu_kernels, m) {
  m.def("lowrank_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, Tensor? g, float scale, "
        "float p, Tensor? seed, int threshold) -> (Tensor, Tensor)");
  m.def("lowrank_linear_bwd(Tensor dy, Tensor? x, Tensor? weight, Tensor a, Tensor b, Tensor? g, Tensor u, "
        "float scale, float p, Tensor? seed, int threshold, bool need_dx, bool need_dbias, bool need_da, bool need_db, "
        "bool need_dg) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spu_kernels, CUDA, m) {
  m.impl("lowrank_linear_fwd", &lowrank_linear_fwd_cuda);
  m.impl("lowrank_linear_bwd", &lowrank_linear_bwd_cuda);
}

TORCH_LIBRARY_IMPL(spu_kernels, Meta, m) {
  m.impl("lowrank_linear_fwd", &lowrank_linear_fwd_meta);
  m.impl("lowrank_linear_bwd", &lowrank_linear_bwd_meta);
}
