"""Vocabulary-parallel (tensor-parallel) LM heads: the GRPO log-probs, entropy and loss when each rank of a process
group holds only a slice of the vocabulary (Megatron's ``VocabParallelEmbedding`` / column-parallel LM head).

Layout (docs/scaling.md): rank ``r`` of ``group`` holds the logits (or the LM-head weight rows) of the vocabulary
ids ``[start_r, end_r)``. Without ``vocab_start_index`` the shards must be Megatron's: equal contiguous shards of
``ceil(V/W)`` ids in rank order, the last possibly shorter (never empty). With ``vocab_start_index`` every rank says
where its shard starts, and the shards must tile ``[0, V)`` in any order. Every other argument -- tokens (the
*global* ids, ``-100`` = ignored), mask, rewards, options, hidden states -- must be identical on every rank.

Per row, with ``lse_r``, ``H_r`` and ``ℓ_r`` the local kernel's log-sum-exp, entropy and log-prob over the shard
(the owner ``o`` of the target id computes ``ℓ_o = z_y/τ − lse_o`` for the local id ``y − start_o``; the other ranks
run the kernel on a dummy local id 0 and ignore its log-prob), two all-reduces combine them:

1. ``MAX`` of ``[lse_r, lse_r if r owns the target else −inf]`` -> ``M = max_r lse_r`` and ``lse_o`` (2 floats);
2. ``SUM`` of ``[a_r·1[r≠o], ℓ_r·1[r=o], a_r·(H_r − d_r)]`` with ``d_r = lse_r − M ≤ 0`` and ``a_r = e^{d_r}``
   (3 floats; 2 without entropy) -> ``N = Σ_{r≠o} a_r``, ``ℓ_o``, ``E``.

Then ``Q = N·e^{−d_o} = Σ_{r≠o} e^{lse_r − lse_o}``, ``lse = lse_o + log1p(Q)``, ``ℓ = ℓ_o − log1p(Q)`` -- the
rank-local form: the owner's log-prob keeps its kernel's precision for confident tokens (no ``z_y/τ − lse``
cancellation), and the other shards enter through ``log1p`` of their (small) mass relative to the owner's -- and
``H = log s + E/s`` with ``s = Σ_r a_r ≥ 1``: ``H = Σ_r w_r (H_r − log w_r)``, ``w_r = a_r/s``, a sum of non-negative
terms (no cancellation). The summands of ``N`` and ``ℓ_o`` have at most one non-zero term for ``W = 2`` (and ``ℓ_o``
for any ``W``), so they are exact; ``E`` and ``N`` for ``W ≥ 3`` are summed in the collective's fixed order (gloo and
NCCL reduce in a fixed order for a given world size and message size), and every rank receives the same bits: the
log-probs, entropy, loss and metrics are identical on every rank, and the same run to run.

Backward: no communication -- everything it needs (``lse``, ``H``, ``ℓ``, ``∂loss/∂ℓ``, ``∂loss/∂H``) is replicated.
Each rank's shard gradient is the unsharded formula restricted to its columns,
``(g_ℓ·(1[v=y] − p_v) − g_H·p_v·(z_v/τ − (lse − H)))/τ`` with the *global* ``lse``/``H``: the kernel backward
(``logprobs_bwd`` of the backend) writes every column with them, then one ``S·T`` scatter rewrites the entry at the
local id, from the logit gathered in the forward: the target's ``(g_ℓ·(−expm1 ℓ) − g_H·p_y(z_y/τ − μ))/τ`` on the owner
(from the global ℓ, so ``1 − p_y`` is not ``1 − exp``; the backends take ``1 − p_y = Σ_{v≠y} p_v`` over their own row,
i.e. over the shard only, which this rewrite corrects), and the plain ``−p_v(g_ℓ + g_H(z_v/τ − μ))/τ`` at the dummy id
elsewhere (recomputed, not a subtraction of ``g_ℓ/τ``, which would cancel in bf16). Backend ``"torch"``'s
``logprobs_bwd`` recomputes the log-sum-exp from its own row, so for it this module runs the same closed form
itself (:func:`_eager_bwd`, with the given statistics). The gradient of the replicated inputs (rewards) comes from
the loss value on every rank, as usual.

Communication per call (``N = S·T`` rows, accumulation dtype ``a`` bytes, fp32 -> 4): one all-gather of 8 int64 per
rank (layout and consistency checks, plus one host sync), then ``5·a·N`` bytes (``4·a·N`` without entropy) of
all-reduce payload; the fused-linear variant adds one all-reduce of ``grad_hidden`` (``N·H`` in the accumulation
dtype). Nothing scales with V.

Public functions: :func:`shard_bounds`, :func:`vocab_parallel_token_logprobs`, :func:`vocab_parallel_grpo_loss`,
:func:`vocab_parallel_fused_linear_grpo_loss` (in :mod:`grpo_kernels.vocab_parallel_linear`, re-exported here). The
``*_from_options`` functions are the same calls once
:class:`~grpo_kernels.options.LossOptions` are built: the hooks for ``grpo_loss`` / ``fused_linear_grpo_loss``
(``vocab_parallel_group=``, ``vocab_start_index=``).

Eager mode only: the collectives and the layout check (a host sync) do not trace under ``torch.compile``.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import kernels as _kernels
from . import reference as _ref
from . import validation as _v
from .kernels import ops as _ops
from .options import LossOptions, with_option_keywords

Tensor = torch.Tensor

__all__ = [
    "VocabShard",
    "shard_bounds",
    "vocab_parallel_token_logprobs",
    "vocab_parallel_grpo_loss",
    "vocab_parallel_fused_linear_grpo_loss",
    "grpo_loss_from_options",
    "fused_linear_grpo_loss_from_options",
    "combine_shard_stats",
    "shard_gradient",
    "COMM_FLOATS_PER_ROW",
]

# all-reduce payload per row, in accumulation-dtype elements: (MAX, SUM) with and without entropy
COMM_FLOATS_PER_ROW = {True: (2, 3), False: (2, 2)}

# what the one all-gather of a call carries, per rank (int64): an error flag, then the layout and what must agree
_FIELDS = ("error", "kind", "vocab_local", "vocab_start", "rows", "cols", "ids_fingerprint", "temperature_bits")
_KIND_NAMES = {1: "shard_bounds", 2: "vocab_parallel_token_logprobs", 3: "vocab_parallel_grpo_loss",
               4: "vocab_parallel_fused_linear_grpo_loss"}
_SWITCH = 60.0  # log1p(N·e^{−d_o}) while −d_o < this, else log(s) − d_o (no overflow; same value to rounding)


class VocabShard(NamedTuple):
    """This rank's vocabulary slice ``[start, end)`` of a vocabulary of ``vocab_size`` ids."""

    start: int
    end: int
    vocab_size: int


