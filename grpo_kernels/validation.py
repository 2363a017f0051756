"""Argument validation shared by every backend.

Every public entry point (``grpo_loss``, ``token_logprobs``, ``fused_linear_grpo_loss`` and the reference
itself) funnels its arguments through the functions here, so that bad input raises the same clear
``ValueError``/``TypeError`` whichever backend would have run -- never a crash inside a kernel, a NaN, or a
silently wrong number.

Checks that need the *values* of tensors (token ids in range, finite rewards) cost one device sync in all
(:class:`DeviceChecks`); they are skipped while ``torch.compile`` traces (data-dependent branches cannot be
traced), and the kernels are then called with ``check_ids=True`` so an out-of-range id never reaches a kernel.
The options' own checks live in :meth:`grpo_kernels.options.LossOptions.validate`.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .options import LossOptions

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
IGNORE_INDEX = -100

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


class DeviceChecks:
    """Value checks on tensor contents (token ids in range, finite rewards), gathered so that a whole argument
    list costs one device-to-host transfer instead of one per check: on CUDA each transfer is a host sync.

    ``add(bad, fail)`` records a 0-dim bool tensor that is True when the input is bad and a callable that raises
    the error (it may inspect the tensor further: that runs only on the error path); ``run()`` transfers every
    flag at once and calls the first failing ``fail``. Flags share one device (the arguments' device is
    checked first).
    """

    def __init__(self):
        self._flags = []
        self._fails = []

    def add(self, bad: torch.Tensor, fail) -> None:
        self._flags.append(bad.reshape(()))
        self._fails.append(fail)

    def run(self) -> None:
        if not self._flags:
            return
        bad = _flags_to_host(self._flags)
        fails = self._fails
        self._flags, self._fails = [], []
        for is_bad, fail in zip(bad, fails):
            if is_bad:
                fail()


def _flags_to_host(flags) -> list:
    """The one device-to-host transfer of :class:`DeviceChecks` (a list of Python bools)."""
    return torch.stack(flags).tolist()


def _check_now_or_later(checks: Optional[DeviceChecks], bad: torch.Tensor, fail) -> None:
    """Add the check to ``checks``, or run it at once when there is no collector."""
    c = checks if checks is not None else DeviceChecks()
    c.add(bad, fail)
    if checks is None:
        c.run()


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def check_positive_number(name: str, value, *, allow_zero: bool = False, allow_none: bool = False) -> None:
    if value is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a number, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a Python number, got a tensor ({_describe(value)}); use .item()")
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if allow_zero:
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    elif value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_int(name: str, value, *, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_tensor(name: str, t, *, ndim: Optional[int] = None, shape=None, floating: Optional[bool] = None,
                 device: Optional[torch.device] = None, allow_none: bool = False) -> None:
    """Type, rank, shape, dtype-kind and device of one tensor argument."""
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {t.dim()} ({_describe(t)})")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if floating is True and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}; move all tensors to one device")


def check_logits(logits, name: str = "logits", ndim: Optional[int] = 3) -> None:
    check_tensor(name, logits, ndim=ndim, floating=True)
    if logits.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values: the loss checks token ids and "
                         "rewards and runs kernels; use a real device (torch.compile traces through the ops "
                         "with its own fake tensors)")
    if logits.dim() == 0:
        raise ValueError(f"{name} must have a vocabulary dimension, got a scalar")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")


def check_tokens(tokens, shape, num_classes: int, device, name: str = "tokens",
                 checks: Optional[DeviceChecks] = None) -> None:
    """Integer ids of ``shape`` on ``device``, each in ``[0, num_classes)`` or ``-100``. The range check is
    deferred to ``checks`` when given (else run at once)."""
    check_tensor(name, tokens, device=device)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (token ids), got {tokens.dtype}")
    if tuple(tokens.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the logits without the vocabulary dimension), "
                         f"got {tuple(tokens.shape)}")
    if tokens.numel() and not _is_compiling():
        bad = (tokens >= num_classes) | ((tokens < 0) & (tokens != IGNORE_INDEX))

        def fail():
            first = tokens[bad][0].item()
            raise ValueError(f"{name} must hold ids in [0, {num_classes}) or {IGNORE_INDEX} (ignored); "
                             f"found {first} (vocabulary size V={num_classes})")

        _check_now_or_later(checks, bad.any(), fail)


def check_mask(mask, shape, device, name: str = "mask", checks: Optional[DeviceChecks] = None) -> None:
    """Bool or real ``shape`` on ``device``; a floating mask must be finite (the content check is deferred to
    ``checks`` when given, else run at once)."""
    if mask is None:
        return
    check_tensor(name, mask, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or real-valued, got {mask.dtype}")
    if mask.is_floating_point() and mask.numel() and not _is_compiling():
        def fail():
            raise ValueError(f"{name} must be finite (0/1 weights); got NaN or inf in {name}")

        _check_now_or_later(checks, ~torch.isfinite(mask.detach()).all(), fail)


def check_temperature(temperature, dtype: torch.dtype) -> None:
    """τ > 0 and finite, and ``1/τ`` representable in the accumulation dtype of ``dtype`` logits (a τ of 1e-40
    with fp32 logits would turn every logit into ±inf)."""
    check_positive_number("temperature", temperature)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if not math.isfinite(1.0 / temperature) or 1.0 / temperature > torch.finfo(acc).max:
        raise ValueError(f"temperature={temperature!r} is too small for {dtype} logits: 1/temperature overflows "
                         f"{acc} (the logits are divided by it)")


def check_rewards_like(name: str, t, num_sequences: int, device, checks: Optional[DeviceChecks] = None,
                       shapes: Optional[str] = None) -> None:
    check_tensor(name, t, device=device)
    if t.dtype.is_complex:
        raise TypeError(f"{name} must be real-valued, got {t.dtype}")
    if t.dim() == 2 and t.shape[-1] == 1:
        pass
    elif t.dim() != 1:
        expected = shapes or f"({num_sequences},) (one value per sequence)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    if t.shape[0] != num_sequences:
        raise ValueError(f"{name} must have one value per sequence: expected length {num_sequences} "
                         f"(= logits.shape[0]), got {t.shape[0]}")
    if t.is_floating_point() and t.numel() and not _is_compiling():
        def fail():
            raise ValueError(f"{name} must be finite; got NaN or inf in {name}")

        _check_now_or_later(checks, ~torch.isfinite(t.detach()).all(), fail)


def check_loss_args(options: "LossOptions", *, num_sequences: int, seq_len: int, num_classes: int, device, dtype,
                    tokens, rewards, mask, group_size, old_logprobs, ref_logprobs, advantages, num_items_in_batch,
                    loss_scale=1.0, sampling_logprobs=None) -> None:
    """Validate the options and everything ``grpo_loss`` takes except the logits themselves (``check_logits``).

    ``num_sequences``/``seq_len``/``num_classes`` are S, T, V and ``dtype`` the dtype of the logits (or of
    hidden/weight). The content checks (token ids, finite rewards/advantages/mask, finite old/reference
    log-probs at the positions that count, no ±inf in the sampling log-probs) cost one device-to-host transfer in
    all.
    """
    from .options import ITEMS_NORMALIZED_LOSS_TYPES

    options.validate()
    check_temperature(options.temperature, dtype)
    loss_type = options.loss_type
    check_int("group_size", group_size, minimum=1)
    if num_sequences % group_size != 0:
        raise ValueError(f"the number of sequences S={num_sequences} must be a multiple of group_size={group_size} "
                         "(rows g*G ... g*G+G-1 answer prompt g)")
    check_positive_number("loss_scale", loss_scale)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, "
                                 f"got shape {tuple(num_items_in_batch.shape)}")
        else:
            check_positive_number("num_items_in_batch", num_items_in_batch)
        agg = options.loss_agg_mode
        if not (agg == "token-mean" or (agg is None and loss_type in ITEMS_NORMALIZED_LOSS_TYPES)):
            raise ValueError("num_items_in_batch is the token-mean normalizer: it is used by loss_type in "
                             f"{ITEMS_NORMALIZED_LOSS_TYPES} or loss_agg_mode='token-mean', got "
                             f"loss_type={loss_type!r}, loss_agg_mode={agg!r}")
    if ref_logprobs is not None and options.kl_coef == 0:
        warnings.warn("reference log-probs are ignored because kl_coef is 0 (the KL coefficient, TRL's `beta`)",
                      UserWarning, stacklevel=4)
    if sampling_logprobs is not None:
        if loss_type == "softmax":
            raise ValueError("sampling_logprobs= (the inference engine's log-probs) feed the importance-sampling "
                             "correction and off-policy masking of the advantage-weighted loss types; "
                             "loss_type='softmax' does not use them")
        if not options.vllm_importance_sampling_correction and options.off_policy_mask_threshold is None:
            warnings.warn("sampling_logprobs are ignored: vllm_importance_sampling_correction is False and "
                          "off_policy_mask_threshold is None", UserWarning, stacklevel=4)
        if (loss_type == "vespo" and options.vllm_importance_sampling_correction
                and options.sequence_level_is_correction):
            raise ValueError("loss_type='vespo' takes the engine ratio per token inside its sequence weight: "
                             "vllm_importance_sampling_mode must be 'token_truncate' or 'token_mask', got "
                             f"{options.vllm_importance_sampling_mode!r}")

    shape = (num_sequences, seq_len)
    checks = DeviceChecks()  # the content checks of tokens, rewards and advantages: one host sync in all
    check_tokens(tokens, shape, num_classes, device, checks=checks)
    check_mask(mask, shape, device, checks=checks)
    counts = None  # the positions that count: unmasked, token != -100

    def counting():
        nonlocal counts
        if counts is None:
            counts = tokens != IGNORE_INDEX
            if mask is not None:
                counts = counts & (mask != 0)
        return counts

    if advantages is not None:
        if loss_type == "softmax":
            raise ValueError("advantages= is only used by the advantage-weighted loss types (every loss_type but "
                             "'softmax'); loss_type='softmax' weights sequences by softmax(rewards/beta): pass rewards")
        if isinstance(advantages, torch.Tensor) and advantages.dim() == 2 and advantages.shape[-1] != 1:
            check_tensor("advantages", advantages, shape=shape, device=device)  # per-token advantages
            if not advantages.is_floating_point():
                raise TypeError(f"advantages must be a floating-point tensor, got {advantages.dtype}")
            _check_finite_where_counted("advantages", advantages, counting, checks)
        else:
            check_rewards_like("advantages", advantages, num_sequences, device, checks=checks,
                               shapes=f"({num_sequences},) or ({num_sequences}, {seq_len})")
            if not advantages.is_floating_point():
                raise TypeError(f"advantages must be a floating-point tensor, got {advantages.dtype}")
        if rewards is not None:
            check_rewards_like("rewards", rewards, num_sequences, device, checks=checks)
    else:
        if rewards is None:
            raise TypeError("rewards must be a tensor of shape (S,) (or pass advantages= for an advantage-weighted "
                            "loss type)")
        check_rewards_like("rewards", rewards, num_sequences, device, checks=checks)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        check_tensor(name, t, shape=shape, floating=True, device=device, allow_none=True)
        if t is not None:
            _check_finite_where_counted(name, t, counting, checks)
    check_tensor("sampling_logprobs", sampling_logprobs, shape=shape, floating=True, device=device, allow_none=True)
    if sampling_logprobs is not None and sampling_logprobs.numel() and not _is_compiling():
        t = sampling_logprobs
        bad = counting() & torch.isinf(t.detach())

        def fail(t=t, bad=bad):
            s, p = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"sampling_logprobs must be finite at the positions that count (NaN = a token the "
                             f"engine could not score, which is allowed); found {t[s, p].item()} at [{s}, {p}]")

        checks.add(bad.any(), fail)
    checks.run()


def _check_finite_where_counted(name: str, t, counting, checks: DeviceChecks) -> None:
    if not t.numel() or _is_compiling():
        return
    bad = counting() & ~torch.isfinite(t.detach())

    def fail():
        s, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must be finite at the positions that count (unmasked, token != "
                         f"{IGNORE_INDEX}); found {t[s, p].item()} at [{s}, {p}]")

    checks.add(bad.any(), fail)
