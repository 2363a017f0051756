"""``GRPOConfig``: every knob of the lean trainer in one dataclass, loadable from YAML/JSON.

Values are resolved in this order (later wins): dataclass defaults, the config file
(:meth:`GRPOConfig.from_file`), explicit overrides (:meth:`GRPOConfig.replace`, the CLI flags).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..options import LossOptions

_SCHEDULERS = ("cosine", "constant", "linear")


@dataclass
class GRPOConfig:
    """Hyper-parameters of :class:`~grpo_kernels.trainer.GRPOTrainer`.

    A "step" is one :meth:`GRPOTrainer.training_step`: ``per_device_batch_size`` prompts per process are
    sampled ``num_generations`` times each, scored, and used for ``num_iterations`` optimizer updates
    (each update accumulates gradients over ``gradient_accumulation_steps`` micro-batches of prompts).
    """

    # --- run ---
    output_dir: str = "grpo_output"
    seed: int = 0
    max_steps: int = 100
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    shuffle: bool = True

    # --- batch and sampling ---
    per_device_batch_size: int = 8  # prompts per step per process
    num_generations: int = 8  # G, responses per prompt (the group size)
    gradient_accumulation_steps: int = 1  # micro-batches of prompts per optimizer update
    num_iterations: int = 1  # mu, optimizer updates per generated batch (old log-probs kept fixed)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    # --- data ---
    max_length: int = 2048  # prompt + response tokens, longer rows are truncated
    use_chat_template: bool = True  # only when the tokenizer has one
    skip_invalid_rows: bool = False  # skip malformed JSONL rows (a count is reported) instead of raising

    # --- loss: the fields of grpo_kernels.LossOptions, same names and defaults (docs/design.md §3-4) ---
    loss_type: str = "softmax"
    beta: Optional[float] = None  # softmax group-weight temperature (softmax only; None = 0.1). TRL's beta is kl_coef
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    scale_rewards: str = "group"
    importance_sampling_level: str = "token"
    kl_coef: float = 0.0  # > 0 keeps a frozen reference model and adds the k3 KL (TRL's beta)
    max_completion_length: Optional[int] = None  # dr_grpo normalizer (the trainer uses max_new_tokens when None)
    backend: str = "auto"
    fused_linear: bool = False  # loss from hidden states + lm_head weight (grpo_kernels.fused_linear_grpo_loss)

    # --- rewards ---
    reward_funcs: List[str] = field(default_factory=lambda: ["exact_answer"])
    reward_weights: Optional[List[float]] = None
    reward_model_path: Optional[str] = None  # local AutoModelForSequenceClassification checkpoint
    reward_model_weight: float = 1.0

    # --- optimizer ---
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0  # optimizer updates of linear warm-up
    lr_scheduler: str = "cosine"
    min_lr_ratio: float = 0.0  # cosine/linear decay down to learning_rate * min_lr_ratio
    max_grad_norm: Optional[float] = 1.0  # None or 0 = no clipping

    # --- precision / memory ---
    bf16: bool = False  # bf16 autocast, GPU only (ignored with a note on CPU)
    gradient_checkpointing: bool = False

    # --- logging / checkpoints ---
    logging_steps: int = 1  # progress bar refresh; metrics.jsonl gets every step
    save_steps: int = 0  # checkpoint every N steps (0 = only the final model)
    save_final: bool = True
    plot: bool = True
    progress_bar: bool = True
    target_reward: Optional[float] = None  # report when the 10-step mean reward first reaches it
    stop_at_target: bool = False  # ... and stop there
    resume_from_checkpoint: Optional[str] = None  # a checkpoint dir, or "latest" (newest in output_dir)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> "GRPOConfig":
        def pos_int(name, allow_zero=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise ValueError(f"{name} must be an integer >= {0 if allow_zero else 1}, got {v!r}")

        for n in ("max_steps", "per_device_batch_size", "num_generations", "gradient_accumulation_steps",
                  "num_iterations", "max_new_tokens", "max_length", "logging_steps"):
            pos_int(n)
        for n in ("warmup_steps", "save_steps", "top_k"):
            pos_int(n, allow_zero=True)
        self.loss_options()  # every loss field, checked by LossOptions.validate (the one definition)
        if self.lr_scheduler not in _SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.per_device_batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"per_device_batch_size ({self.per_device_batch_size}) must be divisible by "
                             f"gradient_accumulation_steps ({self.gradient_accumulation_steps})")
        if not (self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (self.learning_rate >= 0):
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate!r}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef!r}")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [s for s in self.reward_funcs.split(",") if s]
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has "
                             f"{len(self.reward_funcs)} (the reward model has its own reward_model_weight)")
        return self

    def loss_options(self) -> LossOptions:
        """The :class:`~grpo_kernels.options.LossOptions` of this config (validated): its fields of the same
        names. ``temperature`` is the sampling temperature, which the loss divides the logits by too."""
        return LossOptions(**{k: getattr(self, k) for k in LossOptions.names()}).validate()

    # ------------------------------------------------------------------ io
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GRPOConfig":
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown GRPOConfig keys: {unknown}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str, **overrides) -> "GRPOConfig":
        """Load a ``.yaml``/``.yml`` or ``.json`` file (a flat mapping of field names), then apply ``overrides``."""
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of GRPOConfig fields, got {type(d).__name__}")
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d)

    def replace(self, **overrides) -> "GRPOConfig":
        """A copy with the non-None ``overrides`` applied (validated)."""
        d = self.to_dict()
        d.update({k: v for k, v in overrides.items() if v is not None})
        return type(self).from_dict(d)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
