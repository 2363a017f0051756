"""``LossOptions``: the one place a loss knob is defined (its name, default, meaning and check).

Every entry point builds or holds one: :func:`grpo_kernels.grpo_loss` and
:func:`grpo_kernels.fused_linear_grpo_loss` take the fields as keyword arguments and build it once,
:class:`~grpo_kernels.GRPOLoss` / :class:`~grpo_kernels.FusedLinearGRPOLoss` hold one,
:meth:`GRPOConfig.loss_options() <grpo_kernels.trainer.GRPOConfig.loss_options>` produces one (and so do the
``grpo-kernels train`` flags, one per config field), and the eager math
(:func:`grpo_kernels.reference.loss_from_logprobs`) and the coefficient functions read it. Adding a knob is one
field here plus its math in ``reference.py``: the signatures, the module forms, the config and the CLI follow.

The per-batch tensors (``old_logprobs``, ``ref_logprobs``, ``advantages``, ``num_items_in_batch``), the
gradient-accumulation factor ``loss_scale`` and the execution choices (``backend``, ``return_metrics``,
``inplace_backward``, ``chunk_size``) are arguments of the call, not options. See docs/design.md §3-4 for the
math of every option.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from . import validation as _v

LOSS_TYPES = ("softmax", "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
#: The loss types driven by advantages and importance ratios (every type but the lesson's softmax).
CLIPPED_LOSS_TYPES = tuple(t for t in LOSS_TYPES if t != "softmax")
#: The loss types whose normalizer is ``num_items_in_batch`` when given (TRL's cispo/dapo/vespo).
ITEMS_NORMALIZED_LOSS_TYPES = ("dapo", "cispo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
#: verl's ``loss_agg_mode`` values (docs/design.md §4).
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

#: The softmax-weight temperature ``beta`` when ``loss_type="softmax"`` and none is given (the lesson's 0.1).
DEFAULT_SOFTMAX_BETA = 0.1

BETA_IS_NOT_THE_KL_COEF = ("`beta` is the temperature of the softmax weights of loss_type='softmax'; the KL "
                           "coefficient is `kl_coef` (TRL's `beta`)")


def _opt(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class LossOptions:
    """The knobs of the GRPO loss family (docs/design.md §3-4). Frozen; build with keywords, check with
    :meth:`validate` (the public functions do), change with :meth:`replace`."""

    loss_type: str = _opt("softmax", "``\"softmax\"`` (the lesson's ``−Σ softmax(r/β)·L`` per group; default), "
                                     "``\"grpo\"``, ``\"bnpo\"``, ``\"dr_grpo\"``, ``\"dapo\"`` (the clipped "
                                     "surrogate with different normalizers), ``\"cispo\"``, ``\"sapo\"``, "
                                     "``\"luspo\"`` or ``\"vespo\"`` (docs/design.md §4).")
    beta: Optional[float] = _opt(None, "temperature of the softmax group weights, ``loss_type=\"softmax\"`` only "
                                       "(None = 0.1). Not TRL's ``beta``: the KL coefficient is ``kl_coef``; "
                                       "passing ``beta`` with any other loss type is an error.")
    temperature: float = _opt(1.0, "sampling temperature τ > 0: the logits are divided by it.")
    kl_coef: float = _opt(0.0, "weight of the k3 KL to ``ref_logprobs`` (TRL's ``beta``); 0 = no KL term.")
    epsilon: float = _opt(0.2, "lower clipping range: the ratio is clipped to ``[1 − epsilon, 1 + epsilon_high]``.")
    epsilon_high: Optional[float] = _opt(None, "upper clipping range (None = ``epsilon``; DAPO's clip-higher).")
    delta: Optional[float] = _opt(None, "cap of the unclipped ratio (two-sided clipping); None = no cap.")
    scale_rewards: str = _opt("group", "how advantages are scaled: ``\"group\"`` (by each group's std), "
                                       "``\"batch\"`` (by the std of all rewards) or ``\"none\"`` (Dr. GRPO).")
    importance_sampling_level: str = _opt("token", "``\"token\"`` ratios, or ``\"sequence\"`` (GSPO: one "
                                                   "length-normalized ratio per sequence).")
    max_completion_length: Optional[int] = _opt(None, "the ``dr_grpo`` normalizer ``S · L`` (and verl's "
                                                      "``seq-mean-token-sum-norm``) uses this L (None = T, the "
                                                      "completion dimension).")
    use_bias_correction_kl: bool = _opt(True, "multiply the k3 KL by the importance ratio ρ (DeepSeek-V3.2; TRL's "
                                              "default), clipped loss types only: changes the KL gradient even "
                                              "on-policy.")
    sapo_temperature_pos: float = _opt(1.0, "``sapo``: gate temperature for tokens with advantage > 0.")
    sapo_temperature_neg: float = _opt(1.05, "``sapo``: gate temperature for tokens with advantage ≤ 0.")
    vespo_k_pos: float = _opt(2.0, "``vespo``: power k of the Gamma weight for advantage ≥ 0.")
    vespo_lambda_pos: float = _opt(3.0, "``vespo``: decay λ of the Gamma weight for advantage ≥ 0.")
    vespo_k_neg: float = _opt(3.0, "``vespo``: power k of the Gamma weight for advantage < 0.")
    vespo_lambda_neg: float = _opt(2.0, "``vespo``: decay λ of the Gamma weight for advantage < 0.")
    entropy_coef: float = _opt(0.0, "entropy bonus: the loss gets ``− entropy_coef · (token mean of H)`` over the "
                                    "tokens the policy loss acts on (gradient through the kernels); 0 = off.")
    top_entropy_quantile: float = _opt(1.0, "policy loss only on the top ``ρ`` fraction of tokens by entropy "
                                            "(threshold: the ``1 − ρ`` quantile of the unmasked entropies); 1 = all.")
    off_policy_mask_threshold: Optional[float] = _opt(None, "drop sequences with advantage < 0 whose mean "
                                                            "``sampling − ℓ`` log-prob gap exceeds this (DeepSeek-V3.2 "
                                                            "off-policy masking); None = off.")
    vllm_importance_sampling_correction: bool = _opt(True, "when ``sampling_logprobs`` (the inference engine's) "
                                                           "are given, weight the policy loss by the truncated or "
                                                           "masked ratio ``exp(ℓ_old − ℓ_sampling)``.")
    vllm_importance_sampling_mode: str = _opt("sequence_mask", "``\"token_truncate\"``, ``\"token_mask\"``, "
                                                               "``\"sequence_truncate\"`` or ``\"sequence_mask\"`` "
                                                               "(TRL's default).")
    vllm_importance_sampling_clip_min: Optional[float] = _opt(None, "lower bound C_min of that ratio (None = none).")
    vllm_importance_sampling_clip_max: Optional[float] = _opt(3.0, "upper bound C_max of that ratio (None = none).")
    loss_agg_mode: Optional[str] = _opt(None, "verl's aggregation of the per-token loss, replacing the loss "
                                              "type's normalizer: ``\"token-mean\"``, ``\"seq-mean-token-sum\"``, "
                                              "``\"seq-mean-token-mean\"`` or ``\"seq-mean-token-sum-norm\"``; "
                                              "None = the loss type's own.")

    # ------------------------------------------------------------------ derived values
    @property
    def softmax_beta(self) -> float:
        """The softmax-weight temperature in force (``beta``, or 0.1 when unset)."""
        return DEFAULT_SOFTMAX_BETA if self.beta is None else self.beta

    @property
    def upper_epsilon(self) -> float:
        """``epsilon_high``, or ``epsilon`` when unset."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss value itself depends on the per-token entropy (the bonus or the entropy mask)."""
        return self.entropy_coef != 0 or self.top_entropy_quantile < 1.0

    @property
    def sequence_level_is_correction(self) -> bool:
        """Whether the inference-engine correction uses one ratio per sequence."""
        return self.vllm_importance_sampling_mode.startswith("sequence")

    # ------------------------------------------------------------------ construction
    @staticmethod
    def names():
        """The option names, in definition order."""
        return _NAMES

    @staticmethod
    def defaults() -> Dict[str, Any]:
        return dict(_DEFAULTS)

    @staticmethod
    def from_kwargs(where: str, kwargs: Dict[str, Any]) -> "LossOptions":
        """Options from a keyword dict, with a TypeError naming ``where`` and every unknown keyword.
        (No ``dataclasses.fields`` at call time: ``torch.compile`` traces this.)"""
        for k in kwargs:
            if k not in _DEFAULTS:
                unknown = sorted(set(kwargs) - set(_NAMES))
                raise TypeError(f"{where} got unexpected keyword argument(s): {', '.join(unknown)} "
                                f"(loss options: {', '.join(_NAMES)})")
        return LossOptions(**kwargs)

    def replace(self, **changes) -> "LossOptions":
        return dataclasses.replace(self, **changes)

    def changed(self) -> Dict[str, Any]:
        """The fields that differ from their defaults (for ``repr``s and logs)."""
        return {k: getattr(self, k) for k in _NAMES if not _same(getattr(self, k), _DEFAULTS[k])}

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in _NAMES}

    # ------------------------------------------------------------------ checks
    def validate(self) -> "LossOptions":
        """Raise a ValueError/TypeError naming the first bad option; return ``self``."""
        _v.check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _v.check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _v.check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        if self.beta is not None:
            if self.loss_type != "softmax":
                raise ValueError(f"{BETA_IS_NOT_THE_KL_COEF}; got beta={self.beta!r} with "
                                 f"loss_type={self.loss_type!r}")
            _v.check_positive_number("beta", self.beta)
        _v.check_positive_number("temperature", self.temperature)
        _check_finite("kl_coef", self.kl_coef)
        _v.check_positive_number("epsilon", self.epsilon, allow_zero=True)
        _v.check_positive_number("epsilon_high", self.epsilon_high, allow_zero=True, allow_none=True)
        _v.check_positive_number("delta", self.delta, allow_none=True)
        _v.check_int("max_completion_length", self.max_completion_length, minimum=1, allow_none=True)
        _check_bool("use_bias_correction_kl", self.use_bias_correction_kl)
        _check_bool("vllm_importance_sampling_correction", self.vllm_importance_sampling_correction)
        _v.check_positive_number("sapo_temperature_pos", self.sapo_temperature_pos)
        _v.check_positive_number("sapo_temperature_neg", self.sapo_temperature_neg)
        for side in ("pos", "neg"):
            _v.check_positive_number(f"vespo_k_{side}", getattr(self, f"vespo_k_{side}"), allow_zero=True)
            _v.check_positive_number(f"vespo_lambda_{side}", getattr(self, f"vespo_lambda_{side}"))
        _check_finite("entropy_coef", self.entropy_coef)
        _check_finite("top_entropy_quantile", self.top_entropy_quantile)
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1] (the fraction of tokens, by entropy, that the "
                             f"policy loss keeps; 1 = all), got {self.top_entropy_quantile}")
        _v.check_positive_number("off_policy_mask_threshold", self.off_policy_mask_threshold, allow_zero=True,
                                 allow_none=True)
        _v.check_choice("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, IMPORTANCE_SAMPLING_MODES)
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        _v.check_positive_number("vllm_importance_sampling_clip_min", lo, allow_zero=True, allow_none=True)
        _v.check_positive_number("vllm_importance_sampling_clip_max", hi, allow_zero=True, allow_none=True)
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"vllm_importance_sampling_clip_min ({lo}) must be less than "
                             f"vllm_importance_sampling_clip_max ({hi})")
        if self.vllm_importance_sampling_mode.endswith("truncate") and lo is None and hi is None:
            raise ValueError("vllm_importance_sampling_mode="
                             f"{self.vllm_importance_sampling_mode!r} needs vllm_importance_sampling_clip_min or "
                             "vllm_importance_sampling_clip_max (both are None)")
        if self.loss_agg_mode is not None:
            _v.check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        if self.loss_type == "softmax":
            if self.loss_agg_mode is not None:
                raise ValueError(f"loss_agg_mode={self.loss_agg_mode!r} aggregates the per-token loss of the clipped "
                                 "family; loss_type='softmax' has its own (−Σ w·L per group)")
            if self.off_policy_mask_threshold is not None:
                raise ValueError("off_policy_mask_threshold masks sequences by their advantage; loss_type='softmax' "
                                 "has none (use a clipped loss type)")
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise ValueError("loss_type='luspo' is the length-scaled sequence-level (GSPO) loss: it needs "
                             "importance_sampling_level='sequence', got "
                             f"{self.importance_sampling_level!r} (TRL only warns here)")
        return self

    @classmethod
    def docs(cls, indent: str = "        ") -> str:
        """An ``Args:``-style block documenting every option (appended to the public docstrings)."""
        lines = []
        for f in dataclasses.fields(cls):
            lines.append(f"{indent}{f.name} (default {f.default!r}): {f.metadata['doc']}")
        return "\n".join(lines)


_NAMES = tuple(f.name for f in dataclasses.fields(LossOptions))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LossOptions)}


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def with_option_keywords(fn, *, before: str):
    """Give ``fn`` (which takes the options as ``**options``) a signature and docstring that list every
    :class:`LossOptions` field as a keyword-only parameter with its default, inserted before ``before``.

    ``help(grpo_loss)``, ``inspect.signature`` and IDEs then show the options as if they were written out, while
    their one definition stays in :class:`LossOptions`.
    """
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = [p.name for p in params]
    at = names.index(before)
    opts = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                              annotation=f.type) for f in dataclasses.fields(LossOptions)]
    fn.__signature__ = sig.replace(parameters=params[:at] + opts + params[at:])
    if fn.__doc__ and "{loss_options}" in fn.__doc__:
        fn.__doc__ = fn.__doc__.replace("{loss_options}", LossOptions.docs().lstrip())
    return fn
