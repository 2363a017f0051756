// CPU implementations of the grpo_kernels_C ops: the CPU policy of RowOps (op_glue.h, which does the argument
// checks and output allocation): the choice of the SIMD variant of the row kernels (cpu_kernels_impl.h),
// threading over rows with at::parallel_for, the token-id check and the gradient buffer.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "grpo_kernels.h"
#include "op_glue.h"

namespace grpo {
namespace {

using at::Tensor;

// The SIMD variant for the running CPU (checked at run time, never at build time). ATEN_CPU_CAPABILITY
// (default / avx2 / avx512), ATen's own override, also caps the choice here.
const CpuKernelTable& kernels() {
  static const CpuKernelTable* table = []() -> const CpuKernelTable* {
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    std::string cap = env ? env : "";
    for (auto& ch : cap) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    (void)cap;
#if defined(GRPO_HAVE_AVX512)
    if ((cap.empty() || cap == "avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
      return &cpu_kernels_AVX512();
#endif
#if defined(GRPO_HAVE_AVX2)
    if ((cap.empty() || cap == "avx2" || cap == "avx512") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
      return &cpu_kernels_AVX2();
#endif
    return &cpu_kernels_DEFAULT();
  }();
  return *table;
}

int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return static_cast<int>(DType::F32);
    case at::kDouble: return static_cast<int>(DType::F64);
    case at::kBFloat16: return static_cast<int>(DType::BF16);
    case at::kHalf: return static_cast<int>(DType::F16);
    default: TORCH_CHECK_TYPE(false, "unsupported logits dtype ", t);
  }
}

// The CPU policy of RowOps (op_glue.h).
struct CpuDev {
  static constexpr c10::DeviceType type = c10::DeviceType::CPU;

  struct Guard {
    explicit Guard(const Tensor&) {}
  };

  // An out-of-range id on a row the kernel reads would be an out-of-bounds access: refuse it up front.
  static void check_ids(const Tensor& tokens, const Tensor& mask, int64_t V) {
    const int64_t* tok = tokens.const_data_ptr<int64_t>();
    const bool* m = mask.const_data_ptr<bool>();
    const int64_t n = tokens.numel();
    for (int64_t i = 0; i < n; ++i) {
      if (m[i] && (tok[i] < 0 || tok[i] >= V)) {
        TORCH_CHECK_VALUE(false, "tokens must hold ids in [0, ", V, ") on unmasked positions (mask True); found ",
                          tok[i], " at (", i / tokens.size(1), ", ", i % tokens.size(1), ")");
      }
    }
  }

  // A new contiguous gradient buffer. Fresh multi-megabyte CPU allocations are untouched mmap pages: the first
  // write faults every 4 KiB page in, which costs more than the kernel itself. Asking for transparent huge pages
  // on the (2 MiB-aligned interior of the) fresh buffer cuts the faults 512-fold. Only a hint: no effect where
  // THP is off, and nothing changes in the values.
  static Tensor new_grad(const Tensor& logits) {
    Tensor out = at::empty(logits.sizes(), logits.options());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const size_t bytes = out.numel() * out.element_size();
    if (bytes >= 4 * kHuge) {
      const uintptr_t p0 = reinterpret_cast<uintptr_t>(out.data_ptr());
      const uintptr_t lo = (p0 + kHuge - 1) & ~(kHuge - 1), hi = (p0 + bytes) & ~(kHuge - 1);
      if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
    }
#endif
    return out;
  }

  // The SIMD variant's row kernel over all rows, threaded with at::parallel_for (~32k logits per task).
  static void run(Kind kind, at::ScalarType dtype, const RowProblem& p) {
    const CpuKernelTable& k = kernels();
    const int i = dtype_index(dtype);
    const RowFn fn = kind == Kind::Fwd ? k.fwd[i] : kind == Kind::Bwd ? k.bwd[i] : k.fwd_grad[i];
    const int64_t rows = p.S * p.T;
    if (rows == 0) return;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(p.V, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
  }
};

using CpuOps = RowOps<CpuDev>;

std::string cpu_isa() { return kernels().isa; }

}  // namespace
}  // namespace grpo

TORCH_LIBRARY_FRAGMENT(grpo_kernels_C, m) {
  m.def("cpu_isa() -> str", &grpo::cpu_isa);  // which SIMD variant of the CPU kernels runs here
}

TORCH_LIBRARY_IMPL(grpo_kernels_C, CPU, m) {
  m.impl("logprobs_fwd", &grpo::CpuOps::fwd);
  m.impl("logprobs_bwd", &grpo::CpuOps::bwd);
  m.impl("logprobs_bwd_out", &grpo::CpuOps::bwd_out);
  m.impl("logprobs_fwd_grad", &grpo::CpuOps::fwd_grad);
  m.impl("logprobs_fwd_grad_out", &grpo::CpuOps::fwd_grad_out);
}
