"""The ops gateway: the only way the public API (``loss.py``, ``fused_linear.py``) reaches a kernel module.

``torch.library`` custom ops carry all logits-sized work, with fake implementations (so ``torch.compile``
traces through them, ``fullgraph=True`` included) and autograd; ``torch.library.opcheck`` checks them:

``grpo_kernels::logprobs_fwd(logits, tokens, mask, temperature, with_entropy, backend, inplace_backward, check_ids)``
    ``-> (logp, lse, entropy)``; differentiable (its backward is ``logprobs_bwd`` / ``logprobs_bwd_inplace``).
``grpo_kernels::logprobs_bwd(...)`` / ``grpo_kernels::logprobs_bwd_inplace(...)``
    the two-pass backward, into a new buffer or into the logits' own storage.
``grpo_kernels::logprobs_fwd_grad(logits, tokens, mask, coef, temperature, with_entropy, backend, check_ids, ent_coef)``
    the one-pass forward + gradient (see :func:`one_pass_loss`); ``grpo_kernels::logprobs_fwd_grad_inplace``
    writes that gradient over the logits (``inplace_backward=True``).

``backend`` names the kernel module (see the contract in :mod:`grpo_kernels.kernels`). ``check_ids`` is explicit:
the public functions pass False after they validated the token ids themselves (eager mode) and True while
``torch.compile`` traces (validation cannot run then, so the op checks at run time, on the device, without a host
sync: :func:`grpo_kernels.kernels.assert_token_ids`); the backward trusts the ids its forward saw. :func:`kernel_fwd` and :func:`kernel_fwd_grad` are the same calls without autograd, for
the fused-linear path's chunks (which may write the gradient into the chunk buffer, ``out=``).

Memory traffic: the forward reads each unmasked logits row once; the backward reads it once more and writes
the gradient once; the one-pass op reads it once (plus a cache-hot reread) and writes the gradient once
(docs/design.md §6). Masked rows are never read.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import validation as _v
from ..reference import accumulation_dtype
from . import assert_token_ids, kernel_module, rows_overlap

Tensor = torch.Tensor


def check_ids_in_op() -> bool:
    """The ``check_ids`` the public functions pass after validating their arguments: False in eager mode (the
    ids were just checked), True while ``torch.compile`` traces (validation is skipped then)."""
    return _v._is_compiling()


def kernel_fwd(backend: str, logits: Tensor, tokens: Tensor, mask: Tensor, temperature: float, with_entropy: bool,
               *, check_ids: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp, lse, entropy)`` from backend's ``logprobs_fwd`` (no autograd; kernel layout, see :func:`prepare`).
    ``check_ids=True`` checks the ids here, on the device (:func:`grpo_kernels.kernels.assert_token_ids`: no host
    sync), and the kernel module is then told not to check again."""
    if check_ids:
        assert_token_ids(logits, tokens, mask)
    return kernel_module(backend).logprobs_fwd(logits, tokens, mask, temperature, with_entropy, check_ids=False)


