// The device-independent half of the grpo_kernels_C ops, shared by cpu_ops.cpp and cuda_ops.cu: argument checks,
// output allocation and the filling of the RowProblem that a row kernel runs on. The device-specific half is a
// policy class `Dev` with
//
//   static constexpr c10::DeviceType type;                       // CPU or CUDA
//   struct Guard { explicit Guard(const at::Tensor& logits); };  // device guard for the op's duration
//   static void check_ids(const at::Tensor& tokens, const at::Tensor& mask, int64_t V);  // ids in range
//                                                               (skipped when the op's check_ids is false)
//   static at::Tensor new_grad(const at::Tensor& logits);        // a fresh gradient buffer
//   static void run(Kind kind, at::ScalarType dtype, const RowProblem& p);  // launch the row kernel
//
// and `RowOps<Dev>::fwd/bwd/bwd_out/fwd_grad/fwd_grad_out` are the op implementations registered for that
// device. Every check runs before any kernel does (errors are ValueError/TypeError naming the argument).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "grpo_kernels.h"
#include "op_checks.h"

namespace grpo {

enum class Kind { Fwd, Bwd, FwdGrad };

template <class Dev>
struct RowOps {
  using Tensor = at::Tensor;
  using Stats = std::tuple<Tensor, Tensor, Tensor>;  // logp, lse, entropy

  // Checks the common arguments and returns the problem over contiguous copies of tokens and mask (kept alive in
  // `keep`, since the problem holds raw pointers into them).
  static RowProblem problem(const Tensor& logits, const Tensor& tokens, const Tensor& mask, double temperature,
                            bool check_ids, std::tuple<Tensor, Tensor>& keep) {
    check_common(logits, tokens, mask, temperature, Dev::type);
    keep = {tokens.contiguous(), mask.contiguous()};
    const Tensor& tok = std::get<0>(keep);
    const Tensor& m = std::get<1>(keep);
    if (check_ids) Dev::check_ids(tok, m, logits.size(2));
    RowProblem p;
    p.logits = logits.const_data_ptr();
    p.ls_s = logits.stride(0);
    p.ls_t = logits.stride(1);
    p.S = logits.size(0);
    p.T = logits.size(1);
    p.V = logits.size(2);
    p.tokens = tok.const_data_ptr<int64_t>();
    p.mask = m.const_data_ptr<bool>();
    p.inv_temp = 1.0 / temperature;
    return p;
  }

  static Tensor new_row_tensor(const Tensor& logits) {
    return at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(acc_type(logits.scalar_type())));
  }

  // New per-row outputs, wired into the problem.
  static Stats add_stats(RowProblem& p, const Tensor& logits, bool with_entropy) {
    Tensor logp = new_row_tensor(logits), lse = new_row_tensor(logits), ent = new_row_tensor(logits);
    p.with_entropy = with_entropy;
    p.logp = logp.data_ptr();
    p.lse = lse.data_ptr();
    p.ent = ent.data_ptr();
    return {logp, lse, ent};
  }

  static void set_grad(RowProblem& p, const Tensor& grad) {
    p.grad = grad.data_ptr();
    p.gs_s = grad.stride(0);
    p.gs_t = grad.stride(1);
  }

  static Stats fwd(const Tensor& logits, const Tensor& tokens, const Tensor& mask, double temperature,
                   bool with_entropy, bool check_ids) {
    const typename Dev::Guard guard(logits);
    std::tuple<Tensor, Tensor> keep;
    RowProblem p = problem(logits, tokens, mask, temperature, check_ids, keep);
    Stats out = add_stats(p, logits, with_entropy);
    Dev::run(Kind::Fwd, logits.scalar_type(), p);
    return out;
  }

