"""``GRPOTrainer``: the lean GRPO loop -- rollout, reward, fused loss, optimizer step, log, checkpoint.

One :meth:`GRPOTrainer.training_step` does, for this process's share of the step's prompts::

    _rollout               G sampled responses per prompt (HF ``generate``), or the rows' own responses
    _score                 rule rewards / reward model, weighted (or the rows' own rewards)
    _old_and_ref_logprobs  [old log-probs if num_iterations > 1]  [reference log-probs if kl_coef > 0]
    _update                num_iterations times:
                             _micro_step per micro-batch of prompts:
                                 loss = grpo_loss(..., loss_scale=1/accumulation); loss.backward()
                             _optimizer_step: clip gradients; AdamW step; LR scheduler step
    _step_metrics          the step's metrics, averaged over ranks

The loss is :func:`grpo_kernels.grpo_loss` on the completion logits (``logits[:, t]`` of the full sequence
predicts token ``t+1``; only completion tokens up to and including the first ``<eos>`` count), or
:func:`grpo_kernels.fused_linear_grpo_loss` on the last hidden states and the LM-head weight when
``config.fused_linear`` is on. Under ``torchrun`` every rank takes a contiguous slice of the step's global batch,
gradients are averaged by DDP (or, with ``config.fsdp``, reduce-scattered by FSDP2, which shards the parameters,
gradients and optimizer state: :mod:`.fsdp`), and rank 0 logs and saves; dapo's token normalizer and batch-scaled
advantages are taken over the global batch, so DDP, FSDP and gradient accumulation take the step one process with
the whole batch would.

The pieces: generation and log-probs in :mod:`.rollout`, the loss keywords and paths in :mod:`.objective`,
checkpoints in :mod:`.checkpoint`, the reward curve in :mod:`.plotting`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .checkpoint import TMP_PREFIX, CheckpointMixin
from .config import GRPOConfig
from .data import GRPODataset
from .fsdp import grad_norm as sharded_grad_norm, norm_value
from .objective import ObjectiveMixin
from .outdir import OutputDirMixin
from .plotting import plot_rewards
from .rewards import CombinedReward, RewardModel
from .rollout import Rollout, RolloutMixin

_INTERNAL_KEYS = ("prompt", "prompt_ids", "responses", "response_ids", "rewards")


def _lr_lambda(kind: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier of optimizer update ``i``: linear warm-up, then constant / linear / cosine decay to
    ``min_ratio`` at update ``total``."""
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


