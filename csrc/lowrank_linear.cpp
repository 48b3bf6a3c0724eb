// The cuda backend of the fused low-rank op, registered as torch ops (TORCH_LIBRARY_FRAGMENT):
//
//   spu_kernels::lowrank_linear_fwd(x, W, b?, A, B, g?, s, p, seed?, threshold) -> (y, u)
//   spu_kernels::lowrank_linear_bwd(dy, x?, W?, A, B, g?, u, s, p, seed?, threshold, needs...)
// (seed: a one-element int64 tensor on the device, read by the kernels; needed when p > 0)
//       -> (dx, grad_bias, grad_A, grad_B, grad_g)
//
// y = x Wᵀ + b + s·((drop(x) Aᵀ) ⊙ g) Bᵀ with x (T, K) and W (N, K). The dense GEMMs are cuBLAS
// calls through ATen; the rank-r term is accumulated into their output with beta = 1 (addmm_), so
// there is never a T×N branch output. The passes over x and dy are the kernels of
// lowrank_kernels.cu. Forward returns u = drop(x) Aᵀ (T, r), the one activation backward needs
// besides x. Grads come back in fp32 (the autograd.Function casts them to the parameters' dtypes);
// a grad that is not needed comes back as an empty tensor. Meta kernels give shapes for
// torch.compile / FakeTensor.
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

// Per-rank scale s·g as fp32 (r,).
Tensor rank_scale(const OptTensor& g, int64_t r, double scale, const Tensor& like) {
  if (g.has_value() && g->defined()) return g->to(at::kFloat) * scale;
  return at::full({r}, scale, like.options().dtype(at::kFloat));
}

// ROW pass: out[t][r] = out_scale · Σ_c m(t, c)·rm(c, r), fp32 (rows, r); rm is (cols, r) as strides.
Tensor row_pass(const Tensor& m, const Tensor& rm, int64_t rm_stride_c, int64_t rm_stride_r, int64_t rank,
                bool dropout, const int64_t* seed, int64_t threshold, double out_scale) {
  const auto plan = spu::skinny_plan(m.size(0), m.size(1), static_cast<int>(rank), false, m.get_device());
  Tensor part = at::empty({plan.col_blocks, m.size(0), rank}, m.options().dtype(at::kFloat));
  spu::SkinnyPass a{};
  a.dtype = kernel_dtype(m);
  a.m = m.data_ptr(); a.rows = m.size(0); a.cols = m.size(1); a.stride_mt = m.stride(0); a.stride_mc = m.stride(1);
  a.rank = static_cast<int>(rank);
  a.dropout = dropout; a.seed = seed; a.threshold = static_cast<uint32_t>(threshold);
  a.out_scale = static_cast<float>(out_scale);
  a.rm = rm.data_ptr(); a.stride_rmc = rm_stride_c; a.stride_rmr = rm_stride_r; a.row_part = part.data_ptr<float>();
  spu::skinny_pass(a, plan, c10::cuda::getCurrentCUDAStream());
  return plan.col_blocks == 1 ? part.select(0, 0) : part.sum(0);
}

