// CUDA implementations of the grpo_kernels_C ops (schemas in ops.cpp, kernels in cuda_kernels.cuh). Built as the
// separate extension grpo_kernels._C_cuda, loaded after grpo_kernels._C.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda_kernels.cuh"
#include "grpo_kernels.h"
#include "op_checks.h"

namespace grpo {
namespace {

using at::Tensor;

enum class Kind { Fwd, Bwd, FwdGrad };

void launch(Kind kind, at::ScalarType dt, const RowProblem& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (dt) {
#define GRPO_CASE(ST, T)                                                                            \
  case ST:                                                                                          \
    err = kind == Kind::Fwd   ? cuda::launch_fwd<T>(p, stream)                                      \
          : kind == Kind::Bwd ? cuda::launch_bwd<T>(p, stream)                                      \
                              : cuda::launch_fwd_grad<T>(p, stream);                                \
    break;
    GRPO_CASE(at::kFloat, float)
    GRPO_CASE(at::kDouble, double)
    GRPO_CASE(at::kBFloat16, __nv_bfloat16)
    GRPO_CASE(at::kHalf, __half)
#undef GRPO_CASE
    default:
      TORCH_CHECK_TYPE(false, "unsupported logits dtype ", dt);
  }
  C10_CUDA_CHECK(err);
}

// Token ids in range on unmasked rows (one small reduction and a sync; the kernels never index with a bad id).
void check_ids(const Tensor& tokens, const Tensor& mask, int64_t V) {
  const Tensor bad = mask.logical_and(tokens.lt(0).logical_or(tokens.ge(V)));
  if (bad.any().item<bool>()) {
    const int64_t first = tokens.masked_select(bad).slice(0, 0, 1).cpu().item<int64_t>();
    TORCH_CHECK_VALUE(false, "tokens must hold ids in [0, ", V, ") on unmasked positions (mask True); found ",
                      first);
  }
}

struct Prepared {
  Tensor tokens, mask;
};

Prepared prepare(const Tensor& logits, const Tensor& tokens, const Tensor& mask, double temperature) {
  check_common(logits, tokens, mask, temperature, c10::DeviceType::CUDA);
  Prepared r{tokens.contiguous(), mask.contiguous()};
  check_ids(r.tokens, r.mask, logits.size(2));
  return r;
}

RowProblem base_problem(const Tensor& logits, const Prepared& pr, double temperature) {
  RowProblem p;
  p.logits = logits.const_data_ptr();
  p.ls_s = logits.stride(0);
  p.ls_t = logits.stride(1);
  p.S = logits.size(0);
  p.T = logits.size(1);
  p.V = logits.size(2);
  p.tokens = pr.tokens.const_data_ptr<int64_t>();
  p.mask = pr.mask.const_data_ptr<bool>();
  p.inv_temp = 1.0 / temperature;
  return p;
}

Tensor new_row_tensor(const Tensor& logits) {
  return at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(acc_type(logits.scalar_type())));
}

std::tuple<Tensor, Tensor, Tensor> logprobs_fwd_cuda(const Tensor& logits, const Tensor& tokens, const Tensor& mask,
                                                      double temperature, bool with_entropy) {
  const c10::cuda::CUDAGuard guard(logits.device());
  auto pr = prepare(logits, tokens, mask, temperature);
  Tensor logp = new_row_tensor(logits), lse = new_row_tensor(logits), ent = new_row_tensor(logits);
  RowProblem p = base_problem(logits, pr, temperature);
  p.with_entropy = with_entropy;
  p.logp = logp.data_ptr();
  p.lse = lse.data_ptr();
  p.ent = ent.data_ptr();
  launch(Kind::Fwd, logits.scalar_type(), p);
  return {logp, lse, ent};
}

void bwd_into(const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, const Tensor& logits,
              const Tensor& tokens, const Tensor& mask, const Tensor& lse, const Tensor& entropy, double temperature,
              const Tensor& out) {
  auto pr = prepare(logits, tokens, mask, temperature);
  check_row_tensor("grad_logp", grad_logp, logits);
  check_row_tensor("lse", lse, logits);
  check_row_tensor("entropy", entropy, logits);
  Tensor gl = grad_logp.contiguous(), l = lse.contiguous(), h = entropy.contiguous(), gh;
  if (grad_entropy.has_value() && grad_entropy->defined()) {
    check_row_tensor("grad_entropy", *grad_entropy, logits);
    gh = grad_entropy->contiguous();
  }
  RowProblem p = base_problem(logits, pr, temperature);
  p.grad_logp = gl.const_data_ptr();
  p.grad_ent = gh.defined() ? gh.const_data_ptr() : nullptr;
  p.lse_in = l.const_data_ptr();
  p.ent_in = h.const_data_ptr();
  p.grad = out.data_ptr();
  p.gs_s = out.stride(0);
  p.gs_t = out.stride(1);
  launch(Kind::Bwd, logits.scalar_type(), p);
}

Tensor logprobs_bwd_cuda(const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                         const Tensor& tokens, const Tensor& mask, const Tensor& lse, const Tensor& entropy,
                         double temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  check_common(logits, tokens, mask, temperature, c10::DeviceType::CUDA);
  Tensor out = at::empty(logits.sizes(), logits.options());
  bwd_into(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, out);
  return out;
}

void logprobs_bwd_out_cuda(const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                           const Tensor& tokens, const Tensor& mask, const Tensor& lse, const Tensor& entropy,
                           double temperature, const Tensor& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  check_common(logits, tokens, mask, temperature, c10::DeviceType::CUDA);
  check_out(out, logits);
  bwd_into(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, out);
}

std::tuple<Tensor, Tensor, Tensor> fwd_grad_into(const Tensor& logits, const Tensor& tokens, const Tensor& mask,
                                                  const Tensor& coef, double temperature, bool with_entropy,
                                                  const Tensor& out) {
  auto pr = prepare(logits, tokens, mask, temperature);
  check_row_tensor("coef", coef, logits);
  Tensor c = coef.contiguous();
  Tensor logp = new_row_tensor(logits), lse = new_row_tensor(logits), ent = new_row_tensor(logits);
  RowProblem p = base_problem(logits, pr, temperature);
  p.with_entropy = with_entropy;
  p.logp = logp.data_ptr();
  p.lse = lse.data_ptr();
  p.ent = ent.data_ptr();
  p.coef = c.const_data_ptr();
  p.grad = out.data_ptr();
  p.gs_s = out.stride(0);
  p.gs_t = out.stride(1);
  launch(Kind::FwdGrad, logits.scalar_type(), p);
  return {logp, lse, ent};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> logprobs_fwd_grad_cuda(const Tensor& logits, const Tensor& tokens,
                                                                  const Tensor& mask, const Tensor& coef,
                                                                  double temperature, bool with_entropy) {
  const c10::cuda::CUDAGuard guard(logits.device());
  check_common(logits, tokens, mask, temperature, c10::DeviceType::CUDA);
  Tensor out = at::empty(logits.sizes(), logits.options());
  auto [logp, lse, ent] = fwd_grad_into(logits, tokens, mask, coef, temperature, with_entropy, out);
  return {logp, lse, ent, out};
}

std::tuple<Tensor, Tensor, Tensor> logprobs_fwd_grad_out_cuda(const Tensor& logits, const Tensor& tokens,
                                                               const Tensor& mask, const Tensor& coef,
                                                               double temperature, bool with_entropy,
                                                               const Tensor& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  check_common(logits, tokens, mask, temperature, c10::DeviceType::CUDA);
  check_out(out, logits);
  return fwd_grad_into(logits, tokens, mask, coef, temperature, with_entropy, out);
}

}  // namespace
}  // namespace grpo

TORCH_LIBRARY_IMPL(grpo_kernels_C, CUDA, m) {
  m.impl("logprobs_fwd", &grpo::logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &grpo::logprobs_bwd_cuda);
  m.impl("logprobs_bwd_out", &grpo::logprobs_bwd_out_cuda);
  m.impl("logprobs_fwd_grad", &grpo::logprobs_fwd_grad_cuda);
  m.impl("logprobs_fwd_grad_out", &grpo::logprobs_fwd_grad_out_cuda);
}
