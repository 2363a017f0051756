// CUDA implementations of the grpo_kernels_C ops (schemas in ops.cpp, kernels in cuda_kernels.cuh): the CUDA policy
// of RowOps (op_glue.h, which does the argument checks and output allocation). Built as the separate extension
// grpo_kernels._C_cuda, loaded after grpo_kernels._C.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda_kernels.cuh"
#include "grpo_kernels.h"
#include "op_glue.h"

namespace grpo {
namespace {

using at::Tensor;

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

// The CUDA policy of RowOps (op_glue.h).
struct CudaDev {
  static constexpr c10::DeviceType type = c10::DeviceType::CUDA;

  struct Guard {
    explicit Guard(const Tensor& logits) : g(logits.device()) {}
    c10::cuda::CUDAGuard g;
  };

  // Token ids in range on unmasked rows (one small reduction and a sync; the kernels never index with a bad id).
  static void check_ids(const Tensor& tokens, const Tensor& mask, int64_t V) {
    const Tensor bad = mask.logical_and(tokens.lt(0).logical_or(tokens.ge(V)));
    if (bad.any().item<bool>()) {
      const int64_t first = tokens.masked_select(bad).slice(0, 0, 1).cpu().item<int64_t>();
      TORCH_CHECK_VALUE(false, "tokens must hold ids in [0, ", V, ") on unmasked positions (mask True); found ",
                        first);
    }
  }

  static Tensor new_grad(const Tensor& logits) { return at::empty(logits.sizes(), logits.options()); }

  static void run(Kind kind, at::ScalarType dtype, const RowProblem& p) { launch(kind, dtype, p); }
};

using CudaOps = RowOps<CudaDev>;

}  // namespace
}  // namespace grpo

TORCH_LIBRARY_IMPL(grpo_kernels_C, CUDA, m) {
  m.impl("logprobs_fwd", &grpo::CudaOps::fwd);
  m.impl("logprobs_bwd", &grpo::CudaOps::bwd);
  m.impl("logprobs_bwd_out", &grpo::CudaOps::bwd_out);
  m.impl("logprobs_fwd_grad", &grpo::CudaOps::fwd_grad);
  m.impl("logprobs_fwd_grad_out", &grpo::CudaOps::fwd_grad_out);
}
