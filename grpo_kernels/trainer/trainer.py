"""``GRPOTrainer``: the lean GRPO loop -- rollout, reward, fused loss, optimizer step, log, checkpoint.

One :meth:`GRPOTrainer.training_step` does, for this process's share of the step's prompts::

    generate G responses per prompt (HF ``generate``; skipped for offline rows that carry responses)
    score them (rule rewards / reward model, weighted; skipped for rows that carry rewards)
    [old log-probs if num_iterations > 1]  [reference log-probs if kl_coef > 0]
    num_iterations times:  for each micro-batch of prompts: loss = grpo_loss(..., loss_scale=1/accumulation); backward
                           clip gradients; AdamW step; LR scheduler step

The loss is :func:`grpo_kernels.grpo_loss` on the completion logits (``logits[:, t]`` of the full sequence
predicts token ``t+1``; only completion tokens up to and including the first ``<eos>`` count), or
``grpo_kernels.fused_linear_grpo_loss`` on the last hidden states and the LM-head weight when
``config.fused_linear`` is on. Under ``torchrun`` every rank takes a contiguous slice of the step's global batch,
gradients are averaged by DDP, and rank 0 logs and saves.

Quantities over the whole step batch are global, so that gradient accumulation and DDP take the same step as
one process with the whole batch: ``loss_type="dapo"`` divides by the completion tokens of the global batch
(passed as ``num_items_in_batch``), and ``scale_rewards="batch"`` divides the advantages by the std of every
reward of the global batch (all-gathered). ``bnpo`` normalizes by each micro-batch's tokens (as TRL does);
``grpo``, ``dr_grpo`` and ``softmax`` are per-sequence / per-group means over equal-sized micro-batches and so are
exact either way.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import reference as _ref
from ..loss import grpo_loss
from ..rewards import CombinedReward, RewardModel
from .config import GRPOConfig
from .data import GRPODataset

_INTERNAL_KEYS = ("prompt", "prompt_ids", "responses", "response_ids", "rewards")
_STATE_FILE = "trainer_state.pt"


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


def _lr_lambda(kind: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def f(i: int) -> float:
        if warmup > 0 and i < warmup:
            return (i + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        if kind == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class GRPOTrainer:
    """Lean GRPO trainer for Hugging Face causal LMs.

    ``max_score_values`` (class attribute, 2**27): above this many ``S·C·V`` values, ``generate_responses``
    computes log-probs by a chunked forward pass instead of keeping the sampling logits.

    Args:
        model: a ``transformers`` causal LM (``generate``, ``logits_to_keep``), on any device.
        train_dataset: a :class:`GRPODataset`, a JSONL path or a list of row dicts (see ``trainer/data.py``).
        config: :class:`GRPOConfig` (default: ``GRPOConfig()``).
        reward_funcs: names from :mod:`grpo_kernels.rewards` and/or callables (default: ``config.reward_funcs``);
            ``config.reward_model_path`` adds a local reward model.
        tokenizer: needed to generate and decode (default: the dataset's).
        ref_model: the frozen reference for the KL term (default: a copy of ``model`` at start when kl_coef > 0).
        reward_weights: weights of ``reward_funcs`` (default 1.0 each; ``config.reward_weights`` goes with
            ``config.reward_funcs``).
    """

    max_score_values = 2 ** 27

    def __init__(self, model, train_dataset, config: Optional[GRPOConfig] = None,
                 reward_funcs: Optional[Sequence] = None, tokenizer=None, ref_model=None,
                 reward_weights: Optional[Sequence[float]] = None):
        self.config = cfg = (config or GRPOConfig()).validate()
        self._setup_distributed()
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", self.local_rank)
        self.G = cfg.num_generations
        self.tokenizer = tokenizer if tokenizer is not None else getattr(train_dataset, "tokenizer", None)
        if not isinstance(train_dataset, GRPODataset):
            if self.tokenizer is None:
                raise ValueError("tokenizer is required to build a GRPODataset from a path or a list")
            train_dataset = GRPODataset(train_dataset, self.tokenizer, num_samples=self.G, max_length=cfg.max_length,
                                        use_chat_template=cfg.use_chat_template, skip_invalid=cfg.skip_invalid_rows)
        elif train_dataset.offline and train_dataset.num_samples != self.G:
            raise ValueError(f"the dataset has {train_dataset.num_samples} responses per prompt but "
                             f"config.num_generations is {self.G}")
        self.train_dataset = train_dataset
        if self.tokenizer is None and not train_dataset.offline:
            raise ValueError("tokenizer is required for online training (generation and decoding)")
        pad = None if self.tokenizer is None else self.tokenizer.pad_token_id
        eos = None if self.tokenizer is None else self.tokenizer.eos_token_id
        self.eos_id = eos if eos is not None else getattr(model.config, "eos_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

        # rewards
        self.reward = None
        if train_dataset.kind != "offline_rewards":
            funcs = list(reward_funcs) if reward_funcs is not None else list(cfg.reward_funcs)
            weights = reward_weights if reward_funcs is not None else cfg.reward_weights
            if cfg.reward_model_path:
                rm = RewardModel(cfg.reward_model_path, device=self.device, use_chat_template=cfg.use_chat_template)
                funcs.append(rm)
                weights = (list(weights) if weights is not None else [1.0] * (len(funcs) - 1)) + [cfg.reward_model_weight]
            self.reward = CombinedReward(funcs, weights)

        self._seed_everything(cfg.seed + self.rank)
        self.unwrapped = model.to(self.device)
        if cfg.gradient_checkpointing:
            enable = getattr(self.unwrapped, "activation_checkpointing_enable", None)  # transformers >= 5 name
            (enable or self.unwrapped.gradient_checkpointing_enable)()
            self.unwrapped.config.use_cache = False
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = (ref_model if ref_model is not None else copy.deepcopy(self.unwrapped)).to(self.device).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.model = self.unwrapped
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.unwrapped, device_ids=ids)
        params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        total_updates = cfg.max_steps * cfg.num_iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total_updates, cfg.min_lr_ratio))
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self.target_reached: Optional[Dict[str, float]] = None
        self._fused_linear = None
        if cfg.fused_linear:
            import grpo_kernels

            self._fused_linear = getattr(grpo_kernels, "fused_linear_grpo_loss", None)
            if self._fused_linear is None:
                raise ValueError("config.fused_linear=True but grpo_kernels.fused_linear_grpo_loss is not available "
                                 "in this version")
        if cfg.bf16 and self.device.type != "cuda" and self.is_main:
            print("note: bf16 autocast is GPU-only; training in fp32 on", self.device)

    # ------------------------------------------------------------------ setup helpers
    def _setup_distributed(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and self.config.device != "cpu" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend)
        if dist.is_initialized():
            self.world_size, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def _seed_everything(seed: int):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % (2 ** 32))
        except ImportError:  # pragma: no cover
            pass

    def _autocast(self):
        if self.config.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ data order
    def batch_indices(self, step: int) -> List[int]:
        """Dataset indices of this rank's prompts at ``step``: a stateless function of (seed, step, rank), so a
        resumed run sees exactly the rows an uninterrupted one would."""
        n = len(self.train_dataset)
        B = self.config.per_device_batch_size
        gb = B * self.world_size
        out = []
        perms: Dict[int, List[int]] = {}
        for pos in range(step * gb + self.rank * B, step * gb + (self.rank + 1) * B):
            epoch, i = divmod(pos, n)
            if epoch not in perms:
                if self.config.shuffle:
                    g = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
                    perms[epoch] = torch.randperm(n, generator=g).tolist()
                else:
                    perms[epoch] = list(range(n))
            out.append(perms[epoch][i])
        return out

    def get_batch(self, step: int) -> List[Dict[str, Any]]:
        return [self.train_dataset[i] for i in self.batch_indices(step)]

    # ------------------------------------------------------------------ tensors
    def _left_pad(self, seqs: List[List[int]]):
        P = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), P), self.pad_id, dtype=torch.long)
        m = torch.zeros((len(seqs), P), dtype=torch.bool)
        for i, s in enumerate(seqs):
            if s:
                ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
                m[i, P - len(s):] = True
        return ids.to(self.device), m.to(self.device)

    def _completion_mask(self, comp: torch.Tensor) -> torch.Tensor:
        """True up to and including the first eos (all True when a row never emits eos)."""
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

    # ------------------------------------------------------------------ the lesson's three methods
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

        gen_cfg = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                   top_k=cfg.top_k if cfg.top_k > 0 else None, max_new_tokens=cfg.max_new_tokens,
                                   pad_token_id=self.pad_id, eos_token_id=self.eos_id, bos_token_id=None,
                                   output_logits=False, return_dict_in_generate=True, use_cache=True)
        vocab = self.unwrapped.get_output_embeddings().weight.shape[0]
        from_scores = return_logprobs and ids.shape[0] * cfg.max_new_tokens * vocab < self.max_score_values
        gen_cfg.output_logits = from_scores
        model = self.unwrapped
        was_training = model.training
        model.eval()
        with self._autocast():
            out = model.generate(input_ids=ids, attention_mask=pm.long(), generation_config=gen_cfg)
        if was_training:
            model.train()
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

    def compute_rewards(self, prompts: Sequence[str], responses: Sequence[str], **columns):
        """Rewards for ``responses`` (``prompts`` aligned with them): ``(rewards (N,) fp32, {name: (N,)})``."""
        if self.reward is None:
            raise ValueError("no reward functions configured (the dataset carries its own rewards)")
        return self.reward(prompts, responses, **columns)

    def _offline_rollout(self, rows) -> Rollout:
        G = self.G
        seqs = [r["prompt_ids"] for r in rows for _ in range(G)]
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
        """``(S, C)`` completion log-probs under ``model`` (no grad), computed in chunks of one micro-batch of rows."""
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

    def _global_batch_terms(self, rollout: Rollout, rewards: torch.Tensor) -> Dict[str, Any]:
        """Loss keywords that depend on the whole step batch (all ranks, all micro-batches): ``num_items_in_batch``
        for dapo and the batch-scaled ``advantages`` (see the module docstring)."""
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

    def _loss(self, rollout: Rollout, sl: slice, rewards, old_lp, ref_lp, batch_terms=None):
        cfg = self.config
        cm = rollout.completion_mask[sl]
        tokens = rollout.completion_ids[sl].masked_fill(~cm, -100)
        batch_terms = batch_terms or {}
        advantages = batch_terms.get("advantages")
        if advantages is not None:
            advantages, rewards = advantages[sl], None
        else:
            rewards = rewards[sl]
        kw = dict(group_size=self.G, loss_type=cfg.loss_type, beta=cfg.beta, temperature=cfg.temperature,
                  old_logprobs=None if old_lp is None else old_lp[sl], ref_logprobs=None if ref_lp is None else ref_lp[sl],
                  kl_coef=cfg.kl_coef if ref_lp is not None else 0.0, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                  delta=cfg.delta, scale_rewards=cfg.scale_rewards,
                  max_completion_length=cfg.max_completion_length or cfg.max_new_tokens,
                  importance_sampling_level=cfg.importance_sampling_level, return_metrics=True, backend=cfg.backend,
                  advantages=advantages, num_items_in_batch=batch_terms.get("num_items_in_batch"),
                  loss_scale=1.0 / cfg.gradient_accumulation_steps)
        if self._fused_linear is not None:
            hidden = self._forward_logits(self.model, rollout, sl, with_hidden=True)
            head = self.unwrapped.get_output_embeddings()
            w, b = head.weight, head.bias
            if w.dtype != hidden.dtype:  # bf16 autocast over an fp32 model: the head runs in bf16, as autocast would
                w = w.to(hidden.dtype)
                b = None if b is None else b.to(hidden.dtype)
            # fp32 master weights under bf16 autocast: sum the head's gradient over chunks in fp32 (one rounding,
            # as the unfused autocast backward has) rather than in bf16
            acc = "fp32" if head.weight.dtype == torch.float32 else "auto"
            return self._fused_linear(hidden, w, tokens, rewards, cm, bias=b, grad_weight_accumulation=acc, **kw)
        logits = self._forward_logits(self.model, rollout, sl)
        return grpo_loss(logits, tokens, rewards, cm, **kw)

    def _prepare(self, batch) -> List[Dict[str, Any]]:
        """Dataset rows as they are; raw row dicts (``{"prompt": ...}``) are tokenized like the dataset does."""
        return [r if "prompt_ids" in r else self.train_dataset.encode_row(r) for r in batch]

    def training_step(self, batch: List[Dict[str, Any]]) -> Dict[str, float]:
        """Generate → reward → (old/ref log-probs) → ``num_iterations`` optimizer updates on this batch of rows.

        ``batch``: this process's rows (dataset items, or raw row dicts in a dataset format).
        Returns this step's metrics (averaged over ranks): see :meth:`train` for the names.
        """
        cfg, G = self.config, self.G
        t0 = time.perf_counter()
        if not batch:
            raise ValueError("empty batch")
        rows = self._prepare(batch)
        # 1. rollout
        if "response_ids" in rows[0]:
            rollout = self._offline_rollout(rows)
        else:
            rollout = self.generate_responses([r["prompt_ids"] for r in rows], G, return_logprobs=False)
        # 2. rewards
        per_fn: Dict[str, torch.Tensor] = {}
        if "rewards" in rows[0]:
            rewards = torch.tensor([x for r in rows for x in r["rewards"]], dtype=torch.float32)
        else:
            cols = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k not in _INTERNAL_KEYS}
            prompts = [r["prompt"] for r in rows for _ in range(G)]
            rewards, per_fn = self.compute_rewards(prompts, rollout.responses, **cols)
        rewards = rewards.to(self.device)
        # 3. old / reference log-probs
        self.model.train()
        old_lp = self._policy_logprobs(self.unwrapped, rollout) if cfg.num_iterations > 1 else None
        ref_lp = self._policy_logprobs(self.ref_model, rollout) if self.ref_model is not None else None
        # 4. updates
        nb = len(rows) // cfg.gradient_accumulation_steps if len(rows) % cfg.gradient_accumulation_steps == 0 else None
        if nb is None:
            raise ValueError(f"batch of {len(rows)} prompts is not divisible by gradient_accumulation_steps="
                             f"{cfg.gradient_accumulation_steps}")
        batch_terms = self._global_batch_terms(rollout, rewards)
        acc: Dict[str, float] = {}
        count = 0
        grad_norm = 0.0
        for _ in range(cfg.num_iterations):
            for k in range(cfg.gradient_accumulation_steps):
                sl = slice(k * nb * G, (k + 1) * nb * G)
                last = k == cfg.gradient_accumulation_steps - 1
                sync = contextlib.nullcontext() if (last or self.world_size == 1) else self.model.no_sync()
                with sync:
                    # loss_scale = 1/k inside the loss: the fused one-pass gradient needs no rescaling pass
                    loss, m = self._loss(rollout, sl, rewards, old_lp, ref_lp, batch_terms)
                    loss.backward()
                acc["loss"] = acc.get("loss", 0.0) + loss.item() * cfg.gradient_accumulation_steps
                for key, v in m.items():
                    acc[key] = acc.get(key, 0.0) + float(v)
                count += 1
            if cfg.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.unwrapped.parameters(), cfg.max_grad_norm))
            else:
                grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.unwrapped.parameters()
                                                 if p.grad is not None)))
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        step_time = time.perf_counter() - t0
        n_tok = float(rollout.completion_mask.sum())
        group_std = rewards.view(-1, G).std(1, unbiased=True) if G > 1 else torch.zeros(len(rows))
        metrics = {
            "reward": float(rewards.mean()),
            "reward_std": float(group_std.mean()),
            "frac_reward_zero_std": float((group_std < 1e-6).float().mean()),
        }
        for name, t in per_fn.items():
            metrics[f"rewards/{name}"] = float(t.mean())
        metrics["kl"] = acc.get("kl", 0.0) / count
        metrics["clip_ratio"] = acc.get("clip_ratio/region_mean", 0.0) / count
        metrics["entropy"] = acc.get("entropy", 0.0) / count
        metrics["completions/mean_length"] = n_tok / len(rollout.responses)
        metrics["loss"] = acc["loss"] / count
        metrics["grad_norm"] = grad_norm
        metrics["learning_rate"] = lr
        metrics = self._reduce_metrics(metrics)
        metrics["step_time"] = step_time
        metrics["tokens_per_sec"] = n_tok * self.world_size / max(step_time, 1e-9)
        return metrics

    def _reduce_metrics(self, metrics: Dict[str, float]) -> Dict[str, float]:
        if self.world_size == 1 or not dist.is_initialized():
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        t /= self.world_size
        return dict(zip(keys, t.tolist()))

    # ------------------------------------------------------------------ loop
    def train(self) -> List[Dict[str, float]]:
        """Run ``config.max_steps`` steps (from a checkpoint if ``resume_from_checkpoint``); returns the metric rows.

        Writes ``output_dir/metrics.jsonl`` (one row per step: ``step``, ``reward``, ``reward_std``,
        ``frac_reward_zero_std``, ``rewards/<fn>``, ``kl``, ``clip_ratio``, ``entropy``, ``completions/mean_length``,
        ``loss``, ``grad_norm``, ``learning_rate``, ``step_time`` (s), ``tokens_per_sec`` (completion tokens / s),
        ``elapsed`` (s)), ``checkpoint-<step>/`` every ``save_steps``, the final model and ``reward_curve.png``.
        """
        cfg = self.config
        os.makedirs(cfg.output_dir, exist_ok=True) if self.is_main else None
        if cfg.resume_from_checkpoint:
            self.load_checkpoint(cfg.resume_from_checkpoint)
        mpath = os.path.join(cfg.output_dir, "metrics.jsonl")
        if self.is_main:
            kept = [json.dumps(r) for r in self.history]
            with open(mpath, "w", encoding="utf-8") as f:
                f.write("".join(k + "\n" for k in kept))
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="GRPO", dynamic_ncols=True,
                   disable=not (cfg.progress_bar and self.is_main))
        elapsed0 = self.history[-1]["elapsed"] if self.history else 0.0
        t_start = time.perf_counter()
        while self.step < cfg.max_steps:
            metrics = self.training_step(self.get_batch(self.step))
            self.step += 1
            row = {"step": self.step, **metrics, "elapsed": elapsed0 + time.perf_counter() - t_start}
            self.history.append(row)
            if self.is_main:
                with open(mpath, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                    bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.4f}", refresh=False)
                bar.update(1)
            self._check_target(row)
            if cfg.save_steps and self.step % cfg.save_steps == 0:
                self.save_checkpoint()
            if self.target_reached and cfg.stop_at_target:
                break
        bar.close()
        if cfg.save_final:
            self.save_model(os.path.join(cfg.output_dir, "final"))
        if self.is_main and cfg.plot and self.history:
            self.plot_path = plot_rewards(self.history, os.path.join(cfg.output_dir, "reward_curve.png"))
        return self.history

    def _check_target(self, row):
        target = self.config.target_reward
        if target is None or self.target_reached or len(self.history) < 10:
            return
        avg = sum(r["reward"] for r in self.history[-10:]) / 10
        if avg >= target:
            self.target_reached = {"step": row["step"], "elapsed": row["elapsed"], "reward_avg10": avg}
            if self.is_main:
                from tqdm.auto import tqdm

                tqdm.write(f"reached mean reward {avg:.3f} >= {target} (last 10 steps) at step {row['step']} "
                           f"after {row['elapsed']:.1f} s")

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, path: str):
        if self.is_main:
            os.makedirs(path, exist_ok=True)
            self.unwrapped.save_pretrained(path, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(path)
        if self.world_size > 1:
            dist.barrier()

    def save_checkpoint(self, path: Optional[str] = None) -> str:
        """``output_dir/checkpoint-<step>``: model (safetensors) + tokenizer + optimizer/scheduler/step/history on
        rank 0, and every rank's RNG state."""
        path = path or os.path.join(self.config.output_dir, f"checkpoint-{self.step}")
        self.save_model(path)
        if self.is_main:
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "history": self.history,
                        "target_reached": self.target_reached, "config": self.config.to_dict(),
                        "world_size": self.world_size}, os.path.join(path, _STATE_FILE))
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        try:
            import numpy as np

            rng["numpy"] = np.random.get_state()
        except ImportError:  # pragma: no cover
            pass
        torch.save(rng, os.path.join(path, f"rng_state_{self.rank}.pt"))
        if self.world_size > 1:
            dist.barrier()
        return path

    def latest_checkpoint(self) -> Optional[str]:
        found = []
        for d in glob.glob(os.path.join(self.config.output_dir, "checkpoint-*")):
            m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d))
            if m and os.path.isfile(os.path.join(d, _STATE_FILE)):
                found.append((int(m.group(1)), d))
        return max(found)[1] if found else None

    def load_checkpoint(self, path: str):
        """Restore model weights, optimizer, scheduler, step, metric history and RNG from ``path`` ("latest" = the
        newest ``checkpoint-*`` in ``output_dir``)."""
        if path == "latest":
            p = self.latest_checkpoint()
            if p is None:
                raise ValueError(f"resume_from_checkpoint='latest' but {self.config.output_dir!r} has no checkpoint")
            path = p
        state_file = os.path.join(path, _STATE_FILE)
        if not os.path.isfile(state_file):
            raise ValueError(f"resume_from_checkpoint: {path!r} is not a checkpoint (no {_STATE_FILE})")
        from safetensors.torch import load_file

        sd = load_file(os.path.join(path, "model.safetensors"), device=str(self.device))
        missing, unexpected = self.unwrapped.load_state_dict(sd, strict=False)
        tied = set(getattr(self.unwrapped, "_tied_weights_keys", None) or [])
        if unexpected or [k for k in missing if k not in tied]:
            raise ValueError(f"checkpoint {path!r} does not match the model: missing={missing}, unexpected={unexpected}")
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state.get("world_size", 1) != self.world_size:
            raise ValueError(f"checkpoint was written with world_size={state.get('world_size')} but this run has "
                             f"{self.world_size}; the data order would differ")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.target_reached = state.get("target_reached")
        rng_file = os.path.join(path, f"rng_state_{self.rank}.pt")
        rng = torch.load(rng_file, map_location="cpu", weights_only=False)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "numpy" in rng:
            import numpy as np

            np.random.set_state(rng["numpy"])
        return path

    # ------------------------------------------------------------------ summary
    def summary(self) -> Dict[str, Any]:
        h = self.history
        if not h:
            return {}
        k = min(10, len(h))
        return {"steps": h[-1]["step"], "elapsed_s": h[-1]["elapsed"],
                "reward_first10": sum(r["reward"] for r in h[:k]) / k,
                "reward_last10": sum(r["reward"] for r in h[-k:]) / k,
                "reward_best": max(r["reward"] for r in h), "target_reached": self.target_reached,
                "output_dir": os.path.abspath(self.config.output_dir),
                "plot": os.path.abspath(getattr(self, "plot_path", "") or "") if getattr(self, "plot_path", None) else None}


def plot_rewards(history: List[Dict[str, float]], path: str) -> str:
    """Reward (and its 10-step moving average) per step to ``path`` (PNG, matplotlib Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    rew = [r["reward"] for r in history]
    avg = [sum(rew[max(0, i - 9):i + 1]) / len(rew[max(0, i - 9):i + 1]) for i in range(len(rew))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, rew, color="#9ab", lw=1, label="reward (batch mean)")
    ax.plot(steps, avg, color="#c33", lw=2, label="10-step moving average")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(min(0.0, min(rew)) - 0.02, max(1.0, max(rew)) + 0.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("GRPO reward")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
