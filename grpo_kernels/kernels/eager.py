"""Backend ``"torch"``: the kernel contract (see :mod:`grpo_kernels.kernels`) in eager PyTorch.

Not a speed path: it runs everywhere (any device torch supports), so ``backend="torch"`` means this one
implementation in ``grpo_loss``, ``token_logprobs`` and the fused-linear path alike. The forward equals
:func:`grpo_kernels.reference.token_logprobs` to rounding, the backward is the contract's closed-form row gradient
(autograd is not available inside a custom op's implementation); rows are processed in slices so the fp32
temporaries stay bounded (``ROW_BLOCK`` rows at a time).

Confident targets (``p_y ≈ 1``): nothing is formed as ``z_y/τ − lse``, nor ``1 − p_y`` from ``p_y`` -- in fp32 both
keep nothing of a ``1 − p_y`` below ~``|lse|·6e-8``. The forward takes ``ℓ = −softplus(x)``,
``x = logsumexp_{v≠y}(z_v/τ) − z_y/τ`` (``= log((1 − p_y)/p_y)``), and ``H = Σ_{v≠y} p_v (lse − z_v/τ) − p_y ℓ``
(non-negative terms); the backward writes the target's ``1 − p_y`` as ``Σ_{v≠y} p_v`` and its entropy term's
``log p_y + H`` from that sum. Everything is tensor arithmetic (``torch.where``, no host-side branch), so the module
runs inside ``torch.compile`` and CUDA-graph-captured steps.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference as _ref
from . import check_ent_coef, check_out, check_token_ids

Tensor = torch.Tensor

FWD_GRAD = True
ROW_BLOCK = 256  # rows per slice: bounds the fp32 temporaries to ROW_BLOCK x V


def is_available(device: torch.device) -> Tuple[bool, str]:
    return True, "eager PyTorch (reference math through autograd)"


def _rows(logits: Tensor, tokens: Tensor, mask: Tensor):
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    y = torch.where(mask, tokens, torch.full_like(tokens, -100)).reshape(-1)
    return z, y


_NEG_INF = float("-inf")
_INF = float("inf")


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + e^x)`` to rounding for every x (``F.softplus`` returns x above its threshold: an error of
    ``e^-20`` there, more than fp64 rounding)."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def _fwd_rows(zb: Tensor, yb: Tensor, temperature: float, with_entropy: bool, acc: torch.dtype):
    """``(logp, lse, entropy)`` of a slice of rows (``yb == -100``: outputs 0; entropy None unless asked).

    ``ℓ = −softplus(x)`` with ``x = logsumexp_{v≠y}(z_v/τ) − z_y/τ``: ``e^x = Σ_{v≠y} p_v / p_y``, so for a
    confident target ℓ ≈ −e^x keeps its relative accuracy (``z_y/τ − lse`` would be 0 or one ulp of lse), and for any
    other row it is ``z_y/τ − lse`` to rounding. ``lse = z_y/τ + softplus(x)`` (the others' log-sum-exp where
    ``z_y = −inf``). ``H = Σ_{v≠y} p_v (lse − z_v/τ) + p_y·softplus(x)``: non-negative terms, no cancellation."""
    z = zb.to(acc)
    if temperature != 1.0:
        z = z / temperature
    keep = yb != -100
    idx = torch.where(keep, yb, torch.zeros_like(yb)).long().unsqueeze(-1)
    zy = z.gather(-1, idx)
    others = z.scatter(-1, idx, _NEG_INF)
    lse_o = torch.logsumexp(others, -1, keepdim=True)
    sp = _softplus(lse_o - zy)  # −log p_y (a row of V = 1: lse_o = −inf, sp = 0)
    lse = torch.where(zy == _NEG_INF, lse_o, zy + sp)
    zero = torch.zeros((), dtype=acc, device=z.device)
    ent = None
    if with_entropy:
        p_o = torch.exp(others - lse)  # p_v for v ≠ y (0 at y)
        terms = torch.where(others == _NEG_INF, zero, p_o * (lse - others))  # (−inf logits: p = 0, avoid 0·inf)
        py_term = torch.where(sp == _INF, zero, torch.exp(-sp) * sp)  # p_y·(−log p_y), 0 at p_y = 0
        ent = torch.where(keep, (terms.sum(-1, keepdim=True) + py_term).squeeze(-1), zero)
    return torch.where(keep, -sp.squeeze(-1), zero), torch.where(keep, lse.squeeze(-1), zero), ent


def logprobs_fwd(logits: Tensor, tokens: Tensor, mask: Tensor, temperature: float,
                 with_entropy: bool, check_ids: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    if check_ids:
        check_token_ids(logits, tokens, mask)
    S, T, _ = logits.shape
    z, y = _rows(logits, tokens, mask)
    acc = _ref.accumulation_dtype(logits.dtype)
    logp = torch.zeros(S * T, dtype=acc, device=logits.device)
    lse = torch.zeros_like(logp)
    ent = torch.zeros_like(logp)
    with torch.no_grad():
        for a in range(0, S * T, ROW_BLOCK):
            lp, lse_b, h = _fwd_rows(z[a:a + ROW_BLOCK], y[a:a + ROW_BLOCK], temperature, with_entropy, acc)
            logp[a:a + ROW_BLOCK] = lp
            lse[a:a + ROW_BLOCK] = lse_b
            if with_entropy:
                ent[a:a + ROW_BLOCK] = h
    return logp.view(S, T), lse.view(S, T), ent.view(S, T)


def _grad_rows(zb: Tensor, yb: Tensor, temperature: float, g: Tensor, gh: Optional[Tensor]) -> Tensor:
    """The contract's gradient formula on a slice of rows (fp32/fp64 math, cast by the caller).

    The target's entry is ``(g·(1 − p_y) − g_H·p_y·(log p_y + H))/τ`` with ``1 − p_y = Σ_{v≠y} p_v`` (neither
    ``1 − p_y`` formed from p_y nor a scatter-add of g onto ``−g·p_y``: both cancel at p_y ≈ 1) and, where that sum
    is below 1/2, ``log p_y = log1p(−Σ_{v≠y} p_v)``; H is summed from non-negative terms, as in the forward."""
    acc = g.dtype
    z = zb.to(acc) / temperature
    keep = (yb != -100).unsqueeze(-1)
    idx = torch.where(keep.squeeze(-1), yb, torch.zeros_like(yb)).long().unsqueeze(-1)
    lse = torch.logsumexp(z, -1, keepdim=True)
    p = torch.exp(z - lse)
    p = torch.where(torch.isfinite(lse), p, torch.zeros_like(p))
    p_o = p.scatter(-1, idx, 0.0)  # p_v for v ≠ y
    rest = p_o.sum(-1, keepdim=True)  # 1 − p_y
    g1 = g.unsqueeze(-1)
    grad = -g1 * p
    target = g1 * rest
    if gh is not None:
        gh1 = gh.unsqueeze(-1)
        zero = torch.zeros((), dtype=acc, device=z.device)
        py = p.gather(-1, idx)
        lpy = torch.where(rest < 0.5, torch.log1p(-rest), z.gather(-1, idx) - lse)  # log p_y
        terms = torch.where(z == _NEG_INF, zero, p_o * (lse - z))
        h = terms.sum(-1, keepdim=True) - torch.where(py > 0, py * lpy, zero)
        finite_z = z.masked_fill(z == _NEG_INF, 0.0)
        grad = grad - gh1 * p * (finite_z - (lse - h))
        target = target - gh1 * torch.where(py > 0, py * (lpy + h), zero)
    grad = grad.scatter(-1, idx, target)
    return torch.where(keep, grad / temperature, torch.zeros_like(grad))


def logprobs_bwd(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, tokens: Tensor, mask: Tensor,
                 lse: Tensor, entropy: Tensor, temperature: float, out: Optional[Tensor] = None,
                 check_ids: bool = True) -> Tensor:
    if check_ids:
        check_token_ids(logits, tokens, mask)
    if out is not None:
        check_out(out, logits)
    S, T, V = logits.shape
    z, y = _rows(logits, tokens, mask)
    res = torch.empty((S, T, V), dtype=logits.dtype, device=logits.device) if out is None else out
    dst = res.view(-1, V) if res.is_contiguous() else None
    g = grad_logp.reshape(-1)
    gh = None if grad_entropy is None else grad_entropy.reshape(-1)
    for a in range(0, S * T, ROW_BLOCK):
        b = min(a + ROW_BLOCK, S * T)
        grad = _grad_rows(z[a:b], y[a:b], temperature, g[a:b], None if gh is None else gh[a:b])
        if dst is not None:
            dst[a:b] = grad
        else:  # strided out= (the logits themselves): write row slices through the (S, T) index
            idx = torch.arange(a, b, device=logits.device)
            res[idx // T, idx % T] = grad.to(res.dtype)
    return res


def logprobs_fwd_grad(logits: Tensor, tokens: Tensor, mask: Tensor, coef: Tensor, temperature: float,
                      with_entropy: bool, out: Optional[Tensor] = None, check_ids: bool = True,
                      ent_coef: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if ent_coef is not None:
        check_ent_coef(ent_coef, logits)
        with_entropy = True
    logp, lse, ent = logprobs_fwd(logits, tokens, mask, temperature, with_entropy, check_ids=check_ids)
    grad = logprobs_bwd(coef, ent_coef, logits, tokens, mask, lse, ent, temperature, out=out, check_ids=False)
    return logp, lse, ent, grad
