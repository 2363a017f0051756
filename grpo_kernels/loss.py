"""Public loss API: :func:`grpo_loss`, :class:`GRPOLoss` and :func:`token_logprobs`, dispatching on ``backend``.

Every backend shares one signature and one validator. The fused backends replace only the logits-sized
part (per-token log-probs, entropy and their gradient) with a kernel; the rest of the loss is the single
eager copy in :func:`grpo_kernels.reference.loss_from_logprobs`, applied to ``[S, T]`` tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _ops
from . import backends as _backends
from . import reference as _ref
from . import validation as _v

Tensor = torch.Tensor

_LOSS_DEFAULTS = dict(loss_type="softmax", beta=0.1, temperature=1.0, old_logprobs=None, ref_logprobs=None,
                      kl_coef=0.0, epsilon=0.2, epsilon_high=None, delta=None, scale_rewards="group",
                      advantages=None, max_completion_length=None, num_items_in_batch=None,
                      importance_sampling_level="token", loss_scale=1.0, return_metrics=False, backend="auto",
                      inplace_backward=False)


def grpo_loss(logits: Tensor,  # (S, T, V) float
              tokens: Tensor,  # (S, T) int, -100 = ignored
              rewards: Optional[Tensor],  # (S,)
              mask: Optional[Tensor] = None,  # (S, T) bool/float
              *,
              group_size: int,
              loss_type: str = "softmax",
              beta: float = 0.1,
              temperature: float = 1.0,
              old_logprobs: Optional[Tensor] = None,  # (S, T)
              ref_logprobs: Optional[Tensor] = None,  # (S, T)
              kl_coef: float = 0.0,
              epsilon: float = 0.2,
              epsilon_high: Optional[float] = None,
              delta: Optional[float] = None,
              scale_rewards: str = "group",
              advantages: Optional[Tensor] = None,  # (S,)
              max_completion_length: Optional[int] = None,
              num_items_in_batch=None,
              importance_sampling_level: str = "token",
              loss_scale: float = 1.0,
              return_metrics: bool = False,
              backend: str = "auto",
              inplace_backward: bool = False):
    """GRPO loss straight from the LM-head logits.

    ``S = num_groups * group_size`` sequences, grouped contiguously (rows ``g*G … g*G+G-1`` answer prompt
    ``g``); ``logits[s, t]`` predicts ``tokens[s, t]`` (already shifted). See DESIGN.md §3-4 for the math.

    Args:
        logits: ``(S, T, V)`` fp16/bf16/fp32/fp64 logits (any strides; a unit vocabulary stride avoids a copy).
        tokens: ``(S, T)`` integer targets; ``-100`` marks an ignored position.
        rewards: ``(S,)`` one scalar per sequence (may require grad). May be None when ``advantages`` is given.
        mask: ``(S, T)`` optional completion mask (1 = counts).
        group_size: G, responses per prompt.
        loss_type: ``"softmax"`` (the lesson's ``−Σ softmax(r/β)·L``; default), ``"grpo"``, ``"bnpo"``,
            ``"dr_grpo"`` or ``"dapo"`` (clipped surrogate with different normalizers).
        beta: temperature of the softmax group weights (softmax loss only).
        temperature: sampling temperature τ; logits are divided by it.
        old_logprobs / ref_logprobs: ``(S, T)`` log-probs of the behaviour policy / reference model.
        kl_coef: weight of the k3 KL to ``ref_logprobs``.
        epsilon, epsilon_high, delta: clipping range ``[1-ε, 1+ε_high]`` and the optional cap δ of the
            unclipped ratio (two-sided clipping).
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"`` -- how advantages are scaled.
        advantages: ``(S,)`` precomputed advantages instead of rewards (clipped types).
        max_completion_length: dr_grpo normalizer (default T).
        num_items_in_batch: dapo normalizer (default: valid tokens in this batch).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        loss_scale: multiplies the returned loss (and so its gradient); metrics are not scaled. Under gradient
            accumulation over ``k`` micro-batches pass ``loss_scale=1/k`` and call ``loss.backward()`` instead
            of ``(loss / k).backward()``: the one-pass path computes the gradient already scaled during the
            forward, so its backward has nothing left to do, while a ``grad_output != 1`` costs one more pass
            over the ``[S, T, V]`` gradient (a read and a write) and, for half-precision logits, a second
            rounding of it.
        return_metrics: also return a dict of detached 0-dim tensors: ``kl``, ``entropy``,
            ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``logprob``,
            ``num_tokens``.
        backend: ``"auto"`` (fastest available for the logits' device), ``"torch"``, ``"triton"``,
            ``"cuda"`` or ``"cpu"``.
        inplace_backward: fused backends only (the torch backend ignores it): the backward writes the gradient
            into the logits' own storage instead of a new ``[S, T, V]`` buffer. The logits' values are gone
            after ``backward()``; do not use them afterwards. Any other autograd node that saved the same logits
            raises autograd's "modified by an inplace operation" error instead of reading the gradient.

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
    _v.check_logits(logits)
    S, T, V = logits.shape
    kw = dict(group_size=group_size, loss_type=loss_type, beta=beta, old_logprobs=old_logprobs,
              ref_logprobs=ref_logprobs, kl_coef=kl_coef, epsilon=epsilon, epsilon_high=epsilon_high, delta=delta,
              scale_rewards=scale_rewards, advantages=advantages, max_completion_length=max_completion_length,
              num_items_in_batch=num_items_in_batch, importance_sampling_level=importance_sampling_level,
              loss_scale=loss_scale)
    _v.check_loss_args(num_sequences=S, seq_len=T, num_classes=V, device=logits.device, tokens=tokens,
                       rewards=rewards, mask=mask, temperature=temperature, backend=backend, **kw)
    impl = _backends.resolve_backend(backend, logits.device)
    if impl == "torch":
        logp_ent = _ref.token_logprobs(logits, tokens, temperature, return_entropy=return_metrics)
        logp, ent = logp_ent if return_metrics else (logp_ent, None)
    else:
        m = _ref.effective_mask(tokens, mask, _ref.accumulation_dtype(logits.dtype))
        if (logits.requires_grad and torch.is_grad_enabled() and not inplace_backward
                and not _v._is_compiling() and coefficients_are_constant(**kw) and _ops.supports_one_pass(impl)):
            # One pass: ∂loss/∂ℓ is known before the forward, so the kernel writes the gradient while it reads.
            coef = logprob_coefficients(m, rewards, **kw)

            def value_fn(logp, ent):
                return _ref.loss_from_logprobs(logp, m, rewards, return_metrics=return_metrics, entropy=ent, **kw)

            with _ops.validated_ids_context():  # tokens were checked above: the op skips its own check
                return _ops.one_pass_loss(logits, value_fn, tokens, mask, coef, temperature, return_metrics, impl)
        with _ops.validated_ids_context():
            logp, ent = _ops.fused_token_logprobs(logits, tokens, mask, temperature, return_metrics, impl,
                                                  inplace_backward=inplace_backward)
    m = _ref.effective_mask(tokens, mask, logp.dtype)
    return _ref.loss_from_logprobs(logp, m, rewards, return_metrics=return_metrics, entropy=ent, **kw)


def coefficients_are_constant(*, loss_type: str, old_logprobs, ref_logprobs, kl_coef, **_) -> bool:
    """Whether ``∂loss/∂ℓ`` is independent of the log-probs ℓ (so it can be computed before the forward).

    True for the lesson's softmax loss and for the clipped losses on-policy (``old_logprobs=None``: the ratio
    is identically 1, at token or sequence level), as long as the k3 KL is off; the KL and off-policy clipping
    make the gradient depend on ℓ.
    """
    if ref_logprobs is not None and kl_coef != 0:
        return False
    return loss_type == "softmax" or old_logprobs is None


def logprob_coefficients(mask: Tensor, rewards: Optional[Tensor], at: Optional[Tensor] = None, **kw) -> Tensor:
    """``c = ∂loss/∂ℓ`` of shape ``(S, T)``, by differentiating the one eager formulation
    (:func:`reference.loss_from_logprobs`) -- no second copy of the normalizers.

    ``at`` is the ``(S, T)`` log-probs to differentiate at; by default ℓ = 0, which is exact for a loss with
    :func:`coefficients_are_constant` (its gradient does not depend on ℓ). Rewards and advantages are detached:
    their own gradient comes from the loss value.
    """
    kw = dict(kw)
    if kw.get("advantages") is not None:
        kw["advantages"] = kw["advantages"].detach()
    r = rewards.detach() if rewards is not None else None
    with torch.enable_grad():
        if at is None:
            leaf = torch.zeros(mask.shape, dtype=mask.dtype, device=mask.device, requires_grad=True)
        else:
            leaf = at.detach().clone().requires_grad_(True)
        loss = _ref.loss_from_logprobs(leaf, mask, r, **kw)
        (coef,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return torch.zeros_like(leaf) if coef is None else coef


def token_logprobs(logits: Tensor,  # (..., V)
                   tokens: Tensor,  # (...)
                   temperature: float = 1.0,
                   return_entropy: bool = False,
                   *,
                   mask: Optional[Tensor] = None,  # (...)
                   backend: str = "auto"):
    """Per-token log-probs ``ℓ = z[y]/τ − logsumexp(z/τ)`` (and entropy), differentiable.

    ``logits (..., V)``, ``tokens (...)``; positions with ``tokens == -100`` (or ``mask == 0``) give 0 and
    receive no gradient -- the fused kernels never read their logits. Returns fp32 (fp64 for fp64 logits).
    """
    _v.check_logits(logits, ndim=None)
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., V) with at least one leading dimension, got {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    V = logits.shape[-1]
    _v.check_tokens(tokens, lead, V, logits.device)
    _v.check_mask(mask, lead, logits.device)
    _v.check_positive_number("temperature", temperature)
    impl = _backends.resolve_backend(backend, logits.device)
    if impl == "torch":
        out = _ref.token_logprobs(logits, tokens, temperature, return_entropy)
        if mask is None:
            return out
        keep = mask != 0
        if return_entropy:
            return tuple(torch.where(keep, o, torch.zeros_like(o)) for o in out)
        return torch.where(keep, out, torch.zeros_like(out))
    # view as (S, T, V) without copying where possible
    if logits.dim() == 2:
        l3, t3, m3 = logits.unsqueeze(0), tokens.unsqueeze(0), None if mask is None else mask.unsqueeze(0)
    else:
        l3 = logits.reshape(-1, lead[-1], V)
        t3 = tokens.reshape(-1, lead[-1])
        m3 = None if mask is None else mask.reshape(-1, lead[-1])
    with _ops.validated_ids_context():  # tokens were checked above: the op skips its own check
        logp, ent = _ops.fused_token_logprobs(l3, t3, m3, temperature, return_entropy, impl)
    logp = logp.reshape(lead)
    if return_entropy:
        return logp, ent.reshape(lead)
    return logp


class GRPOLoss(nn.Module):
    """Module form of :func:`grpo_loss`: the keywords are fixed at construction, tensors go to ``forward``.

    Example::

        >>> crit = GRPOLoss(group_size=4, loss_type="grpo", epsilon=0.2)
        >>> loss = crit(logits, tokens, rewards, mask)
    """

    def __init__(self, group_size: int, **kwargs):
        super().__init__()
        unknown = set(kwargs) - set(_LOSS_DEFAULTS)
        if unknown:
            raise TypeError(f"GRPOLoss got unexpected keyword(s): {', '.join(sorted(unknown))}")
        _v.check_int("group_size", group_size, minimum=1)
        self.group_size = group_size
        self.options = {**_LOSS_DEFAULTS, **kwargs}

    def forward(self, logits: Tensor, tokens: Tensor, rewards: Optional[Tensor], mask: Optional[Tensor] = None,
                **overrides):
        unknown = set(overrides) - set(_LOSS_DEFAULTS)
        if unknown:
            raise TypeError(f"GRPOLoss.forward got unexpected keyword(s): {', '.join(sorted(unknown))}")
        return grpo_loss(logits, tokens, rewards, mask, group_size=self.group_size, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        changed = {k: v for k, v in self.options.items() if _LOSS_DEFAULTS[k] is not v and not isinstance(v, Tensor)}
        return ", ".join([f"group_size={self.group_size}"] + [f"{k}={v!r}" for k, v in changed.items()])