std::tuple<Tensor, Tensor> lowrank_linear_fwd_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                   const Tensor& a, const Tensor& b, const OptTensor& g, double scale,
                                                   double p, const OptTensor& seed, int64_t threshold) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && a.dim() == 2 && b.dim() == 2,
              "spu_kernels lowrank_linear_fwd (cuda): x, weight, A, B must be 2-D");
  const int64_t* seed_ptr = seed_pointer(seed, p, x);
  for (auto [t, name] : {std::pair{&weight, "weight"}, {&a, "A"}, {&b, "B"}}) check_cuda(*t, name, x);
  if (bias.has_value() && bias->defined()) check_cuda(*bias, "bias", x);
  if (g.has_value() && g->defined()) check_cuda(*g, "g", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t r = a.size(0);
  // u = drop(x) Aᵀ: the ROW pass over x with rm(c, r) = A[r][c]
  Tensor u = row_pass(x, a, a.stride(1), a.stride(0), r, p > 0, seed_ptr, threshold, p > 0 ? 1.0 / (1.0 - p) : 1.0)
                 .to(x.scalar_type());
  Tensor ug = (u.to(at::kFloat) * rank_scale(g, r, scale, x)).to(x.scalar_type());
  Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(ug, b.t());   // beta = 1: the rank-r term lands in y, no T×N temporary
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lowrank_linear_bwd_cuda(
    const Tensor& dy, const OptTensor& x, const OptTensor& weight, const Tensor& a, const Tensor& b,
    const OptTensor& g, const Tensor& u, double scale, double p, const OptTensor& seed, int64_t threshold, bool need_dx,
    bool need_dbias, bool need_da, bool need_db, bool need_dg) {
  TORCH_CHECK(dy.dim() == 2 && u.dim() == 2, "spu_kernels lowrank_linear_bwd (cuda): dy and u must be 2-D");
  for (auto [t, name] : {std::pair{&a, "A"}, {&b, "B"}, {&u, "u"}}) check_cuda(*t, name, dy);
  TORCH_CHECK(!need_dx || (weight.has_value() && weight->defined()), "lowrank_linear_bwd: need_dx without weight");
  TORCH_CHECK(!need_da || (x.has_value() && x->defined()), "lowrank_linear_bwd: need_da without x");
  if (need_dx) check_cuda(*weight, "weight", dy);
  if (g.has_value() && g->defined()) check_cuda(*g, "g", dy);
  const int64_t* seed_ptr = seed_pointer(seed, p, dy);
  const c10::cuda::CUDAGuard guard(dy.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t T = dy.size(0), N = dy.size(1), r = a.size(0), K = a.size(1);
  const auto f32 = dy.options().dtype(at::kFloat);
  auto none = [&] { return at::empty({0}, f32); };   // a grad not asked for (a fresh tensor each)
  if (T == 0) {   // no tokens: the passes write nothing, so the grads are zeros here
    auto z = [&](bool need, at::IntArrayRef shape, const at::TensorOptions& o) { return need ? at::zeros(shape, o) : none(); };
    return {z(need_dx, {0, K}, dy.options()), z(need_dbias, {N}, f32), z(need_da, {r, K}, f32), z(need_db, {N, r}, f32),
            z(need_dg, {r}, f32)};
  }
  const Tensor gs = rank_scale(g, r, scale, dy);

  // One pass over dy: v = dy B (ROW), grad_B = dyᵀ (s u ⊙ g) (COL), grad_bias = Σ_t dy (COLSUM).
  const auto plan = spu::skinny_plan(T, N, static_cast<int>(r), need_db || need_dbias, dy.get_device());
  Tensor v_part = at::empty({plan.col_blocks, T, r}, f32);
  Tensor ug = need_db ? (u.to(at::kFloat) * gs).contiguous() : none();
  Tensor db_part = need_db ? at::empty({plan.row_splits, N, r}, f32) : none();
  Tensor dbias_part = need_dbias ? at::empty({plan.row_splits, N}, f32) : none();
  spu::SkinnyPass pass{};
  pass.dtype = kernel_dtype(dy);
  pass.m = dy.data_ptr(); pass.rows = T; pass.cols = N; pass.stride_mt = dy.stride(0); pass.stride_mc = dy.stride(1);
  pass.rank = static_cast<int>(r);
  pass.out_scale = 1.f;
  pass.rm = b.data_ptr(); pass.stride_rmc = b.stride(0); pass.stride_rmr = b.stride(1);
  pass.row_part = v_part.data_ptr<float>();
  if (need_db) { pass.l = ug.data_ptr<float>(); pass.stride_lt = ug.stride(0); pass.stride_lr = ug.stride(1);
                 pass.col_part = db_part.data_ptr<float>(); }
  if (need_dbias) pass.sum_part = dbias_part.data_ptr<float>();
  spu::skinny_pass(pass, plan, stream);
  const Tensor v = plan.col_blocks == 1 ? v_part.select(0, 0) : v_part.sum(0);   // (T, r) fp32
  const Tensor vg = (v * gs).contiguous();                                       // s v ⊙ g, fp32

  Tensor dx = none(), dbias = none(), da = none(), db = none(), dg = none();
  if (need_db) db = plan.row_splits == 1 ? db_part.select(0, 0) : db_part.sum(0);
  if (need_dbias) dbias = plan.row_splits == 1 ? dbias_part.select(0, 0) : dbias_part.sum(0);
  if (need_dg) dg = (u.to(at::kFloat) * v).sum(0) * scale;
  if (need_dx) {
    dx = at::mm(dy, *weight);   // (T, K)
    if (p == 0) {
      dx.addmm_(vg.to(dy.scalar_type()), a);   // beta = 1
    } else {
      spu::dropout_lowrank_add(kernel_dtype(dx), dx.data_ptr(), T, K, dx.stride(0), dx.stride(1), vg.data_ptr<float>(),
                               vg.stride(0), vg.stride(1), static_cast<int>(r), a.data_ptr(), a.stride(0), a.stride(1),
                               seed_ptr, static_cast<uint32_t>(threshold),
                               static_cast<float>(1.0 / (1.0 - p)), stream);
    }
  }
  if (need_da) {
    // grad_A = (s v ⊙ g)ᵀ drop(x): the COL pass over x with l = vg gives grad_Aᵀ (K, r)
    const Tensor& xx = *x;
    check_cuda(xx, "x", dy);
    const auto plan_a = spu::skinny_plan(T, K, static_cast<int>(r), true, dy.get_device());
    Tensor part = at::empty({plan_a.row_splits, K, r}, f32);
    spu::SkinnyPass pa{};
    pa.dtype = kernel_dtype(xx);
    pa.m = xx.data_ptr(); pa.rows = T; pa.cols = K; pa.stride_mt = xx.stride(0); pa.stride_mc = xx.stride(1);
    pa.rank = static_cast<int>(r);
    pa.dropout = p > 0; pa.seed = seed_ptr; pa.threshold = static_cast<uint32_t>(threshold);
    pa.out_scale = static_cast<float>(p > 0 ? 1.0 / (1.0 - p) : 1.0);
    pa.l = vg.data_ptr<float>(); pa.stride_lt = vg.stride(0); pa.stride_lr = vg.stride(1);
    pa.col_part = part.data_ptr<float>();
    spu::skinny_pass(pa, plan_a, stream);
    da = (plan_a.row_splits == 1 ? part.select(0, 0) : part.sum(0)).t().contiguous();
  }
  return {dx, dbias, da, db, dg};
}

// Meta (shape-only) versions for FakeTensor / torch.compile.
std::tuple<Tensor, Tensor> lowrank_linear_fwd_meta(const Tensor& x, const Tensor& weight, const OptTensor&,
                                                   const Tensor& a, const Tensor&, const OptTensor&, double, double,
                                                   const OptTensor&, int64_t) {
  return {at::empty({x.size(0), weight.size(0)}, x.options()), at::empty({x.size(0), a.size(0)}, x.options())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lowrank_linear_bwd_meta(
    const Tensor& dy, const OptTensor&, const OptTensor&, const Tensor& a, const Tensor& b, const OptTensor&,
    const Tensor&, double, double, const OptTensor&, int64_t, bool need_dx, bool need_dbias, bool need_da, bool need_db,
    bool need_dg) {
  const auto f32 = dy.options().dtype(at::kFloat);
  auto sized = [&](bool need, at::IntArrayRef shape, const at::TensorOptions& o) {
    return need ? at::empty(shape, o) : at::empty({0}, f32);
  };
  const int64_t T = dy.size(0), N = b.size(0), r = a.size(0), K = a.size(1);
  return {sized(need_dx, {T, K}, dy.options()), sized(need_dbias, {N}, f32), sized(need_da, {r, K}, f32),
          sized(need_db, {N, r}, f32), sized(need_dg, {r}, f32)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spu_kernels, m) {
  m.def("lowrank_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, Tensor? g, float scale, "
        "float p, Tensor? seed, int threshold) -> (Tensor, Tensor)");
  m.def("lowrank_linear_bwd(Tensor dy, Tensor? x, Tensor? weight, Tensor a, Tensor b, Tensor? g, Tensor u, "
        "float scale, float p, Tensor? seed, int threshold, bool need_dx, bool need_dbias, bool need_da, bool need_db, "
        "bool need_dg) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(spu_kernels, CUDA, m) {
  m.impl("lowrank_linear_fwd", &lowrank_linear_fwd_cuda);
  m.impl("lowrank_linear_bwd", &lowrank_linear_bwd_cuda);
}

TORCH_LIBRARY_IMPL(spu_kernels, Meta, m) {
  m.impl("lowrank_linear_fwd", &lowrank_linear_fwd_meta);
  m.impl("lowrank_linear_bwd", &lowrank_linear_bwd_meta);
}
