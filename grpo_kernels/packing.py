"""Packed (padding-free) batches: ``cu_seqlens`` as flash-attn, TRL's ``padding_free`` and verl's remove-padding
lay them out (docs/design.md §2, packed batches).

``N`` tokens of ``S = len(cu_seqlens) − 1`` sequences back to back: sequence ``s`` is tokens
``cu_seqlens[s] … cu_seqlens[s+1] − 1``. The logits-sized work (the kernels) runs on the ``N`` packed rows as they
are -- no padding is ever read or written; only the ``[S, T_max]`` per-token vectors the eager loss needs (log-probs,
entropies, masks, coefficients: a few bytes per token) are scattered into a padded layout, so every normalizer and
GSPO's per-sequence ratio is exactly the padded form's. :class:`Packing` is that index map.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import validation as _v

Tensor = torch.Tensor


class Packing:
    """The map between ``N`` packed positions and the ``(S, T)`` padded layout (``T`` = the longest sequence).

    ``index (N,)``: flat padded position ``s·T + t`` of each packed token. Built once per call from
    ``cu_seqlens`` (its values are read on the host once: ``T`` is a shape).
    """

    def __init__(self, cu_seqlens, num_tokens: int, device: torch.device):
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be a 1-D int32/int64 tensor of cumulative lengths, got "
                            f"{type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64 (cumulative sequence lengths, as flash-attn), got "
                            f"{cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be 1-D with S + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.device != device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the logits are on {device}")
        cu = [int(x) for x in cu_seqlens.detach().cpu().tolist()]  # the one host read: T is a shape
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
        for s in range(len(cu) - 1):
            if cu[s + 1] < cu[s]:
                raise ValueError(f"cu_seqlens must be non-decreasing (cumulative lengths), got cu_seqlens[{s}] = "
                                 f"{cu[s]} > cu_seqlens[{s + 1}] = {cu[s + 1]}")
        if cu[-1] != num_tokens:
            raise ValueError(f"cu_seqlens must end at the number of packed tokens N = {num_tokens}, got "
                             f"cu_seqlens[-1] = {cu[-1]}")
        self.S = len(cu) - 1
        self.N = num_tokens
        lengths = [cu[s + 1] - cu[s] for s in range(self.S)]
        self.T = max(lengths, default=0)
        starts = torch.tensor(cu[:-1], dtype=torch.int64)
        seq = torch.repeat_interleave(torch.arange(self.S), torch.tensor(lengths, dtype=torch.int64))
        pos = torch.arange(num_tokens) - starts[seq] if num_tokens else torch.zeros(0, dtype=torch.int64)
        self.index = (seq * self.T + pos).to(device)
        self.device = device

    # ------------------------------------------------------------------ layout changes of [N]-sized vectors
    def flat(self, x: Tensor, name: str) -> Tensor:
        """A per-token tensor given as ``(N,)`` or ``(1, N)`` → ``(N,)`` (a ValueError naming ``name`` otherwise)."""
        _v.check_tensor(name, x, device=self.device)
        if tuple(x.shape) not in ((self.N,), (1, self.N)):
            raise ValueError(f"{name} must have shape ({self.N},) or (1, {self.N}) (one value per packed token), got "
                             f"{tuple(x.shape)}")
        return x.reshape(self.N)

    def pad(self, x: Tensor, fill=0) -> Tensor:
        """``(N,)`` → ``(S, T)``, ``fill`` at the padding; differentiable with respect to ``x``."""
        out = torch.full((self.S * self.T,), fill, dtype=x.dtype, device=x.device)
        return out.index_copy(0, self.index, x.reshape(-1)).view(self.S, self.T)

    def gather(self, x: Tensor) -> Tensor:
        """``(S, T)`` → ``(1, N)``: the packed positions of a padded per-token tensor."""
        return x.reshape(-1).index_select(0, self.index).view(1, self.N)


def packed_inputs(logits_or_hidden: Tensor, tokens: Tensor, mask: Optional[Tensor], cu_seqlens, data: dict,
                  name: str = "logits"):
    """Validate and lay out a packed call: ``(x3 (1, N, D), tokens (1, N), mask (1, N) or None, packing, tokens_p,
    mask_p, data_p)`` where ``*_p`` are the padded ``(S, T)`` forms the eager loss and the validator take.

    ``x`` is ``(N, D)`` or ``(1, N, D)``; per-token keywords of ``data`` (``old_logprobs``, ``ref_logprobs``,
    ``sampling_logprobs``, per-token ``advantages``) are ``(N,)`` or ``(1, N)``.
    """
    _v.check_tensor(name, logits_or_hidden, floating=True)
    if logits_or_hidden.dim() == 2:
        x3 = logits_or_hidden.unsqueeze(0)
    elif logits_or_hidden.dim() == 3 and logits_or_hidden.shape[0] == 1:
        x3 = logits_or_hidden
    else:
        raise ValueError(f"with cu_seqlens, {name} must be packed: shape (N, D) or (1, N, D), got "
                         f"{tuple(logits_or_hidden.shape)}")
    N = x3.shape[1]
    pk = Packing(cu_seqlens, N, x3.device)
    _v.check_tensor("tokens", tokens, device=x3.device)
    tok = pk.flat(tokens, "tokens")
    tokens_p = pk.pad(tok, _v.IGNORE_INDEX)
    mask_f = None if mask is None else pk.flat(mask, "mask")
    mask_p = None if mask_f is None else pk.pad(mask_f, 0)
    data_p = dict(data)
    for key in ("old_logprobs", "ref_logprobs", "sampling_logprobs"):
        if data.get(key) is not None:
            data_p[key] = pk.pad(pk.flat(data[key], key), 0)
    adv = data.get("advantages")
    if isinstance(adv, torch.Tensor) and adv.numel() == N and N != pk.S and adv.dim() >= 1 and adv.shape[-1] == N:
        data_p["advantages"] = pk.pad(pk.flat(adv, "advantages"), 0)  # per-token advantages
    return (x3, tok.view(1, N), None if mask_f is None else mask_f.view(1, N), pk, tokens_p, mask_p, data_p)