class GRPOTrainer(RolloutMixin, ObjectiveMixin, CheckpointMixin, OutputDirMixin):
    """Lean GRPO trainer for Hugging Face causal LMs.

    ``max_score_values`` (class attribute, 2**27): above this many ``S·C·V`` values, ``generate_responses``
    computes log-probs by a chunked forward pass instead of keeping the sampling logits.

    Args:
        model: a ``transformers`` causal LM (``generate``, ``logits_to_keep``), on any device.
        train_dataset: a :class:`GRPODataset`, a JSONL path or a list of row dicts (see ``trainer/data.py``).
        config: :class:`GRPOConfig` (default: ``GRPOConfig()``).
        reward_funcs: names from :mod:`grpo_kernels.trainer.rewards` and/or callables (default:
            ``config.reward_funcs``); ``config.reward_model_path`` adds a local reward model.
        tokenizer: needed to generate and decode (default: the dataset's).
        ref_model: the frozen reference for the KL term (default: a copy of ``model`` at start when kl_coef > 0).
        reward_weights: weights of ``reward_funcs`` (default 1.0 each; ``config.reward_weights`` goes with
            ``config.reward_funcs``).
    """

    def __init__(self, model, train_dataset, config: Optional[GRPOConfig] = None,
                 reward_funcs: Optional[Sequence] = None, tokenizer=None, ref_model=None,
                 reward_weights: Optional[Sequence[float]] = None):
        self.config = (config or GRPOConfig()).validate()
        self.G = self.config.num_generations
        self._setup_distributed()
        self._setup_device()
        self._setup_dataset(train_dataset, tokenizer, model)
        self._setup_rewards(reward_funcs, reward_weights)
        self._seed_everything(self.config.seed + self.rank)
        self._setup_models(model, ref_model)
        self._setup_optimizer()
        self._setup_loss()
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self.target_reached: Optional[Dict[str, float]] = None
        self.plot_path: Optional[str] = None

    # ------------------------------------------------------------------ setup
    def _setup_distributed(self):
        """``world_size``, ``rank``, ``local_rank`` from the torchrun environment; joins the process group."""
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

    def _setup_device(self):
        """``device`` from ``config.device`` ("auto": this rank's GPU if there is one; "cuda": this rank's GPU)."""
        cfg = self.config
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", self.local_rank)
        if cfg.bf16 and self.device.type != "cuda" and self.is_main:
            print("note: bf16 autocast is GPU-only; training in fp32 on", self.device)

    def _setup_dataset(self, train_dataset, tokenizer, model):
        """``tokenizer``, ``train_dataset`` (built from a path/list when needed), ``eos_id`` and ``pad_id``."""
        cfg = self.config
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

    def _setup_rewards(self, reward_funcs, reward_weights):
        """``reward``: the weighted :class:`CombinedReward` (None when the dataset carries its own rewards)."""
        cfg = self.config
        self.reward = None
        if self.train_dataset.kind == "offline_rewards":
            return
        funcs = list(reward_funcs) if reward_funcs is not None else list(cfg.reward_funcs)
        weights = reward_weights if reward_funcs is not None else cfg.reward_weights
        if cfg.reward_model_path:
            rm = RewardModel(cfg.reward_model_path, device=self.device, use_chat_template=cfg.use_chat_template)
            funcs.append(rm)
            weights = (list(weights) if weights is not None else [1.0] * (len(funcs) - 1)) + [cfg.reward_model_weight]
        self.reward = CombinedReward(funcs, weights)

    def _setup_models(self, model, ref_model):
        """``unwrapped`` (the policy on ``device``), ``ref_model`` (frozen, when kl_coef > 0) and ``model``
        (``unwrapped``, DDP-wrapped under torchrun). With ``config.fsdp`` under torchrun (``self.fsdp``) the policy
        and the reference model are sharded in place instead (FSDP2, :mod:`.fsdp`) and ``model`` is ``unwrapped``;
        ``config.fsdp`` in a single process trains unsharded, with a note."""
        cfg = self.config
        self.fsdp = bool(cfg.fsdp) and self.world_size > 1
        if cfg.fsdp and not self.fsdp and self.is_main:
            print("note: fsdp: a single process has nothing to shard; training unsharded (launch with "
                  "torchrun --nproc_per_node N, N > 1, to shard)", flush=True)
        self.unwrapped = model.to(self.device)
        if cfg.gradient_checkpointing:
            enable = getattr(self.unwrapped, "activation_checkpointing_enable", None)  # transformers >= 5 name
            (enable or self.unwrapped.gradient_checkpointing_enable)()
            self.unwrapped.config.use_cache = False
        if self.fsdp:  # DDP broadcasts rank 0's weights when it wraps the model; fully_shard does not
            from . import fsdp

            fsdp.broadcast_from_rank0(self.unwrapped)
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = (ref_model if ref_model is not None else copy.deepcopy(self.unwrapped)).to(self.device).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
            if self.fsdp and ref_model is not None:
                fsdp.broadcast_from_rank0(self.ref_model)
        self.model = self.unwrapped
        if self.fsdp:  # sharded per decoder layer, then the root; the optimizer is built over the shards
            fsdp.shard(self.unwrapped, self.device)
            if self.ref_model is not None:
                fsdp.shard(self.ref_model, self.device, frozen=True)
        elif self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.unwrapped, device_ids=ids)

    def _setup_optimizer(self):
        """AdamW over the trainable parameters and its per-update LR schedule (``max_steps * num_iterations``)."""
        cfg = self.config
        params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        total_updates = cfg.max_steps * cfg.num_iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total_updates, cfg.min_lr_ratio))

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

    def _prepare(self, batch) -> List[Dict[str, Any]]:
        """Dataset rows as they are; raw row dicts (``{"prompt": ...}``) are tokenized like the dataset does."""
        return [r if "prompt_ids" in r else self.train_dataset.encode_row(r) for r in batch]

    # ------------------------------------------------------------------ rewards
    def compute_rewards(self, prompts: Sequence[str], responses: Sequence[str], **columns):
        """Rewards for ``responses`` (``prompts`` aligned with them): ``(rewards (N,) fp32, {name: (N,)})``."""
        if self.reward is None:
            raise ValueError("no reward functions configured (the dataset carries its own rewards)")
        return self.reward(prompts, responses, **columns)

    # ------------------------------------------------------------------ one step
    def training_step(self, batch: List[Dict[str, Any]]) -> Dict[str, float]:
        """Generate → reward → (old/ref log-probs) → ``num_iterations`` optimizer updates on this batch of rows.

        ``batch``: this process's rows (dataset items, or raw row dicts in a dataset format).
        Returns this step's metrics (averaged over ranks): see :meth:`train` for the names.
        """
        t0 = time.perf_counter()
        if not batch:
            raise ValueError("empty batch")
        rows = self._prepare(batch)
        rollout = self._rollout(rows)
        rewards, per_fn = self._score(rows, rollout)
        old_lp, ref_lp = self._old_and_ref_logprobs(rollout)
        update = self._update(rollout, rewards, old_lp, ref_lp)
        return self._step_metrics(rollout, rewards, per_fn, update, step_time=time.perf_counter() - t0)

    def _rollout(self, rows: List[Dict[str, Any]]) -> Rollout:
        """The rows' own responses when they carry them, else ``G`` sampled responses per prompt (no log-probs:
        the old log-probs, when needed, come from :meth:`_old_and_ref_logprobs`)."""
        if "response_ids" in rows[0]:
            return self._offline_rollout(rows)
        return self.generate_responses([r["prompt_ids"] for r in rows], self.G, return_logprobs=False)

    def _score(self, rows: List[Dict[str, Any]], rollout: Rollout) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(rewards (S,) fp32 on device, {reward fn name: (S,)})``: the rows' own rewards when they carry them
        (no per-function terms), else the reward functions on the rollout's responses and the rows' columns."""
        if "rewards" in rows[0]:
            rewards = torch.tensor([x for r in rows for x in r["rewards"]], dtype=torch.float32)
            per_fn: Dict[str, torch.Tensor] = {}
        else:
            G = self.G
            cols = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k not in _INTERNAL_KEYS}
            prompts = [r["prompt"] for r in rows for _ in range(G)]
            rewards, per_fn = self.compute_rewards(prompts, rollout.responses, **cols)
        return rewards.to(self.device), per_fn

    def _old_and_ref_logprobs(self, rollout: Rollout) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(old, ref)`` ``(S, C)`` log-probs held fixed over the updates: the policy's before the first update
        (only when ``num_iterations > 1``; else None: the loss uses the detached current ones) and the frozen
        reference model's (only when ``kl_coef > 0``)."""
        old_lp = self._policy_logprobs(self.unwrapped, rollout) if self.config.num_iterations > 1 else None
        ref_lp = self._policy_logprobs(self.ref_model, rollout) if self.ref_model is not None else None
        return old_lp, ref_lp

    def _update(self, rollout: Rollout, rewards: torch.Tensor, old_lp, ref_lp) -> Dict[str, float]:
        """``num_iterations`` optimizer updates, each accumulating gradients over the micro-batches of prompts.

        Returns the loss and loss metrics averaged over every micro-step, and the last update's ``grad_norm``
        and ``learning_rate``.
        """
        cfg = self.config
        ga = cfg.gradient_accumulation_steps
        num_prompts = rollout.completion_ids.shape[0] // self.G
        if num_prompts % ga:
            raise ValueError(f"batch of {num_prompts} prompts is not divisible by gradient_accumulation_steps={ga}")
        rows = num_prompts // ga * self.G
        micro_batches = [slice(k * rows, (k + 1) * rows) for k in range(ga)]
        batch_terms = self._global_batch_terms(rollout, rewards)
        self.model.train()
        totals: Dict[str, float] = {}
        count = 0
        for _ in range(cfg.num_iterations):
            for k, sl in enumerate(micro_batches):
                m = self._micro_step(rollout, sl, rewards, old_lp, ref_lp, batch_terms, sync=k == ga - 1)
                for key, v in m.items():
                    totals[key] = totals.get(key, 0.0) + v
                count += 1
            grad_norm, lr = self._optimizer_step()
            self._entropy_controller_step()
        out = {key: v / count for key, v in totals.items()}
        out.update(grad_norm=grad_norm, learning_rate=lr)
        return out

    def _micro_step(self, rollout: Rollout, sl: slice, rewards, old_lp, ref_lp, batch_terms,
                    sync: bool) -> Dict[str, float]:
        """Forward + backward on rows ``sl``; DDP all-reduces the gradients only when ``sync`` (the last
        micro-batch of an update). Returns ``loss`` (unscaled by the accumulation) and the loss metrics."""
        # DDP all-reduces only on the last micro-batch; FSDP reduce-scatters every one (the sum stays sharded)
        no_sync = not sync and self.world_size > 1 and not self.fsdp
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            # loss_scale = 1/k inside the loss: the fused one-pass gradient needs no rescaling pass
            loss, metrics = self._loss(rollout, sl, rewards, old_lp, ref_lp, batch_terms)
            loss.backward()
        out = {"loss": loss.item() * self.config.gradient_accumulation_steps}
        out.update({key: float(v) for key, v in metrics.items()})
        return out

    def _optimizer_step(self) -> Tuple[float, float]:
        """Clip (or just measure) the gradient norm, AdamW step, LR scheduler step, zero the gradients.
        Returns ``(grad_norm before clipping, learning rate used)``."""
        cfg = self.config
        params = [p for p in self.unwrapped.parameters() if p.grad is not None]
        if cfg.max_grad_norm:  # under FSDP (DTensor gradients) the global norm, as a replicated DTensor
            grad_norm = norm_value(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        elif self.fsdp:
            grad_norm = sharded_grad_norm(params)
        else:
            grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params)))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def _step_metrics(self, rollout: Rollout, rewards: torch.Tensor, per_fn: Dict[str, torch.Tensor],
                      update: Dict[str, float], step_time: float) -> Dict[str, float]:
        """The metric row of one step (see :meth:`train`), averaged over ranks; ``step_time`` and
        ``tokens_per_sec`` are this rank's."""
        G = self.G
        n_tok = float(rollout.completion_mask.sum())
        group_std = rewards.view(-1, G).std(1, unbiased=True) if G > 1 else torch.zeros(rewards.numel() // G)
        metrics = {
            "reward": float(rewards.mean()),
            "reward_std": float(group_std.mean()),
            "frac_reward_zero_std": float((group_std < 1e-6).float().mean()),
        }
        for name, t in per_fn.items():
            metrics[f"rewards/{name}"] = float(t.mean())
        metrics["kl"] = update.get("kl", 0.0)
        metrics["clip_ratio"] = update.get("clip_ratio/region_mean", 0.0)
        metrics["entropy"] = update.get("entropy", 0.0)
        if self.config.entropy_coef != 0 or self.adaptive_entropy is not None:  # TRL's entropy_coef metric
            metrics["entropy_coef"] = self._entropy_coef_metric()
        metrics["completions/mean_length"] = n_tok / len(rollout.responses)
        metrics["loss"] = update["loss"]
        metrics["grad_norm"] = update["grad_norm"]
        metrics["learning_rate"] = update["learning_rate"]
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

        Writes ``output_dir/config.json``, ``output_dir/metrics.jsonl`` (one row per step: ``step``, ``reward``,
        ``reward_std``, ``frac_reward_zero_std``, ``rewards/<fn>``, ``kl``, ``clip_ratio``, ``entropy``,
        ``completions/mean_length``, ``loss``, ``grad_norm``, ``learning_rate``, ``step_time`` (s),
        ``tokens_per_sec`` (completion tokens / s), ``elapsed`` (s)), ``checkpoint-<step>/`` every ``save_steps``
        (atomically, see :mod:`.checkpoint`), the final model and ``reward_curve.png``.

        The output directory is guarded (rank 0, for the whole call): ``output_dir/.lock`` names this process,
        and another live run's lock is an error; a directory that holds another run's files (metrics,
        checkpoints, ``final/``) is refused unless ``resume_from_checkpoint`` is set (continue it) or
        ``overwrite_output_dir`` (its files are removed first).
        """
        lock = self._guard_output_dir()
        try:
            return self._train_loop()
        finally:
            if lock is not None:
                lock.release()

    def _train_loop(self) -> List[Dict[str, float]]:
        cfg = self.config
        if cfg.resume_from_checkpoint:
            path = self.load_checkpoint(cfg.resume_from_checkpoint)
            if self.is_main:
                print(f"resumed from {path} at step {self.step}", flush=True)
        mpath = os.path.join(cfg.output_dir, "metrics.jsonl")
        if self.is_main:
            cfg.save(os.path.join(cfg.output_dir, "config.json"))
            # the rows kept from a resumed checkpoint (replacing the file in one rename), then one row per new step
            tmp = os.path.join(cfg.output_dir, TMP_PREFIX + "metrics.jsonl")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.history))
            os.replace(tmp, mpath)
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
            self._save_model_atomic(os.path.join(cfg.output_dir, "final"))
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

    # ------------------------------------------------------------------ summary
    def summary(self) -> Dict[str, Any]:
        """Steps, elapsed seconds, first/last-10-step and best mean reward, ``target_reached``, the output
        directory and the reward curve's path (None if not plotted); ``{}`` before the first step."""
        h = self.history
        if not h:
            return {}
        k = min(10, len(h))
        return {"steps": h[-1]["step"], "elapsed_s": h[-1]["elapsed"],
                "reward_first10": sum(r["reward"] for r in h[:k]) / k,
                "reward_last10": sum(r["reward"] for r in h[-k:]) / k,
                "reward_best": max(r["reward"] for r in h), "target_reached": self.target_reached,
                "output_dir": os.path.abspath(self.config.output_dir),
                "plot": os.path.abspath(self.plot_path) if self.plot_path else None}