# ----------------------------------------------------------------------------------------------------------
# The group and the layout
# ----------------------------------------------------------------------------------------------------------
def _check_group(group):
    """The process group (None = the default group) and this process's rank in it, or a ValueError."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab-parallel log-probs need an initialized torch.distributed process group "
                         "(torch.distributed.init_process_group), and group= the ranks that hold the vocabulary "
                         "shards")
    if group is None:
        group = dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("this process is not a member of the vocab-parallel group it passed (group=): every rank "
                         "that calls must hold one vocabulary shard of that group")
    try:
        rank = dist.get_rank(group)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"group= is not a usable process group for this process: {e}") from None
    if rank < 0:
        raise ValueError("this process is not a member of the vocab-parallel group it passed (group=): every rank "
                         "that calls must hold one vocabulary shard of that group")
    return group, rank, dist.get_world_size(group)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where the collectives' tensors live: CUDA for NCCL, CPU for gloo (small ``S·T`` vectors are moved there)."""
    backend = str(dist.get_backend(group)).lower()
    nccl, cpu = "nccl" in backend, ("gloo" in backend or "mpi" in backend)
    if nccl and not cpu:
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    if cpu and not nccl:
        return torch.device("cpu")
    return device  # a group with a backend per device type (e.g. "cpu:gloo,cuda:nccl")


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _ids_fingerprint(tokens: Tensor, keep: Tensor) -> Tensor:
    """A 0-dim int64 that differs (almost surely) when the kept ids or the mask differ between ranks."""
    n = tokens.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.int64, device=tokens.device)
    ids = torch.where(keep, tokens.to(torch.int64) + 1, 0).reshape(-1)
    weights = torch.arange(n, device=tokens.device, dtype=torch.int64) % 1000003 + 1
    return (ids * weights).sum()


def _exchange(group, world: int, device: torch.device, *, error: Optional[BaseException], kind: int,
              vocab_local: int, vocab_start: Optional[int], rows: int = 0, cols: int = 0,
              fingerprint: Optional[Tensor] = None, temperature: float = 0.0):
    """The one all-gather of a call: every rank's error flag, layout and the values that must agree. A local error
    (bad arguments on one rank) is raised on that rank and reported on the others, instead of leaving them blocked
    in a later collective. Returns the gathered rows (``world`` lists of ``len(_FIELDS)`` ints)."""
    comm = _comm_device(group, device)
    head = torch.tensor([1 if error is not None else 0, kind, int(vocab_local),
                         -1 if vocab_start is None else int(vocab_start), int(rows), int(cols), 0,
                         _float_bits(temperature)], dtype=torch.int64)
    head = head.to(comm)
    if fingerprint is not None:
        head[6] = fingerprint.to(comm)
    out = [torch.empty_like(head) for _ in range(world)]
    dist.all_gather(out, head, group=group)
    table = torch.stack(out).tolist()  # the host sync of the layout check
    if error is not None:
        raise error
    bad = [r for r, row in enumerate(table) if row[0]]
    if bad:
        raise ValueError(f"rank(s) {bad} of the vocab-parallel group rejected their arguments (see the error there); "
                         "every rank raises instead of waiting in a collective")
    kinds = {row[1] for row in table}
    if len(kinds) > 1:
        names = [_KIND_NAMES.get(row[1], str(row[1])) for row in table]
        raise ValueError(f"the ranks of the vocab-parallel group called different functions: {names} (by rank); "
                         "group= must be the group of ranks that hold the shards of this LM head, all in this call")
    return table


