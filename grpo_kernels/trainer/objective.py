"""The objective of one micro-batch: :class:`ObjectiveMixin` builds the keywords of the loss and evaluates it.

The loss is :func:`grpo_kernels.grpo_loss` on the completion logits, or :func:`grpo_kernels.fused_linear_grpo_loss`
on the last hidden states and the LM-head weight when ``config.fused_linear`` is on (the trainer picks the path
once, in ``_setup_loss``); :meth:`ObjectiveMixin._loss_kwargs` builds the keywords of either, in one place.

Quantities over the whole step batch are global, so that gradient accumulation and DDP take the same step as
one process with the whole batch: the token-mean loss types (``dapo``, ``cispo``, ``vespo``, or
``loss_agg_mode="token-mean"``) divide by the completion tokens of the global batch (passed as
``num_items_in_batch``), and ``scale_rewards="batch"`` divides the advantages by the std of every
reward of the global batch (all-gathered). ``bnpo`` normalizes by each micro-batch's tokens (as TRL does);
``grpo``, ``dr_grpo`` and ``softmax`` are per-sequence / per-group means over equal-sized micro-batches and so are
exact either way.

The mixin reads the trainer's ``config``, ``G``, ``device``, ``rank``, ``world_size``, ``model`` (DDP-wrapped under
torchrun), ``unwrapped`` and ``_forward_logits`` (:class:`~grpo_kernels.trainer.rollout.RolloutMixin`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from .. import reference as _ref
from ..fused_linear import fused_linear_grpo_loss
from ..loss import grpo_loss
from ..options import ITEMS_NORMALIZED_LOSS_TYPES
from .rollout import Rollout


class AdaptiveEntropy:
    """TRL's adaptive entropy controller (``use_adaptive_entropy``): the bonus ``coef`` moves by ``delta`` per
    optimizer step, up (to ``coef_max``) while the mean entropy of the tokens the policy loss acts on -- over the
    whole step, every micro-batch and rank -- is at or below ``target``, down (to ``coef_min``) otherwise; a step
    applies the coefficient only when the previous step's entropy was at or below the target (none before the first
    measurement). ``state_dict``/``load_state_dict`` for exact resume."""

    def __init__(self, coef: float, target: float, coef_min: float, coef_max: float, delta: float):
        self.coef, self.target = float(coef), float(target)
        self.coef_min, self.coef_max, self.delta = float(coef_min), float(coef_max), float(delta)
        self.last_entropy = float("inf")
        self._sum = 0.0
        self._count = 0.0

    def applied(self) -> float:
        """The coefficient this step's micro-batches use."""
        return self.coef if self.last_entropy <= self.target else 0.0

    def observe(self, metrics) -> None:
        """Add one micro-batch's entropy sums (the loss metrics ``entropy/active_sum|tokens``)."""
        self._sum += float(metrics["entropy/active_sum"])
        self._count += float(metrics["entropy/active_tokens"])

    def step(self, all_reduce=None) -> float:
        """End of an optimizer step: update the coefficient from the window's entropy (``all_reduce`` sums a
        2-vector over the ranks); returns that entropy."""
        window = torch.tensor([self._sum, self._count], dtype=torch.float64)
        if all_reduce is not None:
            window = all_reduce(window)
        entropy = float(window[0] / window[1].clamp(min=1.0))
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_entropy = entropy
        self._sum = self._count = 0.0
        return entropy

    def state_dict(self) -> Dict[str, float]:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.coef, self.last_entropy = float(state["coef"]), float(state["last_entropy"])


