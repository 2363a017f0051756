// Operator schemas of the grpo_kernels_C library (implemented for CPU in cpu_ops.cpp and for CUDA in cuda_ops.cu;
// fake/meta implementations are registered from Python in grpo_kernels/kernels/native.py).
//
// Shapes: logits (S, T, V) with vocabulary stride 1 (other strides arbitrary); tokens (S, T) int64; mask (S, T)
// bool; per-row tensors (logp, lse, entropy, grad_logp, grad_entropy, coef) (S, T) in fp32 (fp64 for fp64
// logits). Gradients have the logits' dtype. The *_out variants write the gradient into `out` (the logits'
// shape and dtype, vocabulary stride 1; it may be the logits tensor itself: each row is read before it is
// overwritten) and declare that mutation in their schema. `check_ids` (default true) checks that every token on a
// kept row is in [0, V) before any kernel runs (on CUDA a host sync); callers that have just validated the
// same tokens pass false. `ent_coef` (fwd_grad only, optional, (S, T) contiguous in the accumulation dtype) adds the
// entropy term of the two-pass backward with g_H = ent_coef to the one-pass gradient (and the entropy is then
// computed whatever with_entropy says); it comes last, so calls without it keep their positions.
#include <torch/library.h>

TORCH_LIBRARY(grpo_kernels_C, m) {
  m.def("logprobs_fwd(Tensor logits, Tensor tokens, Tensor mask, float temperature, bool with_entropy,"
        " bool check_ids=True) -> (Tensor logp, Tensor lse, Tensor entropy)");
  m.def("logprobs_bwd(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor tokens, Tensor mask,"
        " Tensor lse, Tensor entropy, float temperature, bool check_ids=True) -> Tensor");
  m.def("logprobs_bwd_out(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor tokens, Tensor mask,"
        " Tensor lse, Tensor entropy, float temperature, Tensor(a!) out, bool check_ids=True) -> ()");
  m.def("logprobs_fwd_grad(Tensor logits, Tensor tokens, Tensor mask, Tensor coef, float temperature,"
        " bool with_entropy, bool check_ids=True, Tensor? ent_coef=None)"
        " -> (Tensor logp, Tensor lse, Tensor entropy, Tensor grad)");
  m.def("logprobs_fwd_grad_out(Tensor logits, Tensor tokens, Tensor mask, Tensor coef, float temperature,"
        " bool with_entropy, Tensor(a!) out, bool check_ids=True, Tensor? ent_coef=None)"
        " -> (Tensor logp, Tensor lse, Tensor entropy)");
}
