"""Backend ``"torch"``: the kernel contract (see :mod:`grpo_kernels.kernels`) in eager PyTorch.

Not a speed path: it runs everywhere (any device torch supports), so ``backend="torch"`` means this one
implementation in ``grpo_loss``, ``token_logprobs`` and the fused-linear path alike. The forward
comes from :func:`grpo_kernels.reference.token_logprobs` (the one eager copy), the backward is the contract's
closed-form row gradient (autograd is not available inside a custom op's implementation); rows are
processed in slices so the fp32 temporaries stay bounded (``ROW_BLOCK`` rows at a time).
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
            zb, yb = z[a:a + ROW_BLOCK], y[a:a + ROW_BLOCK]
            out = _ref.token_logprobs(zb, yb, temperature, return_entropy=with_entropy)
            lp, h = out if with_entropy else (out, None)
            keep = yb != -100
            logp[a:a + ROW_BLOCK] = lp
            y0 = torch.where(keep, yb, 0).long().unsqueeze(-1)
            target = zb.gather(-1, y0).squeeze(-1).to(acc) / temperature
            lse_b = torch.where(keep, target - lp, 0.0)  # ℓ = z_y/τ − lse
            # a target logit of -inf makes that difference NaN: take the log-sum-exp directly there (for the
            # whole slice, no host-side branch: this runs inside compiled / CUDA-graph-captured steps too)
            lse_b = torch.where(torch.isfinite(lse_b) | ~keep, lse_b,
                                torch.logsumexp(zb.to(acc) / temperature, -1))
            lse[a:a + ROW_BLOCK] = lse_b
            if with_entropy:
                ent[a:a + ROW_BLOCK] = h
    return logp.view(S, T), lse.view(S, T), ent.view(S, T)


def _grad_rows(zb: Tensor, yb: Tensor, temperature: float, g: Tensor, gh: Optional[Tensor]) -> Tensor:
    """The contract's gradient formula on a slice of rows (fp32/fp64 math, cast by the caller)."""
    acc = g.dtype
    z = zb.to(acc) / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    p = torch.exp(z - lse)
    p = torch.where(torch.isfinite(lse), p, torch.zeros_like(p))
    keep = (yb != -100).unsqueeze(-1)
    grad = -g.unsqueeze(-1) * p
    if gh is not None:
        finite_z = z.masked_fill(z == float("-inf"), 0.0)
        h = lse - (p * finite_z).sum(-1, keepdim=True)
        grad = grad - gh.unsqueeze(-1) * p * (finite_z - (lse - h))
    idx = torch.where(keep.squeeze(-1), yb, torch.zeros_like(yb)).long().unsqueeze(-1)
    grad = grad.scatter_add(-1, idx, g.unsqueeze(-1))
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
