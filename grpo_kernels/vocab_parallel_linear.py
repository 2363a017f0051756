"""The fused-linear loss from vocabulary-parallel LM-head weight shards: :func:`vocab_parallel_fused_linear_grpo_loss`
(and its options hook :func:`fused_linear_grpo_loss_from_options`, which ``fused_linear_grpo_loss(...,
vocab_parallel_group=)`` calls). The layout, the combine of the shard statistics and the shard gradient are those
of :mod:`grpo_kernels.vocab_parallel` (its module docstring), which also re-exports both functions.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from . import kernels as _kernels
from . import reference as _ref
from . import validation as _v
from .kernels import ops as _ops
from .options import LossOptions, with_option_keywords
from .vocab_parallel import (_PACKED_NAMES, _comm_device, _gather_local, _local_targets, _rows_of, _setup,
                             combine_shard_stats, shard_gradient)

Tensor = torch.Tensor

__all__ = ["vocab_parallel_fused_linear_grpo_loss", "fused_linear_grpo_loss_from_options"]


class _ShardAccumulators:
    """``grad_hidden`` (partial: this shard's ``g @ W_r``; accumulation dtype, all-reduced at the end),
    ``grad_weight_shard`` and ``grad_bias_shard`` (local), like :class:`grpo_kernels.fused_linear._Accumulators`."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], grad_w_dtype: torch.dtype,
                 any_rows: bool):
        from . import fused_linear as _fl

        self._fl = _fl
        S, T, H = hidden.shape
        V = weight.shape[0]
        acc = _ref.accumulation_dtype(hidden.dtype)
        self.shape = (S, T, H)
        self.hidden_dtype = hidden.dtype
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype
        self.h = torch.zeros(S * T, H, dtype=acc, device=hidden.device) if hidden.requires_grad else None
        alloc = torch.empty if any_rows else torch.zeros
        self.w = alloc(V, H, dtype=grad_w_dtype, device=hidden.device) if weight.requires_grad else None
        self.b = torch.zeros(V, dtype=acc, device=hidden.device) if bias is not None and bias.requires_grad else None

    def add(self, g: Tensor, hc: Tensor, w: Tensor, idx: Tensor, first: bool) -> None:
        if self.h is not None:
            self.h.index_copy_(0, idx, (g @ w).to(self.h.dtype))
        if self.w is not None:
            self._fl._accumulate_grad_weight(self.w, g, hc, first=first)
        if self.b is not None:
            self.b += g.sum(0, dtype=self.b.dtype)

    def results(self, group):
        gh = None
        if self.h is not None:
            comm = _comm_device(group, self.h.device)
            buf = self.h.to(comm)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)  # each rank holds one slice of the head
            gh = buf.to(self.h.device).to(self.hidden_dtype).view(self.shape)
        return (gh, None if self.w is None else self.w.to(self.weight_dtype),
                None if self.b is None else self.b.to(self.bias_dtype))