def kernel_fwd_grad(backend: str, logits: Tensor, tokens: Tensor, mask: Tensor, coef: Tensor, temperature: float,
                    with_entropy: bool, *, out: Optional[Tensor] = None, check_ids: bool,
                    ent_coef: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logp, lse, entropy, grad)`` from backend's one-pass ``logprobs_fwd_grad`` (no autograd); ``out`` may be
    the logits themselves (the fused-linear chunk buffer); ``ent_coef (S, T)`` adds ``ent_coef·∂H/∂z`` to the
    gradient (the entropy bonus, docs/design.md §5)."""
    if check_ids:
        assert_token_ids(logits, tokens, mask)
    extra = {} if ent_coef is None else {"ent_coef": ent_coef}
    return kernel_module(backend).logprobs_fwd_grad(logits, tokens, mask, coef, temperature, with_entropy, out=out,
                                                    check_ids=False, **extra)


@torch.library.custom_op("grpo_kernels::logprobs_fwd", mutates_args=())
def logprobs_fwd(logits: Tensor, tokens: Tensor, mask: Tensor, temperature: float, with_entropy: bool,
                 backend: str, inplace_backward: bool = False, check_ids: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    return kernel_fwd(backend, logits, tokens, mask, temperature, with_entropy, check_ids=check_ids)


@logprobs_fwd.register_fake
def _(logits, tokens, mask, temperature, with_entropy, backend, inplace_backward=False, check_ids=True):
    S, T, _ = logits.shape
    dt = accumulation_dtype(logits.dtype)
    return (logits.new_empty((S, T), dtype=dt), logits.new_empty((S, T), dtype=dt),
            logits.new_empty((S, T), dtype=dt))


@torch.library.custom_op("grpo_kernels::logprobs_bwd", mutates_args=())
def logprobs_bwd(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, tokens: Tensor, mask: Tensor,
                 lse: Tensor, entropy: Tensor, temperature: float, backend: str) -> Tensor:
    # the autograd backward: these are the very ids its forward saw (and checked when asked to)
    return kernel_module(backend).logprobs_bwd(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy,
                                               temperature, check_ids=False)


@logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("grpo_kernels::logprobs_bwd_inplace", mutates_args=("logits",))
def logprobs_bwd_inplace(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, tokens: Tensor,
                         mask: Tensor, lse: Tensor, entropy: Tensor, temperature: float, backend: str) -> None:
    """Overwrite ``logits`` with the gradient. Declared as mutating ``logits``, so its version counter moves
    and any other autograd node that saved the logits fails loudly instead of reading the gradient."""
    # every kernel module writes each row in place after reading it (the contract's out=)
    kernel_module(backend).logprobs_bwd(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature,
                                        out=logits, check_ids=False)


@logprobs_bwd_inplace.register_fake
def _(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, tokens, mask, temperature, with_entropy, backend = inputs[:6]
    inplace = inputs[6]
    _, lse, entropy = output
    ctx.save_for_backward(logits, tokens, mask, lse, entropy)
    ctx.temperature = temperature
    ctx.with_entropy = with_entropy
    ctx.backend = backend
    ctx.inplace = inplace


_NO_DOUBLE_BACKWARD = ("grpo_kernels: second derivatives (create_graph=True) are not supported by the fused backends "
                       "(their logits gradient is computed by a kernel); use grpo_kernels.reference.grpo_loss, the "
                       "autograd reference, for double backward")


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    if torch.is_grad_enabled():
        raise NotImplementedError(_NO_DOUBLE_BACKWARD)
    logits, tokens, mask, lse, entropy = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None, None
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    grad_logp = grad_logp.to(lse.dtype).contiguous()
    if grad_entropy is not None and ctx.with_entropy:
        grad_entropy = grad_entropy.to(lse.dtype).contiguous()
    else:
        grad_entropy = None
    if ctx.inplace:
        logprobs_bwd_inplace(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, ctx.temperature,
                             ctx.backend)
        return logits, None, None, None, None, None, None, None
    grad = logprobs_bwd(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, ctx.temperature, ctx.backend)
    return grad, None, None, None, None, None, None, None


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


def _check_inplace(logits: Tensor) -> None:
    if logits.stride(-1) != 1 or rows_overlap(logits):
        raise ValueError("inplace_backward=True needs logits with a unit vocabulary stride whose rows do not overlap "
                         f"(it writes the gradient into their storage), got strides {logits.stride()}; pass "
                         "contiguous logits or inplace_backward=False")


def fused_token_logprobs(logits: Tensor, tokens: Tensor, mask: Optional[Tensor], temperature: float,
                         with_entropy: bool, backend: str, inplace_backward: bool = False, *,
                         check_ids: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """``(logp, entropy or None)`` of shape ``(S, T)`` through the custom op (differentiable).

    ``inplace_backward=True`` writes the gradient into the logits' own storage (saves one ``[S, T, V]``
    buffer). The logits' values are destroyed by the backward; autograd's version counter makes any other
    user of those logits fail loudly rather than silently read the gradient.
    """
    if inplace_backward:
        _check_inplace(logits)
    logits, tokens, keep = prepare(logits, tokens, mask)
    logp, _, entropy = logprobs_fwd(logits, tokens, keep, float(temperature), bool(with_entropy), backend,
                                    bool(inplace_backward), bool(check_ids))
    return logp, (entropy if with_entropy else None)


# ----------------------------------------------------------------------------------------------------------
# The one-pass path: log-probs and the logits gradient in the same pass (docs/design.md §5)
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("grpo_kernels::logprobs_fwd_grad", mutates_args=())
def logprobs_fwd_grad(logits: Tensor, tokens: Tensor, mask: Tensor, coef: Tensor, temperature: float,
                      with_entropy: bool, backend: str, check_ids: bool = True,
                      ent_coef: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logp, lse, entropy, grad)`` with ``grad[s,t,v] = (coef·(1[v=y] − p_v) − ent_coef·p_v·(z_v/τ − (lse −
    H)))/τ`` (the entropy term only when ``ent_coef`` is given): one read of each unmasked logits row, one write of
    the gradient. Not differentiable itself (see :func:`one_pass_loss`)."""
    return kernel_fwd_grad(backend, logits, tokens, mask, coef, temperature, with_entropy, check_ids=check_ids,
                           ent_coef=ent_coef)


@logprobs_fwd_grad.register_fake
def _(logits, tokens, mask, coef, temperature, with_entropy, backend, check_ids=True, ent_coef=None):
    S, T, _ = logits.shape
    dt = accumulation_dtype(logits.dtype)
    small = [logits.new_empty((S, T), dtype=dt) for _ in range(3)]
    return (*small, torch.empty(logits.shape, dtype=logits.dtype, device=logits.device))


def supports_one_pass(backend: str) -> bool:
    """Whether the kernel module of ``backend`` implements ``logprobs_fwd_grad`` (``FWD_GRAD``)."""
    return bool(kernel_module(backend).FWD_GRAD)