class ObjectiveMixin:
    """``_global_batch_terms``, ``_loss_kwargs``, ``_loss``, the two loss paths and the adaptive entropy
    controller of the trainer."""

    def _setup_loss(self):
        """The loss path: on the logits (:meth:`_logits_loss`) or fused with the LM head
        (:meth:`_fused_linear_loss`); and TRL's adaptive entropy controller when ``use_adaptive_entropy``."""
        cfg = self.config
        self._loss_path = self._fused_linear_loss if cfg.fused_linear else self._logits_loss
        self.adaptive_entropy = (AdaptiveEntropy(cfg.entropy_coef, cfg.entropy_target, cfg.entropy_coef_min,
                                                 cfg.entropy_coef_max, cfg.entropy_coef_delta)
                                 if cfg.use_adaptive_entropy else None)

    def _entropy_controller_step(self) -> None:
        """At an optimizer step: the adaptive coefficient from the step's entropy over every micro-batch and rank."""
        if self.adaptive_entropy is None:
            return
        reduce = None
        if self.world_size > 1 and dist.is_initialized():
            comm_dev = self.device if self.device.type == "cuda" else torch.device("cpu")

            def reduce(t):
                t = t.to(comm_dev)
                dist.all_reduce(t)
                return t.cpu()
        self.adaptive_entropy.step(reduce)

    def _entropy_coef_metric(self) -> float:
        """TRL's ``entropy_coef`` metric: the coefficient after this step's update (constant without adaptation)."""
        return self.config.entropy_coef if self.adaptive_entropy is None else self.adaptive_entropy.coef

    def _global_batch_terms(self, rollout: Rollout, rewards: torch.Tensor) -> Dict[str, Any]:
        """Loss keywords that depend on the whole step batch (all ranks, all micro-batches): ``num_items_in_batch``
        for dapo and the batch-scaled ``advantages`` ``(S,)`` of this rank's rows (see the module docstring)."""
        cfg = self.config
        out: Dict[str, Any] = {}
        ddp = self.world_size > 1 and dist.is_initialized()
        comm_dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        token_mean = (cfg.loss_agg_mode == "token-mean"
                      or (cfg.loss_agg_mode is None and cfg.loss_type in ITEMS_NORMALIZED_LOSS_TYPES))
        if token_mean:
            n = self._loss_mask(rollout).sum().to(device=comm_dev, dtype=torch.float64)
            if ddp:
                dist.all_reduce(n)
            # each micro-batch loss is divided by the accumulation steps and DDP averages over ranks
            out["num_items_in_batch"] = max(float(n), 1.0) / (self.world_size * cfg.gradient_accumulation_steps)
        if cfg.scale_rewards == "batch" and cfg.loss_type != "softmax":
            r = rewards.to(comm_dev, torch.float32)
            if ddp:
                parts = [torch.empty_like(r) for _ in range(self.world_size)]
                dist.all_gather(parts, r)
                everything = torch.cat(parts)
            else:
                everything = r
            adv = _ref.group_advantages(everything, self.G, "batch")
            out["advantages"] = adv[self.rank * r.numel():(self.rank + 1) * r.numel()].to(rewards.device)
        return out

    def _loss_kwargs(self, sl: slice, rewards: torch.Tensor, old_lp: Optional[torch.Tensor],
                     ref_lp: Optional[torch.Tensor], batch_terms: Dict[str, Any]) -> Dict[str, Any]:
        """The keyword arguments of ``grpo_loss`` / ``fused_linear_grpo_loss`` for rows ``sl``, ``rewards``
        included (None when the batch-scaled advantages of ``batch_terms`` replace them)."""
        cfg = self.config
        advantages = batch_terms.get("advantages")
        opts = cfg.loss_options()
        # the dr_grpo normalizer defaults to the generation budget (not to this batch's longest completion), and
        # without a reference model there is no KL term
        opts = opts.replace(max_completion_length=opts.max_completion_length or cfg.max_new_tokens,
                            kl_coef=opts.kl_coef if ref_lp is not None else 0.0)
        controller = getattr(self, "adaptive_entropy", None)
        if controller is not None:  # the coefficient of this optimizer step (TRL's adaptive entropy)
            opts = opts.replace(entropy_coef=controller.applied())
        return dict(rewards=rewards[sl] if advantages is None else None,
                    advantages=None if advantages is None else advantages[sl],
                    group_size=self.G, **opts.to_dict(),
                    old_logprobs=None if old_lp is None else old_lp[sl],
                    ref_logprobs=None if ref_lp is None else ref_lp[sl],
                    return_metrics=True, backend=cfg.backend, num_items_in_batch=batch_terms.get("num_items_in_batch"),
                    loss_scale=1.0 / cfg.gradient_accumulation_steps)

    def _loss(self, rollout: Rollout, sl: slice, rewards, old_lp, ref_lp, batch_terms=None):
        """``(loss, metrics)`` of rows ``sl`` through the configured loss path (with gradients)."""
        cm = self._loss_mask(rollout)[sl]
        tokens = rollout.completion_ids[sl].masked_fill(~cm, -100)
        kw = self._loss_kwargs(sl, rewards, old_lp, ref_lp, batch_terms or {})
        loss, metrics = self._loss_path(rollout, sl, tokens, cm, kw)
        controller = getattr(self, "adaptive_entropy", None)
        if controller is not None and torch.is_grad_enabled():
            controller.observe(metrics)
        return loss, metrics

    def _loss_mask(self, rollout: Rollout) -> torch.Tensor:
        """The completion mask the loss uses ``(S, C)`` bool: with ``mask_truncated_completions``, rows that
        never emitted eos within the budget are dropped (TRL's option; their rewards still count in the group
        statistics)."""
        cm = rollout.completion_mask
        if not self.config.mask_truncated_completions or self.eos_id is None:
            return cm
        finished = ((rollout.completion_ids == self.eos_id) & cm).any(1, keepdim=True)
        return cm & finished

    def _logits_loss(self, rollout: Rollout, sl: slice, tokens, mask, kw):
        """``grpo_loss`` on the completion logits ``(s, C, V)`` of rows ``sl``; ``tokens`` ``(s, C)`` (-100 off the
        mask), ``mask`` ``(s, C)`` bool, ``kw`` from :meth:`_loss_kwargs`."""
        logits = self._forward_logits(self.model, rollout, sl)
        return grpo_loss(logits, tokens, mask=mask, **kw)

    def _fused_linear_loss(self, rollout: Rollout, sl: slice, tokens, mask, kw):
        """``fused_linear_grpo_loss`` on the last hidden states ``(s, C, H)`` of rows ``sl`` and the LM head's
        ``(V, H)`` weight (and bias): the ``(s, C, V)`` logits are never all materialized. Arguments as
        :meth:`_logits_loss`."""
        hidden = self._forward_logits(self.model, rollout, sl, with_hidden=True)
        head = self.unwrapped.get_output_embeddings()
        w, b = head.weight, head.bias
        if w.dtype != hidden.dtype:  # bf16 autocast over an fp32 model: the head runs in bf16, as autocast would
            w = w.to(hidden.dtype)
            b = None if b is None else b.to(hidden.dtype)
        # fp32 master weights under bf16 autocast: sum the head's gradient over chunks in fp32 (one rounding,
        # as the unfused autocast backward has) rather than in bf16
        acc = "fp32" if head.weight.dtype == torch.float32 else "auto"
        return fused_linear_grpo_loss(hidden, w, tokens, mask=mask, bias=b, grad_weight_accumulation=acc, **kw)
