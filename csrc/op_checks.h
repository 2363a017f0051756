// Argument checks shared by the CPU and CUDA implementations of the grpo_kernels_C ops. They raise
// ValueError / TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) naming the argument, before any kernel runs.
#pragma once
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>

namespace grpo {

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// logits (S, T, V) float, vocabulary stride 1, on `dev`; tokens (S, T) int64; mask (S, T) bool; temperature > 0.
inline void check_common(const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& mask,
                         double temperature, c10::DeviceType dev) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "logits must have shape (S, T, V), got ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                   "logits must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(logits.device().type() == dev, "logits must be a ", c10::DeviceTypeName(dev),
                    " tensor for this kernel, got device ", logits.device());
  TORCH_CHECK_VALUE(logits.size(2) >= 1, "logits must have a non-empty vocabulary dimension");
  TORCH_CHECK_VALUE(logits.stride(2) == 1 || logits.size(2) == 1,
                    "logits must have a unit vocabulary stride (stride(-1) == 1), got strides ", logits.strides());
  TORCH_CHECK_VALUE(tokens.dim() == 2 && tokens.size(0) == logits.size(0) && tokens.size(1) == logits.size(1),
                    "tokens must have shape (S, T) = (", logits.size(0), ", ", logits.size(1), "), got ",
                    tokens.sizes());
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kLong, "tokens must be int64, got ", tokens.scalar_type());
  TORCH_CHECK_VALUE(tokens.device() == logits.device(), "tokens must be on the logits' device ",
                    logits.device(), ", got ", tokens.device());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.sizes() == tokens.sizes(), "mask must have shape (S, T) = (",
                    logits.size(0), ", ", logits.size(1), "), got ", mask.sizes());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.device() == logits.device(), "mask must be on the logits' device ", logits.device(),
                    ", got ", mask.device());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a finite number > 0, got ",
                    temperature);
}

// A per-row (S, T) tensor in the accumulation dtype, on the logits' device.
inline void check_row_tensor(const char* name, const at::Tensor& x, const at::Tensor& logits) {
  const auto acc = acc_type(logits.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == logits.size(0) && x.size(1) == logits.size(1), name,
                    " must have shape (S, T) = (", logits.size(0), ", ", logits.size(1), "), got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == acc, name, " must be ", acc, " for ", logits.scalar_type(),
                   " logits, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == logits.device(), name, " must be on the logits' device ", logits.device(),
                    ", got ", x.device());
}

// `ent_coef` of fwd_grad: a contiguous (S, T) tensor in the accumulation dtype on the logits' device. Every
// mismatch is a ValueError (as kernels.check_ent_coef raises for the Python modules), the dtype included.
inline void check_ent_coef(const at::Tensor& x, const at::Tensor& logits) {
  const auto acc = acc_type(logits.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == logits.size(0) && x.size(1) == logits.size(1),
                    "ent_coef must have shape (S, T) = (", logits.size(0), ", ", logits.size(1), "), got ", x.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == acc, "ent_coef must be ", acc, " for ", logits.scalar_type(),
                    " logits, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == logits.device(), "ent_coef must be on the logits' device ", logits.device(),
                    ", got ", x.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), "ent_coef must be contiguous, got strides ", x.strides());
}

// `out` for the gradient: the logits' shape, dtype and device, vocabulary stride 1.
inline void check_out(const at::Tensor& out, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(out.sizes() == logits.sizes(), "out must have the logits' shape ", logits.sizes(), ", got ",
                    out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == logits.scalar_type(), "out must have the logits' dtype ",
                   logits.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == logits.device(), "out must be on the logits' device ", logits.device(),
                    ", got ", out.device());
  TORCH_CHECK_VALUE(out.stride(2) == 1 || out.size(2) == 1, "out must have a unit vocabulary stride, got strides ",
                    out.strides());
  // Rows of out must not overlap each other (a broadcast/expanded out would race): with the row dimensions of
  // size > 1 ordered by stride, each stride must reach past everything the smaller ones span (a row spans V).
  {
    int64_t extent = out.size(2);
    int64_t st[2] = {out.stride(0), out.stride(1)}, sz[2] = {out.size(0), out.size(1)};
    if (st[0] > st[1]) {
      std::swap(st[0], st[1]);
      std::swap(sz[0], sz[1]);
    }
    bool overlap = false;
    for (int i = 0; i < 2 && extent > 0; ++i) {
      if (sz[i] <= 1) continue;
      if (st[i] < extent) overlap = true;
      extent = st[i] * sz[i];
    }
    TORCH_CHECK_VALUE(!overlap, "out rows must not overlap, got strides ", out.strides());
  }
  // out either is the logits (same storage offset and strides: row r of out is row r of logits, read before
  // it is written) or must not share memory with them.
  if (out.data_ptr() != logits.data_ptr() || out.strides() != logits.strides()) {
    TORCH_CHECK_VALUE(!out.is_alias_of(logits) || logits.numel() == 0,
                      "out may be the logits tensor itself or a separate tensor, not another view of the logits");
  }
}

}  // namespace grpo
