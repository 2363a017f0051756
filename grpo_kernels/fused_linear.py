"""Fused linear GRPO loss: from the last hidden states and the LM head, never building the full logits.

The tokens are processed in chunks of ``chunk_size`` rows. For each chunk: the logits of that chunk
(``hidden_c @ weight.T + bias``, a matmul in the input dtype with fp32 accumulation), the fused
log-prob/gradient kernel *in place in the chunk buffer* (``logprobs_fwd_grad``: the buffer turns into
``∂loss/∂logits``), then ``grad_hidden`` of the chunk (``grad_c @ weight``) and the accumulation of
``grad_weight`` (see *Accumulating grad_weight* below) and ``grad_bias`` (fp32). Rows that are masked (or whose
token is ``-100``) are skipped entirely: no matmul, no kernel.

Two schedules:

* **one phase** (3 GEMMs per chunk) when ``∂loss/∂ℓ`` does not depend on the log-probs -- the lesson's softmax
  loss and the clipped losses on-policy, without KL (:func:`grpo_kernels.loss.coefficients_are_constant`);
* **two phases** otherwise (off-policy clipping, KL, GSPO with ``old_logprobs``): phase 1 computes every
  token's log-prob chunk by chunk (1 GEMM per chunk, nothing kept but ``[S, T]`` vectors), then
  ``c = ∂loss/∂ℓ`` comes from autograd on the eager :func:`reference.loss_from_logprobs` over the whole batch,
  and phase 2 is the one-phase loop with that ``c`` (3 GEMMs). Memory stays flat in both.

Accumulating grad_weight (``grad_weight_accumulation``), for half-precision weights:

* ``"fp32"``: a ``V × H`` fp32 accumulator, each chunk's ``grad_c.T @ hidden_c`` added to it (in slabs of the
  vocabulary, so the temporaries stay under ~50 MiB), cast to the weight's dtype once at the end. Most accurate; costs
  ``4·V·H`` bytes beyond the gradient itself (2.5 GB at V=151,936, H=4,096) and an fp32 read-modify-write of it
  per chunk.
* ``"weight"``: ``grad_weight`` is accumulated in the weight's dtype by the GEMM itself
  (``addmm_``, fp32 accumulation inside each GEMM, one rounding per chunk) -- no extra ``V × H`` memory. With
  ``k`` chunks the gradient is rounded ``k`` times instead of once.
* ``"auto"`` (default): ``"fp32"`` when that accumulator takes at most 1 GiB (``V·H ≤ 2**28``), else ``"weight"``.

fp32/fp64 weights always accumulate in their own dtype (the modes coincide).

Peak extra memory: one chunk of logits (``chunk × V`` in the input dtype), the ``grad_weight`` accumulator
(``V × H``; fp32 only under ``"fp32"``), ``grad_hidden`` (the size of ``hidden``) and ``[S, T]`` vectors --
independent of ``S·T`` beyond the gradients autograd has to return anyway.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _ops
from . import backends as _backends
from . import loss as _loss
from . import reference as _ref
from . import validation as _v

Tensor = torch.Tensor

_CPU_CHUNK_BYTES = 64 << 20  # logits bytes per chunk on CPU (big enough for efficient GEMMs)
_GPU_CHUNK_BYTES = 512 << 20  # upper bound on GPU (with grad_weight, fits 2 GiB extra at V=151,936, H=4,096)
_FP32_ACCUMULATOR_MAX_BYTES = 1 << 30  # "auto" uses an fp32 grad_weight accumulator up to this size
_SLAB_BYTES = 16 << 20  # one slab of grad_c.T @ hidden_c under "fp32" accumulation (+ its fp32 copy on CPU)
GRAD_WEIGHT_ACCUMULATIONS = ("auto", "fp32", "weight")


def default_chunk_size(num_rows: int, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """Rows per chunk: the chunk's logits take about 64 MiB on CPU, and on GPU ``min(512 MiB, free/8)``;
    a multiple of 64 rows (at least 64), never more than ``num_rows``. ``hidden_size`` is unused today
    (the ``V × H`` gradient accumulator does not depend on the chunk) but kept in the signature."""
    elt = torch.empty((), dtype=dtype).element_size()
    budget = _CPU_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = max(64 << 20, min(_GPU_CHUNK_BYTES, free // 8))
    rows = max(64, (budget // max(1, vocab_size * elt)) // 64 * 64)
    return max(1, min(rows, num_rows))


def grad_weight_accumulator_dtype(accumulation: str, weight_dtype: torch.dtype, vocab_size: int,
                                  hidden_size: int) -> torch.dtype:
    """The dtype ``grad_weight`` is accumulated in for ``grad_weight_accumulation=accumulation`` (see the
    module docstring): the weight's own dtype for fp32/fp64 weights; for half precision, fp32 under ``"fp32"``,
    the weight's dtype under ``"weight"``, and under ``"auto"`` fp32 when ``4·V·H`` bytes ≤ 1 GiB."""
    if accumulation not in GRAD_WEIGHT_ACCUMULATIONS:
        raise ValueError(f"grad_weight_accumulation must be one of {GRAD_WEIGHT_ACCUMULATIONS}, got {accumulation!r}")
    if weight_dtype in (torch.float32, torch.float64):
        return weight_dtype
    if accumulation == "auto":
        accumulation = "fp32" if 4 * vocab_size * hidden_size <= _FP32_ACCUMULATOR_MAX_BYTES else "weight"
    return torch.float32 if accumulation == "fp32" else weight_dtype


