"""Rollouts: sampling responses, packing them into tensors, and completion log-probs under a model.

:class:`Rollout` holds the ``S = num_prompts * G`` sequences of one step (groups contiguous).
:class:`RolloutMixin` gives :class:`~grpo_kernels.trainer.GRPOTrainer` its generation and forward-pass
methods; it reads the trainer's ``config``, ``G``, ``device``, ``tokenizer``, ``unwrapped`` (the model without
DDP), ``fsdp``, ``pad_id`` and ``eos_id``.

Under FSDP (:mod:`.fsdp`) ``generate`` runs on the parameters gathered once per rollout, the log-prob passes through
the FSDP forward hooks (every rank makes the same forward calls: the same number of row chunks).

Completion logits come from the full ``prompt + completion`` sequence: with ``P`` (left-padded) prompt
positions, ``logits[:, P-1+t]`` predicts completion token ``t``. Only completion tokens up to and including
the first ``<eos>`` are in the completion mask.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional

import torch

from .. import reference as _ref


@dataclass
class Rollout:
    """Sampled responses for ``S = num_prompts * G`` sequences, grouped contiguously.

    ``responses``: ``S`` decoded strings (up to the first ``<eos>``, special tokens removed);
    ``logprobs``: ``(S, C)`` fp32 token log-probs under the sampling policy at the sampling temperature
    (0 on masked positions); ``completion_ids``: ``(S, C)`` (pad after ``<eos>``); ``completion_mask``: ``(S, C)``
    bool, True up to and including the first ``<eos>``; ``prompt_ids``/``prompt_mask``: ``(S, P)`` left-padded.
    """

    responses: List[str]
    logprobs: Optional[torch.Tensor]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor

    def __iter__(self):  # ``responses, logprobs = trainer.generate_responses(...)``
        return iter((self.responses, self.logprobs))


class RolloutMixin:
    """Generation, offline rollouts and completion log-probs (see the module docstring for what it reads).

    ``max_score_values`` (2**27): above this many ``S·C·V`` values, :meth:`generate_responses` computes the
    log-probs by a chunked forward pass instead of keeping the sampling logits.
    """

    max_score_values = 2 ** 27

    def _gathered_for_generation(self, model):
        """Under FSDP, the policy's parameters gathered once for the whole ``generate`` call (each rank stops
        sampling when its own rows are done, so per-token all-gathers would deadlock; see :func:`.fsdp.gathered`);
        otherwise nothing."""
        if not getattr(self, "fsdp", False):
            return contextlib.nullcontext()
        from .fsdp import gathered

        return gathered(model)

    def _autocast(self):
        if self.config.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ tensors
    def _left_pad(self, seqs: List[List[int]]):
        """``(ids (N, P) long, mask (N, P) bool)`` on the trainer's device, ``P`` the longest sequence."""
        P = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), P), self.pad_id, dtype=torch.long)
        m = torch.zeros((len(seqs), P), dtype=torch.bool)
        for i, s in enumerate(seqs):
            if s:
                ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
                m[i, P - len(s):] = True
        return ids.to(self.device), m.to(self.device)

    def _completion_mask(self, comp: torch.Tensor) -> torch.Tensor:
        """``(S, C)`` bool for ``comp`` ``(S, C)``: True up to and including the first eos (all True when a row
        never emits eos)."""
        C = comp.shape[1]
        if self.eos_id is None:
            return torch.ones_like(comp, dtype=torch.bool)
        is_eos = comp == self.eos_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], C, dtype=torch.long))
        return torch.arange(C, device=comp.device)[None, :] <= first[:, None]

    def _decode(self, comp: torch.Tensor, mask: torch.Tensor) -> List[str]:
        out = []
        for row, m in zip(comp.tolist(), mask.sum(1).tolist()):
            out.append(self.tokenizer.decode(row[:m], skip_special_tokens=True))
        return out

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def generate_responses(self, prompts, num_samples: Optional[int] = None, return_logprobs: bool = True) -> Rollout:
        """Sample ``num_samples`` responses for each prompt (strings, or lists of token ids).

        Returns a :class:`Rollout` (unpacks as ``responses, logprobs``); rows ``i*G … i*G+G-1`` answer prompt ``i``.
        The log-probs come from the sampling logits when they are small (``S·C·V <`` ``max_score_values``), otherwise from
        a no-grad forward pass in row chunks (the ``[S, C, V]`` logits are never all kept); ``return_logprobs=False``
        skips them (``logprobs`` is then None).
        """
        G = num_samples or self.G
        cfg = self.config
        if self.tokenizer is None:
            raise ValueError("generate_responses needs a tokenizer")
        if not prompts:
            raise ValueError("prompts must be a non-empty list")
        if isinstance(prompts[0], str):  # already formatted text (a dataset row's "prompt")
            seqs = [self.tokenizer(t)["input_ids"] for t in prompts]
        else:
            seqs = [list(p) for p in prompts]
        ids, pm = self._left_pad([s for s in seqs for _ in range(G)])
        from transformers import GenerationConfig

        vocab = self.unwrapped.get_output_embeddings().weight.shape[0]
        from_scores = return_logprobs and ids.shape[0] * cfg.max_new_tokens * vocab < self.max_score_values
        gen_cfg = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                   top_k=cfg.top_k if cfg.top_k > 0 else None, max_new_tokens=cfg.max_new_tokens,
                                   pad_token_id=self.pad_id, eos_token_id=self.eos_id, bos_token_id=None,
                                   output_logits=from_scores, return_dict_in_generate=True, use_cache=True)
        model = self.unwrapped
        was_training = model.training
        model.eval()
        with self._gathered_for_generation(model), self._autocast():
            out = model.generate(input_ids=ids, attention_mask=pm.long(), generation_config=gen_cfg)
        model.train(was_training)
        comp = out.sequences[:, ids.shape[1]:]
        cmask = self._completion_mask(comp)
        comp = comp.masked_fill(~cmask, self.pad_id)
        rollout = Rollout(self._decode(comp, cmask), None, comp, cmask, ids, pm)
        if from_scores:
            logits = torch.stack(out.logits, dim=1).float()  # (S, C, V) raw scores
            rollout.logprobs = _ref.token_logprobs(logits, comp, cfg.temperature) * cmask
        elif return_logprobs:
            rollout.logprobs = self._policy_logprobs(self.unwrapped, rollout)
        return rollout

    def _offline_rollout(self, rows) -> Rollout:
        """The :class:`Rollout` of dataset rows that carry their responses (``response_ids``, ``responses``)."""
        seqs = [r["prompt_ids"] for r in rows for _ in range(self.G)]
        ids, pm = self._left_pad(seqs)
        resp = [t for r in rows for t in r["response_ids"]]
        C = max(1, max(len(t) for t in resp))
        comp = torch.full((len(resp), C), self.pad_id, dtype=torch.long)
        cm = torch.zeros((len(resp), C), dtype=torch.bool)
        for i, t in enumerate(resp):
            comp[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            cm[i, :len(t)] = True
        texts = [t for r in rows for t in r["responses"]]
        return Rollout(texts, None, comp.to(self.device), cm.to(self.device), ids, pm)

    # ------------------------------------------------------------------ forward passes
    def _forward_logits(self, model, rollout: Rollout, sl: slice, with_hidden: bool = False):
        """Completion logits ``(s, C, V)`` (or last hidden states ``(s, C, H)``) for rows ``sl``."""
        pi, pm = rollout.prompt_ids[sl], rollout.prompt_mask[sl]
        ci, cm = rollout.completion_ids[sl], rollout.completion_mask[sl]
        C = ci.shape[1]
        input_ids = torch.cat([pi, ci], 1)
        attn = torch.cat([pm, cm], 1).long()
        position_ids = (attn.cumsum(1) - 1).clamp(min=0)
        with self._autocast():
            if with_hidden:
                out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                            output_hidden_states=True, logits_to_keep=1)
                return out.hidden_states[-1][:, -C - 1:-1]
            out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                        logits_to_keep=C + 1)
        return out.logits[:, :-1]  # position P-1+t predicts completion token t

    @torch.no_grad()
    def _policy_logprobs(self, model, rollout: Rollout) -> torch.Tensor:
        """``(S, C)`` fp32 completion log-probs under ``model`` (no grad, eval mode, 0 on masked positions),
        computed in chunks of one micro-batch of rows."""
        cfg = self.config
        S = rollout.completion_ids.shape[0]
        rows = max(1, cfg.per_device_batch_size // cfg.gradient_accumulation_steps) * self.G
        was_training = model.training
        model.eval()  # no dropout in the behaviour/reference log-probs
        out = []
        for i in range(0, S, rows):
            sl = slice(i, min(S, i + rows))
            cm = rollout.completion_mask[sl]
            tokens = rollout.completion_ids[sl].masked_fill(~cm, -100)
            logits = self._forward_logits(model, rollout, sl)
            out.append(_ref.token_logprobs(logits.float(), tokens, cfg.temperature) * cm)
        model.train(was_training)
        return torch.cat(out, 0)
