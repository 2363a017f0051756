"""Backend registry: which fused implementations exist here, and which one ``backend="auto"`` picks.

A *kernel module* is a module exposing the same three functions (the contract every fused backend meets):

``is_available(device: torch.device) -> tuple[bool, str]``
    whether it can run on tensors of that device here, and if not, why (shown to the user).
``logprobs_fwd(logits, tokens, mask, temperature, with_entropy) -> (logp, lse, entropy)``
    ``logits (S, T, V)`` float with ``stride(-1) == 1`` (other strides arbitrary), ``tokens (S, T)`` int64
    contiguous, ``mask (S, T)`` bool contiguous (False for ignored/masked positions: their logits are never
    read and their outputs are 0). Returns contiguous ``(S, T)`` tensors in fp32 (fp64 for fp64 logits):
    the log-prob of the target, the log-sum-exp of ``z/τ``, and the entropy (zeros unless
    ``with_entropy``).
``logprobs_bwd(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature) -> grad_logits``
    ``grad_logits[s,t,v] = (g_ℓ·(1[v=y] − p_v) − g_H·p_v·(z_v/τ − (lse − H))) / τ`` where ``p = softmax(z/τ)``,
    written as a new contiguous ``(S, T, V)`` tensor in the logits' dtype; rows with ``mask == False`` are
    exactly zero. ``grad_entropy`` may be None. A module whose ``BWD_SUPPORTS`` contains ``"out"`` also takes
    ``out=`` (a tensor with the logits' shape, dtype and strides, possibly the logits themselves) and writes the
    gradient there, each row after it has been read (used by ``inplace_backward=True``).

``logprobs_fwd_grad(logits, tokens, mask, coef, temperature, with_entropy, out=None) -> (logp, lse, entropy, grad)``
    (modules with ``FWD_GRAD = True``) the one-pass path: the forward outputs plus
    ``grad[s,t,v] = coef[s,t]·(1[v=y] − p_v)/τ`` for an up-front ``coef (S, T)`` (fp32, fp64 for fp64 logits),
    reading each unmasked row once (a second, cache-hot read of the same row is allowed) and writing the
    gradient once, into ``out`` when given (which may be the logits themselves). Used when the loss is
    linear in the log-probs (``coef = ∂loss/∂ℓ`` does not depend on ℓ): the lesson's softmax loss and the
    clipped losses on-policy, without KL.

The modules are imported lazily: importing ``grpo_kernels`` never imports triton or builds an extension.
"""

from __future__ import annotations

import importlib
import os
from typing import Dict, List, Tuple

import torch

from . import validation as _v

# backend name -> module implementing the kernel contract above
_KERNEL_MODULES: Dict[str, str] = {
    "torch": "grpo_kernels.torch_kernels",  # the contract in eager PyTorch (fused-linear fallback, op tests)
    "triton": "grpo_kernels.triton_kernels",
    "cuda": "grpo_kernels.cpp_ext",
    "cpu": "grpo_kernels.cpp_ext",
}

# Preference order of backend="auto" per device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


def kernel_module(name: str):
    """Import and return the kernel module of backend ``name`` (raises ImportError if it cannot load)."""
    return importlib.import_module(_KERNEL_MODULES[name])


def backend_status(name: str, device: torch.device) -> Tuple[bool, str]:
    """``(available, reason)`` for one backend on one device type."""
    if name == "torch":
        return True, "eager PyTorch reference"
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
