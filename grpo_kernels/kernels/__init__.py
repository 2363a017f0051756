"""The kernels: interchangeable implementations of one contract, and the registry that picks one.

Every backend is a *kernel module* in this folder; all of them compute the same logits-sized part of the loss
(per-token log-probs, log-sum-exp, entropy and their logits gradient, docs/design.md §5 and §9):

========== ====================== ===========================================================================
backend    module                 what it is
========== ====================== ===========================================================================
``torch``  :mod:`.eager`          eager PyTorch (forward = :func:`grpo_kernels.reference.token_logprobs`, the
                                  closed-form gradient below); runs on any device
``triton`` :mod:`.triton_impl`    Triton kernels (CUDA; CPU tensors only under ``TRITON_INTERPRET=1``)
``cpu``    :mod:`.native`         the C++ CPU ops built from ``csrc/``
``cuda``   :mod:`.native`         the CUDA C++ ops built from ``csrc/``
========== ====================== ===========================================================================

The public API reaches them only through the ops gateway :mod:`.ops` (``torch.library`` custom ops with fake
implementations and autograd, plus the plain per-chunk calls of the fused-linear path). The pure autograd
reference, the test oracle, is :func:`grpo_kernels.reference.grpo_loss`.

The contract (every module implements all of it):

``is_available(device: torch.device) -> tuple[bool, str]``
    whether it can run on tensors of that device here, and if not, why (shown to the user).
``logprobs_fwd(logits, tokens, mask, temperature, with_entropy, check_ids=True) -> (logp, lse, entropy)``
    ``logits (S, T, V)`` float with ``stride(-1) == 1`` (other strides arbitrary), ``tokens (S, T)`` int64
    contiguous, ``mask (S, T)`` bool contiguous (False for ignored/masked positions: their logits are never
    read and their outputs are 0). Returns contiguous ``(S, T)`` tensors in fp32 (fp64 for fp64 logits):
    the log-prob of the target, the log-sum-exp of ``z/τ``, and the entropy (zeros unless
    ``with_entropy``). ``check_ids=True``: the module raises ValueError for a token id outside ``[0, V)`` on
    an unmasked row (on CUDA a host sync); the public functions pass False after validating the ids.
``logprobs_bwd(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, out=None, check_ids=True)``
    ``grad_logits[s,t,v] = (g_ℓ·(1[v=y] − p_v) − g_H·p_v·(z_v/τ − (lse − H))) / τ`` where ``p = softmax(z/τ)``,
    written as a new contiguous ``(S, T, V)`` tensor in the logits' dtype, or into ``out`` (the logits' shape
    and dtype, unit vocabulary stride, possibly the logits themselves: each row is read before it is
    overwritten); rows with ``mask == False`` are exactly zero. ``grad_entropy`` may be None. The autograd
    backward passes ``check_ids=False``: it trusts the ids its forward saw.
``logprobs_fwd_grad(logits, tokens, mask, coef, temperature, with_entropy, out=None, check_ids=True, ent_coef=None)``
    ``-> (logp, lse, entropy, grad)``: the one-pass schedule: the forward outputs plus
    ``grad[s,t,v] = coef[s,t]·(1[v=y] − p_v)/τ`` for an up-front ``coef (S, T)`` (fp32, fp64 for fp64 logits),
    plus ``− ent_coef[s,t]·p_v·(z_v/τ − (lse − H))/τ`` when ``ent_coef (S, T)`` (same dtype) is given -- the
    backward's formula with ``g_ℓ = coef``, ``g_H = ent_coef``; the entropy is then computed and returned whatever
    ``with_entropy`` says (:func:`check_ent_coef` checks the argument),
    reading each unmasked row once (a second, cache-hot read of the same row is allowed) and writing the
    gradient once, into ``out`` when given (which may be the logits themselves). Used when ``coef = ∂loss/∂ℓ``
    does not depend on ℓ (:func:`grpo_kernels.reference.coefficients_are_constant`).

The modules are imported lazily: importing ``grpo_kernels`` never imports triton or builds an extension.
"""

from __future__ import annotations

import importlib
import os
from typing import Dict, List, Tuple

import torch

from .. import validation as _v

# backend name -> module implementing the kernel contract above
_KERNEL_MODULES: Dict[str, str] = {
    "torch": "grpo_kernels.kernels.eager",
    "triton": "grpo_kernels.kernels.triton_impl",
    "cuda": "grpo_kernels.kernels.native",
    "cpu": "grpo_kernels.kernels.native",
}

# Preference order of backend="auto" per device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


def kernel_module(name: str):
    """Import and return the kernel module of backend ``name`` (raises ImportError if it cannot load)."""
    return importlib.import_module(_KERNEL_MODULES[name])


def backend_status(name: str, device: torch.device) -> Tuple[bool, str]:
    """``(available, reason)`` for one backend on one device type."""
    if name == "torch":
        return True, "eager PyTorch"
    if name not in _KERNEL_MODULES:
        return False, f"unknown backend {name!r}"
    if name == "cuda" and device.type != "cuda":
        return False, "the 'cuda' backend runs on CUDA tensors only"
    if name == "cpu" and device.type != "cpu":
        return False, "the 'cpu' backend runs on CPU tensors only"
    try:
        mod = kernel_module(name)
    except ImportError as e:  # missing dependency or not yet written
        return False, f"cannot import {_KERNEL_MODULES[name]}: {e}"
    return mod.is_available(device)


def available_backends(device) -> List[str]:
    """Backends that can run on tensors of ``device`` here (always includes ``"torch"``)."""
    device = torch.device(device)
    return [b for b in ("triton", "cuda", "cpu", "torch") if backend_status(b, device)[0]]