def fused_linear_grpo_loss_from_options(hidden: Tensor, weight: Tensor, tokens: Tensor, rewards: Optional[Tensor],
                                        mask: Optional[Tensor], opts: LossOptions, *, group,
                                        bias: Optional[Tensor] = None,
                                        vocab_start_index: Optional[int] = None,
                                        cu_seqlens: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                                        grad_weight_accumulation: str = "auto", backend: str = "auto",
                                        return_metrics: bool = False, **data):
    """:func:`vocab_parallel_fused_linear_grpo_loss` once the options are built: the hook for
    ``fused_linear_grpo_loss`` (``weight``/``bias`` = this rank's rows; ``data`` as in
    :func:`grpo_loss_from_options`).

    Two phases whatever the loss (the gradient needs the global statistics): phase 1 runs the chunks forward only
    (``z = h_c @ W_rᵀ + b_r``, the local kernel; 1 GEMM per chunk) and keeps the per-row shard statistics, then the
    two all-reduces give ℓ, lse, H, then ``c``, ``c_H`` come from :func:`reference.logprob_coefficients` at them;
    phase 2 recomputes each chunk's logits, writes their gradient into the chunk buffer (backend ``logprobs_bwd``
    with the global statistics, ``out=`` the buffer) and accumulates ``g @ W_r`` (partial ``grad_hidden``),
    ``gᵀ h_c`` (``grad_weight`` of the shard) and ``Σ g`` (``grad_bias`` of the shard): 3 GEMMs. ``grad_hidden`` is
    all-reduced (SUM) over the group once at the end. The chunking is local (a rank's ``chunk_size`` default
    depends on its shard and free memory): no collective runs per chunk. With ``cu_seqlens``, ``hidden`` is packed
    (``(N, H)`` or ``(1, N, H)``) and the chunks run over the N rows, as in ``fused_linear_grpo_loss``."""
    from . import fused_linear as _fl

    rows = []

    def local_checks():
        r = _rows_of(hidden, tokens, mask, cu_seqlens, data, "hidden",
                     lambda x: _fl._check_linear_args(x, weight, bias, chunk_size))
        rows.append(r)
        return r.tokens_p, r.mask_p

    device = hidden.device if isinstance(hidden, Tensor) else torch.device("cpu")
    V_local = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 2 else 0
    group, shard, keep = _setup(group, 4, local_checks, device=device, vocab_local=V_local,
                                vocab_start_index=vocab_start_index, tokens=tokens, mask=mask,
                                temperature=opts.temperature,
                                names=_PACKED_NAMES if cu_seqlens is not None else
                                ("S (hidden.shape[0])", "T (hidden.shape[1])"))
    r = rows[0]
    data = r.data
    S, T = r.tokens_p.shape
    H = r.x.shape[-1]
    n_rows = r.x.shape[0] * r.x.shape[1]  # S·T, or N packed
    V_r = weight.shape[0]
    grad_w_dtype = _fl.grad_weight_accumulator_dtype(grad_weight_accumulation, weight.dtype, V_r, H)
    _v.check_loss_args(opts, num_sequences=S, seq_len=T, num_classes=shard.vocab_size, device=device,
                       dtype=hidden.dtype, tokens=r.tokens_p, rewards=rewards, mask=r.mask_p, **data)
    impl = _kernels.resolve_backend(backend, device)

    acc = _ref.accumulation_dtype(hidden.dtype)
    m = _ref.effective_mask(r.tokens_p, r.mask_p, acc)  # (S, T): the loss's layout
    plan = _fl.plan_chunks(r.to_rows(m).view(r.tokens.shape), r.x, weight, bias, chunk_size, opts, data)
    h2 = r.x.detach().reshape(n_rows, H)
    keep1 = r.to_rows(keep)
    y_local, own = _local_targets(r.tokens.reshape(-1), keep1, shard)
    w = weight.detach()
    b = None if bias is None else bias.detach()
    tau = float(opts.temperature)
    with_entropy = return_metrics or opts.needs_entropy
    logp_r = torch.zeros(n_rows, dtype=acc, device=device)
    lse_r = torch.zeros_like(logp_r)
    ent_r = torch.zeros_like(logp_r) if with_entropy else None
    cap = min(plan.chunk, max(plan.rows.numel(), 1))
    ones = torch.ones(1, cap, dtype=torch.bool, device=device)

    def chunk_logits(hc):
        return (hc @ w.t() if b is None else torch.addmm(b, hc, w.t())).unsqueeze(0)  # (1, k, V_r)

    with torch.no_grad():  # phase 1: the shard statistics of every kept row
        for _, idx in plan.chunks():
            k = idx.numel()
            z = chunk_logits(h2.index_select(0, idx))
            lp, ls, h = _ops.kernel_fwd(impl, z, y_local[idx].unsqueeze(0), ones[:, :k], tau, with_entropy,
                                        check_ids=False)
            logp_r[idx], lse_r[idx] = lp[0], ls[0]
            if ent_r is not None:
                ent_r[idx] = h[0]
            del z
    logp, lse, ent = combine_shard_stats(group, logp_r, lse_r, ent_r, own, keep1)

    grads = None
    if plan.need_grad:
        at_h = None if ent is None else r.to_loss(ent)
        ent_coef = None
        if opts.entropy_coef != 0:
            coef, ent_coef = _ref.logprob_coefficients(m, rewards, opts, at=r.to_loss(logp), entropy=at_h,
                                                       with_entropy=True, **data)
            ent_coef = r.to_rows(ent_coef).to(acc)
        else:
            coef = _ref.logprob_coefficients(m, rewards, opts, at=r.to_loss(logp), entropy=at_h, **data)
        coef = r.to_rows(coef).to(acc)
        ent_full = ent if ent is not None else torch.zeros_like(lse)
        accs = _ShardAccumulators(r.x, weight, bias, grad_w_dtype, any_rows=plan.rows.numel() > 0)
        with torch.no_grad():  # phase 2: the gradient chunk by chunk, in the chunk buffer
            for first, idx in plan.chunks():
                k = idx.numel()
                hc = h2.index_select(0, idx)
                z = chunk_logits(hc)
                yk = y_local[idx].unsqueeze(0)
                z_t = _gather_local(z, yk)
                row = lambda t: t[idx].unsqueeze(0).contiguous()  # noqa: E731
                g = shard_gradient(impl, row(coef), None if ent_coef is None else row(ent_coef), z, yk,
                                   ones[:, :k], row(own), z_t, row(logp), row(lse), row(ent_full), tau, out=z)
                accs.add(g[0], hc, w, idx, first)
                del z, hc, g
        grads = accs.results(group)
        if grads[0] is not None:
            grads = (grads[0].reshape(hidden.shape),) + tuple(grads[1:])

    out = _ref.loss_from_logprobs(r.to_loss(logp), m, rewards, opts, return_metrics=return_metrics,
                                  entropy=None if ent is None else r.to_loss(ent), **data)
    loss, metrics = out if return_metrics else (out, None)
    if grads is not None:
        loss = _fl._FusedLinearAttach.apply(hidden, weight, bias, loss, *grads)
    return (loss, metrics) if return_metrics else loss


