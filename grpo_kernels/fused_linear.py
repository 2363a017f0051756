"""Fused linear GRPO loss: from the last hidden states and the LM head, never building the full logits.

The tokens are processed in chunks of ``chunk_size`` rows. For each chunk: the logits of that chunk
(``hidden_c @ weight.T + bias``, a matmul in the input dtype with fp32 accumulation), the fused
log-prob/gradient kernel *in place in the chunk buffer* (``logprobs_fwd_grad``: the buffer turns into
``∂loss/∂logits``), then ``grad_hidden`` of the chunk (``grad_c @ weight``) and the accumulation of
``grad_weight`` (see *Accumulating grad_weight* below) and ``grad_bias`` (fp32). Rows that are masked (or whose
token is ``-100``) are skipped entirely: no matmul, no kernel.

Two schedules:

* **one phase** (3 GEMMs per chunk) when ``∂loss/∂ℓ`` (and ``∂loss/∂H``) do not depend on the log-probs and
  entropies -- the lesson's softmax loss and every other loss type on-policy, without KL, with or without a
  constant entropy bonus (:func:`grpo_kernels.reference.coefficients_are_constant`);
* **two phases** otherwise (off-policy ratios, KL, the entropy mask, off-policy masking, the engine correction):
  phase 1 computes every token's log-prob (and entropy) chunk by chunk (1 GEMM per chunk, nothing kept but
  ``[S, T]`` vectors), then ``c = ∂loss/∂ℓ`` (and ``c_H = ∂loss/∂H``) come from autograd on the eager
  :func:`reference.loss_from_logprobs` over the whole batch, and phase 2 is the one-phase loop with them (3 GEMMs).
  Memory stays flat in both.

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

The code follows the steps: :func:`plan_chunks` (which rows, how many at a time, which schedule) →
:func:`_chunk_pass` (one loop over the chunks: GEMM → kernel through the ops gateway → the chunk's gradients) →
:class:`_Accumulators` (``grad_hidden``, ``grad_weight``, ``grad_bias``) → the eager loss value on the
``[S, T]`` log-probs with the gradients attached (docs/design.md §7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import kernels as _kernels
from . import reference as _ref
from . import validation as _v
from .kernels import ops as _ops
from .loss import OptionsModule
from .options import LossOptions, with_option_keywords
from .packing import packed_inputs

Tensor = torch.Tensor

_CPU_CHUNK_BYTES = 64 << 20  # logits bytes per chunk on CPU (big enough for efficient GEMMs)
_GPU_CHUNK_BYTES = 512 << 20  # upper bound on GPU (with grad_weight, fits 2 GiB extra at V=151,936, H=4,096)
_FP32_ACCUMULATOR_MAX_BYTES = 1 << 30  # "auto" uses an fp32 grad_weight accumulator up to this size
_SLAB_BYTES = 16 << 20  # one slab of grad_c.T @ hidden_c under "fp32" accumulation (+ its fp32 copy on CPU)
GRAD_WEIGHT_ACCUMULATIONS = ("auto", "fp32", "weight")


def default_chunk_size(num_rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: the chunk's logits take about 64 MiB on CPU, and on GPU ``min(512 MiB, free/8)``;
    a multiple of 64 rows (at least 64), never more than ``num_rows``."""
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


@dataclass
class ChunkPlan:
    """What :func:`plan_chunks` decided: the kept rows (flat indices into ``S·T``), rows per chunk, the schedule."""

    rows: Tensor  # (n,) int64, the only rows ever computed
    chunk: int  # rows per chunk
    one_phase: bool  # c = ∂loss/∂ℓ known up front: one loop (3 GEMMs per chunk)
    need_grad: bool  # any of hidden / weight / bias requires grad (and grad mode is on)

    def chunks(self):
        for a in range(0, self.rows.numel(), self.chunk):
            yield a == 0, self.rows[a:a + self.chunk]


def plan_chunks(m: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_size: Optional[int],
                opts: LossOptions, data: dict) -> ChunkPlan:
    """Kept rows of the effective mask ``m (S, T)``, the chunk size (default :func:`default_chunk_size`) and whether
    one phase suffices (:func:`grpo_kernels.reference.coefficients_are_constant`)."""
    rows = (m.reshape(-1) != 0).nonzero().squeeze(-1)
    chunk = chunk_size or default_chunk_size(max(rows.numel(), 1), weight.shape[0], hidden.dtype, hidden.device)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    one_phase = need_grad and _ref.coefficients_are_constant(opts, old_logprobs=data["old_logprobs"],
                                                             ref_logprobs=data["ref_logprobs"],
                                                             sampling_logprobs=data["sampling_logprobs"])
    return ChunkPlan(rows, chunk, one_phase, need_grad)