def _layout(table, rank: int, world: int) -> VocabShard:
    sizes = [row[2] for row in table]
    starts = [row[3] for row in table]
    if any(n < 1 for n in sizes):
        raise ValueError(f"every rank of the vocab-parallel group must hold at least one vocabulary id; local "
                         f"vocabulary sizes by rank: {sizes}")
    V = sum(sizes)
    given = [s >= 0 for s in starts]
    if any(given) and not all(given):
        raise ValueError(f"vocab_start_index must be given on every rank of the group or on none; given on ranks "
                         f"{[r for r, g in enumerate(given) if g]} of {world}")
    if not any(given):
        c = -(-V // world)
        expected = [min(c, max(0, V - r * c)) for r in range(world)]
        if sizes != expected:
            raise ValueError(f"the vocabulary shards are not in Megatron's layout (equal contiguous shards of "
                             f"ceil(V/W) = {c} ids in rank order, the last possibly shorter, none empty): local sizes "
                             f"by rank {sizes} (V = {V}, W = {world}) where that layout has {expected}; pass "
                             "vocab_start_index= (this rank's first id) on every rank for any other layout")
        start = rank * c
        return VocabShard(start, start + sizes[rank], V)
    spans = sorted((starts[r], starts[r] + sizes[r], r) for r in range(world))
    pos = 0
    for a, b, r in spans:
        if a != pos:
            desc = ", ".join(f"rank {q}: [{x}, {y})" for x, y, q in sorted(spans, key=lambda s: s[2]))
            raise ValueError(f"the vocabulary shards given by vocab_start_index do not tile [0, {V}) (the sum of the "
                             f"local sizes) without gaps or overlaps: {desc}")
        pos = b
    return VocabShard(starts[rank], starts[rank] + sizes[rank], V)


def _check_agreement(table, names: Sequence[str]) -> None:
    for i, name in ((4, names[0]), (5, names[1])):
        vals = [row[i] for row in table]
        if len(set(vals)) > 1:
            raise ValueError(f"{name} differs between the ranks of the vocab-parallel group: {vals} (by rank); every "
                             "argument but the vocabulary shard must be replicated on the group")
    if len({row[6] for row in table}) > 1:
        raise ValueError("tokens (or the mask) differ between the ranks of the vocab-parallel group (or, packed, "
                         "cu_seqlens): every rank must "
                         "pass the same global token ids and mask (only the logits / weight rows are sharded)")
    if len({row[7] for row in table}) > 1:
        taus = [struct.unpack("<d", struct.pack("<q", row[7]))[0] for row in table]
        raise ValueError(f"temperature differs between the ranks of the vocab-parallel group: {taus} (by rank)")


def shard_bounds(group, V_local: int, vocab_start_index: Optional[int] = None, *,
                 device: Optional[torch.device] = None) -> VocabShard:
    """``(start, end, V_global)`` of this rank's vocabulary shard: one all-gather of the local sizes (and start
    indices) over ``group`` (None = the default group).

    Without ``vocab_start_index`` the sizes must be Megatron's layout (equal contiguous shards of ``ceil(V/W)`` in
    rank order, the last possibly shorter, none empty); with it, every rank passes its first id and the shards must
    tile ``[0, V)``. Anything else is a ValueError on every rank. Every rank of the group must call it.
    ``device``: where the gathered tensor lives (default: the current CUDA device for NCCL, else CPU).
    """
    group, rank, world = _check_group(group)
    error = None
    try:
        _v.check_int("V_local", V_local, minimum=1)
        _v.check_int("vocab_start_index", vocab_start_index, minimum=0, allow_none=True)
    except (TypeError, ValueError) as e:
        error = e
    dev = torch.device(device) if device is not None else torch.device("cpu")
    table = _exchange(group, world, dev, error=error, kind=1,
                      vocab_local=V_local if error is None else 0,
                      vocab_start=vocab_start_index if error is None else None)
    return _layout(table, rank, world)


def _setup(group, kind: int, local_checks, *, device: torch.device, vocab_local: int, vocab_start_index,
           tokens, mask, temperature: float, names=("S (logits.shape[0])", "T (logits.shape[1])")):
    """Group, local checks, the one all-gather, the layout and the agreement checks. Returns
    ``(group, shard, keep)`` with ``keep`` the bool mask of ``tokens``/``mask`` (or raises on every rank).
    ``local_checks`` may return ``(tokens, mask)`` to use instead (a packed call's padded ``(S, T)`` forms, so
    that the fingerprint also covers ``cu_seqlens``)."""
    group, rank, world = _check_group(group)
    error, keep, fp, rows, cols = None, None, None, 0, 0
    try:
        given = local_checks()
        if given is not None:
            tokens, mask = given
        _v.check_int("vocab_start_index", vocab_start_index, minimum=0, allow_none=True)
        keep = _keep(tokens, mask)
        fp = _ids_fingerprint(tokens, keep)
        shape = tuple(tokens.shape)
        rows, cols = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    except (TypeError, ValueError) as e:
        error = e
    table = _exchange(group, world, device, error=error, kind=kind, vocab_local=vocab_local if error is None else 0,
                      vocab_start=vocab_start_index if error is None else None, rows=rows, cols=cols,
                      fingerprint=fp, temperature=temperature)
    shard = _layout(table, rank, world)
    _check_agreement(table, names)
    return group, shard, keep


class _Rows(NamedTuple):
    """The rows the kernels run over and the loss's ``(S, T)`` layout: unpacked, both are ``(S, T)``; packed
    (``cu_seqlens``), the kernels run over ``(1, N)`` and ``pk`` maps between the two (grpo_kernels.packing)."""
    x: Tensor  # (S, T, D) or (1, N, D): logits or hidden states in the kernels' row layout
    tokens: Tensor  # ids in the kernels' row layout
    pk: Optional[object]  # grpo_kernels.packing.Packing, or None
    tokens_p: Tensor  # (S, T)
    mask_p: Optional[Tensor]  # (S, T)
    data: dict  # per-token keywords in the (S, T) layout

    def to_loss(self, x: Tensor) -> Tensor:  # kernel rows -> (S, T)
        return x.view(self.tokens_p.shape) if self.pk is None else self.pk.pad(x)

    def to_rows(self, x: Tensor) -> Tensor:  # (S, T) -> kernel rows, flat
        return (x if self.pk is None else self.pk.gather(x)).reshape(-1)


def _rows_of(x: Tensor, tokens: Tensor, mask: Optional[Tensor], cu_seqlens, data: dict, name: str,
             check) -> _Rows:
    """Validate the row layout of a call (packed when ``cu_seqlens`` is given, as in ``grpo_loss``; ``check`` is
    applied to ``x`` in the kernels' 3-D layout); raises TypeError/ValueError, which :func:`_setup` reports on
    every rank."""
    if cu_seqlens is None:
        check(x)
        _check_ids_tensor(tokens, tuple(x.shape[:2]), x.device)
        return _Rows(x, tokens, None, tokens, mask, data)
    from .packing import packed_inputs

    x3, tok, _, pk, tokens_p, mask_p, data_p = packed_inputs(x, tokens, mask, cu_seqlens, data, name=name)
    check(x3)
    _check_ids_tensor(tok, tuple(x3.shape[:2]), x3.device)
    return _Rows(x3, tok, pk, tokens_p, mask_p, data_p)


def _local_size(x, cu_seqlens) -> int:
    """The local vocabulary size of a logits shard: ``(S, T, V_r)``, or packed ``(N, V_r)`` / ``(1, N, V_r)``
    (0 when it is not a tensor of such a shape; the local checks then say why)."""
    ok = isinstance(x, Tensor) and (x.dim() == 3 or (cu_seqlens is not None and x.dim() == 2))
    return x.shape[-1] if ok else 0


_PACKED_NAMES = ("S (len(cu_seqlens) - 1)", "T (the longest sequence of cu_seqlens)")


def _check_ids_tensor(tokens, shape, device) -> None:
    """The local part of ``validation.check_tokens`` (the range check needs the global V: it runs after the layout
    exchange, on every rank alike)."""
    _v.check_tensor("tokens", tokens, device=device)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor (token ids), got {tokens.dtype}")
    if tuple(tokens.shape) != tuple(shape):
        raise ValueError(f"tokens must have shape {tuple(shape)}, got {tuple(tokens.shape)}")


def _keep(tokens: Tensor, mask: Optional[Tensor]) -> Tensor:
    keep = tokens != _v.IGNORE_INDEX
    if mask is not None:
        keep = keep & (mask != 0)
    return keep.contiguous()


# ----------------------------------------------------------------------------------------------------------
# The combine (forward) and the shard gradient (backward)
# ----------------------------------------------------------------------------------------------------------
def _local_targets(tokens: Tensor, keep: Tensor, shard: VocabShard) -> Tuple[Tensor, Tensor]:
    """``(y_local, own)``: the target's local id where this shard holds it, else 0 (a dummy whose one-hot term the
    backward removes), and whether it does (only on kept rows)."""
    tokens = tokens.to(torch.int64)
    own = keep & (tokens >= shard.start) & (tokens < shard.end)
    return torch.where(own, tokens - shard.start, 0).contiguous(), own


def combine_shard_stats(group, logp_r: Tensor, lse_r: Tensor, ent_r: Optional[Tensor], own: Tensor,
                        keep: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The global ``(ℓ, lse, H or None)`` from each rank's per-row shard statistics (the two all-reduces; module
    docstring). All ``(…)``-shaped alike, in the accumulation dtype; ``own``: this rank holds the row's target;
    ``keep``: the row counts (the outputs are 0 elsewhere). Every rank of ``group`` must call it with the same
    ``keep``."""
    acc = lse_r.dtype
    device = lse_r.device
    comm = _comm_device(group, device)
    ninf = torch.full((), float("-inf"), dtype=acc, device=device)
    zero = torch.zeros((), dtype=acc, device=device)
    mx = torch.stack([lse_r, torch.where(own, lse_r, ninf)]).to(comm)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    mx = mx.to(device)
    M, lse_o = mx[0], mx[1]
    M0 = torch.where(torch.isfinite(M), M, zero)  # a row of -inf logits on every shard (or no row): no NaN here
    d = lse_r - M0
    a = torch.exp(d)
    parts = [torch.where(own, zero, a), torch.where(own, logp_r, zero)]
    if ent_r is not None:
        parts.append(torch.where(a > 0, a * (ent_r - d), zero))  # a = 0 (a shard of -inf): no 0·inf
    sm = torch.stack(parts).to(comm)
    dist.all_reduce(sm, op=dist.ReduceOp.SUM, group=group)
    sm = sm.to(device)
    n_other, logp_o = sm[0], sm[1]
    d_o = lse_o - M0  # ≤ 0; -inf on rows without an owner (masked) or with a -inf owner shard
    a_o = torch.exp(d_o)
    s = n_other + a_o  # = Σ_r a_r ≥ 1 on kept rows with a finite maximum
    near = d_o > -_SWITCH
    corr = torch.where(near, torch.log1p(n_other * torch.exp(torch.clamp(-d_o, max=_SWITCH))),
                       torch.log(s) - d_o)  # log1p(Σ_{r≠o} e^{lse_r − lse_o})
    lse = torch.where(near, lse_o + corr, M0 + torch.log(s))
    logp = logp_o - corr
    logp = torch.where(torch.isneginf(lse_o) & torch.isfinite(M), ninf, logp)  # the target's own shard is all -inf
    lse = torch.where(keep, lse, zero)
    logp = torch.where(keep, logp, zero)
    ent = None
    if ent_r is not None:
        log_s = torch.where(d_o == 0, corr, torch.log(s))  # owner holds the maximum: log s = log1p(N), exactly
        ent = torch.where(keep, log_s + sm[2] / s, zero)
    return logp, lse, ent


def _entropy_floor(acc: torch.dtype) -> float:
    return 200.0 if acc == torch.float32 else 1000.0  # as the kernels (docs/design.md §5): z/τ ≥ lse − floor


def _eager_bwd(grad_logp: Tensor, grad_ent: Optional[Tensor], logits: Tensor, keep: Tensor, lse: Tensor,
               ent: Tensor, temperature: float, out: Optional[Tensor] = None, row_block: int = 256) -> Tensor:
    """The contract's backward with the *given* ``lse``/``H`` (backend ``"torch"``'s own recomputes them from the
    row, i.e. the shard's), without the one-hot term (the caller writes the local-id entry). Row blocks bound the
    fp32 temporaries."""
    S, T, V = logits.shape
    acc = lse.dtype
    res = torch.empty((S, T, V), dtype=logits.dtype, device=logits.device) if out is None else out
    z = logits.reshape(S * T, V) if logits.is_contiguous() else None
    g = grad_logp.reshape(-1)
    gh = None if grad_ent is None else grad_ent.reshape(-1)
    L = lse.reshape(-1)
    mu = (lse - ent).reshape(-1)
    k = keep.reshape(-1)
    floor = _entropy_floor(acc)
    flat = res.view(S * T, V) if res.is_contiguous() else None
    for a in range(0, S * T, row_block):
        b = min(a + row_block, S * T)
        if z is not None:
            zb = z[a:b]
        else:
            idx = torch.arange(a, b, device=logits.device)
            zb = logits[idx // T, idx % T]
        zb = zb.to(acc) / temperature
        lb = L[a:b, None]
        p = torch.exp(zb - lb)
        coef = g[a:b, None]
        if gh is not None:
            sv = torch.maximum(zb, lb - floor)
            grad = -p * (coef + gh[a:b, None] * (sv - mu[a:b, None]))
        else:
            grad = -p * coef
        grad = torch.where(k[a:b, None], grad / temperature, torch.zeros((), dtype=acc, device=grad.device))
        if flat is not None:
            flat[a:b] = grad.to(res.dtype)
        else:
            idx = torch.arange(a, b, device=logits.device)
            res[idx // T, idx % T] = grad.to(res.dtype)
    return res


def _local_entry(grad_logp: Tensor, grad_ent: Optional[Tensor], z_t: Tensor, own: Tensor, keep: Tensor,
                 logp: Tensor, lse: Tensor, ent: Tensor, temperature: float) -> Tensor:
    """The gradient entry at the local id of every row: the target's on the owner, a plain entry elsewhere."""
    acc = lse.dtype
    zero = torch.zeros((), dtype=acc, device=lse.device)
    s_t = z_t.to(acc) / temperature
    mu = lse - ent
    # owner: p_y = e^ℓ and 1 − p_y = −expm1(ℓ) from the global log-prob; elsewhere p = e^{z/τ − lse}
    p = torch.where(own, torch.exp(logp), torch.exp(s_t - lse))
    val = torch.where(own, -torch.expm1(logp), -p) * grad_logp
    if grad_ent is not None:
        sv = torch.maximum(s_t, lse - _entropy_floor(acc))
        val = val - grad_ent * torch.where(p == 0, zero, p * (sv - mu))
    return torch.where(keep, val / temperature, zero)


def shard_gradient(impl: str, grad_logp: Tensor, grad_ent: Optional[Tensor], logits: Tensor, y_local: Tensor,
                   keep: Tensor, own: Tensor, z_t: Tensor, logp: Tensor, lse: Tensor, ent: Tensor,
                   temperature: float, out: Optional[Tensor] = None) -> Tensor:
    """``∂/∂logits_shard`` of ``Σ g_ℓ·ℓ + g_H·H`` with the global statistics: the backend's ``logprobs_bwd`` (or
    :func:`_eager_bwd` for ``"torch"``), then the local-id entry rewritten (:func:`_local_entry`; ``z_t`` = the logit
    at ``y_local``, gathered before ``out`` may overwrite the logits). ``(S, T, V_r)`` logits in kernel layout."""
    if impl == "torch":
        grad = _eager_bwd(grad_logp, grad_ent, logits, keep, lse, ent, temperature, out=out)
    else:
        grad = _kernels.kernel_module(impl).logprobs_bwd(grad_logp, grad_ent, logits, y_local, keep, lse, ent,
                                                         temperature, out=out, check_ids=False)
    val = _local_entry(grad_logp, grad_ent, z_t, own, keep, logp, lse, ent, temperature)
    S, T = y_local.shape
    si = torch.arange(S, device=grad.device).unsqueeze(1).expand(S, T)
    ti = torch.arange(T, device=grad.device).unsqueeze(0).expand(S, T)
    grad.index_put_((si, ti, y_local), val.to(grad.dtype))
    return grad


def _gather_local(logits: Tensor, y_local: Tensor) -> Tensor:
    return logits.gather(-1, y_local.unsqueeze(-1)).squeeze(-1)


class _VocabParallelLogprobs(torch.autograd.Function):
    """``(ℓ, H)`` of a vocabulary shard ``(S, T, V_r)`` (kernel layout); backward without communication."""

    @staticmethod
    def forward(ctx, logits, tokens, keep, shard, temperature, with_entropy, impl, group, inplace):
        y_local, own = _local_targets(tokens, keep, shard)
        logp_r, lse_r, ent_r = _ops.kernel_fwd(impl, logits.detach(), y_local, keep, temperature, with_entropy,
                                               check_ids=False)
        logp, lse, ent = combine_shard_stats(group, logp_r, lse_r, ent_r if with_entropy else None, own, keep)
        if ent is None:
            ent = torch.zeros_like(lse)
        z_t = _gather_local(logits.detach(), y_local)
        ctx.save_for_backward(logits, y_local, keep, own, z_t, logp, lse, ent)
        ctx.temperature, ctx.with_entropy, ctx.impl, ctx.inplace = temperature, with_entropy, impl, inplace
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        if torch.is_grad_enabled():
            raise NotImplementedError(_ops._NO_DOUBLE_BACKWARD)
        logits, y_local, keep, own, z_t, logp, lse, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        g = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
        gh = grad_ent.to(lse.dtype).contiguous() if (grad_ent is not None and ctx.with_entropy) else None
        out = logits.detach() if ctx.inplace else None
        grad = shard_gradient(ctx.impl, g, gh, logits.detach(), y_local, keep, own, z_t, logp, lse, ent,
                              ctx.temperature, out=out)
        if ctx.inplace:
            grad = logits  # the storage now holds the gradient (its version counter moved)
        return grad, None, None, None, None, None, None, None, None


def _shard_logprobs(logits3: Tensor, tokens2: Tensor, keep2: Tensor, shard: VocabShard, temperature: float,
                    with_entropy: bool, impl: str, group, inplace: bool) -> Tuple[Tensor, Optional[Tensor]]:
    if inplace:
        _ops._check_inplace(logits3)
    if logits3.stride(-1) != 1:
        logits3 = logits3.contiguous()
    logp, ent = _VocabParallelLogprobs.apply(logits3, tokens2.to(torch.int64).contiguous(), keep2, shard,
                                             float(temperature), bool(with_entropy), impl, group, bool(inplace))
    return logp, (ent if with_entropy else None)


# ----------------------------------------------------------------------------------------------------------
# Public: log-probs
# ----------------------------------------------------------------------------------------------------------
def vocab_parallel_token_logprobs(logits_shard: Tensor,  # (..., V_r)
                                  tokens: Tensor,  # (...) global ids, -100 = ignored
                                  mask: Optional[Tensor] = None,  # (...)
                                  temperature: float = 1.0,
                                  with_entropy: bool = False,
                                  *,
                                  group,
                                  vocab_start_index: Optional[int] = None,
                                  backend: str = "auto",
                                  inplace_backward: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-token log-probs ``ℓ = z_y/τ − lse`` (and entropy ``H``) of the full vocabulary when this rank holds only
    ``logits_shard``, the columns ``[start, end)`` of the logits (module docstring for the layout and the math).

    Every rank of ``group`` (None = the default group) calls it with its shard and the *same* global ``tokens`` and
    ``mask``. Returns ``(logp, entropy or None)`` of ``tokens``' shape, fp32 (fp64 for fp64 logits), identical on
    every rank; differentiable w.r.t. ``logits_shard`` (each rank's gradient is its slice of the unsharded one; the
    backward communicates nothing). ``inplace_backward=True`` writes that gradient into the shard's storage.
    Raises ValueError on every rank for a layout that is not Megatron's without ``vocab_start_index``, for token ids
    outside ``[0, V_global)`` ∪ {-100}, for tokens/mask/shapes/temperature that differ between ranks, or when this
    process is not in ``group``.
    """
    lead = tuple(logits_shard.shape[:-1]) if isinstance(logits_shard, Tensor) else ()

    def local_checks():
        _v.check_logits(logits_shard, "logits_shard", ndim=None)
        if logits_shard.dim() < 2:
            raise ValueError(f"logits_shard must have shape (..., V_local) with at least one leading dimension, got "
                             f"{tuple(logits_shard.shape)}")
        _check_ids_tensor(tokens, lead, logits_shard.device)
        _v.check_mask(mask, lead, logits_shard.device)
        _v.check_temperature(temperature, logits_shard.dtype)

    device = logits_shard.device if isinstance(logits_shard, Tensor) else torch.device("cpu")
    V_local = logits_shard.shape[-1] if isinstance(logits_shard, Tensor) and logits_shard.dim() else 0
    group, shard, keep = _setup(group, 2, local_checks, device=device, vocab_local=V_local,
                                vocab_start_index=vocab_start_index, tokens=tokens, mask=mask,
                                temperature=temperature, names=("the leading shape", "the last leading dimension"))
    _v.check_tokens(tokens, lead, shard.vocab_size, device)
    impl = _kernels.resolve_backend(backend, device)
    T = lead[-1]
    l3 = logits_shard.reshape(-1, T, V_local) if logits_shard.dim() > 2 else logits_shard.unsqueeze(0)
    t2 = tokens.reshape(-1, T)
    k2 = keep.reshape(-1, T)
    logp, ent = _shard_logprobs(l3, t2, k2, shard, temperature, with_entropy, impl, group, inplace_backward)
    return logp.reshape(lead), (None if ent is None else ent.reshape(lead))


# ----------------------------------------------------------------------------------------------------------
# Public: the loss from logits shards
# ----------------------------------------------------------------------------------------------------------
def grpo_loss_from_options(logits: Tensor, tokens: Tensor, rewards: Optional[Tensor], mask: Optional[Tensor],
                           opts: LossOptions, *, group, vocab_start_index: Optional[int] = None,
                           cu_seqlens: Optional[Tensor] = None, return_metrics: bool = False, backend: str = "auto",
                           inplace_backward: bool = False, **data):
    """:func:`vocab_parallel_grpo_loss` once the options are built: the hook for ``loss._grpo_loss`` (``data``:
    group_size, old/ref/sampling log-probs, advantages, num_items_in_batch, loss_scale). Always the two-pass schedule
    (the gradient needs the global statistics, which exist only after the forward's all-reduces). With
    ``cu_seqlens`` the shard is packed, ``(N, V_r)`` or ``(1, N, V_r)``: the kernels and the all-reduces run over
    the N rows, the eager loss over the padded ``(S, T)`` vectors (grpo_kernels.packing)."""
    rows = []

    def local_checks():
        r = _rows_of(logits, tokens, mask, cu_seqlens, data, "logits", lambda x: _v.check_logits(x, "logits"))
        rows.append(r)
        return r.tokens_p, r.mask_p

    device = logits.device if isinstance(logits, Tensor) else torch.device("cpu")
    group, shard, keep = _setup(group, 3, local_checks, device=device,
                                vocab_local=_local_size(logits, cu_seqlens), vocab_start_index=vocab_start_index,
                                tokens=tokens, mask=mask, temperature=opts.temperature,
                                names=_PACKED_NAMES if cu_seqlens is not None else
                                ("S (logits.shape[0])", "T (logits.shape[1])"))
    r = rows[0]
    S, T = r.tokens_p.shape
    _v.check_loss_args(opts, num_sequences=S, seq_len=T, num_classes=shard.vocab_size, device=device,
                       dtype=r.x.dtype, tokens=r.tokens_p, rewards=rewards, mask=r.mask_p, **r.data)
    impl = _kernels.resolve_backend(backend, device)
    m = _ref.effective_mask(r.tokens_p, r.mask_p, _ref.accumulation_dtype(r.x.dtype))
    with_entropy = return_metrics or opts.needs_entropy
    keep_rows = keep if r.pk is None else r.to_rows(keep).view(r.tokens.shape).contiguous()
    logp, ent = _shard_logprobs(r.x, r.tokens, keep_rows, shard, opts.temperature, with_entropy, impl, group,
                                inplace_backward)
    return _ref.loss_from_logprobs(r.to_loss(logp), m, rewards, opts, return_metrics=return_metrics,
                                   entropy=None if ent is None else r.to_loss(ent), **r.data)


def vocab_parallel_grpo_loss(logits_shard: Tensor,  # (S, T, V_r)
                             tokens: Tensor,  # (S, T) global ids
                             rewards: Optional[Tensor],
                             mask: Optional[Tensor] = None,
                             *,
                             group,
                             group_size: int,
                             vocab_start_index: Optional[int] = None,
                             cu_seqlens: Optional[Tensor] = None,
                             old_logprobs: Optional[Tensor] = None,
                             ref_logprobs: Optional[Tensor] = None,
                             sampling_logprobs: Optional[Tensor] = None,
                             advantages: Optional[Tensor] = None,
                             num_items_in_batch=None,
                             loss_scale: float = 1.0,
                             return_metrics: bool = False,
                             backend: str = "auto",
                             inplace_backward: bool = False,
                             **options):
    """:func:`grpo_kernels.grpo_loss` when this rank holds the vocabulary shard ``logits_shard`` of the logits
    (module docstring). Same arguments, losses, metrics and validation (token ids against the *global* vocabulary);
    every argument but the shard is replicated on ``group``. The loss and metrics are identical on every rank; each
    rank's ``backward()`` gives its shard's slice of the unsharded logits gradient. ``cu_seqlens`` (replicated): a
    packed batch, ``logits_shard`` ``(N, V_r)`` or ``(1, N, V_r)`` and per-token tensors ``(N,)`` (as in
    ``grpo_loss``).

    **options: the loss options of :class:`~grpo_kernels.options.LossOptions`:

        {loss_options}
    """
    opts = LossOptions.from_kwargs("vocab_parallel_grpo_loss", options)
    return grpo_loss_from_options(logits_shard, tokens, rewards, mask, opts, group=group,
                                  vocab_start_index=vocab_start_index, cu_seqlens=cu_seqlens,
                                  return_metrics=return_metrics,
                                  backend=backend, inplace_backward=inplace_backward, group_size=group_size,
                                  old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                  sampling_logprobs=sampling_logprobs, advantages=advantages,
                                  num_items_in_batch=num_items_in_batch, loss_scale=loss_scale)


with_option_keywords(vocab_parallel_grpo_loss, before="return_metrics")


def __getattr__(name):
    """The fused-linear entry points live in :mod:`grpo_kernels.vocab_parallel_linear` (which imports this module);
    they are re-exported here on first use (PEP 562), so ``from grpo_kernels.vocab_parallel import
    vocab_parallel_fused_linear_grpo_loss`` keeps working."""
    if name in ("vocab_parallel_fused_linear_grpo_loss", "fused_linear_grpo_loss_from_options"):
        from . import vocab_parallel_linear

        return getattr(vocab_parallel_linear, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
