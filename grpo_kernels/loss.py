"""Public loss API: :func:`grpo_loss`, :class:`GRPOLoss` and :func:`token_logprobs`, dispatching on ``backend``.

Every backend shares one signature and one validator. The kernels replace only the logits-sized part
(per-token log-probs, entropy and their gradient, through the ops gateway :mod:`grpo_kernels.kernels.ops`); the
rest of the loss is the single eager copy in :func:`grpo_kernels.reference.loss_from_logprobs`, applied to
``[S, T]`` tensors and configured by one :class:`~grpo_kernels.options.LossOptions`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import kernels as _kernels
from . import reference as _ref
from . import validation as _v
from .kernels import ops as _ops
from .options import LossOptions, with_option_keywords
from .packing import packed_inputs

Tensor = torch.Tensor


def grpo_loss(logits: Tensor,  # (S, T, V) float
              tokens: Tensor,  # (S, T) int, -100 = ignored
              rewards: Optional[Tensor],  # (S,)
              mask: Optional[Tensor] = None,  # (S, T) bool/float
              *,
              group_size: int,
              old_logprobs: Optional[Tensor] = None,  # (S, T)
              ref_logprobs: Optional[Tensor] = None,  # (S, T)
              sampling_logprobs: Optional[Tensor] = None,  # (S, T)
              advantages: Optional[Tensor] = None,  # (S,) or (S, T)
              num_items_in_batch=None,
              loss_scale: float = 1.0,
              return_metrics: bool = False,
              backend: str = "auto",
              inplace_backward: bool = False,
              cu_seqlens: Optional[Tensor] = None,  # (S + 1,) packed batches
              vocab_parallel_group=None,
              vocab_start_index: Optional[int] = None,
              **options):
    """GRPO loss straight from the LM-head logits.

    ``S = num_groups * group_size`` sequences, grouped contiguously (rows ``g*G … g*G+G-1`` answer prompt
    ``g``); ``logits[s, t]`` predicts ``tokens[s, t]`` (already shifted). See docs/design.md §3-4 for the math.

    Args:
        logits: ``(S, T, V)`` fp16/bf16/fp32/fp64 logits (any strides; a unit vocabulary stride avoids a copy).
        tokens: ``(S, T)`` integer targets; ``-100`` marks an ignored position.
        rewards: ``(S,)`` one scalar per sequence (may require grad). May be None when ``advantages`` is given.
        mask: ``(S, T)`` optional completion mask (1 = counts).
        group_size: G, responses per prompt.
        old_logprobs / ref_logprobs: ``(S, T)`` log-probs of the behaviour policy / reference model (the
            reference's are used only with ``kl_coef != 0``; a warning says so otherwise).
        sampling_logprobs: ``(S, T)`` log-probs the inference engine (vLLM, SGLang) reported while sampling: the
            input of the rollout/trainer mismatch correction (``vllm_importance_sampling_*``) and of off-policy
            masking (``off_policy_mask_threshold``). NaN marks a token the engine could not score.
        advantages: ``(S,)`` precomputed advantages instead of rewards, or ``(S, T)`` per-token advantages
            (process rewards), for every loss type but softmax.
        num_items_in_batch: the token-mean normalizer of dapo/cispo/vespo and ``loss_agg_mode="token-mean"``
            (default: valid tokens in this batch).
        loss_scale: multiplies the returned loss (and so its gradient); metrics are not scaled. Under gradient
            accumulation over ``k`` micro-batches pass ``loss_scale=1/k`` and call ``loss.backward()`` instead
            of ``(loss / k).backward()``: the one-pass path computes the gradient already scaled during the
            forward, so its backward has nothing left to do, while a ``grad_output != 1`` costs one more pass
            over the ``[S, T, V]`` gradient (a read and a write) and, for half-precision logits, a second
            rounding of it.
        return_metrics: also return a dict of detached 0-dim tensors with TRL's names (docs/design.md §4):
            ``kl``, ``entropy``, ``clip_ratio/low_mean|high_mean|region_mean|low_min|high_max``,
            ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``policy_loss`` (with an entropy bonus), the
            ``sampling/...`` statistics of the engine correction, ``logprob``, ``num_tokens``.
        backend: ``"auto"`` (fastest available for the logits' device), ``"torch"`` (eager PyTorch),
            ``"triton"``, ``"cuda"`` or ``"cpu"``.
        cu_seqlens: a packed (padding-free) batch, as flash-attn / TRL ``padding_free`` / verl remove-padding lay it
            out: ``(S + 1,)`` int32/int64 cumulative lengths; ``logits`` is then ``(N, V)`` or ``(1, N, V)``,
            ``tokens``, ``mask`` and the per-token tensors ``(N,)`` or ``(1, N)``, ``rewards`` ``(S,)`` for the
            ``S`` sequences (grouped contiguously). Same losses as the padded form; no padding is ever read
            (the kernels run on the ``N`` rows; only ``[S, T]`` per-token vectors are padded for the eager loss).
        vocab_parallel_group: a ``torch.distributed`` process group over which the vocabulary is split
            (tensor-parallel LM head, Megatron layout): each rank passes its shard ``logits[..., V_r0:V_r1]`` and
            the *global* token ids; loss, log-probs and metrics are identical on every rank and each rank gets its
            shard's gradient (two all-reduces of 4-5 floats per row; :mod:`grpo_kernels.vocab_parallel`,
            docs/scaling.md). None (default) = the whole vocabulary is here.
        vocab_start_index: with ``vocab_parallel_group``, the first vocabulary id of this rank's shard (default:
            Megatron's equal contiguous shards in rank order).
        inplace_backward: the gradient is written into the logits' own storage instead of a new ``[S, T, V]``
            buffer: by the one-pass kernel during the forward when ``∂loss/∂ℓ`` is known up front (the logits'
            values are then gone right after this call), else by the backward (gone after ``backward()``). Do
            not use the logits afterwards. Any other autograd node that saved the same logits raises autograd's
            "modified by an inplace operation" error instead of reading the gradient. Needs logits with a unit
            vocabulary stride and rows that do not overlap.
        **options: the loss options, each a field of :class:`~grpo_kernels.options.LossOptions`:

        {loss_options}

    Returns:
        0-dim fp32 loss (fp64 for fp64 logits), or ``(loss, metrics)``.

    Example::

        >>> S, T, V, G = 8, 16, 1000, 4
        >>> logits = torch.randn(S, T, V, requires_grad=True)
        >>> tokens = torch.randint(0, V, (S, T))
        >>> rewards = torch.rand(S)
        >>> loss = grpo_loss(logits, tokens, rewards, group_size=G)
        >>> loss.backward()
    """
    opts = LossOptions.from_kwargs("grpo_loss", options)
    return _grpo_loss(logits, tokens, rewards, mask, opts, group_size=group_size, old_logprobs=old_logprobs,
                      ref_logprobs=ref_logprobs, sampling_logprobs=sampling_logprobs, advantages=advantages,
                      num_items_in_batch=num_items_in_batch,
                      loss_scale=loss_scale, return_metrics=return_metrics, backend=backend,
                      inplace_backward=inplace_backward, cu_seqlens=cu_seqlens,
                      vocab_parallel_group=vocab_parallel_group, vocab_start_index=vocab_start_index)


with_option_keywords(grpo_loss, before="return_metrics")


def _grpo_loss(logits, tokens, rewards, mask, opts: LossOptions, *, return_metrics: bool, backend: str,
               inplace_backward: bool, cu_seqlens=None, vocab_parallel_group=None, vocab_start_index=None,
               **data):
    """:func:`grpo_loss` once the options are built (``data``: group_size, the per-batch tensors, loss_scale).

    With ``cu_seqlens`` the kernels run on the ``N`` packed rows and the eager loss on the padded ``(S, T)``
    per-token vectors (:mod:`grpo_kernels.packing`): ``to_loss`` maps the kernels' ``(1, N)`` outputs to that
    layout and ``to_rows`` the coefficients back."""
    if vocab_parallel_group is not None:
        from . import vocab_parallel as _vp

        return _vp.grpo_loss_from_options(logits, tokens, rewards, mask, opts, group=vocab_parallel_group,
                                          vocab_start_index=vocab_start_index, cu_seqlens=cu_seqlens,
                                          return_metrics=return_metrics, backend=backend,
                                          inplace_backward=inplace_backward, **data)
    if vocab_start_index is not None:
        raise ValueError("vocab_start_index is only used with vocab_parallel_group= (a vocabulary-parallel LM head)")
    if cu_seqlens is not None:
        logits, tokens, mask, pk, tokens_p, mask_p, data = packed_inputs(logits, tokens, mask, cu_seqlens, data)
        _v.check_logits(logits)
        S, T, V = pk.S, pk.T, logits.shape[-1]
        to_loss, to_rows = pk.pad, pk.gather
    else:
        _v.check_logits(logits)
        S, T, V = logits.shape
        tokens_p, mask_p = tokens, mask
        to_loss = to_rows = lambda x: x  # noqa: E731
    _v.check_loss_args(opts, num_sequences=S, seq_len=T, num_classes=V, device=logits.device, dtype=logits.dtype,
                       tokens=tokens_p, rewards=rewards, mask=mask_p, **data)
    impl = _kernels.resolve_backend(backend, logits.device)
    check_ids = _ops.check_ids_in_op()  # the ids were validated above (in eager mode)
    tau = opts.temperature
    m = _ref.effective_mask(tokens_p, mask_p, _ref.accumulation_dtype(logits.dtype))
    with_entropy = return_metrics or opts.needs_entropy
    if (logits.requires_grad and torch.is_grad_enabled() and not _v._is_compiling() and _ops.supports_one_pass(impl)
            and _ref.coefficients_are_constant(opts, old_logprobs=data["old_logprobs"],
                                               ref_logprobs=data["ref_logprobs"],
                                               sampling_logprobs=data["sampling_logprobs"])):
        # One pass: ∂loss/∂ℓ (and ∂loss/∂H of a constant entropy bonus) is known before the forward, so the kernel
        # writes the gradient while it reads.
        ent_coef = None
        if opts.entropy_coef != 0:
            coef, ent_coef = _ref.logprob_coefficients(m, rewards, opts, with_entropy=True, **data)
            ent_coef = to_rows(ent_coef)
        else:
            coef = _ref.logprob_coefficients(m, rewards, opts, **data)

        def value_fn(logp, ent):
            return _ref.loss_from_logprobs(to_loss(logp), m, rewards, opts, return_metrics=return_metrics,
                                           entropy=None if ent is None else to_loss(ent), **data)

        return _ops.one_pass_loss(logits, value_fn, tokens, mask, to_rows(coef), tau, with_entropy, impl,
                                  check_ids=check_ids, inplace=inplace_backward, ent_coef=ent_coef)
    logp, ent = _ops.fused_token_logprobs(logits, tokens, mask, tau, with_entropy, impl,
                                          inplace_backward=inplace_backward, check_ids=check_ids)
    return _ref.loss_from_logprobs(to_loss(logp), m, rewards, opts, return_metrics=return_metrics,
                                   entropy=None if ent is None else to_loss(ent), **data)


def token_logprobs(logits: Tensor,  # (..., V)
                   tokens: Tensor,  # (...)
                   temperature: float = 1.0,
                   return_entropy: bool = False,
                   *,
                   mask: Optional[Tensor] = None,  # (...)
                   backend: str = "auto",
                   vocab_parallel_group=None,
                   vocab_start_index: Optional[int] = None):
    """Per-token log-probs ``ℓ = z[y]/τ − logsumexp(z/τ)`` (and entropy), differentiable.

    ``logits (..., V)``, ``tokens (...)``; positions with ``tokens == -100`` (or ``mask == 0``) give 0 and
    receive no gradient -- the kernels never read their logits. Returns fp32 (fp64 for fp64 logits).
    ``vocab_parallel_group`` / ``vocab_start_index``: a vocabulary-parallel shard, as in :func:`grpo_loss`.
    """
    if vocab_parallel_group is not None:
        from . import vocab_parallel as _vp

        lp, ent = _vp.vocab_parallel_token_logprobs(logits, tokens, mask, temperature, return_entropy,
                                                    group=vocab_parallel_group, vocab_start_index=vocab_start_index,
                                                    backend=backend)
        return (lp, ent) if return_entropy else lp
    if vocab_start_index is not None:
        raise ValueError("vocab_start_index is only used with vocab_parallel_group= (a vocabulary-parallel LM head)")
    _v.check_logits(logits, ndim=None)
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., V) with at least one leading dimension, got {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    V = logits.shape[-1]
    _v.check_tokens(tokens, lead, V, logits.device)
    _v.check_mask(mask, lead, logits.device)
    _v.check_temperature(temperature, logits.dtype)
    impl = _kernels.resolve_backend(backend, logits.device)
    # view as (S, T, V) without copying where possible
    if logits.dim() == 2:
        l3, t3, m3 = logits.unsqueeze(0), tokens.unsqueeze(0), None if mask is None else mask.unsqueeze(0)
    else:
        l3 = logits.reshape(-1, lead[-1], V)
        t3 = tokens.reshape(-1, lead[-1])
        m3 = None if mask is None else mask.reshape(-1, lead[-1])
    logp, ent = _ops.fused_token_logprobs(l3, t3, m3, temperature, return_entropy, impl,
                                          check_ids=_ops.check_ids_in_op())
    logp = logp.reshape(lead)
    if return_entropy:
        return logp, ent.reshape(lead)
    return logp


class OptionsModule(nn.Module):
    """Base of the module forms: fixed keywords (``options``, a :class:`LossOptions`, plus the call keywords
    in ``_CALL_DEFAULTS``) set at construction, overridable per call."""

    _CALL_DEFAULTS: dict = {}

    def __init__(self, group_size: int, **kwargs):
        super().__init__()
        _v.check_int("group_size", group_size, minimum=1)
        self.group_size = group_size
        call = {k: kwargs.pop(k) for k in list(kwargs) if k in self._CALL_DEFAULTS}
        self.options = LossOptions.from_kwargs(type(self).__name__, kwargs).validate()
        self.call_options = {**self._CALL_DEFAULTS, **call}

    def _merged(self, overrides: dict):
        call = {k: overrides.pop(k) for k in list(overrides) if k in self._CALL_DEFAULTS}
        unknown = sorted(set(overrides) - set(LossOptions.names()))
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward got unexpected keyword argument(s): {', '.join(unknown)}")
        return {**self.options.to_dict(), **overrides, **self.call_options, **call}

    def extra_repr(self) -> str:
        changed = {**self.options.changed(),
                   **{k: v for k, v in self.call_options.items()
                      if not isinstance(v, Tensor) and not (type(v) is type(self._CALL_DEFAULTS[k])
                                                            and v == self._CALL_DEFAULTS[k])}}
        return ", ".join([f"group_size={self.group_size}"] + [f"{k}={v!r}" for k, v in changed.items()])


class GRPOLoss(OptionsModule):
    """Module form of :func:`grpo_loss`: the keywords (loss options and call keywords) are fixed at
    construction, tensors go to ``forward`` (which also takes per-call overrides).

    Example::

        >>> crit = GRPOLoss(group_size=4, loss_type="grpo", epsilon=0.2)
        >>> loss = crit(logits, tokens, rewards, mask)
    """

    _CALL_DEFAULTS = dict(old_logprobs=None, ref_logprobs=None, sampling_logprobs=None, advantages=None,
                          num_items_in_batch=None, loss_scale=1.0, return_metrics=False, backend="auto",
                          inplace_backward=False, cu_seqlens=None, vocab_parallel_group=None, vocab_start_index=None)

    def forward(self, logits: Tensor, tokens: Tensor, rewards: Optional[Tensor], mask: Optional[Tensor] = None,
                **overrides):
        return grpo_loss(logits, tokens, rewards, mask, group_size=self.group_size, **self._merged(overrides))