  static void bwd_into(const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                       const Tensor& tokens, const Tensor& mask, const Tensor& lse, const Tensor& entropy,
                       double temperature, const Tensor& out, bool check_ids) {
    std::tuple<Tensor, Tensor> keep;
    RowProblem p = problem(logits, tokens, mask, temperature, check_ids, keep);
    check_row_tensor("grad_logp", grad_logp, logits);
    check_row_tensor("lse", lse, logits);
    check_row_tensor("entropy", entropy, logits);
    Tensor gl = grad_logp.contiguous(), l = lse.contiguous(), h = entropy.contiguous(), gh;
    if (grad_entropy.has_value() && grad_entropy->defined()) {
      check_row_tensor("grad_entropy", *grad_entropy, logits);
      gh = grad_entropy->contiguous();
    }
    p.grad_logp = gl.const_data_ptr();
    p.grad_ent = gh.defined() ? gh.const_data_ptr() : nullptr;
    p.lse_in = l.const_data_ptr();
    p.ent_in = h.const_data_ptr();
    set_grad(p, out);
    Dev::run(Kind::Bwd, logits.scalar_type(), p);
  }

  static Tensor bwd(const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                    const Tensor& tokens, const Tensor& mask, const Tensor& lse, const Tensor& entropy,
                    double temperature, bool check_ids) {
    const typename Dev::Guard guard(logits);
    check_common(logits, tokens, mask, temperature, Dev::type);
    Tensor out = Dev::new_grad(logits);
    bwd_into(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, out, check_ids);
    return out;
  }

  static void bwd_out(const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                      const Tensor& tokens, const Tensor& mask, const Tensor& lse, const Tensor& entropy,
                      double temperature, const Tensor& out, bool check_ids) {
    const typename Dev::Guard guard(logits);
    check_common(logits, tokens, mask, temperature, Dev::type);
    check_out(out, logits);
    bwd_into(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, out, check_ids);
  }

  // ent_coef (optional): adds the entropy term -ent_coef p_v (z_v/tau - (lse - H)) / tau to the gradient; the
  // entropy is then computed (and returned) whatever with_entropy says.
  static Stats fwd_grad_into(const Tensor& logits, const Tensor& tokens, const Tensor& mask, const Tensor& coef,
                             double temperature, bool with_entropy, const Tensor& out, bool check_ids,
                             const std::optional<Tensor>& ent_coef) {
    std::tuple<Tensor, Tensor> keep;
    RowProblem p = problem(logits, tokens, mask, temperature, check_ids, keep);
    check_row_tensor("coef", coef, logits);
    const bool has_ec = ent_coef.has_value() && ent_coef->defined();
    if (has_ec) check_ent_coef(*ent_coef, logits);
    Tensor c = coef.contiguous();
    Stats stats = add_stats(p, logits, with_entropy || has_ec);
    p.coef = c.const_data_ptr();
    p.ent_coef = has_ec ? ent_coef->const_data_ptr() : nullptr;
    set_grad(p, out);
    Dev::run(Kind::FwdGrad, logits.scalar_type(), p);
    return stats;
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor> fwd_grad(const Tensor& logits, const Tensor& tokens,
                                                             const Tensor& mask, const Tensor& coef,
                                                             double temperature, bool with_entropy,
                                                             bool check_ids, const std::optional<Tensor>& ent_coef) {
    const typename Dev::Guard guard(logits);
    check_common(logits, tokens, mask, temperature, Dev::type);
    Tensor out = Dev::new_grad(logits);
    auto [logp, lse, ent] =
        fwd_grad_into(logits, tokens, mask, coef, temperature, with_entropy, out, check_ids, ent_coef);
    return {logp, lse, ent, out};
  }

  static Stats fwd_grad_out(const Tensor& logits, const Tensor& tokens, const Tensor& mask, const Tensor& coef,
                            double temperature, bool with_entropy, const Tensor& out, bool check_ids,
                            const std::optional<Tensor>& ent_coef) {
    const typename Dev::Guard guard(logits);
    check_common(logits, tokens, mask, temperature, Dev::type);
    check_out(out, logits);
    return fwd_grad_into(logits, tokens, mask, coef, temperature, with_entropy, out, check_ids, ent_coef);
  }
};

}  // namespace grpo