def _accumulate_grad_weight(grad_w: Tensor, g: Tensor, hc: Tensor, first: bool) -> None:
    """``grad_w += g.T @ hc`` (``grad_w = g.T @ hc`` for the ``first`` chunk: the buffer is neither zero-filled
    nor read, which saves two passes over the ``V × H`` gradient). Same dtype: one GEMM (fp32 accumulation
    inside it). fp32 accumulator with half-precision ``g``/``hc``: slab by slab of the vocabulary, so the
    half-precision product (16 MiB) and the fp32 copy CPU's mixed-dtype ``+=`` makes of it stay small instead
    of ``V × H``."""
    if g.dtype == grad_w.dtype:
        if first:
            torch.mm(g.t(), hc, out=grad_w)
        else:
            grad_w.addmm_(g.t(), hc)
        return
    V, H = grad_w.shape
    slab = max(1, _SLAB_BYTES // max(1, H * g.element_size()))
    for v0 in range(0, V, slab):
        part = g[:, v0:v0 + slab].t() @ hc
        if first:
            grad_w[v0:v0 + slab].copy_(part)
        else:
            grad_w[v0:v0 + slab] += part


def _check_linear_args(hidden, weight, bias, chunk_size) -> None:
    _v.check_tensor("hidden", hidden, ndim=3, floating=True)
    _v.check_tensor("weight", weight, ndim=2, floating=True, device=hidden.device)
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must have shape (V, H) with H = hidden.shape[-1] = {hidden.shape[2]}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None:
        _v.check_tensor("bias", bias, ndim=1, floating=True, device=hidden.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (one value per vocabulary row of weight), "
                             f"got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    if chunk_size is not None:
        _v.check_int("chunk_size", chunk_size, minimum=1)


class _FusedLinearAttach(torch.autograd.Function):
    """Returns ``value``; its backward hands ``grad_output ·`` the gradients computed in the forward to
    hidden, weight and bias (saved tensors, scaled in place), and ``grad_output`` to ``value``'s own graph
    (the rewards)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, value, grad_h, grad_w, grad_b):
        ctx.present = tuple(g is not None for g in (grad_h, grad_w, grad_b))
        ctx.save_for_backward(*[g for g in (grad_h, grad_w, grad_b) if g is not None])
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(_ops.scale_saved_gradients(ctx, ctx.saved_tensors, grad_out))
        gh, gw, gb = (next(saved) if p else None for p in ctx.present)
        return gh, gw, gb, grad_out, None, None, None


def fused_linear_grpo_loss(hidden: Tensor,  # (S, T, H)
                           weight: Tensor,  # (V, H)
                           tokens: Tensor,  # (S, T)
                           rewards: Optional[Tensor],  # (S,)
                           mask: Optional[Tensor] = None,  # (S, T)
                           *,
                           group_size: int,
                           bias: Optional[Tensor] = None,  # (V,)
                           chunk_size: Optional[int] = None,
                           loss_type: str = "softmax",
                           beta: float = 0.1,
                           temperature: float = 1.0,
                           old_logprobs: Optional[Tensor] = None,
                           ref_logprobs: Optional[Tensor] = None,
                           kl_coef: float = 0.0,
                           epsilon: float = 0.2,
                           epsilon_high: Optional[float] = None,
                           delta: Optional[float] = None,
                           scale_rewards: str = "group",
                           advantages: Optional[Tensor] = None,
                           max_completion_length: Optional[int] = None,
                           num_items_in_batch=None,
                           importance_sampling_level: str = "token",
                           loss_scale: float = 1.0,
                           return_metrics: bool = False,
                           backend: str = "auto",
                           grad_weight_accumulation: str = "auto"):
    """GRPO loss of ``logits = hidden @ weight.T + bias`` without materializing the ``[S, T, V]`` logits.

    Same losses, keywords, metrics and validation as :func:`grpo_kernels.grpo_loss`; gradients flow to
    ``hidden``, ``weight`` and ``bias`` (and to ``rewards``/``advantages`` when they require it).

    Args:
        hidden: ``(S, T, H)`` last hidden states; ``hidden[s, t]`` predicts ``tokens[s, t]`` (already shifted).
        weight: ``(V, H)`` LM-head weight (same dtype and device as ``hidden``).
        tokens: ``(S, T)`` integer targets, ``-100`` = ignored.
        rewards: ``(S,)`` (None when ``advantages`` is given).
        mask: ``(S, T)`` optional completion mask.
        group_size: responses per prompt, G.
        bias: optional ``(V,)`` LM-head bias.
        chunk_size: rows of logits built at a time (default: :func:`default_chunk_size`, ~64 MiB of logits on
            CPU, ``min(512 MiB, free/8)`` on GPU).
        backend: kernel for the per-chunk log-prob/gradient: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``
            or ``"cpu"`` (the GEMMs are always torch's).
        loss_scale: as in :func:`grpo_kernels.grpo_loss` (pass ``1/k`` under gradient accumulation: the
            gradients computed in the forward then need no rescaling in the backward).
        grad_weight_accumulation: ``"auto"`` (default), ``"fp32"`` or ``"weight"``: what half-precision
            ``grad_weight`` is accumulated in across chunks (module docstring; fp32/fp64 weights: no effect).

    Returns:
        0-dim fp32 loss (fp64 for fp64 inputs), or ``(loss, metrics)`` with ``return_metrics=True``.

    Example::

        >>> hidden = model(ids, output_hidden_states=True).hidden_states[-1][:, :-1]
        >>> loss = fused_linear_grpo_loss(hidden, model.lm_head.weight, tokens, rewards, mask, group_size=8)
    """
    _check_linear_args(hidden, weight, bias, chunk_size)
    S, T, H = hidden.shape
    V = weight.shape[0]
    grad_w_dtype = grad_weight_accumulator_dtype(grad_weight_accumulation, weight.dtype, V, H)
    kw = dict(group_size=group_size, loss_type=loss_type, beta=beta, old_logprobs=old_logprobs,
              ref_logprobs=ref_logprobs, kl_coef=kl_coef, epsilon=epsilon, epsilon_high=epsilon_high, delta=delta,
              scale_rewards=scale_rewards, advantages=advantages, max_completion_length=max_completion_length,
              num_items_in_batch=num_items_in_batch, importance_sampling_level=importance_sampling_level,
              loss_scale=loss_scale)
    _v.check_loss_args(num_sequences=S, seq_len=T, num_classes=V, device=hidden.device, tokens=tokens,
                       rewards=rewards, mask=mask, temperature=temperature, backend=backend, **kw)
    impl = _backends.resolve_backend(backend, hidden.device)
    mod = _backends.kernel_module(impl)
    if not getattr(mod, "FWD_GRAD", False):  # every shipped kernel module has it; keep a safe fallback
        mod = _backends.kernel_module("torch")

    acc = _ref.accumulation_dtype(hidden.dtype)
    m = _ref.effective_mask(tokens, mask, acc)  # (S, T)
    rows = (m.reshape(-1) != 0).nonzero().squeeze(-1)  # the only rows that are ever computed
    n = rows.numel()
    chunk = chunk_size or default_chunk_size(max(n, 1), V, H, hidden.dtype, hidden.device)
    h2 = hidden.detach().reshape(S * T, H)
    y2 = tokens.reshape(-1).to(torch.int64)
    w = weight.detach()
    b = None if bias is None else bias.detach()
    tau = float(temperature)

    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    one_phase = need_grad and _loss.coefficients_are_constant(**kw)

    logp = torch.zeros(S * T, dtype=acc, device=hidden.device)
    ent = torch.zeros(S * T, dtype=acc, device=hidden.device) if return_metrics else None

    def chunk_logits(idx):
        hc = h2.index_select(0, idx)
        # the bias is added in the GEMM's epilogue (addmm), not by another pass over the chunk's logits
        z = hc @ w.t() if b is None else torch.addmm(b, hc, w.t())
        return hc, z

    ones = None

    def keep_of(k):
        nonlocal ones
        if ones is None or ones.shape[1] < k:
            ones = torch.ones(1, max(k, chunk), dtype=torch.bool, device=hidden.device)
        return ones[:, :k]

    # Phase 1 (forward only): every kept token's log-prob, when the coefficients need them or no grad is needed.
    if not one_phase:
        with torch.no_grad(), _ops.validated_ids_context():  # ids validated above: kernels skip their check
            for a in range(0, n, chunk):
                idx = rows[a:a + chunk]
                _, z = chunk_logits(idx)
                lp, _, h = mod.logprobs_fwd(z.unsqueeze(0), y2[idx].unsqueeze(0), keep_of(idx.numel()), tau,
                                            return_metrics)
                logp[idx] = lp[0]
                if ent is not None:
                    ent[idx] = h[0]
                del z

    grads = None
    if need_grad:
        # one phase: c does not depend on ℓ (taken at ℓ = 0); two phases: c at the log-probs of phase 1
        coef = _loss.logprob_coefficients(m, rewards, at=None if one_phase else logp.view(S, T), **kw)
        coef2 = coef.reshape(-1).to(acc)
        want_h = hidden.requires_grad
        want_w = weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(h2) if want_h else None
        # written by the first chunk's GEMM (no zero fill); zeros when no row is kept
        alloc = torch.empty if n > 0 else torch.zeros
        grad_w = alloc(V, H, dtype=grad_w_dtype, device=hidden.device) if want_w else None
        grad_b = torch.zeros(V, dtype=acc, device=hidden.device) if want_b else None
        with torch.no_grad(), _ops.validated_ids_context():  # ids validated above: kernels skip their check
            for a in range(0, n, chunk):
                idx = rows[a:a + chunk]
                k = idx.numel()
                hc, z = chunk_logits(idx)
                lp, _, h, g = mod.logprobs_fwd_grad(z.unsqueeze(0), y2[idx].unsqueeze(0), keep_of(k),
                                                    coef2[idx].unsqueeze(0).contiguous(), tau,
                                                    return_metrics and one_phase, out=z.unsqueeze(0))
                g = g[0]  # (k, V): the chunk buffer now holds ∂loss/∂logits
                if one_phase:
                    logp[idx] = lp[0]
                    if ent is not None:
                        ent[idx] = h[0]
                if grad_h is not None:
                    grad_h.index_copy_(0, idx, g @ w)
                if grad_w is not None:
                    _accumulate_grad_weight(grad_w, g, hc, first=a == 0)
                if grad_b is not None:
                    grad_b += g.sum(0, dtype=grad_b.dtype)
                del z, g, hc
        grads = (None if grad_h is None else grad_h.view(S, T, H),
                 None if grad_w is None else grad_w.to(weight.dtype),
                 None if grad_b is None else grad_b.to(bias.dtype))

    out = _ref.loss_from_logprobs(logp.view(S, T), m, rewards, return_metrics=return_metrics,
                                  entropy=None if ent is None else ent.view(S, T), **kw)
    loss, metrics = out if return_metrics else (out, None)
    if grads is not None:
        loss = _FusedLinearAttach.apply(hidden, weight, bias, loss, *grads)
    return (loss, metrics) if return_metrics else loss


class FusedLinearGRPOLoss(nn.Module):
    """Module form of :func:`fused_linear_grpo_loss` (keywords fixed at construction).

    Example::

        >>> crit = FusedLinearGRPOLoss(group_size=8, loss_type="dapo", chunk_size=1024)
        >>> loss = crit(hidden, lm_head.weight, tokens, rewards, mask, bias=lm_head.bias)
    """

    _DEFAULTS = dict(_loss._LOSS_DEFAULTS, chunk_size=None, grad_weight_accumulation="auto")
    _DEFAULTS.pop("inplace_backward")

    def __init__(self, group_size: int, **kwargs):
        super().__init__()
        unknown = set(kwargs) - set(self._DEFAULTS)
        if unknown:
            raise TypeError(f"FusedLinearGRPOLoss got unexpected keyword(s): {', '.join(sorted(unknown))}")
        _v.check_int("group_size", group_size, minimum=1)
        self.group_size = group_size
        self.options = {**self._DEFAULTS, **kwargs}

    def forward(self, hidden: Tensor, weight: Tensor, tokens: Tensor, rewards: Optional[Tensor],
                mask: Optional[Tensor] = None, bias: Optional[Tensor] = None, **overrides):
        unknown = set(overrides) - set(self._DEFAULTS)
        if unknown:
            raise TypeError(f"FusedLinearGRPOLoss.forward got unexpected keyword(s): {', '.join(sorted(unknown))}")
        return fused_linear_grpo_loss(hidden, weight, tokens, rewards, mask, group_size=self.group_size, bias=bias,
                                      **{**self.options, **overrides})

    def extra_repr(self) -> str:
        changed = {k: v for k, v in self.options.items()
                   if self._DEFAULTS[k] is not v and not isinstance(v, Tensor)}
        return ", ".join([f"group_size={self.group_size}"] + [f"{k}={v!r}" for k, v in changed.items()])
