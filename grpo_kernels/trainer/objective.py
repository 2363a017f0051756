"""The objective of one micro-batch: :class:`ObjectiveMixin` builds the keywords of the loss and evaluates it.

The loss is :func:`grpo_kernels.grpo_loss` on the completion logits, or :func:`grpo_kernels.fused_linear_grpo_loss`
on the last hidden states and the LM-head weight when ``config.fused_linear`` is on (the trainer picks the path
once, in ``_setup_loss``); :meth:`ObjectiveMixin._loss_kwargs` builds the keywords of either, in one place.

Quantities over the whole step batch are global, so that gradient accumulation and DDP take the same step as
one process with the whole batch: ``loss_type="dapo"`` divides by the completion tokens of the global batch
(passed as ``num_items_in_batch``), and ``scale_rewards="batch"`` divides the advantages by the std of every
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
from .rollout import Rollout


class ObjectiveMixin:
    """``_global_batch_terms``, ``_loss_kwargs``, ``_loss`` and the two loss paths of the trainer."""

    def _global_batch_terms(self, rollout: Rollout, rewards: torch.Tensor) -> Dict[str, Any]:
        """Loss keywords that depend on the whole step batch (all ranks, all micro-batches): ``num_items_in_batch``
        for dapo and the batch-scaled ``advantages`` ``(S,)`` of this rank's rows (see the module docstring)."""
        cfg = self.config
        out: Dict[str, Any] = {}
        ddp = self.world_size > 1 and dist.is_initialized()
        comm_dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        if cfg.loss_type == "dapo":
            n = rollout.completion_mask.sum().to(device=comm_dev, dtype=torch.float64)
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
        return dict(rewards=rewards[sl] if advantages is None else None,
                    advantages=None if advantages is None else advantages[sl],
                    group_size=self.G, **opts.to_dict(),
                    old_logprobs=None if old_lp is None else old_lp[sl],
                    ref_logprobs=None if ref_lp is None else ref_lp[sl],
                    return_metrics=True, backend=cfg.backend, num_items_in_batch=batch_terms.get("num_items_in_batch"),
                    loss_scale=1.0 / cfg.gradient_accumulation_steps)

    def _loss(self, rollout: Rollout, sl: slice, rewards, old_lp, ref_lp, batch_terms=None):
        """``(loss, metrics)`` of rows ``sl`` through the configured loss path (with gradients)."""
        cm = rollout.completion_mask[sl]
        tokens = rollout.completion_ids[sl].masked_fill(~cm, -100)
        kw = self._loss_kwargs(sl, rewards, old_lp, ref_lp, batch_terms or {})
        return self._loss_path(rollout, sl, tokens, cm, kw)

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
