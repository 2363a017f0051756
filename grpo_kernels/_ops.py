"""The ``torch.library`` custom ops behind every fused backend, with fake implementations and autograd.

Two ops carry all logits-sized work:

``grpo_kernels::logprobs_fwd(logits, tokens, mask, temperature, with_entropy, backend) -> (logp, lse, entropy)``
``grpo_kernels::logprobs_bwd(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, backend)
-> grad_logits``

``backend`` names the kernel module (``"triton"``, ``"cuda"``, ``"cpu"``; see :mod:`grpo_kernels.backends`
for the contract). Being custom ops with fake implementations, they are opaque to ``torch.compile``
(``fullgraph=True`` traces through them) and checked by ``torch.library.opcheck``.

Memory traffic: the forward reads each unmasked logits row once; the backward reads it once more and
writes the gradient once (DESIGN.md §6). Masked rows are never read.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from . import backends as _backends
from . import validation as _v

Tensor = torch.Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def validated_ids_context():
    """:func:`validation.ids_validated` in eager mode, a no-op context while ``torch.compile`` traces (validation
    is skipped while tracing, so the ops keep checking at run time)."""
    return contextlib.nullcontext() if _v._is_compiling() else _v.ids_validated()


def _check_ids(logits: Tensor, tokens: Tensor, mask: Tensor) -> None:
    # The kernels' own guard: an out-of-range id on a row they will read would be an out-of-bounds load.
    if _v.ids_are_validated():
        return
    V = logits.shape[-1]
    bad = mask & ((tokens < 0) | (tokens >= V))
    if bool(bad.any()):
        raise ValueError(f"tokens must hold ids in [0, {V}) or -100 on unmasked positions; "
                         f"found {tokens[bad][0].item()}")


@torch.library.custom_op("grpo_kernels::logprobs_fwd", mutates_args=())
def logprobs_fwd(logits: Tensor, tokens: Tensor, mask: Tensor, temperature: float, with_entropy: bool,
                 backend: str, inplace_backward: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    _check_ids(logits, tokens, mask)
    return _backends.kernel_module(backend).logprobs_fwd(logits, tokens, mask, temperature, with_entropy)


@logprobs_fwd.register_fake
def _(logits, tokens, mask, temperature, with_entropy, backend, inplace_backward=False):
    S, T, _ = logits.shape
    dt = _acc_dtype(logits.dtype)
    return (logits.new_empty((S, T), dtype=dt), logits.new_empty((S, T), dtype=dt),
            logits.new_empty((S, T), dtype=dt))


@torch.library.custom_op("grpo_kernels::logprobs_bwd", mutates_args=())
def logprobs_bwd(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, tokens: Tensor, mask: Tensor,
                 lse: Tensor, entropy: Tensor, temperature: float, backend: str) -> Tensor:
    return _backends.kernel_module(backend).logprobs_bwd(grad_logp, grad_entropy, logits, tokens, mask, lse,
                                                         entropy, temperature)


@logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("grpo_kernels::logprobs_bwd_inplace", mutates_args=("logits",))
def logprobs_bwd_inplace(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, tokens: Tensor,
                         mask: Tensor, lse: Tensor, entropy: Tensor, temperature: float, backend: str) -> None:
    """Overwrite ``logits`` with the gradient. Declared as mutating ``logits``, so its version counter moves
    and any other autograd node that saved the logits fails loudly instead of reading the gradient."""
    mod = _backends.kernel_module(backend)
    if "out" in getattr(mod, "BWD_SUPPORTS", ()):  # kernel writes each row in place after reading it
        mod.logprobs_bwd(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, out=logits)
    else:
        logits.copy_(mod.logprobs_bwd(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature))


@logprobs_bwd_inplace.register_fake
def _(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, tokens, mask, temperature, with_entropy, backend = inputs[:6]
    inplace = inputs[6] if len(inputs) > 6 else False
    _, lse, entropy = output
    ctx.save_for_backward(logits, tokens, mask, lse, entropy)
    ctx.temperature = temperature
    ctx.with_entropy = with_entropy
    ctx.backend = backend
    ctx.inplace = inplace


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    logits, tokens, mask, lse, entropy = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    grad_logp = grad_logp.to(lse.dtype).contiguous()
    if grad_entropy is not None and ctx.with_entropy:
        grad_entropy = grad_entropy.to(lse.dtype).contiguous()
    else:
        grad_entropy = None
    # the forward op checked these very (saved) tokens: the kernels need not check them again
    with validated_ids_context():
        if ctx.inplace:
            logprobs_bwd_inplace(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, ctx.temperature,
                                 ctx.backend)
            return logits, None, None, None, None, None, None
        grad = logprobs_bwd(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, ctx.temperature,
                            ctx.backend)
    return grad, None, None, None, None, None, None


torch.library.register_autograd("grpo_kernels::logprobs_fwd", _backward, setup_context=_setup_context)


def prepare(logits: Tensor, tokens: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Bring user tensors into the layout the kernels take: logits ``(S, T, V)`` with unit vocabulary
    stride (no copy unless the vocabulary dimension itself is strided), int64 tokens and a bool mask that
    is False wherever ``mask == 0`` or ``tokens == -100``."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    keep = tokens != _v.IGNORE_INDEX
    if mask is not None:
        keep = keep & (mask != 0)
    return logits, tokens.to(torch.int64).contiguous(), keep.contiguous()


def fused_token_logprobs(logits: Tensor, tokens: Tensor, mask: Optional[Tensor], temperature: float,
                         with_entropy: bool, backend: str,
                         inplace_backward: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """``(logp, entropy or None)`` of shape ``(S, T)`` through the custom op (differentiable).

    ``inplace_backward=True`` writes the gradient into the logits' own storage (saves one ``[S, T, V]``
    buffer). The logits' values are destroyed by the backward; autograd's version counter makes any other
    user of those logits fail loudly rather than silently read the gradient.
    """
    if inplace_backward and logits.stride(-1) != 1:
        raise ValueError("inplace_backward=True needs logits with a unit vocabulary stride (it writes the "
                         "gradient into their storage); pass contiguous logits or inplace_backward=False")
    logits, tokens, keep = prepare(logits, tokens, mask)
    logp, _, entropy = logprobs_fwd(logits, tokens, keep, float(temperature), bool(with_entropy), backend,
                                    bool(inplace_backward))
    return logp, (entropy if with_entropy else None)


# ----------------------------------------------------------------------------------------------------------
# The one-pass path: log-probs and the logits gradient in the same pass (DESIGN.md §5)
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("grpo_kernels::logprobs_fwd_grad", mutates_args=())
def logprobs_fwd_grad(logits: Tensor, tokens: Tensor, mask: Tensor, coef: Tensor, temperature: float,
                      with_entropy: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logp, lse, entropy, grad)`` with ``grad[s,t,v] = coef[s,t]·(1[v=y] − p_v)/τ``: one read of each
    unmasked logits row, one write of the gradient. Not differentiable itself (see :func:`one_pass_loss`)."""
    _check_ids(logits, tokens, mask)
    mod = _backends.kernel_module(backend)
    return mod.logprobs_fwd_grad(logits, tokens, mask, coef, temperature, with_entropy)


