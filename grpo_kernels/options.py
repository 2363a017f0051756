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

LOSS_TYPES = ("softmax", "grpo", "bnpo", "dr_grpo", "dapo")
CLIPPED_LOSS_TYPES = tuple(t for t in LOSS_TYPES if t != "softmax")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")

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
                                     "``\"grpo\"``, ``\"bnpo\"``, ``\"dr_grpo\"`` or ``\"dapo\"`` (the clipped "
                                     "surrogate with different normalizers).")
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
    max_completion_length: Optional[int] = _opt(None, "the ``dr_grpo`` normalizer ``S · L`` uses this L "
                                                      "(None = T, the completion dimension).")

    # ------------------------------------------------------------------ derived values
    @property
    def softmax_beta(self) -> float:
        """The softmax-weight temperature in force (``beta``, or 0.1 when unset)."""
        return DEFAULT_SOFTMAX_BETA if self.beta is None else self.beta

    @property
    def upper_epsilon(self) -> float:
        """``epsilon_high``, or ``epsilon`` when unset."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

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
        if isinstance(self.kl_coef, bool) or not isinstance(self.kl_coef, (int, float)) \
                or not math.isfinite(self.kl_coef):
            raise TypeError(f"kl_coef must be a finite number, got {self.kl_coef!r}")
        _v.check_positive_number("epsilon", self.epsilon, allow_zero=True)
        _v.check_positive_number("epsilon_high", self.epsilon_high, allow_zero=True, allow_none=True)
        _v.check_positive_number("delta", self.delta, allow_none=True)
        _v.check_int("max_completion_length", self.max_completion_length, minimum=1, allow_none=True)
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
