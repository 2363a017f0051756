// Compile check of the CUDA kernels without torch (the CPU torch wheel ships no CUDA build configuration):
// instantiates every kernel for every element type. Built only by .ci/check_cuda.sh (nvcc -c -o /dev/null),
// never part of the extension.
#include "cuda_kernels.cuh"

namespace grpo {
namespace cuda {

#define GRPO_INSTANTIATE(T)                                                   \
  template cudaError_t launch_fwd<T>(const RowProblem&, cudaStream_t);        \
  template cudaError_t launch_bwd<T>(const RowProblem&, cudaStream_t);        \
  template cudaError_t launch_fwd_grad<T>(const RowProblem&, cudaStream_t);

GRPO_INSTANTIATE(float)
GRPO_INSTANTIATE(double)
GRPO_INSTANTIATE(__nv_bfloat16)
GRPO_INSTANTIATE(__half)

#undef GRPO_INSTANTIATE

}  // namespace cuda
}  // namespace grpo
