"""The eager PyTorch reference: the one copy of the GRPO math in plain PyTorch.

This module is the test oracle (:func:`grpo_loss` differentiates it end to end with autograd) and the math
every backend shares. It follows docs/design.md §2-5 to the letter and favours obviously-correct code over
speed: logits are upcast to fp32 (fp64 stays fp64), log-softmax is materialized, and autograd derives every
gradient (logits, and rewards when they require one).

The loss is split in two layers so that the fused backends reuse the same math:

* :func:`token_logprobs` -- the only part that touches the ``[S, T, V]`` logits. Fused kernels replace it.
* :func:`loss_from_logprobs` -- everything else (group weights, advantages, ratios, clipping, KL,
  aggregation, metrics) on ``[S, T]`` tensors, configured by one :class:`~grpo_kernels.options.LossOptions`.
  Every backend calls this same function on the per-token log-probs its kernel produced, so there is exactly
  one eager copy of the loss.
* :func:`coefficients_are_constant` / :func:`logprob_coefficients` -- ``c = ∂loss/∂ℓ``, taken from that same
  function by autograd (the fused one-pass and fused-linear paths need it up front).

Shapes: ``S`` sequences (``num_groups * G``, grouped contiguously), ``T`` completion tokens, ``V`` vocabulary.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from . import validation as _v
from .options import SCALE_REWARDS, LossOptions, with_option_keywords

Tensor = torch.Tensor

__all__ = [
    "token_logprobs",
    "group_weights",
    "group_advantages",
    "loss_from_logprobs",
    "coefficients_are_constant",
    "logprob_coefficients",
    "effective_mask",
    "grpo_loss",
    "compute_grpo_loss",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other float dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------
# Per-token log-probs (the logits-sized part)
# ----------------------------------------------------------------------------------------------------------
def token_logprobs(logits: Tensor,  # (..., V) float
                   tokens: Tensor,  # (...) int, -100 = ignored
                   temperature: float = 1.0,
                   return_entropy: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Per-token log-probabilities ``ℓ = z[y]/τ − logsumexp(z/τ)`` (and optionally the entropy).

    Args:
        logits: ``(..., V)`` floating-point logits; ``logits[..., :]`` predicts ``tokens[...]``.
        tokens: ``(...)`` integer token ids; ``-100`` marks an ignored position (its outputs are 0).
        temperature: τ > 0, logits are divided by it before the softmax.
        return_entropy: also return ``H = logsumexp(z/τ) − Σ_v p_v z_v/τ``.

    Returns:
        ``ℓ`` of shape ``(...)`` in fp32 (fp64 for fp64 logits), and ``H`` of the same shape if asked.
    """
    z = logits.to(accumulation_dtype(logits.dtype))
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    valid = tokens != _v.IGNORE_INDEX
    idx = torch.where(valid, tokens, torch.zeros_like(tokens)).long()
    target = z.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    logp = torch.where(valid, target - lse, zero)
    if not return_entropy:
        return logp
    p = torch.softmax(z, dim=-1)
    finite_z = z.masked_fill(z == float("-inf"), 0.0)  # p = 0 there; avoids 0 * -inf
    entropy = torch.where(valid, lse - (p * finite_z).sum(-1), zero)
    return logp, entropy


