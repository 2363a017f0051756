"""``GRPOConfig``: every knob of the lean trainer in one dataclass, loadable from YAML/JSON.

Values are resolved in this order (later wins): dataclass defaults, the config file
(:meth:`GRPOConfig.from_file`), explicit overrides (:meth:`GRPOConfig.replace`, the CLI flags).

Every field is checked and coerced by its declared type (:meth:`GRPOConfig.field_type`) whatever the source:
``"1e-3"`` (YAML reads ``1e-3`` without a dot as a string) becomes ``0.001`` for a float field, ``"false"`` /
``"no"`` / ``"0"`` become ``False`` for a bool field, an integral ``1000.0`` becomes ``1000`` for an int field;
anything else of the wrong type is a ``ValueError`` naming the key (and the config file it came from).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional

from ..options import LossOptions

_SCHEDULERS = ("cosine", "constant", "linear")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class FieldType(NamedTuple):
    """The declared type of a :class:`GRPOConfig` field: ``base`` (bool, int, float or str), ``is_list``
    (a list of ``base``) and ``optional`` (None allowed)."""

    base: type
    is_list: bool
    optional: bool


def _type_name(ft: FieldType) -> str:
    names = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}
    what = f"a list of {names[ft.base].split(' ', 1)[1]}s" if ft.is_list else names[ft.base]
    return what + (" or null" if ft.optional else "")


def _coerce_scalar(base: type, v):
    """``v`` as ``base``, or raise ``TypeError`` (the caller words the error)."""
    if base is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
            return v.strip().lower() in _TRUE
        raise TypeError
    if base is str:
        if isinstance(v, str):
            return v
        raise TypeError
    if isinstance(v, bool):  # True is an int to Python, never a number here
        raise TypeError
    if isinstance(v, str):
        t = v.strip()
        try:
            v = int(t) if base is int else float(t)
        except ValueError:
            try:
                v = float(t)  # "1e3" for an int field
            except ValueError:
                raise TypeError from None
    if base is float:
        if isinstance(v, numbers.Real):
            return float(v)
        raise TypeError
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real) and math.isfinite(v) and v == int(v):
        return int(v)
    raise TypeError

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
    use_bias_correction_kl: bool = True  # KL times the importance ratio (TRL's default), clipped loss types
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_coef: float = 0.0  # entropy bonus (the initial value under use_adaptive_entropy)
    top_entropy_quantile: float = 1.0  # policy loss on the top fraction of tokens by entropy
    off_policy_mask_threshold: Optional[float] = None
    # the engine-mismatch correction needs the sampler's log-probs, which this trainer's generate() does not
    # produce (it samples with the policy itself): kept for config parity with TRL, used by the loss call only
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_min: Optional[float] = None
    vllm_importance_sampling_clip_max: Optional[float] = 3.0
    loss_agg_mode: Optional[str] = None  # verl's aggregation instead of the loss type's normalizer
    # --- loss-side trainer features (TRL's names) ---
    mask_truncated_completions: bool = False  # completions that never emit eos get no loss (and no tokens)
    use_adaptive_entropy: bool = False  # entropy_coef adapted each optimizer step (entropy_coef = its start)
    entropy_target: float = 0.2  # the bonus applies while the mean entropy of the acting tokens is <= this
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005  # step of the coefficient per optimizer step
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
    # under torchrun: shard the policy, the reference model, the gradients and AdamW over the ranks (FSDP2, per
    # decoder layer) instead of DDP replicas; checkpoints become sharded. One process trains unsharded.
    fsdp: bool = False

    # --- logging / checkpoints ---
    logging_steps: int = 1  # progress bar refresh; metrics.jsonl gets every step
    save_steps: int = 0  # checkpoint every N steps (0 = only the final model)
    save_final: bool = True
    plot: bool = True
    progress_bar: bool = True
    target_reward: Optional[float] = None  # report when the 10-step mean reward first reaches it
    stop_at_target: bool = False  # ... and stop there
    resume_from_checkpoint: Optional[str] = None  # a checkpoint dir, or "latest" (newest in output_dir)
    # a new run in an output_dir that holds another run's files: remove them (checkpoints, final/, metrics)
    # instead of refusing; see GRPOTrainer.train
    overwrite_output_dir: bool = False

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ types
    @classmethod
    def field_type(cls, name: str) -> FieldType:
        """The declared type of field ``name`` (from its annotation)."""
        hints = _hints(cls)
        if name not in hints:
            raise ValueError(f"unknown GRPOConfig key {name!r}")
        tp, optional = hints[name], False
        if typing.get_origin(tp) is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional, tp = len(args) < len(typing.get_args(tp)), args[0]
        if typing.get_origin(tp) in (list, List):
            return FieldType(typing.get_args(tp)[0], True, optional)
        return FieldType(tp, False, optional)

    @classmethod
    def coerce_field(cls, name: str, value, source: Optional[str] = None):
        """``value`` converted to the declared type of field ``name`` (see the module docstring); a
        ``ValueError`` naming the key (and ``source``, the config file, when given) if it cannot be."""
        ft = cls.field_type(name)
        where = f"config file {source!r}: key {name!r}" if source else f"GRPOConfig field {name!r}"
        if value is None:
            if ft.optional:
                return None
            raise ValueError(f"{where} must be {_type_name(ft)}, got null")
        try:
            if not ft.is_list:
                return _coerce_scalar(ft.base, value)
            if isinstance(value, str) and ft.base is str:
                return [s.strip() for s in value.split(",") if s.strip()]  # "a,b" for a list of names
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_coerce_scalar(ft.base, v) for v in value]
        except TypeError:
            raise ValueError(f"{where} must be {_type_name(ft)}, got {value!r:.80} ({type(value).__name__})") from None

    def _coerce_fields(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, self.coerce_field(f.name, getattr(self, f.name)))

    # ------------------------------------------------------------------ checks
    def validate(self) -> "GRPOConfig":
        self._coerce_fields()
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
        if self.use_adaptive_entropy:
            for n in ("entropy_target", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta"):
                v = getattr(self, n)
                if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                    raise ValueError(f"{n} must be a finite number >= 0, got {v!r}")
            if self.entropy_coef_min > self.entropy_coef_max:
                raise ValueError(f"entropy_coef_min ({self.entropy_coef_min}) must be <= entropy_coef_max "
                                 f"({self.entropy_coef_max})")
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
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ValueError("overwrite_output_dir and resume_from_checkpoint exclude each other: overwriting would "
                             "remove the checkpoints to resume from")
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
    def from_dict(cls, d: Dict[str, Any], source: Optional[str] = None) -> "GRPOConfig":
        """A config from a mapping of field names; ``source`` (a file name) goes into the error messages."""
        unknown = sorted(set(map(str, d)) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown GRPOConfig keys: {unknown}" + (f" in config file {source!r}" if source else ""))
        return cls(**{k: cls.coerce_field(k, v, source) for k, v in d.items()})

    @classmethod
    def read_file(cls, path: str) -> Dict[str, Any]:
        """The raw mapping of a ``.yaml``/``.yml`` or ``.json`` config file (errors name the file)."""
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if path.endswith((".yaml", ".yml")):
            import yaml

            try:
                d = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                what = " ".join(str(getattr(e, "problem", None) or e).split())
                raise ValueError(f"config file {path!r} is not valid YAML: {what}{where}") from None
            d = {} if d is None else d
        else:
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"config file {path!r} is not valid JSON: {e.msg} at line {e.lineno}, "
                                 f"column {e.colno}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of GRPOConfig fields, got {type(d).__name__}")
        return d

    @classmethod
    def from_file(cls, path: str, **overrides) -> "GRPOConfig":
        """Load a ``.yaml``/``.yml`` or ``.json`` file (a flat mapping of field names), then apply ``overrides``.
        A value of the wrong type, or one that fails a check, is an error naming the key and the file."""
        raw = cls.read_file(path)
        unknown = sorted(set(map(str, raw)) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown GRPOConfig keys: {unknown} in config file {path!r}")
        d = {k: cls.coerce_field(k, v, path) for k, v in raw.items()}
        given = {k: v for k, v in overrides.items() if v is not None}
        d.update(given)
        try:
            return cls.from_dict(d)
        except ValueError as e:  # a range check of a value that came from the file: say so
            first = str(e).split(" ", 1)[0]
            if first in set(raw) - set(given):
                raise ValueError(f"config file {path!r}: {e}") from None
            raise

    def replace(self, **overrides) -> "GRPOConfig":
        """A copy with the non-None ``overrides`` applied (validated)."""
        d = self.to_dict()
        d.update({k: v for k, v in overrides.items() if v is not None})
        return type(self).from_dict(d)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        """Write the config as JSON (:meth:`from_file` reads it back)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)


def _hints(cls) -> Dict[str, Any]:
    h = cls.__dict__.get("_type_hints_cache")
    if h is None:
        h = typing.get_type_hints(cls)
        setattr(cls, "_type_hints_cache", h)
    return h