def resolve_backend(backend: str, device) -> str:
    """See :func:`_resolve_backend`; under ``torch.compile`` the answer is a trace-time constant (it depends
    only on the arguments and on what is installed), so tracing never enters the import machinery."""
    if hasattr(device, "type"):
        device = str(device.type)
    return _resolve_backend(backend, str(device))


def _resolve_backend(backend: str, device) -> str:
    """Map ``backend`` (possibly ``"auto"``) to a concrete backend for ``device``, or raise ValueError.

    ``GRPO_KERNELS_BACKEND`` in the environment overrides ``"auto"`` (handy to force a path in tests).
    """
    _v.check_choice("backend", backend, _v.BACKENDS)
    device = torch.device(device)
    if backend == "auto":
        forced = os.environ.get("GRPO_KERNELS_BACKEND")
        if forced:
            _v.check_choice("GRPO_KERNELS_BACKEND", forced, _v.BACKENDS[1:])
            backend = forced
        else:
            for name in _AUTO_ORDER.get(device.type, ()):
                if backend_status(name, device)[0]:
                    return name
            return "torch"
    ok, reason = backend_status(backend, device)
    if not ok:
        avail = ", ".join(repr(b) for b in available_backends(device))
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: {reason}. "
                         f"Available here: {avail}")
    return backend



# Under torch.compile the resolved backend is a trace-time constant. This is exactly what
# ``torch.compiler.assume_constant_result`` does (it sets this attribute); setting it directly avoids importing
# torch._dynamo (seconds, and triton) when grpo_kernels is imported.
_resolve_backend._dynamo_marked_constant = True


def check_token_ids(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> None:
    """The ``check_ids=True`` guard of the modules that do not check inside their own op (eager, Triton): an id
    outside ``[0, V)`` on a row that will be read would be an out-of-bounds load. One host sync on CUDA."""
    V = logits.shape[-1]
    bad = mask & ((tokens < 0) | (tokens >= V))
    if bool(bad.any()):
        raise ValueError(f"tokens must hold ids in [0, {V}) or -100 on unmasked positions; "
                         f"found {tokens[bad][0].item()}")


def assert_token_ids(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> None:
    """The ops gateway's ``check_ids=True`` guard without a host sync (``torch._assert_async``): on CUDA a bad id
    raises RuntimeError at the next synchronization (the kernel never reads out of bounds: the guard runs first on
    the stream, and a failed device assertion stops the stream); on CPU at once. Safe under ``torch.compile``
    and CUDA-graph capture, where :func:`check_token_ids`' ``bool()`` would sync."""
    V = logits.shape[-1]
    if tokens.numel() == 0:
        return
    ok = ~(mask & ((tokens < 0) | (tokens >= V))).any()
    torch._assert_async(ok, f"grpo_kernels: tokens must hold ids in [0, {V}) or -100 on unmasked positions "
                            "(found one outside; checked on the device)")


def rows_overlap(t: torch.Tensor) -> bool:
    """Whether two ``(s, t)`` rows of an ``(S, T, V)`` tensor with a unit vocabulary stride share memory (an
    expanded or overlapping strided view): writing a gradient into such a tensor would race or be wrong."""
    extent = t.shape[-1]
    if extent == 0:
        return False
    for stride, size in sorted((t.stride(i), t.shape[i]) for i in (0, 1) if t.shape[i] > 1):
        if stride < extent:
            return True
        extent = stride * size
    return False


def check_out(out: torch.Tensor, logits: torch.Tensor) -> None:
    """The ``out=`` of ``logprobs_bwd`` / ``logprobs_fwd_grad``: the logits' shape, dtype and device, a unit
    vocabulary stride, rows that do not overlap, and either the logits themselves or memory of its own."""
    if not isinstance(out, torch.Tensor) or out.shape != logits.shape or out.dtype != logits.dtype \
            or out.device != logits.device:
        raise ValueError(f"out must have the logits' shape {tuple(logits.shape)}, dtype {logits.dtype} and device "
                         f"{logits.device}; got {getattr(out, 'shape', type(out))}")
    if logits.shape[-1] > 0 and out.stride(-1) != 1:
        raise ValueError(f"out must have a unit vocabulary stride, got strides {out.stride()}")
    if rows_overlap(out):
        raise ValueError(f"out rows must not overlap (an expanded or overlapping view), got strides {out.stride()}")
    same = out.data_ptr() == logits.data_ptr() and out.stride() == logits.stride()
    if not same and out.numel() and logits.numel() and \
            out.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
        raise ValueError("out may be the logits tensor itself or a separate tensor, not another view of the logits")


def check_ent_coef(ent_coef: torch.Tensor, logits: torch.Tensor) -> None:
    """The ``ent_coef=`` of ``logprobs_fwd_grad``: a contiguous ``(S, T)`` tensor in the accumulation dtype of the
    logits (fp32; fp64 for fp64 logits) on their device."""
    S, T = logits.shape[0], logits.shape[1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if not isinstance(ent_coef, torch.Tensor) or tuple(ent_coef.shape) != (S, T) or ent_coef.dtype != acc \
            or ent_coef.device != logits.device or not ent_coef.is_contiguous():
        raise ValueError(f"ent_coef must be a contiguous ({S}, {T}) {acc} tensor on {logits.device}; got "
                         + (f"shape {tuple(ent_coef.shape)}, dtype {ent_coef.dtype}, device {ent_coef.device}, "
                            f"contiguous={ent_coef.is_contiguous()}" if isinstance(ent_coef, torch.Tensor)
                            else type(ent_coef).__name__))