def vocab_parallel_fused_linear_grpo_loss(hidden: Tensor,  # (S, T, H), replicated
                                          weight_shard: Tensor,  # (V_r, H)
                                          tokens: Tensor,  # (S, T) global ids
                                          rewards: Optional[Tensor],
                                          mask: Optional[Tensor] = None,
                                          *,
                                          group,
                                          group_size: int,
                                          bias_shard: Optional[Tensor] = None,  # (V_r,)
                                          vocab_start_index: Optional[int] = None,
                                          cu_seqlens: Optional[Tensor] = None,
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
                                          **options):
    """:func:`grpo_kernels.fused_linear_grpo_loss` for a vocabulary-parallel LM head: this rank holds the rows
    ``[start, end)`` of the head (``weight_shard``, ``bias_shard``); ``hidden`` and every other argument are
    replicated on ``group``. Gradients: ``hidden`` gets the full gradient (all-reduced over the group, so no further
    reduction is needed), ``weight_shard``/``bias_shard`` their own slice. Schedule and cost:
    :func:`fused_linear_grpo_loss_from_options`. ``cu_seqlens``: a packed batch, ``hidden`` ``(N, H)``.

    **options: the loss options of :class:`~grpo_kernels.options.LossOptions`:

        {loss_options}
    """
    opts = LossOptions.from_kwargs("vocab_parallel_fused_linear_grpo_loss", options)
    return fused_linear_grpo_loss_from_options(hidden, weight_shard, tokens, rewards, mask, opts, group=group,
                                               bias=bias_shard, vocab_start_index=vocab_start_index,
                                               cu_seqlens=cu_seqlens, chunk_size=chunk_size, grad_weight_accumulation=grad_weight_accumulation,
                                               backend=backend, return_metrics=return_metrics, group_size=group_size,
                                               old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                               sampling_logprobs=sampling_logprobs, advantages=advantages,
                                               num_items_in_batch=num_items_in_batch, loss_scale=loss_scale)


with_option_keywords(vocab_parallel_fused_linear_grpo_loss, before="return_metrics")
