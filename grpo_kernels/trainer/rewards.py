"""Reward functions for GRPO: a small registry of rule rewards, a local reward model, weighted sums.

A reward function has the TRL-style signature ``f(prompts, completions, **columns) -> list[float]``: ``prompts``
and ``completions`` are lists of strings of equal length (one entry per sampled response, each prompt
repeated ``G`` times), and ``columns`` carries the dataset's extra fields aligned the same way (for example
``answer=[...]``). ``None`` in the returned list means "not applicable" and counts as 0. Anything else than one finite number (or
``None``) per completion -- ``None`` itself, a generator, a string, nested lists -- is a
:class:`RewardFunctionError` naming the function and what it returned (:func:`check_scores`).

Registered rule rewards (look them up with :func:`get_reward_func`):

* ``exact_answer`` -- 1.0 when the last number in the completion equals the row's ``answer`` numerically
  (also reads ``\\boxed{...}`` and ``#### x``), else 0.0.
* ``format`` -- 1.0 when the completion matches a regex (default: ``<think>…</think>`` then an answer).
* ``length_penalty`` -- ``-max(0, len(completion) - target) / target`` (characters; target 512 by default).
* ``digit_copy`` -- the built-in demo's dense reward (see :func:`digit_copy_reward`).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Optional, Sequence

import torch

RewardFunc = Callable[..., List[Optional[float]]]

_REGISTRY: Dict[str, RewardFunc] = {}


def register_reward(name: str):
    """Decorator: make a reward function available by ``name`` (CLI ``--reward-funcs``, config ``reward_funcs``)."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = fn
        fn.reward_name = name
        return fn

    return deco


def available_rewards() -> List[str]:
    return sorted(_REGISTRY)


def get_reward_func(name_or_fn) -> RewardFunc:
    """A registered reward by name, or the callable itself."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in _REGISTRY:
        raise ValueError(f"unknown reward function {name_or_fn!r}; registered: {available_rewards()}")
    return _REGISTRY[name_or_fn]


def reward_name(fn) -> str:
    return getattr(fn, "reward_name", None) or getattr(fn, "__name__", None) or type(fn).__name__


# --------------------------------------------------------------------------- rule rewards
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _to_number(text) -> Optional[float]:
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    m = _NUMBER.findall(str(text))
    if not m:
        return None
    try:
        return float(m[-1].replace(",", ""))
    except ValueError:
        return None


def extract_answer(completion: str) -> Optional[float]:
    """The number a completion answers: ``\\boxed{x}``, else ``#### x``, else the last number in the text."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    if boxed:
        return _to_number(boxed[-1])
    hashes = re.findall(r"####\s*([^\n]*)", completion)
    if hashes:
        return _to_number(hashes[-1])
    return _to_number(completion)


@register_reward("exact_answer")
def exact_answer_reward(prompts: Sequence[str], completions: Sequence[str], answer=None, **_) -> List[Optional[float]]:
    """1.0 when the completion's answer equals ``answer`` numerically (|diff| <= 1e-6 · max(1, |answer|)), else 0.0."""
    if answer is None:
        raise ValueError("exact_answer needs an 'answer' column in the dataset")
    out = []
    for c, a in zip(completions, answer):
        want, got = _to_number(a), extract_answer(c)
        out.append(float(want is not None and got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))))
    return out


def format_reward_func(pattern: str = r"^\s*<think>.*?</think>\s*\S.*$", flags: int = re.DOTALL) -> RewardFunc:
    """A reward that is 1.0 when ``re.match(pattern, completion)`` succeeds, else 0.0."""
    rx = re.compile(pattern, flags)

    def format_reward(prompts, completions, **_):
        return [1.0 if rx.match(c) else 0.0 for c in completions]

    format_reward.reward_name = "format"
    return format_reward


_REGISTRY["format"] = format_reward_func()


def length_penalty_func(target_chars: int = 512) -> RewardFunc:
    """``-max(0, len(completion) - target_chars) / target_chars``: 0 up to the target, then linearly negative."""
    if target_chars < 1:
        raise ValueError(f"target_chars must be >= 1, got {target_chars}")

    def length_penalty(prompts, completions, **_):
        return [-max(0, len(c) - target_chars) / target_chars for c in completions]

    length_penalty.reward_name = "length_penalty"
    return length_penalty


_REGISTRY["length_penalty"] = length_penalty_func()


@register_reward("digit_copy")
def digit_copy_reward(prompts: Sequence[str], completions: Sequence[str], answer=None, **_) -> List[float]:
    """The demo's dense reward: per-position credit for reproducing ``answer``.

    ``reward = #{i < n : completion[i] == answer[i]} / max(n, len(completion))`` with ``n = len(answer)``.
    It is 1.0 exactly when the completion equals the answer (the model must also stop: every extra character
    lowers the score), 0 for an empty completion, and about ``1/|vocab|`` per position for a uniform policy.
    """
    if answer is None:
        raise ValueError("digit_copy needs an 'answer' column in the dataset")
    out = []
    for c, a in zip(completions, answer):
        a = str(a)
        hits = sum(1 for x, y in zip(c, a) if x == y)
        out.append(hits / max(len(a), len(c), 1))
    return out