class _Accumulators:
    """``grad_hidden (S·T, H)``, ``grad_weight (V, H)`` (in ``grad_w_dtype``) and ``grad_bias (V,)`` over the chunks;
    only those whose tensor requires grad."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], grad_w_dtype: torch.dtype,
                 any_rows: bool):
        S, T, H = hidden.shape
        V = weight.shape[0]
        acc = _ref.accumulation_dtype(hidden.dtype)
        self.shape = (S, T, H)
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype
        self.h = torch.zeros(S * T, H, dtype=hidden.dtype, device=hidden.device) if hidden.requires_grad else None
        # written by the first chunk's GEMM (no zero fill); zeros when no row is kept
        alloc = torch.empty if any_rows else torch.zeros
        self.w = alloc(V, H, dtype=grad_w_dtype, device=hidden.device) if weight.requires_grad else None
        self.b = (torch.zeros(V, dtype=acc, device=hidden.device)
                  if bias is not None and bias.requires_grad else None)

    def add(self, g: Tensor, hc: Tensor, w: Tensor, idx: Tensor, first: bool) -> None:
        """Add one chunk: ``g (k, V)`` = ∂loss/∂logits of rows ``idx``, ``hc (k, H)`` their hidden states."""
        if self.h is not None:
            self.h.index_copy_(0, idx, g @ w)
        if self.w is not None:
            _accumulate_grad_weight(self.w, g, hc, first=first)
        if self.b is not None:
            self.b += g.sum(0, dtype=self.b.dtype)

    def results(self):
        return (None if self.h is None else self.h.view(self.shape),
                None if self.w is None else self.w.to(self.weight_dtype),
                None if self.b is None else self.b.to(self.bias_dtype))


def _chunk_pass(plan: ChunkPlan, h2: Tensor, y2: Tensor, w: Tensor, b: Optional[Tensor], impl: str, tau: float,
                logp: Tensor, ent: Optional[Tensor], *, coef: Optional[Tensor] = None,
                ent_coef: Optional[Tensor] = None, grads: Optional[_Accumulators] = None) -> None:
    """One loop over the chunks. Per chunk: the logits ``hc @ w.T (+ b)`` (the bias in the GEMM's epilogue), then
    the kernel through the ops gateway -- forward only when ``coef`` is None, else the one-pass forward+gradient
    written into the chunk buffer itself (with the entropy term when ``ent_coef`` is given), whose gradient goes to
    ``grads``. Fills ``logp`` (and ``ent``) at the
    chunk's rows when given. The ids were validated by the caller (``check_ids=False``)."""
    keep = torch.ones(1, min(plan.chunk, max(plan.rows.numel(), 1)), dtype=torch.bool, device=h2.device)
    with torch.no_grad():
        for first, idx in plan.chunks():
            k = idx.numel()
            hc = h2.index_select(0, idx)
            z = (hc @ w.t() if b is None else torch.addmm(b, hc, w.t())).unsqueeze(0)  # (1, k, V)
            yk, mk = y2[idx].unsqueeze(0), keep[:, :k]
            if coef is None:
                lp, _, h = _ops.kernel_fwd(impl, z, yk, mk, tau, ent is not None, check_ids=False)
            else:
                ec = None if ent_coef is None else ent_coef[idx].unsqueeze(0).contiguous()
                lp, _, h, g = _ops.kernel_fwd_grad(impl, z, yk, mk, coef[idx].unsqueeze(0).contiguous(), tau,
                                                   ent is not None, out=z, check_ids=False, ent_coef=ec)
                grads.add(g[0], hc, w, idx, first)
            if logp is not None:
                logp[idx] = lp[0]
                if ent is not None:
                    ent[idx] = h[0]
            del z, hc


def fused_linear_grpo_loss(hidden: Tensor,  # (S, T, H)
                           weight: Tensor,  # (V, H)
                           tokens: Tensor,  # (S, T)
                           rewards: Optional[Tensor],  # (S,)
                           mask: Optional[Tensor] = None,  # (S, T)
                           *,
                           group_size: int,
                           bias: Optional[Tensor] = None,  # (V,)
                           old_logprobs: Optional[Tensor] = None,
                           ref_logprobs: Optional[Tensor] = None,
                           sampling_logprobs: Optional[Tensor] = None,
                           advantages: Optional[Tensor] = None,
                           num_items_in_batch=None,
                           loss_scale: float = 1.0,
                           return_metrics: bool = False,
                           backend: str = "auto",
                           chunk_size: Optional[int] = None,
                           grad_weight_accumulation: str = "auto",
                           cu_seqlens: Optional[Tensor] = None,  # (S + 1,) packed batches
                           vocab_parallel_group=None,
                           vocab_start_index: Optional[int] = None,
                           **options):
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
        old_logprobs, ref_logprobs, sampling_logprobs, advantages, num_items_in_batch, return_metrics: as in
            :func:`grpo_kernels.grpo_loss`.
        loss_scale: as in :func:`grpo_kernels.grpo_loss` (pass ``1/k`` under gradient accumulation: the
            gradients computed in the forward then need no rescaling in the backward).
        backend: kernel for the per-chunk log-prob/gradient: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``
            or ``"cpu"`` (the GEMMs are always torch's).
        chunk_size: rows of logits built at a time (default: :func:`default_chunk_size`, ~64 MiB of logits on
            CPU, ``min(512 MiB, free/8)`` on GPU).
        grad_weight_accumulation: ``"auto"`` (default), ``"fp32"`` or ``"weight"``: what half-precision
            ``grad_weight`` is accumulated in across chunks (module docstring; fp32/fp64 weights: no effect).
        cu_seqlens: a packed batch (see :func:`grpo_kernels.grpo_loss`): ``hidden`` ``(N, H)`` or ``(1, N, H)``,
            per-token tensors ``(N,)`` or ``(1, N)``; the chunks run over the ``N`` packed rows.
        vocab_parallel_group / vocab_start_index: a vocabulary-parallel LM head (see
            :func:`grpo_kernels.grpo_loss`): ``weight`` (and ``bias``) are this rank's rows, ``hidden`` is
            replicated; always two-phase (:mod:`grpo_kernels.vocab_parallel`).
        **options: the loss options of :class:`~grpo_kernels.options.LossOptions`:

        {loss_options}

    Returns:
        0-dim fp32 loss (fp64 for fp64 inputs), or ``(loss, metrics)`` with ``return_metrics=True``.

    Example::

        >>> hidden = model(ids, output_hidden_states=True).hidden_states[-1][:, :-1]
        >>> loss = fused_linear_grpo_loss(hidden, model.lm_head.weight, tokens, rewards, mask, group_size=8)
    """
    opts = LossOptions.from_kwargs("fused_linear_grpo_loss", options)
    data = dict(group_size=group_size, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                sampling_logprobs=sampling_logprobs, advantages=advantages, num_items_in_batch=num_items_in_batch,
                loss_scale=loss_scale)
    if vocab_parallel_group is not None:
        from . import vocab_parallel_linear as _vpl

        return _vpl.fused_linear_grpo_loss_from_options(
            hidden, weight, tokens, rewards, mask, opts, group=vocab_parallel_group, bias=bias,
            vocab_start_index=vocab_start_index, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
            grad_weight_accumulation=grad_weight_accumulation, backend=backend, return_metrics=return_metrics,
            **data)
    if vocab_start_index is not None:
        raise ValueError("vocab_start_index is only used with vocab_parallel_group= (a vocabulary-parallel LM head)")
    if cu_seqlens is not None:  # packed: the chunks run over the N rows, the eager loss on (S, T) vectors
        h3, tokens_r, mask_r, pk, tokens, mask, data = packed_inputs(hidden, tokens, mask, cu_seqlens, data,
                                                                     name="hidden")
        S, T = pk.S, pk.T
        to_loss, to_rows = pk.pad, pk.gather
    else:
        h3, tokens_r = hidden, tokens
        to_loss = to_rows = lambda x: x  # noqa: E731
    _check_linear_args(h3, weight, bias, chunk_size)
    if cu_seqlens is None:
        S, T, _ = hidden.shape
    H = h3.shape[-1]
    V = weight.shape[0]
    grad_w_dtype = grad_weight_accumulator_dtype(grad_weight_accumulation, weight.dtype, V, H)
    _v.check_loss_args(opts, num_sequences=S, seq_len=T, num_classes=V, device=hidden.device, dtype=hidden.dtype,
                       tokens=tokens, rewards=rewards, mask=mask, **data)
    impl = _kernels.resolve_backend(backend, hidden.device)

    acc = _ref.accumulation_dtype(hidden.dtype)
    m = _ref.effective_mask(tokens, mask, acc)  # (S, T): the loss's layout
    rows_shape = h3.shape[:2]  # (S, T), or (1, N) packed: the rows the chunks run over
    plan = plan_chunks(to_rows(m), h3, weight, bias, chunk_size, opts, data)
    n_rows = h3.shape[0] * h3.shape[1]
    h2 = h3.detach().reshape(n_rows, H)
    y2 = tokens_r.reshape(-1).to(torch.int64)
    w = weight.detach()
    b = None if bias is None else bias.detach()
    tau = float(opts.temperature)
    logp = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    with_entropy = return_metrics or opts.needs_entropy
    ent = torch.zeros(n_rows, dtype=acc, device=hidden.device) if with_entropy else None

    if not plan.one_phase:  # phase 1 (forward only): every kept token's log-prob
        _chunk_pass(plan, h2, y2, w, b, impl, tau, logp, ent)
    grads = None
    if plan.need_grad:
        # one phase: c (and c_H) do not depend on ℓ, H (taken at 0); two phases: at the log-probs of phase 1
        at = None if plan.one_phase else to_loss(logp.view(rows_shape))
        at_h = None if (plan.one_phase or ent is None) else to_loss(ent.view(rows_shape))
        ent_coef = None
        if opts.entropy_coef != 0:  # the entropy bonus: its gradient is written by the same kernel call
            coef, ent_coef = _ref.logprob_coefficients(m, rewards, opts, at=at, entropy=at_h, with_entropy=True,
                                                       **data)
            ent_coef = to_rows(ent_coef).reshape(-1).to(acc)
        else:
            coef = _ref.logprob_coefficients(m, rewards, opts, at=at, entropy=at_h, **data)
        acc_grads = _Accumulators(h3, weight, bias, grad_w_dtype, any_rows=plan.rows.numel() > 0)
        # the log-probs (and entropy) come from this loop only in the one-phase schedule
        _chunk_pass(plan, h2, y2, w, b, impl, tau, logp if plan.one_phase else None,
                    ent if plan.one_phase else None, coef=to_rows(coef).reshape(-1).to(acc), ent_coef=ent_coef,
                    grads=acc_grads)
        grads = acc_grads.results()
        if grads[0] is not None:
            grads = (grads[0].reshape(hidden.shape),) + tuple(grads[1:])

    out = _ref.loss_from_logprobs(to_loss(logp.view(rows_shape)), m, rewards, opts, return_metrics=return_metrics,
                                  entropy=None if ent is None else to_loss(ent.view(rows_shape)), **data)
    loss, metrics = out if return_metrics else (out, None)
    if grads is not None:
        loss = _FusedLinearAttach.apply(hidden, weight, bias, loss, *grads)
    return (loss, metrics) if return_metrics else loss


with_option_keywords(fused_linear_grpo_loss, before="return_metrics")


class FusedLinearGRPOLoss(OptionsModule):
    """Module form of :func:`fused_linear_grpo_loss` (keywords fixed at construction, overridable per call).

    Example::

        >>> crit = FusedLinearGRPOLoss(group_size=8, loss_type="dapo", chunk_size=1024)
        >>> loss = crit(hidden, lm_head.weight, tokens, rewards, mask, bias=lm_head.bias)
    """

    _CALL_DEFAULTS = dict(old_logprobs=None, ref_logprobs=None, sampling_logprobs=None, advantages=None,
                          num_items_in_batch=None, loss_scale=1.0, return_metrics=False, backend="auto", chunk_size=None,
                          grad_weight_accumulation="auto", cu_seqlens=None, vocab_parallel_group=None,
                          vocab_start_index=None)

    def forward(self, hidden: Tensor, weight: Tensor, tokens: Tensor, rewards: Optional[Tensor],
                mask: Optional[Tensor] = None, bias: Optional[Tensor] = None, **overrides):
        return fused_linear_grpo_loss(hidden, weight, tokens, rewards, mask, group_size=self.group_size, bias=bias,
                                      **self._merged(overrides))