@logprobs_fwd_grad.register_fake
def _(logits, tokens, mask, coef, temperature, with_entropy, backend):
    S, T, _ = logits.shape
    dt = _acc_dtype(logits.dtype)
    small = [logits.new_empty((S, T), dtype=dt) for _ in range(3)]
    return (*small, torch.empty(logits.shape, dtype=logits.dtype, device=logits.device))


def supports_one_pass(backend: str) -> bool:
    """Whether the kernel module of ``backend`` implements ``logprobs_fwd_grad``."""
    return bool(getattr(_backends.kernel_module(backend), "FWD_GRAD", False))


def scale_saved_gradients(ctx, grads, grad_out: Tensor):
    """Gradients computed in a forward, scaled in place by the incoming ``grad_out`` (one 0-dim tensor).

    Scaling in place keeps the memory at one buffer (gradient accumulation passes ``grad_out = 1/k``). The
    scale already applied is remembered, so a second backward through a retained graph rescales instead of
    compounding; ``.data`` is used so the in-place update of a saved tensor is not flagged by autograd.
    """
    want = grad_out.detach().to(torch.float64 if any(g is not None and g.dtype == torch.float64 for g in grads)
                                else torch.float32)
    have = getattr(ctx, "applied_scale", None)
    if have is None:
        factor = want
    else:
        if bool(have.eq(0)):
            raise RuntimeError("grpo_kernels: a retained graph was backpropagated with a zero grad_output, which "
                               "erased its precomputed gradient; recompute the loss for another backward.")
        factor = want / have
    if not bool(factor.eq(1)):
        for g in grads:
            if g is not None:
                g.data.mul_(factor)
    ctx.applied_scale = want
    return grads


class _AttachGradient(torch.autograd.Function):
    """Returns ``value`` unchanged; its backward hands ``grad_output · grad_logits`` to ``logits`` (the
    gradient was computed in the forward) and ``grad_output`` to ``value``'s own graph (e.g. the rewards).

    The gradient buffer is a saved tensor: it is freed with the graph after ``backward()``, and
    ``retain_graph=True`` works as usual. (Tip: ``torch.autograd.grad`` or non-leaf logits -- the normal
    case, logits produced by the LM head -- hand the buffer on without the copy autograd makes when it
    accumulates into a leaf's ``.grad`` while the buffer is still referenced.)
    """

    @staticmethod
    def forward(ctx, logits: Tensor, value: Tensor, grad_logits: Tensor):
        ctx.save_for_backward(grad_logits)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = scale_saved_gradients(ctx, ctx.saved_tensors, grad_out)
        return grad, grad_out, None


def one_pass_loss(logits: Tensor, value_fn, tokens: Tensor, mask: Optional[Tensor], coef: Tensor,
                  temperature: float, with_entropy: bool, backend: str):
    """Run the one-pass kernel and return ``value_fn(logp, entropy)`` whose backward delivers the precomputed
    logits gradient (scaled by the incoming gradient).

    ``coef (S, T)`` must be ``∂loss/∂ℓ`` and independent of ``ℓ`` (the caller checks the loss is linear in
    the log-probs); ``value_fn(logp, entropy)`` computes the loss (or ``(loss, metrics)``) from detached
    log-probs -- it may carry a graph to the rewards.
    """
    l3, tokens, keep = prepare(logits, tokens, mask)
    coef = coef.to(_acc_dtype(l3.dtype)).contiguous()
    logp, _, entropy, grad = logprobs_fwd_grad(l3.detach(), tokens, keep, coef, float(temperature),
                                               bool(with_entropy), backend)
    out = value_fn(logp, entropy if with_entropy else None)
    loss, metrics = out if isinstance(out, tuple) else (out, None)
    loss = _AttachGradient.apply(logits, loss, grad)
    return (loss, metrics) if metrics is not None else loss