# --------------------------------------------------------------------------- reward model
class RewardModel:
    """A sequence-classification reward model loaded from a local directory.

    ``RewardModel(path)(prompts, completions)`` scores ``prompt + completion`` (or the chat-formatted pair
    when the tokenizer has a chat template) and returns the logit of class 0 (``num_labels == 1`` models,
    the usual case) as a float per completion.
    """

    def __init__(self, path: str, device="cpu", batch_size: int = 16, max_length: int = 2048,
                 use_chat_template: bool = True):
        import os

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not os.path.isdir(path):
            raise ValueError(f"reward model path {path!r} is not a local directory")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.use_chat_template = use_chat_template
        self.reward_name = "reward_model"

    def texts(self, prompts, completions) -> List[str]:
        if self.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            return [self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False)
                for p, c in zip(prompts, completions)]
        return [p + c for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def __call__(self, prompts, completions, **_) -> List[float]:
        texts = self.texts(prompts, completions)
        out: List[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            logits = self.model(**enc).logits
            out.extend(logits[:, 0].float().cpu().tolist())
        return out


# --------------------------------------------------------------------------- combination
class RewardFunctionError(TypeError, ValueError):
    """A reward function returned something other than one finite score (or None) per completion. Both a
    ``TypeError`` and a ``ValueError``, so either ``except`` catches it."""


def _describe(v) -> str:
    if v is None:
        return "None"
    text = repr(v)
    return f"a {type(v).__name__} {text[:77] + '...' if len(text) > 80 else text}"


def _where(fn) -> str:
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)
    return f" (defined at {code.co_filename}:{code.co_firstlineno})" if code is not None else ""


def check_scores(name: str, fn, vals, n: int) -> List[float]:
    """``vals``, what reward function ``fn`` (called ``name``) returned for ``n`` completions, as ``n`` floats
    (``None`` -> 0.0). A list, tuple, 1-D tensor or array of real numbers / None is accepted; anything else (None,
    a generator, a string, a dict, nested lists, a non-finite score, a wrong length) is a
    :class:`RewardFunctionError` naming the function and what it returned."""
    def bad(what: str) -> RewardFunctionError:
        return RewardFunctionError(f"reward function {name!r}{_where(fn)} must return a list of {n} scores (floats, "
                                   f"or None for 'not applicable'), one per completion; {what}")

    if torch.is_tensor(vals) or (hasattr(vals, "ndim") and hasattr(vals, "tolist")):  # tensor / numpy array
        if vals.ndim != 1:
            raise bad(f"it returned a {vals.ndim}-D {type(vals).__name__} of shape {tuple(vals.shape)}")
        vals = vals.tolist()
    if not isinstance(vals, (list, tuple)):
        hint = " (a generator: return a list, e.g. [..] instead of (..))" if hasattr(vals, "__next__") else ""
        raise bad(f"it returned {_describe(vals)}{hint}")
    if len(vals) != n:
        raise bad(f"it returned {len(vals)} scores for {n} completions")
    out = []
    for i, v in enumerate(vals):
        if v is None:
            out.append(0.0)
            continue
        x = v.item() if getattr(v, "ndim", None) == 0 and hasattr(v, "item") else v  # 0-d tensor, numpy scalar
        if isinstance(x, (str, bytes)) or not isinstance(x, (int, float)):
            raise bad(f"score {i} is {_describe(v)}")
        v = float(x)
        if not math.isfinite(v):
            raise bad(f"score {i} is {v} (scores must be finite)")
        out.append(v)
    return out


class CombinedReward:
    """Weighted sum of several reward functions, keeping each one's raw scores for logging.

    ``CombinedReward([f, g], weights=[1.0, 0.5])(prompts, completions, **columns)`` returns
    ``(total (N,) fp32 tensor, {name: (N,) fp32 tensor})``; ``None`` scores count as 0.
    """

    def __init__(self, funcs: Sequence, weights: Optional[Sequence[float]] = None):
        funcs = [get_reward_func(f) for f in funcs]
        if not funcs:
            raise ValueError("reward_funcs must name at least one reward function")
        if weights is None:
            weights = [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ValueError(f"reward weights has {len(weights)} entries for {len(funcs)} reward functions")
        for w in weights:
            if not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"reward weights must be finite numbers, got {w!r}")
        self.funcs = funcs
        self.weights = [float(w) for w in weights]
        names, seen = [], {}
        for f in funcs:
            n = reward_name(f)
            seen[n] = seen.get(n, 0) + 1
            names.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
        self.names = names

    def __call__(self, prompts, completions, **columns):
        if len(prompts) != len(completions):
            raise ValueError(f"prompts ({len(prompts)}) and completions ({len(completions)}) differ in length")
        per = {}
        total = torch.zeros(len(completions), dtype=torch.float32)
        for name, fn, w in zip(self.names, self.funcs, self.weights):
            vals = fn(list(prompts), list(completions), **columns)
            t = torch.tensor(check_scores(name, fn, vals, len(completions)), dtype=torch.float32)
            per[name] = t
            total += w * t
        return total, per
