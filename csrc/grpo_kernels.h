// Shared, torch-free description of one kernel launch over the (S*T) rows of a logits tensor.
// Used by the CPU kernels (cpu_kernels_impl.h, compiled once per SIMD level) and by cpu_ops.cpp.
#pragma once

#include <cstdint>

// SIMD variants of the CPU kernels: x86-64 with GCC (which switches the target per translation unit with
// `#pragma GCC target`); every other compiler/architecture uses the portable DEFAULT variant only.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define GRPO_HAVE_AVX2 1
#define GRPO_HAVE_AVX512 1
#endif

namespace grpo {

// Element type of the logits (and of the gradient); the accumulation type is double for F64, else float.
enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

// Every pointer is to the first element; strides are in elements. Per-row (S, T) tensors are contiguous and
// in the accumulation type. Unused fields are null.
struct RowProblem {
  const void* logits = nullptr;
  int64_t ls_s = 0, ls_t = 0;  // logits strides of dims 0 and 1 (the vocabulary stride is 1)
  int64_t S = 0, T = 0, V = 0;
  const int64_t* tokens = nullptr;  // (S, T)
  const bool* mask = nullptr;       // (S, T); false = row never read, outputs 0, gradient row 0
  double inv_temp = 1.0;
  bool with_entropy = false;
  // forward outputs
  void* logp = nullptr;
  void* lse = nullptr;
  void* ent = nullptr;
  // backward inputs
  const void* grad_logp = nullptr;
  const void* grad_ent = nullptr;  // may be null
  const void* lse_in = nullptr;
  const void* ent_in = nullptr;
  // fwd_grad inputs: coef (S, T); ent_coef (S, T) or null (then no entropy term in the gradient)
  const void* coef = nullptr;
  const void* ent_coef = nullptr;
  // gradient output (logits' dtype), vocabulary stride 1
  void* grad = nullptr;
  int64_t gs_s = 0, gs_t = 0;
};

// Processes rows [begin, end) of the flattened (S*T) row range.
using RowFn = void (*)(const RowProblem&, int64_t begin, int64_t end);

struct CpuKernelTable {
  const char* isa;
  RowFn fwd[4];       // indexed by DType
  RowFn bwd[4];
  RowFn fwd_grad[4];
};

// One table per SIMD level (defined in cpu_kernels_<level>.cpp). Only those compiled in exist.
const CpuKernelTable& cpu_kernels_DEFAULT();
#if defined(GRPO_HAVE_AVX2)
const CpuKernelTable& cpu_kernels_AVX2();
#endif
#if defined(GRPO_HAVE_AVX512)
const CpuKernelTable& cpu_kernels_AVX512();
#endif

}  // namespace grpo
