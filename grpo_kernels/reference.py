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

import math
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
                       sampling_logprobs: Optional[Tensor] = None,  # (S, T), the inference engine's
                       advantages: Optional[Tensor] = None,  # (S,) or (S, T)
                       num_items_in_batch=None,
                       loss_scale: float = 1.0,
                       return_metrics: bool = False,
                       entropy: Optional[Tensor] = None,  # (S, T); needed when options.needs_entropy
                       ) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """GRPO loss from per-token log-probs (and entropies); see docs/design.md §3-4. Arguments are assumed valid.

    Values of ``logp``, ``entropy``, ``old_logprobs``, ``ref_logprobs`` and ``sampling_logprobs`` at masked
    positions are ignored (replaced by 0 before any arithmetic), so garbage there can never turn into NaN. The
    loss is differentiable in ``logp`` and ``entropy`` (the entropy bonus) and in the rewards/advantages.
    """
    o = options
    S, T = logp.shape
    acc = logp.dtype
    m = mask.to(acc)
    valid = m != 0
    zero = torch.zeros((), dtype=acc, device=logp.device)
    logp = torch.where(valid, logp, zero)
    H = None if entropy is None else torch.where(valid, entropy.to(acc), zero)
    n_tok = m.sum()
    denom_all = n_tok.clamp(min=1.0)
    metrics: Dict[str, Tensor] = {}

    # tokens the policy term acts on: the top_entropy_quantile mask (a function of the forward's entropies)
    keep_mask = None if o.top_entropy_quantile >= 1.0 else high_entropy_mask(H.detach(), valid,
                                                                                  1.0 - o.top_entropy_quantile)
    kl = None
    if ref_logprobs is not None:
        d = torch.where(valid, ref_logprobs.to(acc), zero) - logp
        kl = torch.exp(d) - d - 1.0
    use_kl = kl is not None and o.kl_coef != 0

    if o.loss_type == "softmax":
        w = group_weights(rewards.reshape(-1).to(acc) if rewards.is_floating_point() else rewards.reshape(-1),
                          group_size, o.softmax_beta).to(acc)
        pm = m if keep_mask is None else m * keep_mask
        loss = -(w * (pm * logp).sum(-1)).sum() / max(1, S // group_size)  # S = 0: an empty batch, loss 0
        if use_kl:
            loss = loss + o.kl_coef * (m * kl).sum() / denom_all
    else:
        loss, kl = _clipped_family_loss(logp, m, valid, rewards, o, group_size=group_size, old_logprobs=old_logprobs,
                                        sampling_logprobs=sampling_logprobs, advantages=advantages, kl=kl,
                                        keep_mask=keep_mask, num_items_in_batch=num_items_in_batch,
                                        metrics=metrics if return_metrics else None)

    if o.entropy_coef != 0:
        if return_metrics:
            metrics["policy_loss"] = loss.detach()
        em = m if keep_mask is None else m * keep_mask
        loss = loss - o.entropy_coef * (em * H).sum() / em.sum().clamp(min=1.0)
    if loss_scale != 1.0:
        loss = loss * loss_scale
    if not return_metrics:
        return loss
    with torch.no_grad():
        metrics["num_tokens"] = n_tok.detach()
        metrics["logprob"] = (m * logp).sum() / denom_all
        if kl is not None:
            metrics["kl"] = (m * kl).sum() / denom_all
        if H is not None:
            metrics["entropy"] = (m * H).sum() / denom_all
            # the entropy of the tokens the policy term acts on, as sums (the trainer's adaptive entropy
            # controller aggregates them over micro-batches and ranks)
            em = m if keep_mask is None else m * keep_mask
            metrics["entropy/active_sum"] = (em * H).sum()
            metrics["entropy/active_tokens"] = em.sum()
    return loss, {k: v.detach() for k, v in metrics.items()}


def high_entropy_mask(entropy: Tensor, valid: Tensor, quantile: float) -> Tensor:
    """``1[H ≥ q-quantile of H over the valid tokens] ∧ valid`` as a 0/1 tensor in H's dtype (TRL's
    ``get_high_entropy_mask``). The quantile is ``torch.quantile``'s linear interpolation, computed here on the
    sorted values with the invalid ones pushed to the end, so the count stays on the device (no host sync, no
    2**24-element limit). No valid token: all zeros."""
    flat = torch.where(valid, entropy, torch.full((), float("inf"), dtype=entropy.dtype,
                                                   device=entropy.device)).reshape(-1)
    if flat.numel() == 0:
        return torch.zeros_like(entropy)
    s = flat.sort().values
    n = valid.sum()
    pos = (n - 1).clamp(min=0).to(entropy.dtype) * quantile
    below = pos.floor()
    lo = below.long().reshape(1)
    hi = pos.ceil().long().reshape(1)
    threshold = torch.lerp(s.gather(0, lo), s.gather(0, hi), (pos - below).reshape(1)).reshape(())
    return ((entropy >= threshold) & valid).to(entropy.dtype)


def _clipped_family_loss(logp, m, valid, rewards, o: LossOptions, *, group_size, old_logprobs, sampling_logprobs,
                         advantages, kl, keep_mask, num_items_in_batch, metrics):
    """The advantage-weighted loss types (everything but softmax), TRL 1.16's ``_compute_loss`` order:
    ratio → (bias-corrected KL) → per-token surrogate → off-policy mask → entropy mask → inference-engine IS
    ratio → + KL → aggregation. Returns ``(loss, kl)`` (``kl`` as it enters the loss and the metric)."""
    S, T = logp.shape
    acc = logp.dtype
    zero = torch.zeros((), dtype=acc, device=logp.device)
    if advantages is not None:
        A = advantages.to(acc)
        A = torch.where(valid, A, zero) if A.dim() == 2 else A.reshape(-1)
    else:
        r = rewards.reshape(-1)
        A = group_advantages(r.to(acc) if r.is_floating_point() else r, group_size, o.scale_rewards).to(acc)
    A_col = A.unsqueeze(-1) if A.dim() == 1 else A  # (S, 1) or (S, T)
    old = logp.detach() if old_logprobs is None else torch.where(valid, old_logprobs.to(acc), zero)
    log_ratio = logp - old  # (S, T)
    if o.importance_sampling_level == "sequence":
        log_iw = ((m * log_ratio).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (S, 1)
    else:
        log_iw = log_ratio
    ratio = torch.exp(log_iw)
    if kl is not None and o.kl_coef != 0 and o.use_bias_correction_kl:
        kl = kl * ratio

    is_ratio = None  # the inference-engine mismatch correction (TRL's vLLM importance sampling)
    if sampling_logprobs is not None and o.vllm_importance_sampling_correction:
        is_ratio = _sampling_correction(old.detach(), sampling_logprobs, m, valid, o, metrics)

    eps_low, eps_high = o.epsilon, o.upper_epsilon
    lt = o.loss_type
    phi = None
    if lt == "cispo":  # MiniMax-M1: the clipped ratio is a constant weight of the log-likelihood
        per_token = -ratio.clamp(max=eps_high).detach() * A_col * logp
    elif lt == "sapo":  # soft gate instead of clipping; temperature by the sign of the advantage
        tau = torch.where(A_col > 0, o.sapo_temperature_pos, o.sapo_temperature_neg).to(acc)
        per_token = -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * A_col
    elif lt == "vespo":
        phi = gamma_weights(A_col, log_ratio, m, is_ratio, o)
        per_token = -phi * A_col * logp
    else:  # grpo, bnpo, dr_grpo, dapo, luspo: the PPO-clipped surrogate
        clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
        unclipped = ratio.clamp(max=o.delta) if o.delta is not None else ratio
        per_token = -torch.min(unclipped * A_col, clipped * A_col)
    if o.off_policy_mask_threshold is not None:
        behaviour = old.detach() if sampling_logprobs is None else sampling_logprobs.to(acc)
        per_token = per_token * off_policy_mask(A_col, logp, behaviour, m, valid, o.off_policy_mask_threshold)
    if keep_mask is not None:
        per_token = per_token * keep_mask
    if is_ratio is not None and lt != "vespo":
        per_token = per_token * is_ratio
    if kl is not None and o.kl_coef != 0:
        per_token = per_token + o.kl_coef * kl
    loss = aggregate(per_token.expand(S, T), m, o, num_items_in_batch=num_items_in_batch)

    if metrics is not None:
        with torch.no_grad():
            _clip_metrics(metrics, ratio, A_col, m, o, phi)
    return loss, kl


def aggregate(per_token: Tensor, m: Tensor, o: LossOptions, *, num_items_in_batch=None) -> Tensor:
    """The normalizer of docs/design.md §4: the loss type's own, or verl's ``loss_agg_mode`` when set."""
    S, T = per_token.shape
    acc = per_token.dtype
    total = m * per_token
    n_seq = max(1, S)
    mode = o.loss_agg_mode
    if mode is None:
        lt = o.loss_type
        if lt in ("grpo", "sapo"):
            return (total.sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / n_seq
        if lt == "luspo":
            return total.sum() / n_seq
        if lt == "dr_grpo":
            mode = "seq-mean-token-sum-norm"
        elif lt == "bnpo":
            return total.sum() / m.sum().clamp(min=1.0)
        else:  # dapo, cispo, vespo
            mode = "token-mean"
    if mode == "token-mean":
        if num_items_in_batch is not None:
            return total.sum() / torch.as_tensor(num_items_in_batch, dtype=acc, device=m.device).clamp(min=1.0)
        return total.sum() / m.sum().clamp(min=1.0)
    if mode == "seq-mean-token-sum":
        return total.sum() / n_seq
    if mode == "seq-mean-token-mean":  # verl's exact form (an empty sequence contributes 0)
        return (total.sum(-1) / (m.sum(-1) + 1e-8)).sum() / n_seq
    L = T if o.max_completion_length is None else o.max_completion_length  # seq-mean-token-sum-norm (Dr. GRPO)
    return total.sum() / (n_seq * L)


def _sampling_correction(old: Tensor, sampling: Tensor, m: Tensor, valid: Tensor, o: LossOptions,
                         metrics) -> Tensor:
    """TRL's vLLM importance-sampling ratio ``exp(ℓ_old − ℓ_sampling)`` per token ``(S, T)`` or per sequence
    ``(S, 1)``, truncated to or masked outside ``[C_min, C_max]``. A NaN sampling log-prob (a token the engine
    could not score) contributes a zero difference. Detached."""
    acc = old.dtype
    sampling = sampling.to(acc)
    diff = torch.where(valid & ~torch.isnan(sampling), old - sampling, torch.zeros((), dtype=acc, device=old.device))
    seq = o.sequence_level_is_correction
    log_r = diff.sum(-1, keepdim=True) if seq else diff
    r = torch.exp(log_r)
    lo, hi = o.vllm_importance_sampling_clip_min, o.vllm_importance_sampling_clip_max
    if o.vllm_importance_sampling_mode.endswith("truncate"):
        r = r.clamp(min=lo, max=hi)
    else:
        bad = torch.zeros_like(r, dtype=torch.bool)
        if lo is not None:
            bad = bad | (r < lo)
        if hi is not None:
            bad = bad | (r > hi)
        r = r.masked_fill(bad, 0.0)
    if metrics is not None:
        with torch.no_grad():
            counted = valid & ~torch.isnan(sampling)
            gap = torch.where(counted, (old - sampling).abs(), torch.zeros((), dtype=acc, device=old.device))
            metrics["sampling/sampling_logp_difference/mean"] = gap.sum() / counted.sum().clamp(min=1)
            metrics["sampling/sampling_logp_difference/max"] = gap.amax() if gap.numel() else gap.new_zeros(())
            if seq:
                flat, keep = r.reshape(-1), torch.ones(r.shape[0], dtype=torch.bool, device=r.device)
            else:
                flat, keep = r.reshape(-1), valid.reshape(-1)
            k = keep.sum()
            inf = torch.full((), float("inf"), dtype=acc, device=old.device)
            some = k > 0
            metrics["sampling/importance_sampling_ratio/min"] = _masked_extreme(flat, keep, inf, torch.amin)
            metrics["sampling/importance_sampling_ratio/mean"] = torch.where(
                some, torch.where(keep, flat, 0.0).sum() / k.clamp(min=1), 0.0)
            metrics["sampling/importance_sampling_ratio/max"] = _masked_extreme(flat, keep, -inf, torch.amax)
    return r.detach()


def _masked_extreme(x: Tensor, keep: Tensor, fill: Tensor, fn, empty: float = 0.0) -> Tensor:
    """``fn`` (amin/amax) of ``x[keep]`` without a host sync; ``empty`` when nothing is kept."""
    if x.numel() == 0:
        return torch.full((), empty, dtype=x.dtype, device=x.device)
    return torch.where(keep.any(), fn(torch.where(keep, x, fill)), torch.full((), empty, dtype=x.dtype,
                                                                               device=x.device))


def off_policy_mask(A_col: Tensor, logp: Tensor, behaviour: Tensor, m: Tensor, valid: Tensor,
                    threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's ``get_off_policy_mask``): keep a sequence when its
    advantage is ≥ 0 or its mean ``behaviour − ℓ`` gap is ≤ ``threshold``. ``(S, 1)`` (or ``(S, T)`` for
    per-token advantages), 0/1 in ℓ's dtype; NaN behaviour log-probs count as no gap."""
    acc = logp.dtype
    gap = behaviour.to(acc) - logp.detach()
    gap = torch.where(valid & ~torch.isnan(gap), gap, torch.zeros((), dtype=acc, device=logp.device))
    mean_gap = (gap * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return ((A_col >= 0) | (mean_gap <= threshold)).to(acc)


def gamma_weights(A_col: Tensor, log_ratio: Tensor, m: Tensor, is_ratio: Optional[Tensor],
                  o: LossOptions) -> Tensor:
    """VESPO's Gamma weight ``φ(w) = exp(λ + k·log w − λ·w)`` of the sequence ratio ``w`` (``φ(1) = 1``),
    with ``k, λ`` by the sign of the advantage; detached (a constant weight of the log-likelihood). As TRL 1.16's
    ``get_gamma_weights``: per-token log-ratios clamped to ±20 and summed (not averaged) over the sequence, plus
    ``Σ_t log`` of the token-level engine ratio (clamped to ``[log 1e-8, 20]``) when given; ``log w`` clamped to
    ``[log 1e-8, 20]``; a non-finite φ becomes 0."""
    with torch.no_grad():
        low = math.log(1e-8)
        seq = (log_ratio.detach().clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)
        if is_ratio is not None:
            seq = seq + torch.log(is_ratio).clamp(low, 20.0).sum(-1, keepdim=True)
        log_w = seq.clamp(low, 20.0)
        nonneg = A_col >= 0
        k = torch.where(nonneg, o.vespo_k_pos, o.vespo_k_neg).to(log_w.dtype)
        lam = torch.where(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def _seq_or_token_mean(x: Tensor, m: Tensor) -> Tensor:
    """TRL's logged mean: over sequences for a ``(S, 1)`` quantity, over unmasked tokens for ``(S, T)``."""
    if x.shape[-1] == 1:
        return x.sum() / max(1, x.shape[0])
    return (x * m).sum() / m.sum().clamp(min=1.0)


def _clip_metrics(metrics, ratio, A_col, m, o: LossOptions, phi) -> None:
    """TRL 1.16's clipping metrics, same names and definitions."""
    acc = ratio.dtype
    if o.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = _seq_or_token_mean(((ratio > o.upper_epsilon) & (A_col > 0)).to(acc), m)
        return
    if o.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = _seq_or_token_mean(phi, m)
        return
    if o.loss_type == "sapo":
        return
    low = ((ratio < 1.0 - o.epsilon) & (A_col < 0)).to(acc)
    high = ((ratio > 1.0 + o.upper_epsilon) & (A_col > 0)).to(acc)
    metrics["clip_ratio/low_mean"] = _seq_or_token_mean(low, m)
    metrics["clip_ratio/high_mean"] = _seq_or_token_mean(high, m)
    metrics["clip_ratio/region_mean"] = _seq_or_token_mean(torch.maximum(low, high), m)

    def per_seq(x):
        if x.shape[-1] == 1:
            return x.squeeze(-1)
        return (x * m).sum(-1) / m.sum(-1)  # NaN for an empty sequence: left out of the min/max below

    lo_s, hi_s = per_seq(low), per_seq(high)  # TRL's nanmin / nanmax over sequences (NaN when all are NaN)
    inf = torch.full((), float("inf"), dtype=acc, device=ratio.device)
    metrics["clip_ratio/low_min"] = _masked_extreme(lo_s, ~lo_s.isnan(), inf, torch.amin, float("nan"))
    metrics["clip_ratio/high_max"] = _masked_extreme(hi_s, ~hi_s.isnan(), -inf, torch.amax, float("nan"))


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
                              ref_logprobs: Optional[Tensor], sampling_logprobs: Optional[Tensor] = None) -> bool:
    """Whether ``∂loss/∂ℓ`` and ``∂loss/∂H`` are independent of the forward's log-probs ℓ and entropies H (so
    they can be computed before the forward, docs/design.md §5).

    True for the lesson's softmax loss and for the advantage-weighted losses on-policy (``old_logprobs=None``:
    the ratio is identically 1, at token or sequence level, for every loss type), with a constant entropy bonus.
    False with the k3 KL, off-policy ratios, the entropy mask (its quantile is a function of H), off-policy
    sequence masking, or the inference-engine correction (its ratio uses ℓ when ``old_logprobs`` is None).
    """
    o = options
    if ref_logprobs is not None and o.kl_coef != 0:
        return False
    if o.top_entropy_quantile < 1.0:
        return False
    if o.loss_type == "softmax":
        return True
    if o.off_policy_mask_threshold is not None:
        return False
    if sampling_logprobs is not None and o.vllm_importance_sampling_correction:
        return False
    return old_logprobs is None


def logprob_coefficients(mask: Tensor,  # (S, T)
                         rewards: Optional[Tensor],  # (S,)
                         options: LossOptions,
                         at: Optional[Tensor] = None,  # (S, T)
                         *,
                         entropy: Optional[Tensor] = None,  # (S, T)
                         with_entropy: bool = False,
                         **data):
    """``c = ∂loss/∂ℓ`` of shape ``(S, T)``, by differentiating the one eager formulation
    (:func:`loss_from_logprobs`, with the same ``data`` keywords) -- no second copy of the normalizers.
    ``with_entropy=True`` returns ``(c, c_H)`` with ``c_H = ∂loss/∂H`` (the entropy bonus, and the entropy mask's
    effect) as well.

    ``at``/``entropy`` are the log-probs/entropies to differentiate at; by default 0, which is exact for a loss
    with :func:`coefficients_are_constant` (its gradient does not depend on them). Rewards and advantages are
    detached: their own gradient comes from the loss value.
    """
    data = dict(data)
    if data.get("advantages") is not None:
        data["advantages"] = data["advantages"].detach()
    r = rewards.detach() if rewards is not None else None

    def leaf_at(x):
        if x is None:
            return torch.zeros(mask.shape, dtype=mask.dtype, device=mask.device, requires_grad=True)
        return x.detach().to(mask.dtype).clone().requires_grad_(True)

    with torch.enable_grad():
        leaf = leaf_at(at)
        h = leaf_at(entropy) if (with_entropy or options.needs_entropy) else None
        loss = loss_from_logprobs(leaf, mask, r, options, entropy=h, **data)
        inputs = (leaf, h) if with_entropy else (leaf,)
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))
    return grads if with_entropy else grads[0]


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
    with_entropy = return_metrics or options.needs_entropy
    out = token_logprobs(logits, tokens, options.temperature, return_entropy=with_entropy)
    logp, ent = out if with_entropy else (out, None)
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
              sampling_logprobs: Optional[Tensor] = None,
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
    data = dict(group_size=group_size, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                sampling_logprobs=sampling_logprobs, advantages=advantages, num_items_in_batch=num_items_in_batch,
                loss_scale=loss_scale)
    _v.check_logits(logits)
    S, T, V = logits.shape
    _v.check_loss_args(opts, num_sequences=S, seq_len=T, num_classes=V, device=logits.device, dtype=logits.dtype,
                       tokens=tokens, rewards=rewards, mask=mask, **data)
    return loss_from_logits(logits, tokens, rewards, mask, opts, return_metrics=return_metrics, **data)


with_option_keywords(grpo_loss, before="return_metrics")
