// CPU implementations of the grpo_kernels_C ops: argument checks, output allocation, the choice of the SIMD
// variant of the row kernels (cpu_kernels_impl.h) and threading over rows with at::parallel_for.
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
#include "op_checks.h"

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

// An out-of-range id on a row the kernel reads would be an out-of-bounds access: refuse it up front.
void check_ids(const Tensor& tokens, const Tensor& mask, int64_t V) {
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

RowProblem base_problem(const Tensor& logits, const Tensor& tokens, const Tensor& mask, double temperature) {
  RowProblem p;
  p.logits = logits.const_data_ptr();
  p.ls_s = logits.stride(0);
  p.ls_t = logits.stride(1);
  p.S = logits.size(0);
  p.T = logits.size(1);
  p.V = logits.size(2);
  p.tokens = tokens.const_data_ptr<int64_t>();
  p.mask = mask.const_data_ptr<bool>();
  p.inv_temp = 1.0 / temperature;
  return p;
}

void set_grad(RowProblem& p, const Tensor& grad) {
  p.grad = grad.data_ptr();
  p.gs_s = grad.stride(0);
  p.gs_t = grad.stride(1);
}

void run(RowFn fn, const RowProblem& p) {
  const int64_t rows = p.S * p.T;
  if (rows == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(p.V, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

struct Prepared {
  Tensor tokens, mask;
};

Prepared prepare(const Tensor& logits, const Tensor& tokens, const Tensor& mask, double temperature) {
  check_common(logits, tokens, mask, temperature, c10::DeviceType::CPU);
  Prepared r{tokens.contiguous(), mask.contiguous()};
  check_ids(r.tokens, r.mask, logits.size(2));
  return r;
}

// A new contiguous gradient buffer. Fresh multi-megabyte CPU allocations are untouched mmap pages: the first
// write faults every 4 KiB page in, which costs more than the kernel itself. Asking for transparent huge pages
// on the (2 MiB-aligned interior of the) fresh buffer cuts the faults 512-fold. Only a hint: no effect where THP
// is off, and nothing changes in the values.
Tensor new_grad_tensor(const Tensor& logits) {
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

Tensor new_row_tensor(const Tensor& logits) {
  return at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(acc_type(logits.scalar_type())));
}

std::tuple<Tensor, Tensor, Tensor> logprobs_fwd_cpu(const Tensor& logits, const Tensor& tokens, const Tensor& mask,
                                                     double temperature, bool with_entropy) {
  auto pr = prepare(logits, tokens, mask, temperature);
  Tensor logp = new_row_tensor(logits), lse = new_row_tensor(logits), ent = new_row_tensor(logits);
  RowProblem p = base_problem(logits, pr.tokens, pr.mask, temperature);
  p.with_entropy = with_entropy;
  p.logp = logp.data_ptr();
  p.lse = lse.data_ptr();
  p.ent = ent.data_ptr();
  run(kernels().fwd[dtype_index(logits.scalar_type())], p);
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
  RowProblem p = base_problem(logits, pr.tokens, pr.mask, temperature);
  p.grad_logp = gl.const_data_ptr();
  p.grad_ent = gh.defined() ? gh.const_data_ptr() : nullptr;
  p.lse_in = l.const_data_ptr();
  p.ent_in = h.const_data_ptr();
  set_grad(p, out);
  run(kernels().bwd[dtype_index(logits.scalar_type())], p);
}

Tensor logprobs_bwd_cpu(const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                        const Tensor& tokens, const Tensor& mask, const Tensor& lse, const Tensor& entropy,
                        double temperature) {
  check_common(logits, tokens, mask, temperature, c10::DeviceType::CPU);
  Tensor out = new_grad_tensor(logits);
  bwd_into(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, out);
  return out;
}

void logprobs_bwd_out_cpu(const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                          const Tensor& tokens, const Tensor& mask, const Tensor& lse, const Tensor& entropy,
                          double temperature, const Tensor& out) {
  check_common(logits, tokens, mask, temperature, c10::DeviceType::CPU);
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
  RowProblem p = base_problem(logits, pr.tokens, pr.mask, temperature);
  p.with_entropy = with_entropy;
  p.logp = logp.data_ptr();
  p.lse = lse.data_ptr();
  p.ent = ent.data_ptr();
  p.coef = c.const_data_ptr();
  set_grad(p, out);
  run(kernels().fwd_grad[dtype_index(logits.scalar_type())], p);
  return {logp, lse, ent};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> logprobs_fwd_grad_cpu(const Tensor& logits, const Tensor& tokens,
                                                                 const Tensor& mask, const Tensor& coef,
                                                                 double temperature, bool with_entropy) {
  check_common(logits, tokens, mask, temperature, c10::DeviceType::CPU);
  Tensor out = new_grad_tensor(logits);
  auto [logp, lse, ent] = fwd_grad_into(logits, tokens, mask, coef, temperature, with_entropy, out);
  return {logp, lse, ent, out};
}

std::tuple<Tensor, Tensor, Tensor> logprobs_fwd_grad_out_cpu(const Tensor& logits, const Tensor& tokens,
                                                              const Tensor& mask, const Tensor& coef,
                                                              double temperature, bool with_entropy,
                                                              const Tensor& out) {
  check_common(logits, tokens, mask, temperature, c10::DeviceType::CPU);
  check_out(out, logits);
  return fwd_grad_into(logits, tokens, mask, coef, temperature, with_entropy, out);
}

std::string cpu_isa() { return kernels().isa; }

}  // namespace
}  // namespace grpo

TORCH_LIBRARY_FRAGMENT(grpo_kernels_C, m) {
  m.def("cpu_isa() -> str", &grpo::cpu_isa);  // which SIMD variant of the CPU kernels runs here
}

TORCH_LIBRARY_IMPL(grpo_kernels_C, CPU, m) {
  m.impl("logprobs_fwd", &grpo::logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &grpo::logprobs_bwd_cpu);
  m.impl("logprobs_bwd_out", &grpo::logprobs_bwd_out_cpu);
  m.impl("logprobs_fwd_grad", &grpo::logprobs_fwd_grad_cpu);
  m.impl("logprobs_fwd_grad_out", &grpo::logprobs_fwd_grad_out_cpu);
}