# ----------------------------------------------------------------------------------------------------------
# Group weights and advantages (sequence-level, [S])
# ----------------------------------------------------------------------------------------------------------
def group_weights(rewards: Tensor, group_size: int, beta: float = 0.1) -> Tensor:
    """The lesson's weights: ``softmax(rewards / beta)`` inside each group of ``group_size`` rows.

    ``rewards`` is ``(S,)`` (groups contiguous) or ``(B, G)``; the result has the same shape, in fp32 (fp64
    for fp64 rewards). Differentiable with respect to the rewards.
    """
    r = rewards.to(accumulation_dtype(rewards.dtype) if rewards.is_floating_point() else torch.float32)
    return torch.softmax(r.reshape(-1, group_size) / beta, dim=-1).reshape(rewards.shape)


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO advantages ``A = (r − mean_group r) / (std r + eps)``.

    ``scale_rewards``: ``"group"`` divides by each group's unbiased std (a group of one has ``A = 0``),
    ``"batch"`` by the std of all rewards, ``"none"`` does not divide (Dr. GRPO). Same shape as ``rewards``.
    """
    _v.check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    r = rewards.to(accumulation_dtype(rewards.dtype) if rewards.is_floating_point() else torch.float32)
    grouped = r.reshape(-1, group_size)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if scale_rewards == "group":
        std = grouped.std(dim=-1, keepdim=True) if group_size > 1 and grouped.numel() else torch.zeros_like(grouped)
        centred = centred / (std + eps)
    elif scale_rewards == "batch":
        std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        centred = centred / (std + eps)
    return centred.reshape(rewards.shape)


def compute_grpo_loss(log_probs: Tensor, rewards: Tensor, beta: float = 0.1) -> Tensor:
    """The lesson's loss on precomputed sequence log-probs.

    ``log_probs`` and ``rewards`` are ``(G,)`` (one group) or ``(B, G)``; returns
    ``−Σ_i softmax(rewards/beta)_i · log_probs_i``, averaged over the ``B`` groups.
    """
    _v.check_tensor("log_probs", log_probs, floating=True)
    _v.check_tensor("rewards", rewards, device=log_probs.device)
    if log_probs.dim() not in (1, 2):
        raise ValueError(f"log_probs must have shape (G,) or (B, G), got {tuple(log_probs.shape)}")
    if rewards.shape != log_probs.shape:
        raise ValueError(f"rewards must have the shape of log_probs {tuple(log_probs.shape)}, got {tuple(rewards.shape)}")
    if log_probs.shape[-1] < 1:
        raise ValueError("log_probs must hold at least one response per group")
    _v.check_positive_number("beta", beta)
    if rewards.is_floating_point() and not bool(torch.isfinite(rewards.detach()).all()):
        raise ValueError("rewards must be finite; got NaN or inf in rewards")
    G = log_probs.shape[-1]
    w = group_weights(rewards.reshape(-1), G, beta).reshape(-1, G)
    lp = log_probs.reshape(-1, G).to(w.dtype)
    return -(w * lp).sum(-1).sum() / max(1, lp.shape[0])  # an empty batch (B = 0) is a zero loss


# ----------------------------------------------------------------------------------------------------------
# The loss on [S, T] log-probs
# ----------------------------------------------------------------------------------------------------------
def loss_from_logprobs(logp: Tensor,  # (S, T) fp32/fp64, per-token log-probs of the policy
                       mask: Tensor,  # (S, T) effective mask (already 0 where tokens == -100)
                       rewards: Optional[Tensor],  # (S,)
                       options: LossOptions,
                       *,
                       group_size: int,
                       old_logprobs: Optional[Tensor] = None,  # (S, T)
                       ref_logprobs: Optional[Tensor] = None,  # (S, T)
                       advantages: Optional[Tensor] = None,  # (S,)
                       num_items_in_batch=None,
                       loss_scale: float = 1.0,
                       return_metrics: bool = False,
                       entropy: Optional[Tensor] = None,  # (S, T), metrics only
                       ) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """GRPO loss from per-token log-probs; see docs/design.md §3-4. Arguments are assumed valid.

    Values of ``logp``, ``old_logprobs`` and ``ref_logprobs`` at masked positions are ignored (replaced by
    0 before any arithmetic), so garbage there can never turn into NaN.
    """
    o = options
    loss_type, kl_coef, epsilon, delta = o.loss_type, o.kl_coef, o.epsilon, o.delta
    S, T = logp.shape
    acc = logp.dtype
    m = mask.to(acc)
    valid = m != 0
    zero = torch.zeros((), dtype=acc, device=logp.device)
    logp = torch.where(valid, logp, zero)
    num_groups = max(1, S // group_size)  # S = 0 (an empty batch): every sum is 0, so the loss is 0
    n_tok = m.sum()
    denom_all = n_tok.clamp(min=1.0)

    kl = None
    if ref_logprobs is not None:
        d = torch.where(valid, ref_logprobs.to(acc), zero) - logp
        kl = torch.exp(d) - d - 1.0
    use_kl = kl is not None and kl_coef != 0

    metrics: Dict[str, Tensor] = {}
    if loss_type == "softmax":
        w = group_weights(rewards.reshape(-1).to(acc) if rewards.is_floating_point() else rewards.reshape(-1),
                          group_size, o.softmax_beta).to(acc)
        seq_logp = (m * logp).sum(-1)
        loss = -(w * seq_logp).sum() / num_groups
        if use_kl:
            loss = loss + kl_coef * (m * kl).sum() / denom_all
    else:
        if advantages is not None:
            A = advantages.reshape(-1).to(acc)
        else:
            r = rewards.reshape(-1)
            A = group_advantages(r.to(acc) if r.is_floating_point() else r, group_size, o.scale_rewards).to(acc)
        old = logp.detach() if old_logprobs is None else torch.where(valid, old_logprobs.to(acc), zero)
        log_ratio = logp - old
        if o.importance_sampling_level == "sequence":
            log_ratio = ((m * log_ratio).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (S, 1)
        ratio = torch.exp(log_ratio)
        eps_high = o.upper_epsilon
        clipped = ratio.clamp(1.0 - epsilon, 1.0 + eps_high)
        unclipped = ratio.clamp(max=delta) if delta is not None else ratio
        A_col = A.unsqueeze(-1)
        per_token = -torch.min(unclipped * A_col, clipped * A_col).expand(S, T)
        if use_kl:
            per_token = per_token + kl_coef * kl
        if loss_type == "grpo":
            loss = ((m * per_token).sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / max(1, S)
        elif loss_type in ("bnpo", "dapo"):
            denom = denom_all
            if loss_type == "dapo" and num_items_in_batch is not None:
                denom = torch.as_tensor(num_items_in_batch, dtype=acc, device=logp.device)
            loss = (m * per_token).sum() / denom
        else:  # dr_grpo
            L = T if o.max_completion_length is None else o.max_completion_length
            loss = (m * per_token).sum() / (max(1, S) * L)
        if return_metrics:
            with torch.no_grad():
                r_full = ratio.expand(S, T)
                low = ((r_full < 1.0 - epsilon) & (A_col < 0)).to(acc)
                high = ((r_full > 1.0 + eps_high) & (A_col > 0)).to(acc)
                metrics["clip_ratio/low_mean"] = (m * low).sum() / denom_all
                metrics["clip_ratio/high_mean"] = (m * high).sum() / denom_all
                metrics["clip_ratio/region_mean"] = (m * torch.maximum(low, high)).sum() / denom_all

    if loss_scale != 1.0:
        loss = loss * loss_scale
    if not return_metrics:
        return loss
    with torch.no_grad():
        metrics["num_tokens"] = n_tok.detach()
        metrics["logprob"] = (m * logp).sum() / denom_all
        if kl is not None:
            metrics["kl"] = (m * kl).sum() / denom_all
        if entropy is not None:
            metrics["entropy"] = (m * torch.where(valid, entropy.to(acc), zero)).sum() / denom_all
    return loss, {k: v.detach() for k, v in metrics.items()}


def effective_mask(tokens: Tensor, mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """``mask * (tokens != -100)`` as ``dtype`` (the ``m`` of docs/design.md §2)."""
    m = (tokens != _v.IGNORE_INDEX).to(dtype)
    if mask is not None:
        m = m * mask.to(dtype)
    return m


# ----------------------------------------------------------------------------------------------------------
# c = ∂loss/∂ℓ (the fused one-pass and fused-linear paths need it before the kernel runs)
# ----------------------------------------------------------------------------------------------------------
def coefficients_are_constant(options: LossOptions, *, old_logprobs: Optional[Tensor],
                              ref_logprobs: Optional[Tensor]) -> bool:
    """Whether ``∂loss/∂ℓ`` is independent of the log-probs ℓ (so it can be computed before the forward).

    True for the lesson's softmax loss and for the clipped losses on-policy (``old_logprobs=None``: the ratio
    is identically 1, at token or sequence level), as long as the k3 KL is off; the KL and off-policy clipping
    make the gradient depend on ℓ (docs/design.md §5).
    """
    if ref_logprobs is not None and options.kl_coef != 0:
        return False
    return options.loss_type == "softmax" or old_logprobs is None


def logprob_coefficients(mask: Tensor,  # (S, T)
                         rewards: Optional[Tensor],  # (S,)
                         options: LossOptions,
                         at: Optional[Tensor] = None,  # (S, T)
                         **data) -> Tensor:
    """``c = ∂loss/∂ℓ`` of shape ``(S, T)``, by differentiating the one eager formulation
    (:func:`loss_from_logprobs`, with the same ``data`` keywords) -- no second copy of the normalizers.

    ``at`` is the log-probs to differentiate at; by default ℓ = 0, which is exact for a loss with
    :func:`coefficients_are_constant` (its gradient does not depend on ℓ). Rewards and advantages are detached:
    their own gradient comes from the loss value.
    """
    data = dict(data)
    if data.get("advantages") is not None:
        data["advantages"] = data["advantages"].detach()
    r = rewards.detach() if rewards is not None else None
    with torch.enable_grad():
        if at is None:
            leaf = torch.zeros(mask.shape, dtype=mask.dtype, device=mask.device, requires_grad=True)
        else:
            leaf = at.detach().clone().requires_grad_(True)
        loss = loss_from_logprobs(leaf, mask, r, options, **data)
        (coef,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return torch.zeros_like(leaf) if coef is None else coef


# ----------------------------------------------------------------------------------------------------------
# The full loss from logits, differentiated by autograd (the oracle)
# ----------------------------------------------------------------------------------------------------------
def loss_from_logits(logits: Tensor,  # (S, T, V)
                     tokens: Tensor,  # (S, T)
                     rewards: Optional[Tensor],  # (S,)
                     mask: Optional[Tensor],  # (S, T)
                     options: LossOptions,
                     *, return_metrics: bool = False, **data):
    """:func:`token_logprobs` then :func:`loss_from_logprobs`, all eager (arguments assumed valid)."""
    out = token_logprobs(logits, tokens, options.temperature, return_entropy=return_metrics)
    logp, ent = out if return_metrics else (out, None)
    m = effective_mask(tokens, mask, logp.dtype)
    return loss_from_logprobs(logp, m, rewards, options, return_metrics=return_metrics, entropy=ent, **data)


def grpo_loss(logits: Tensor,  # (S, T, V)
              tokens: Tensor,  # (S, T)
              rewards: Optional[Tensor],  # (S,)
              mask: Optional[Tensor] = None,  # (S, T)
              *,
              group_size: int,
              old_logprobs: Optional[Tensor] = None,
              ref_logprobs: Optional[Tensor] = None,
              advantages: Optional[Tensor] = None,
              num_items_in_batch=None,
              loss_scale: float = 1.0,
              return_metrics: bool = False,
              **options):
    """The eager oracle: same arguments, validation and outputs as :func:`grpo_kernels.grpo_loss`, with every
    gradient derived by autograd through this module (no kernel, no custom op).

    The loss options (fields of :class:`~grpo_kernels.options.LossOptions`):

        {loss_options}
    """
    opts = LossOptions.from_kwargs("reference.grpo_loss", options)
    data = dict(group_size=group_size, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
                num_items_in_batch=num_items_in_batch, loss_scale=loss_scale)
    _v.check_logits(logits)
    S, T, V = logits.shape
    _v.check_loss_args(opts, num_sequences=S, seq_len=T, num_classes=V, device=logits.device, dtype=logits.dtype,
                       tokens=tokens, rewards=rewards, mask=mask, **data)
    return loss_from_logits(logits, tokens, rewards, mask, opts, return_metrics=return_metrics, **data)


with_option_keywords(grpo_loss, before="return_metrics")