def scale_saved_gradients(ctx, grads, grad_out: Tensor):
    """Gradients computed in a forward, times the incoming ``grad_out`` (one 0-dim tensor).

    The first backward scales the saved buffers in place (``.data``, so autograd does not flag the update of a
    saved tensor) and hands them out: one buffer in all, no copy (gradient accumulation passes
    ``grad_out = 1/k``, or better ``loss_scale=1/k`` and then nothing is scaled). A buffer once handed out is
    never modified again -- the caller may hold it (``g1 = torch.autograd.grad(loss, x, retain_graph=True)``) --
    so a later backward through a retained graph returns a new tensor, rescaled from the scale the buffer holds.
    Raises NotImplementedError under ``create_graph=True``: this gradient is a constant of the forward, not a
    function autograd could differentiate again.
    """
    if torch.is_grad_enabled():
        raise NotImplementedError(_NO_DOUBLE_BACKWARD)
    dt = torch.float64 if any(g is not None and g.dtype == torch.float64 for g in grads) else torch.float32
    want = grad_out.detach().to(dt)
    if getattr(ctx, "handed_out", False):  # buffers hold `have`·gradient and belong to an earlier caller
        have = ctx.applied_scale
        if bool(have.eq(0)):
            return tuple(None if g is None else torch.zeros_like(g) for g in grads)
        factor = want / have
        return tuple(None if g is None else g * factor.to(g.dtype) for g in grads)
    if not bool(want.eq(1)):
        for g in grads:
            if g is not None:
                g.data.mul_(want)
    ctx.applied_scale = want
    ctx.handed_out = True
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


@torch.library.custom_op("grpo_kernels::logprobs_fwd_grad_inplace", mutates_args=("logits",))
def logprobs_fwd_grad_inplace(logits: Tensor, tokens: Tensor, mask: Tensor, coef: Tensor, temperature: float,
                              with_entropy: bool, backend: str, check_ids: bool = True,
                              ent_coef: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`logprobs_fwd_grad` writing the gradient over the logits (each row is read before it is
    overwritten); returns ``(logp, lse, entropy)``. Declared as mutating ``logits``: their version counter moves,
    so any other autograd node that saved them fails loudly instead of reading the gradient."""
    logp, lse, ent, _ = kernel_fwd_grad(backend, logits, tokens, mask, coef, temperature, with_entropy, out=logits,
                                        check_ids=check_ids, ent_coef=ent_coef)
    return logp, lse, ent


@logprobs_fwd_grad_inplace.register_fake
def _(logits, tokens, mask, coef, temperature, with_entropy, backend, check_ids=True, ent_coef=None):
    S, T, _ = logits.shape
    dt = accumulation_dtype(logits.dtype)
    return tuple(logits.new_empty((S, T), dtype=dt) for _ in range(3))


def one_pass_loss(logits: Tensor, value_fn, tokens: Tensor, mask: Optional[Tensor], coef: Tensor,
                  temperature: float, with_entropy: bool, backend: str, *, check_ids: bool = True,
                  inplace: bool = False, ent_coef: Optional[Tensor] = None):
    """Run the one-pass kernel and return ``value_fn(logp, entropy)`` whose backward delivers the precomputed
    logits gradient (scaled by the incoming gradient).

    ``coef (S, T)`` must be ``∂loss/∂ℓ`` and independent of ``ℓ`` (the caller checks the loss is linear in
    the log-probs), and ``ent_coef (S, T)`` (or None) ``∂loss/∂H``, likewise constant (a constant entropy bonus:
    its gradient is written by the same pass, docs/design.md §5); ``value_fn(logp, entropy)`` computes the loss (or ``(loss, metrics)``) from detached
    log-probs -- it may carry a graph to the rewards. ``inplace=True`` writes the gradient into the logits' own
    storage during this forward (``inplace_backward=True`` of the public functions: no ``[S, T, V]`` buffer, and
    the second read of each row is the cache-hot one before its write); the logits' values are gone afterwards.
    """
    if inplace:
        _check_inplace(logits)
    l3, tokens, keep = prepare(logits, tokens, mask)
    acc = accumulation_dtype(l3.dtype)
    coef = coef.to(acc).contiguous()
    if ent_coef is not None:
        ent_coef = ent_coef.to(acc).contiguous()
        with_entropy = True  # the kernel computes H for the gradient anyway
    if inplace:
        grad = l3.detach()  # shares the storage and the version counter of the logits
        logp, _, entropy = logprobs_fwd_grad_inplace(grad, tokens, keep, coef, float(temperature),
                                                     bool(with_entropy), backend, bool(check_ids), ent_coef)
    else:
        logp, _, entropy, grad = logprobs_fwd_grad(l3.detach(), tokens, keep, coef, float(temperature),
                                                   bool(with_entropy), backend, bool(check_ids), ent_coef)
    out = value_fn(logp, entropy if with_entropy else None)
    loss, metrics = out if isinstance(out, tuple) else (out, None)
    loss = _AttachGradient.apply(logits, loss, grad)
    return (loss, metrics) if metrics is not None else loss
