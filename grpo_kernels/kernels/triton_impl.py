"""Triton backend: streaming per-row log-softmax kernels (forward, backward, one-pass forward+gradient).

This module is the ``"triton"`` kernel module of :mod:`grpo_kernels.kernels` (see the contract in its
docstring). Layout of the file: device helpers and kernel bodies -> the lazily built kernel set -> launch
configuration (chunk size, warps, the occupancy-derived persistent grid) and checks -> the contract functions
:func:`logprobs_fwd`, :func:`logprobs_bwd`, :func:`logprobs_fwd_grad`. The ``torch.library`` ops, fakes and
autograd live in :mod:`grpo_kernels.kernels.ops`.

Shapes: ``logits (S, T, V)`` with a unit vocabulary stride (the S and T strides are arbitrary),
``tokens (S, T)`` int64, ``mask (S, T)`` bool; per-row outputs ``(S, T)`` in fp32 (fp64 for fp64 logits).

Design (docs/design.md §5-6):

* One program per ``(s, t)`` row on a 1-D grid (axis 0 takes up to 2^31-1 programs, so neither S nor T
  ever meets CUDA's 65,535 limit of grid axes 1 and 2). Pointer offsets are int64 (S·T·V may exceed 2^31).
* The row is streamed in ``BLOCK_V`` chunks with an online max / sum-exp (fp32 accumulation, fp64 for fp64
  logits). ``-inf`` logits (a masked vocabulary) contribute nothing and never make a NaN. V need not be a
  power of two.
* **Vector accesses for every V.** Triton emits 16-byte loads/stores only where it can prove the addresses
  16-byte aligned; with a plain ``row_base + arange`` that proof comes from the launch specialization (pointer
  and row strides divisible by 16), which V = 50,257, 151,935 or 32,003 -- or a view whose rows start at odd
  offsets -- does not have: those rows compiled to scalar 2-byte accesses. So each row is split at run time
  (:func:`_row_split`) into a *head* (< VEC elements up to the first 16-byte boundary), an aligned *body*
  whose length is a multiple of ``VEC = 16 / element size``, and a *tail* (< VEC elements). The body is
  addressed from ``tl.multiple_of(row + head, 16)`` (true by construction) with a mask whose constancy is VEC,
  so it compiles to ``ld.global.v4`` / ``st.global.v4`` whatever the specialization; the head and tail go
  together through one ``2·VEC``-lane masked block (:func:`_edge_offsets`), before the body in every sweep.
  The whole row is addressed from the aligned body start. The gradient rows use the same split, so their stores
  are vectors too when every ``out`` row is aligned like its logits row (``OUT_ALIGNED``: always for a fresh
  contiguous ``out`` of contiguous logits, and for ``out = logits``; otherwise the stores stay scalar).
  ``.ci/check_triton_sm90.py`` compiles both specializations and fails if a row loop has no vector access.
* Rows with ``mask == False`` write zeros (vectorized the same way) and return before reading a single logit.
* ``temperature`` is a runtime argument (passed as fp64, cast to the accumulation type once per program),
  and so are S, T, V and the strides: changing them does not recompile (Triton still specializes integer
  arguments on divisibility by 16, which is at most a second variant). ``BLOCK_V`` and ``num_warps`` are
  chosen from V and the dtype.
* Confident tokens (p_y ~ 1): ``log p_y = −log1p(Σ_{v≠y} e^{z_v−z_y})`` and the target's gradient uses
  ``1 − p_y = Σ_{v≠y} p_v``, both summed over the other classes, so neither is the cancellation
  ``z_y − lse`` / ``1 − exp(ℓ)`` (which in fp32 leaves nothing of a 1 − p_y below ~1e-7). The entropy is
  summed relative to the running max (:func:`_softmax_step`, :func:`_entropy`), so a confident row's small H
  and the entropy term of its target's gradient keep their relative accuracy too.
* Deterministic: every row is reduced by one program in a fixed order; there are no atomics. The chunking
  follows the row split, i.e. each row's address modulo 16 bytes: the same values in another layout (a strided
  view whose rows start elsewhere modulo 16) may round differently, in the interpreter as on the GPU; the same
  layout always gives the same bits.
* Memory traffic: the forward reads each unmasked row once. The backward reads it once and writes the
  gradient once. The one-pass kernel (:func:`logprobs_fwd_grad`) reads the row, then rereads it and writes
  the gradient: at most two reads and one write per training step, instead of three reads and one write for
  forward + backward. The reread is served by L2 to the extent that the rows in flight fit in it; it walks
  the row backwards, so the chunks read last (still cached) are reread first. Its grid is persistent and
  never larger than what the GPU holds resident at once (:func:`_programs`), so there is no second wave.
* In-place gradient (``out=`` the logits themselves): each program touches only its own row, and every
  element of the row is loaded before the same element is stored, so overwriting is safe.

Triton's ``@triton.jit`` decides at *decoration* time whether a kernel is compiled or interpreted (it reads
``TRITON_INTERPRET`` when the decorator runs, triton 3.x ``runtime/jit.py``). The kernels and their device
helpers are therefore plain functions here, jitted together by :func:`_kernels`, per interpreter flag in force
at launch, into a namespace of their own in which each helper name is bound to the helper jitted for that flag
(a compiled kernel may only call jitted functions, an interpreted one only interpreted ones). Setting
``TRITON_INTERPRET=1`` after importing this module (as the tests' fixture does) therefore works. For the same
reason the kernel bodies avoid triton's *jitted* standard-library helpers (``tl.max``, ``tl.sum``, ``tl.zeros``:
decorated when triton itself was imported, so they cannot run in the interpreter if the flag was set later)
and use builtins instead: ``tl.reduce`` with triton's own combine functions (which the interpreter recognises
and runs with numpy) and ``tl.full``. Under the interpreter, fp32 -> bf16 stores are rounded to nearest even by
hand (``RNE_BF16``), because Triton 3.9's interpreter truncates that cast while compiled kernels round.

Loops whose bounds are runtime values (``V``, ``n_rows``, the program id) are ``while`` loops, not
``range(...)``: the interpreter of Triton <= 3.6 turns ``range``'s bounds into ints with ``int()`` of a
1-element array, which NumPy >= 2.4 rejects (triton-lang/triton#9171, fixed after 3.6), so every CPU test
failed there. Compiled, the ``while`` form gives the same code: same PTX instruction counts, registers and
spills for every kernel, dtype and flag, on Triton 3.6 and 3.9 (``.ci/check_triton_sm90.py`` prints them).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import check_ent_coef, check_out, check_token_ids
from ..reference import accumulation_dtype

Tensor = torch.Tensor

#: :func:`logprobs_fwd_grad` (one-pass forward + gradient) is implemented.
FWD_GRAD = True

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Device helpers (plain functions, jitted lazily with the kernels by _kernels(), which lists them in _HELPERS)
# ----------------------------------------------------------------------------------------------------------
def _row_split(row_ptr, V, VEC: tl.constexpr):
    """``(head, body)`` of the row of ``V`` elements at ``row_ptr``: ``head`` (< VEC) elements up to the first
    16-byte boundary, then ``body`` elements (a multiple of VEC) from that boundary; the remaining ``V − head −
    body`` (< VEC) are the tail. Any split is correct; this one makes ``row_ptr + head`` 16-byte aligned (torch
    elements are aligned to their size, so the address is a whole number of elements past a boundary). The
    kernels address the whole row from there: column ``v`` is offset ``v − head`` (int32, like V)."""
    past = ((row_ptr.to(tl.int64) % 16) // (16 // VEC)).to(tl.int32)  # elements past the last 16-byte boundary
    head = tl.minimum((VEC - past) % VEC, V)
    return head, (V - head) // VEC * VEC


def _edge_offsets(head, body, V, VEC: tl.constexpr):
    """Offsets from the body's start, and validity, of the ``2·VEC`` edge lanes: lanes ``[0, VEC)`` hold the
    head (offsets ``[−head, 0)``), lanes ``[VEC, 2·VEC)`` the tail (offsets ``[body, V − head)``)."""
    e = tl.arange(0, 2 * VEC) - VEC
    rel = tl.where(e < 0, e, body + e)
    return rel, tl.where(e < 0, e >= -head, rel < V - head)


def _softmax_step(z, cols, y, zy, y_seen, m, l_other, w, WITH_ENTROPY: tl.constexpr):
    """One chunk ``z`` (= logits/τ, ``-inf`` where masked) of the online softmax: the running max ``m``, the
    running ``Σ_{v≠y} e^{z_v−m}`` and (entropy) ``w = Σ_v e^{z_v−m}·(z_v − m)`` (≤ 0, relative to the max: see
    :func:`_entropy`), each rescaled to the new max. ``cols`` (the chunk's positions) and ``y`` (the target's) may
    be counted from any common origin, here and below; ``zy`` is the target's z and ``y_seen`` whether an earlier
    chunk held it (its term is then part of the sum that moves ``w`` to the new max)."""
    m_new = tl.maximum(m, tl.reduce(z, 0, tl.standard._elementwise_max))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new).to(z.dtype)  # all -inf so far: no NaN
    alpha = tl.exp(m - m_ref)
    e = tl.exp(z - m_ref)
    if WITH_ENTROPY:  # p = 0, z = -inf contributes 0, not NaN
        # Σ e^{z−m}(z − m_ref) = Σ e^{z−m}(z − m) + (m − m_ref)·Σ e^{z−m} over the earlier chunks
        seen = l_other + tl.where(y_seen & (m > float("-inf")), tl.exp(zy - m), 0.0)
        shift = tl.where(seen > 0.0, m - m_ref, 0.0) * seen  # (no -inf * 0 before any finite z)
        w = (w + shift) * alpha + tl.reduce(e * tl.where(e == 0.0, 0.0, z - m_ref), 0, tl.standard._sum_combine)
    l_other = l_other * alpha + tl.reduce(tl.where(cols == y, 0.0, e), 0, tl.standard._sum_combine)
    return m_new, l_other, w


def _log1p(x):
    """``log(1 + x)`` to relative accuracy for small ``x`` (x > −1), from log (Goldberg)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


def _row_stats(l_other, zy, m):
    """``(log p_y, lse, l = Σ_v e^{z_v−m})`` of a reduced row. ``log p_y = −log1p(l_other / e_y)`` (accurate
    when p_y ~ 1, unlike ``z_y − lse``)."""
    e_y = tl.exp(zy - m)
    l = l_other + e_y
    log_l = tl.log(l)
    x = l_other / tl.where(e_y > 0.0, e_y, 1.0)
    return tl.where(e_y > 0.0, -_log1p(x), (zy - m) - log_l), m + log_l, l


def _entropy(logp, zy, m, w, l):
    """``H = lse − Σ_v p_v z_v = log l − Σ_v p_v (z_v − m)``, ``l = Σ_v e^{z_v−m}``, from ``w`` of
    :func:`_softmax_step`: two non-negative parts, so a confident row's small H keeps its relative accuracy
    (``lse − Σ p z`` kept only ~``|lse|·6e-8``). ``log l = −log p_y`` (a log1p) when the target is the max."""
    log_l = tl.where(zy == m, -logp, tl.log(l))
    return log_l - w / l


def _store_rounded(ptrs, x, mask, RNE_BF16: tl.constexpr):
    """Store ``x`` (accumulation dtype) in the pointee dtype; ``RNE_BF16``: fp32 -> bf16 rounded to nearest even
    by hand (interpreter only, see :func:`_rne_bf16`)."""
    if RNE_BF16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        tl.store(ptrs, u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


def _zero_row(row_ptr, V, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """Write zeros over the row of ``V`` elements at ``row_ptr`` (a masked row's gradient), split as in
    :func:`_row_split` by the row's own alignment, so the body is written with vector stores."""
    ty = row_ptr.dtype.element_ty
    head, body = _row_split(row_ptr, V, VEC)
    aligned = tl.multiple_of(row_ptr + head, 16)
    edge, valid = _edge_offsets(head, body, V, VEC)
    tl.store(aligned + edge, tl.full([2 * VEC], 0.0, ty), mask=valid)
    offs = tl.arange(0, BLOCK_V)
    start = 0
    while start < body:
        rel = start + offs
        tl.store(aligned + rel, tl.full([BLOCK_V], 0.0, ty), mask=rel < body)
        start += BLOCK_V


def _bwd_chunk(z, cols, y, g, gh, lse, mean_z, scale, HAS_GRAD_ENT: tl.constexpr):
    """The two-pass backward on one chunk: ``((g·(1[v=y] − p) − g_H·p·(z − mean_z))/τ, Σ_{v≠y} p)``. The target
    entry is rewritten after the loop (with ``1 − p_y = Σ_{v≠y} p_v``)."""
    p = tl.exp(z - lse)
    grad = g * (tl.where(cols == y, 1.0, 0.0).to(z.dtype) - p)
    if HAS_GRAD_ENT:
        grad -= gh * p * tl.where(p == 0.0, 0.0, z - mean_z)  # p = 0 (z = -inf) -> 0, not NaN
    return grad * scale, tl.reduce(tl.where(cols == y, 0.0, p), 0, tl.standard._sum_combine)


def _fwd_grad_chunk(z, cols, y, lse, c, c_y, ge, m, mean_t, HAS_ENT_COEF: tl.constexpr):
    """The one-pass gradient on one chunk: ``c·(1[v=y] − p_v) − ge·p_v·(z_v − m − mean_t)`` with ``c = coef/τ``,
    ``ge = ent_coef/τ``, ``mean_t = Σ_v p_v (z_v − m)`` (so ``z_v − m − mean_t = log p_v + H``, relative to the
    row max: the max's own factor is ``−mean_t``, small and accurate when its p ≈ 1) and the target's
    ``c·(1 − p_y)`` given as ``c_y`` (computed without cancellation)."""
    p = tl.exp(z - lse)
    grad = tl.where(cols == y, c_y, -c * p)
    if HAS_ENT_COEF:
        grad -= ge * p * tl.where(p == 0.0, 0.0, (z - m) - mean_t)  # p = 0 (z = -inf) -> 0, not NaN
    return grad


# ----------------------------------------------------------------------------------------------------------
# Kernel bodies (plain functions; jitted lazily by _kernels()). ``VEC`` = 16 bytes / element size;
# ``OUT_ALIGNED``: every out row starts at the same address modulo 16 as its logits row (see the module doc).
# ----------------------------------------------------------------------------------------------------------
def _fwd_kernel(logits_ptr, tokens_ptr, mask_ptr,  # (S,T,V) strided rows, (S,T) int64, (S,T) uint8
                logp_ptr, lse_ptr, ent_ptr,  # (S,T) outputs, accumulation dtype
                T, V, stride_s, stride_t,
                inv_tau: tl.float64,
                WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_ty = logp_ptr.dtype.element_ty
    if tl.load(mask_ptr + row) == 0:  # masked: no logits read
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        tl.store(ent_ptr + row, 0.0)
        return
    s = row // T
    t = row - s * T
    base = logits_ptr + s * stride_s + t * stride_t
    scale = tl.full([], inv_tau, acc_ty)
    head, body = _row_split(base, V, VEC)
    aligned = tl.multiple_of(base + head, 16)  # the row is addressed from here: offset = column - head
    y_rel = tl.load(tokens_ptr + row).to(tl.int32) - head
    zy = tl.load(aligned + y_rel).to(acc_ty) * scale
    # head + tail first (they start the running statistics), then the aligned body in BLOCK_V chunks
    edge, valid = _edge_offsets(head, body, V, VEC)
    z_edge = tl.load(aligned + edge, mask=valid, other=float("-inf")).to(acc_ty) * scale
    m, l_other, w = _softmax_step(z_edge, edge, y_rel, zy, tl.full([], 0, tl.int1), tl.full([], float("-inf"), acc_ty),
                                  tl.full([], 0.0, acc_ty), tl.full([], 0.0, acc_ty), WITH_ENTROPY)
    offs = tl.arange(0, BLOCK_V)
    start = 0
    while start < body:
        rel = start + offs
        z = tl.load(aligned + rel, mask=rel < body, other=float("-inf")).to(acc_ty) * scale
        m, l_other, w = _softmax_step(z, rel, y_rel, zy, (y_rel < start) | (y_rel >= body), m, l_other, w,
                                      WITH_ENTROPY)
        start += BLOCK_V
    logp, lse, l = _row_stats(l_other, zy, m)
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, _entropy(logp, zy, m, w, l))
    else:
        tl.store(ent_ptr + row, 0.0)


def _bwd_kernel(grad_logp_ptr, grad_ent_ptr,  # (S,T) accumulation dtype (grad_ent unused without HAS_GRAD_ENT)
                logits_ptr, tokens_ptr, mask_ptr, lse_ptr, ent_ptr,
                out_ptr,  # (S,T,V) strided rows, logits dtype; may alias logits_ptr
                T, V, stride_s, stride_t, out_stride_s, out_stride_t,
                inv_tau: tl.float64,
                HAS_GRAD_ENT: tl.constexpr, BLOCK_V: tl.constexpr, RNE_BF16: tl.constexpr,
                VEC: tl.constexpr, OUT_ALIGNED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_ty = lse_ptr.dtype.element_ty
    s = row // T
    t = row - s * T
    out_base = out_ptr + s * out_stride_s + t * out_stride_t
    if tl.load(mask_ptr + row) == 0:  # masked: exact zeros, no logits read
        _zero_row(out_base, V, BLOCK_V, VEC)
        return
    base = logits_ptr + s * stride_s + t * stride_t
    scale = tl.full([], inv_tau, acc_ty)
    g = tl.load(grad_logp_ptr + row)
    lse = tl.load(lse_ptr + row)
    head, body = _row_split(base, V, VEC)  # the same split addresses the gradient row (see OUT_ALIGNED)
    aligned = tl.multiple_of(base + head, 16)
    out_aligned = out_base + head
    if OUT_ALIGNED:
        out_aligned = tl.multiple_of(out_aligned, 16)
    y_rel = tl.load(tokens_ptr + row).to(tl.int32) - head
    zy = tl.load(aligned + y_rel).to(acc_ty) * scale  # before the loop: out may alias the logits
    if HAS_GRAD_ENT:
        gh = tl.load(grad_ent_ptr + row)
        h = tl.load(ent_ptr + row)
        mean_z = lse - h  # sum_v p_v z_v
    else:
        gh = 0.0
        h = 0.0
        mean_z = 0.0
    # head + tail, then the aligned body
    edge, valid = _edge_offsets(head, body, V, VEC)
    z_edge = tl.load(aligned + edge, mask=valid, other=float("-inf")).to(acc_ty) * scale
    grad_edge, p_other = _bwd_chunk(z_edge, edge, y_rel, g, gh, lse, mean_z, scale, HAS_GRAD_ENT)  # 1 - p_y
    _store_rounded(out_aligned + edge, grad_edge, valid, RNE_BF16)
    offs = tl.arange(0, BLOCK_V)
    start = 0
    while start < body:
        rel = start + offs
        z = tl.load(aligned + rel, mask=rel < body, other=float("-inf")).to(acc_ty) * scale
        grad, p_part = _bwd_chunk(z, rel, y_rel, g, gh, lse, mean_z, scale, HAS_GRAD_ENT)
        p_other += p_part
        _store_rounded(out_aligned + rel, grad, rel < body, RNE_BF16)
        start += BLOCK_V
    # The target entry again, with 1 - p_y = sum_{v != y} p_v (accurate when p_y ~ 1, where 1 - exp(z_y - lse)
    # is all rounding error). The barrier orders this store after the loop's store of the same element,
    # which another thread of the program may have made.
    p_y = tl.exp(zy - lse)
    g_y = g * p_other
    if HAS_GRAD_ENT:
        # z_y − (lse − H) = log p_y + H, with log p_y = log1p(−Σ_{v≠y} p_v) while that sum is below 1/2 (no
        # rounding of the saved lse in it: a confident target's tiny factor keeps its relative accuracy)
        lpy = tl.where(p_other < 0.5, _log1p(-tl.minimum(p_other, 0.5)), zy - lse)
        g_y -= gh * p_y * tl.where(p_y == 0.0, 0.0, lpy + h)
    g_y = g_y * scale
    tl.debug_barrier()
    _store_rounded(out_aligned + y_rel, g_y, None, RNE_BF16)


def _fwd_grad_kernel(logits_ptr, tokens_ptr, mask_ptr, coef_ptr,  # coef (S,T) accumulation dtype
                     ent_coef_ptr,  # (S,T) accumulation dtype; unused without HAS_ENT_COEF
                     logp_ptr, lse_ptr, ent_ptr,
                     out_ptr,  # (S,T,V) strided rows, logits dtype; may alias logits_ptr
                     n_rows, T, V, stride_s, stride_t, out_stride_s, out_stride_t,
                     inv_tau: tl.float64,
                     WITH_ENTROPY: tl.constexpr,  # computes H; the launcher sets it whenever HAS_ENT_COEF
                     HAS_ENT_COEF: tl.constexpr, BLOCK_V: tl.constexpr, RNE_BF16: tl.constexpr,
                     VEC: tl.constexpr, OUT_ALIGNED: tl.constexpr):
    # Persistent: program p handles rows p, p + P, p + 2P, ... (P = the grid size), so exactly P rows are in
    # flight at any time -- the launcher sizes P so that they are all resident and fit in L2, and pass 2
    # rereads from the cache.
    acc_ty = logp_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_V)
    scale = tl.full([], inv_tau, acc_ty)
    r = tl.program_id(0)
    while r < n_rows:
        row = r.to(tl.int64)
        s = row // T
        t = row - s * T
        if tl.load(mask_ptr + row) == 0:  # masked: exact zeros, no logits read
            tl.store(logp_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            tl.store(ent_ptr + row, 0.0)
            _zero_row(out_ptr + s * out_stride_s + t * out_stride_t, V, BLOCK_V, VEC)
        else:
            base = logits_ptr + s * stride_s + t * stride_t
            head, body = _row_split(base, V, VEC)
            aligned = tl.multiple_of(base + head, 16)  # the row is addressed from here: offset = column - head
            y_rel = tl.load(tokens_ptr + row).to(tl.int32) - head
            edge, valid = _edge_offsets(head, body, V, VEC)
            zy = tl.load(aligned + y_rel).to(acc_ty) * scale  # read before pass 2 may overwrite it (out = logits)
            # Pass 1: online max / sum-exp (and the entropy sum) over head + tail, then the body, as in _fwd_kernel.
            z_edge = tl.load(aligned + edge, mask=valid, other=float("-inf")).to(acc_ty) * scale
            m, l_other, w = _softmax_step(z_edge, edge, y_rel, zy, tl.full([], 0, tl.int1),
                                          tl.full([], float("-inf"), acc_ty), tl.full([], 0.0, acc_ty),
                                          tl.full([], 0.0, acc_ty), WITH_ENTROPY)
            start = 0
            while start < body:
                rel = start + offs
                z = tl.load(aligned + rel, mask=rel < body, other=float("-inf")).to(acc_ty) * scale
                m, l_other, w = _softmax_step(z, rel, y_rel, zy, (y_rel < start) | (y_rel >= body), m, l_other,
                                              w, WITH_ENTROPY)
                start += BLOCK_V
            logp, lse, l = _row_stats(l_other, zy, m)
            tl.store(logp_ptr + row, logp)
            tl.store(lse_ptr + row, lse)
            if WITH_ENTROPY:
                tl.store(ent_ptr + row, _entropy(logp, zy, m, w, l))
            else:
                tl.store(ent_ptr + row, 0.0)
            # Pass 2: reread the row and write (coef·(1[v=y] − p_v) − ent_coef·p_v·(z_v − (lse − H)))/τ: head +
            # tail first (2·VEC elements; done now, the row pointers need not stay live through the loop), then
            # the body chunks last to first: the most recently read ones are the likeliest to still be in L2 (a
            # forward sweep over a row larger than this program's share of the cache would evict each chunk just
            # before it is needed). The target's 1 − p_y is l_other / l: no cancellation when p_y ~ 1.
            c = tl.load(coef_ptr + row) * scale
            c_y = c * (l_other / l)
            if HAS_ENT_COEF:
                ge = tl.load(ent_coef_ptr + row) * scale
                mean_t = w / l  # Σ_v p_v (z_v − m) = lse − H − m
            else:
                ge = 0.0
                mean_t = 0.0
            out_aligned = out_ptr + s * out_stride_s + t * out_stride_t + head
            if OUT_ALIGNED:
                out_aligned = tl.multiple_of(out_aligned, 16)
            z_edge = tl.load(aligned + edge, mask=valid, other=float("-inf")).to(acc_ty) * scale
            grad_edge = _fwd_grad_chunk(z_edge, edge, y_rel, lse, c, c_y, ge, m, mean_t, HAS_ENT_COEF)
            _store_rounded(out_aligned + edge, grad_edge, valid, RNE_BF16)
            n_chunks = (body + BLOCK_V - 1) // BLOCK_V
            i = 0
            while i < n_chunks:
                rel = (n_chunks - 1 - i) * BLOCK_V + offs
                z = tl.load(aligned + rel, mask=rel < body, other=float("-inf")).to(acc_ty) * scale
                grad = _fwd_grad_chunk(z, rel, y_rel, lse, c, c_y, ge, m, mean_t, HAS_ENT_COEF)
                _store_rounded(out_aligned + rel, grad, rel < body, RNE_BF16)
                i += 1
        r += tl.num_programs(0)


def _interpreting() -> bool:
    """Whether Triton would interpret kernels decorated now (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


# The device helpers the kernels call, and the kernels with their unspecialized integer arguments.
_HELPERS = (_row_split, _edge_offsets, _softmax_step, _log1p, _row_stats, _entropy, _store_rounded, _zero_row,
            _bwd_chunk, _fwd_grad_chunk)
_KERNEL_FNS = ((_fwd_kernel, ["T"]), (_bwd_kernel, ["T"]), (_fwd_grad_kernel, ["n_rows", "T"]))

_KERNEL_SETS: Dict[bool, tuple] = {}  # interpreter flag -> (fwd, bwd, fwd_grad)


def _rebind(fn, namespace: dict):
    """``fn`` with ``namespace`` as its globals (same code, hence same source for triton.jit)."""
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__annotations__ = dict(fn.__annotations__)
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return new


def _kernels() -> tuple:
    """``(fwd, bwd, fwd_grad)`` jitted for the interpreter flag in force now (decorated lazily, see the
    module doc; triton.jit reads the flag itself when it decorates). The kernels and helpers are rebound to a
    copy of this module's globals in which every helper name means that helper jitted for the same flag."""
    interpret = _interpreting()
    kernels = _KERNEL_SETS.get(interpret)
    if kernels is None:
        namespace = dict(globals())
        for fn in _HELPERS:
            namespace[fn.__name__] = triton.jit(_rebind(fn, namespace))
        kernels = tuple(triton.jit(_rebind(fn, namespace), do_not_specialize=dns) for fn, dns in _KERNEL_FNS)
        _KERNEL_SETS[interpret] = kernels
    return kernels


# ----------------------------------------------------------------------------------------------------------
# Launch configuration: chunk size and warps, and the persistent grid from the compiled kernel's occupancy
# ----------------------------------------------------------------------------------------------------------
def _launch_config(V: int, dtype: torch.dtype, block_v: Optional[int], num_warps: Optional[int] = None,
                   one_pass: bool = False) -> Tuple[int, int]:
    """``(BLOCK_V, num_warps)``: the whole row in one chunk when it is small, else 16 KiB chunks (32 KiB for
    the one-pass kernel, which runs few, large programs: see :func:`_programs`), 16 values per thread.

    Heuristics from the kernels' structure (memory-bound streaming, <= 64 registers per thread at 16 values
    per thread, measured with ptxas for sm_90), not from timings on hardware; ``block_v`` and ``num_warps``
    override them (benchmarks sweep them).
    """
    if block_v is not None:
        if isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 1 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two, got {block_v!r}")
        bv = block_v
    else:
        itemsize = torch.empty((), dtype=dtype).element_size()
        cap = (32768 if one_pass else 16384) // itemsize
        bv = min(triton.next_power_of_2(max(V, 16)), cap)
    if num_warps is None:
        num_warps = max(1, min(32, bv // 512))  # 16 values per thread
    elif isinstance(num_warps, bool) or not isinstance(num_warps, int) or num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be 1, 2, 4, 8, 16 or 32, got {num_warps!r}")
    return bv, num_warps


@dataclasses.dataclass(frozen=True)
class _DeviceLimits:
    """What bounds the blocks resident on one streaming multiprocessor, and the cache the one-pass reread
    relies on. The defaults are those of an H100 (sm_90; the same for H200): used for whatever
    ``torch.cuda.get_device_properties`` does not report (:func:`_limits_from_props`)."""

    sms: int = 132
    l2_bytes: int = 50 * 2 ** 20
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32  # not in torch's properties: see _MAX_BLOCKS_PER_SM
    shared_per_sm: int = 228 * 1024
    shared_reserved_per_block: int = 1024  # the driver's per-block reservation on sm_80 and later
    warp_size: int = 32
    reg_alloc_unit: int = 256  # registers are given to a warp in units of 256 (8 per thread)
    max_regs_per_thread: int = 255


@dataclasses.dataclass(frozen=True)
class _KernelResources:
    """What one block of a compiled kernel takes: registers per thread, warps, static shared memory (bytes)."""

    n_regs: int
    num_warps: int
    shared: int = 0


#: Resident blocks per SM by compute capability where it is not 32 (CUDA programming guide, table of technical
#: specifications per compute capability). torch does not report it.
_MAX_BLOCKS_PER_SM = {(7, 5): 16, (8, 6): 16, (8, 7): 16, (8, 9): 24}


def _limits_from_props(props) -> _DeviceLimits:
    """:class:`_DeviceLimits` from ``torch.cuda.get_device_properties(...)`` (any object with its attribute
    names); a missing or zero attribute keeps the H100 default."""
    d = _DeviceLimits()

    def get(name, default):
        value = getattr(props, name, None)
        return int(value) if value else default

    cc = (getattr(props, "major", 9), getattr(props, "minor", 0))
    return _DeviceLimits(sms=get("multi_processor_count", d.sms), l2_bytes=get("L2_cache_size", d.l2_bytes),
                         regs_per_sm=get("regs_per_multiprocessor", d.regs_per_sm),
                         max_threads_per_sm=get("max_threads_per_multi_processor", d.max_threads_per_sm),
                         max_blocks_per_sm=_MAX_BLOCKS_PER_SM.get(cc, d.max_blocks_per_sm),
                         shared_per_sm=get("shared_memory_per_multiprocessor", d.shared_per_sm),
                         warp_size=get("warp_size", d.warp_size))


@functools.lru_cache(maxsize=None)
def _device_limits(device: torch.device) -> Optional[_DeviceLimits]:
    """The limits of CUDA ``device`` (queried at its first launch); None for a CPU tensor (the interpreter runs
    the programs one after another: there is no residency to respect)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _limits_from_props(torch.cuda.get_device_properties(index))


def _blocks_per_sm(kernel: _KernelResources, limits: _DeviceLimits) -> int:
    """How many blocks of ``kernel`` one SM holds at once: the least of what its registers (allocated per warp,
    rounded up to the allocation unit), its thread slots, its shared memory (plus the per-block reservation)
    and its block slots allow. At least 1 (a kernel that fits no SM would not launch at all)."""
    threads = kernel.num_warps * limits.warp_size
    warp_regs = -(-max(kernel.n_regs, 1) * limits.warp_size // limits.reg_alloc_unit) * limits.reg_alloc_unit
    by_regs = (limits.regs_per_sm // warp_regs) // kernel.num_warps
    by_threads = limits.max_threads_per_sm // threads
    by_shared = limits.shared_per_sm // (kernel.shared + limits.shared_reserved_per_block)
    return max(1, min(by_regs, by_threads, by_shared, limits.max_blocks_per_sm))


def _worst_case_resources(num_warps: int, limits: _DeviceLimits) -> _KernelResources:
    """What a block of ``num_warps`` warps may take at most when the compiled kernel cannot be asked (the
    interpreter, or a Triton without the metadata): every register ptxas may give a thread of that block
    size (``regs_per_sm / threads``, at most 255). Used instead of the real metadata, it never overestimates
    the residency."""
    most = limits.regs_per_sm // (num_warps * limits.warp_size)
    return _KernelResources(n_regs=max(8, min(limits.max_regs_per_thread, most // 8 * 8)), num_warps=num_warps)


def _persistent_grid(n_rows: int, row_bytes: int, kernel: _KernelResources, limits: _DeviceLimits) -> int:
    """Grid size of the persistent one-pass kernel: ``min(rows, resident, max(SMs, L2 fit))``.

    * ``resident = SMs × blocks_per_sm``: never more programs than run at once. Every program strides over
      its share of the rows, so programs beyond the resident ones (a second wave) add no parallelism: they
      start only as first-wave programs finish, run their whole share last, and leave SMs idle at the end.
    * ``L2 fit``: pass 2 rereads a row right after pass 1 read it; the reread is served by L2 if the rows in
      flight (read plus gradient written, ~2 row sizes each) fit in about half of it.
    * but at least one program per SM (fewer would idle SMs; for V ~ 150k in bf16 this floor already exceeds
      the L2 budget, and the backwards sweep of pass 2 then recovers the part that is still cached).

    Pure function of its arguments (unit-tested with mocked limits and metadata). Not tuned on hardware.
    """
    resident = limits.sms * _blocks_per_sm(kernel, limits)
    fit = (limits.l2_bytes // 2) // max(1, 2 * row_bytes)
    return max(1, min(n_rows, resident, max(limits.sms, fit)))


def _resources_of(compiled) -> Optional[_KernelResources]:
    """:class:`_KernelResources` of a ``CompiledKernel`` (``n_regs`` is known once its binary is loaded), or
    None if this Triton does not expose them."""
    try:
        compiled._init_handles()  # loads the binary: where n_regs comes from (Triton 3.x); a launch does it too
        return _KernelResources(n_regs=int(compiled.n_regs), num_warps=int(compiled.metadata.num_warps),
                                shared=int(compiled.metadata.shared))
    except (AttributeError, TypeError, ValueError):
        return None


_RESOURCES_CACHE: dict = {}


def _specialization_key(args: tuple, meta: dict) -> tuple:
    """What selects the compiled variant: the constexprs, the tensors' dtypes and devices and 16-divisibility of
    pointers and integer arguments (Triton's specialization), so the cached resources are those of that binary."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((a.dtype, a.device, a.data_ptr() % 16 == 0))
        elif isinstance(a, int) and not isinstance(a, bool):
            parts.append(("i", a == 1, a % 16 == 0))
        else:
            parts.append(type(a).__name__)
    return tuple(parts) + tuple(sorted(meta.items()))


def _compiled_resources(kernel, args: tuple, meta: dict) -> Optional[_KernelResources]:
    """Resources of the compiled kernel that ``kernel[grid](*args, **meta)`` would run (compiling it now if
    needed, as the launch would), cached per specialization so a launch pays the lookup once; None under the
    interpreter, which compiles nothing."""
    if _interpreting():
        return None
    key = (id(kernel), _specialization_key(args, meta))
    if key in _RESOURCES_CACHE:
        return _RESOURCES_CACHE[key]
    try:
        compiled = kernel.warmup(*args, grid=(1,), **meta)
    except (AttributeError, TypeError):  # a Triton without warmup(..., grid=): use the worst case
        return None
    res = None if compiled is None else _resources_of(compiled)
    _RESOURCES_CACHE[key] = res
    return res


def _programs(logits: Tensor, n_rows: int, block_v: int, num_warps: int, programs: Optional[int],
              resources=lambda: None) -> int:
    """Grid size of the persistent one-pass kernel, i.e. the number of rows in flight.

    ``programs`` overrides (benchmarks sweep it). A row that fits in one chunk is reread right after it was
    loaded: one program per row then, no persistence (the hardware schedules the waves). So is a CPU tensor
    (the interpreter). Otherwise :func:`_persistent_grid` with the device's limits and ``resources()`` (the
    compiled kernel's :class:`_KernelResources`; None -> :func:`_worst_case_resources`).
    """
    if programs is not None:
        if isinstance(programs, bool) or not isinstance(programs, int) or programs < 1:
            raise ValueError(f"programs must be a positive int, got {programs!r}")
        return min(programs, n_rows)
    V = logits.shape[-1]
    limits = _device_limits(logits.device) if V > block_v else None
    if limits is None:
        return n_rows
    kernel = resources() or _worst_case_resources(num_warps, limits)
    return _persistent_grid(n_rows, V * logits.element_size(), kernel, limits)


def _rne_bf16(dtype: torch.dtype) -> bool:
    """Round fp32 -> bf16 gradients to nearest even by hand? Only under the interpreter: Triton 3.9's
    interpreter truncates that cast, while compiled kernels round to nearest even (``cvt.rn.bf16x2.f32``)."""
    return dtype == torch.bfloat16 and _interpreting()


def _vec(dtype: torch.dtype) -> int:
    """Elements per 16-byte vector."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def _rows_aligned_alike(a: Tensor, b: Tensor) -> bool:
    """Whether every ``(s, t)`` row of ``a`` starts at the same address modulo 16 bytes as that row of ``b``
    (same dtype): then one head/body split of the row (``OUT_ALIGNED``) aligns both."""
    if (a.data_ptr() - b.data_ptr()) % 16:
        return False
    e = a.element_size()
    return all((a.stride(i) - b.stride(i)) * e % 16 == 0 for i in (0, 1) if a.shape[i] > 1)


def _check_inputs(logits: Tensor, tokens: Tensor, mask: Tensor, temperature) -> Tuple[Tensor, Tensor, float]:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be an (S, T, V) tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be fp16/bf16/fp32/fp64, got {logits.dtype}")
    if logits.shape[-1] > 0 and logits.stride(-1) != 1:
        raise ValueError(f"logits must have a unit vocabulary stride, got strides {logits.stride()}")
    S, T, _ = logits.shape
    if tuple(tokens.shape) != (S, T) or tuple(mask.shape) != (S, T):
        raise ValueError(f"tokens and mask must have shape {(S, T)}, got {tuple(tokens.shape)} and "
                         f"{tuple(mask.shape)}")
    if tokens.device != logits.device or mask.device != logits.device:
        raise ValueError("logits, tokens and mask must be on the same device")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    tokens = tokens.to(torch.int64).contiguous()
    mask = (mask != 0).contiguous().view(torch.uint8)
    return tokens, mask, 1.0 / float(temperature)


def _row(t: Tensor, name: str, like: Tensor) -> Tensor:
    S, T = like.shape[:2]
    if tuple(t.shape) != (S, T):
        raise ValueError(f"{name} must have shape {(S, T)}, got {tuple(t.shape)}")
    return t.to(device=like.device, dtype=accumulation_dtype(like.dtype)).contiguous()


class _on_device:
    """Make ``tensor``'s CUDA device current while launching (Triton launches on the current device)."""

    def __init__(self, tensor: Tensor):
        self.ctx = torch.cuda.device(tensor.device) if tensor.is_cuda else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------------------------------------
# The kernel-module contract
# ----------------------------------------------------------------------------------------------------------
def is_available(device) -> Tuple[bool, str]:
    """``(available, reason)``: CUDA tensors need a CUDA device; CPU tensors need ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "torch reports no usable CUDA device"
        return True, f"triton {triton.__version__} on CUDA"
    if device.type == "cpu":
        if _interpreting():
            return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1; slow, for tests)"
        return False, ("Triton kernels run on CUDA tensors; on CPU tensors only under the Triton interpreter "
                       "(set TRITON_INTERPRET=1, slow, meant for tests)")
    return False, f"Triton kernels do not run on {device.type} tensors"


def logprobs_fwd(logits: Tensor,  # (S, T, V), stride(-1) == 1
                 tokens: Tensor,  # (S, T) int64
                 mask: Tensor,  # (S, T) bool, False = not read, outputs 0
                 temperature: float,
                 with_entropy: bool,
                 check_ids: bool = True,
                 *, block_v: Optional[int] = None, num_warps: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp, lse, entropy)``, each ``(S, T)`` contiguous fp32 (fp64 for fp64 logits).

    ``logp = z_y/τ − lse`` (evaluated without cancellation when p_y ~ 1), ``lse = logsumexp(z/τ)``,
    ``entropy = lse − Σ p z/τ`` (zeros unless ``with_entropy``); all three are 0 on masked rows.
    ``block_v`` (a power of two: the chunk size; tests use it to exercise the multi-chunk path on tiny V)
    and ``num_warps`` override the launch heuristics.
    """
    tokens, mask_u8, inv_tau = _check_inputs(logits, tokens, mask, temperature)
    if check_ids:
        check_token_ids(logits, tokens, mask_u8.bool())
    S, T, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logp = torch.empty((S, T), dtype=acc, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    if S * T == 0:
        return logp, lse, ent
    bv, nw = _launch_config(V, logits.dtype, block_v, num_warps)
    fwd, _, _ = _kernels()
    with _on_device(logits):
        fwd[(S * T,)](logits, tokens, mask_u8, logp, lse, ent, T, V, logits.stride(0), logits.stride(1), inv_tau,
                      WITH_ENTROPY=bool(with_entropy), BLOCK_V=bv, VEC=_vec(logits.dtype), num_warps=nw)
    return logp, lse, ent


def logprobs_bwd(grad_logp: Tensor,  # (S, T)
                 grad_entropy: Optional[Tensor],  # (S, T) or None
                 logits: Tensor,  # (S, T, V)
                 tokens: Tensor,  # (S, T)
                 mask: Tensor,  # (S, T) bool
                 lse: Tensor,  # (S, T) from logprobs_fwd
                 entropy: Tensor,  # (S, T) from logprobs_fwd (used only with grad_entropy)
                 temperature: float,
                 out: Optional[Tensor] = None,  # (S, T, V), may be ``logits`` itself
                 check_ids: bool = True,
                 *, block_v: Optional[int] = None, num_warps: Optional[int] = None) -> Tensor:
    """``grad_logits = (g·(1[v=y] − p) − g_H·p·(z/τ − (lse − H))) / τ`` in the logits' dtype.

    Written to a new contiguous ``(S, T, V)`` tensor, or into ``out`` (same shape/dtype, unit vocabulary
    stride, any other strides; may be the logits: each element is read before it is overwritten). Masked
    rows are exactly zero. The target's ``1 − p_y`` is ``Σ_{v≠y} p_v`` (accurate when p_y ~ 1).
    """
    tokens, mask_u8, inv_tau = _check_inputs(logits, tokens, mask, temperature)
    if check_ids:
        check_token_ids(logits, tokens, mask_u8.bool())
    S, T, V = logits.shape
    if out is None:
        out = torch.empty((S, T, V), dtype=logits.dtype, device=logits.device)
    else:
        check_out(out, logits)
    grad_logp = _row(grad_logp, "grad_logp", logits)
    lse = _row(lse, "lse", logits)
    has_ge = grad_entropy is not None
    grad_entropy = _row(grad_entropy, "grad_entropy", logits) if has_ge else grad_logp
    entropy = _row(entropy, "entropy", logits) if has_ge else lse
    if S * T == 0 or V == 0:
        return out
    bv, nw = _launch_config(V, logits.dtype, block_v, num_warps)
    _, bwd, _ = _kernels()
    with _on_device(logits):
        bwd[(S * T,)](grad_logp, grad_entropy, logits, tokens, mask_u8, lse, entropy, out, T, V,
                      logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), inv_tau,
                      HAS_GRAD_ENT=has_ge, BLOCK_V=bv, RNE_BF16=_rne_bf16(logits.dtype), VEC=_vec(logits.dtype),
                      OUT_ALIGNED=_rows_aligned_alike(out, logits), num_warps=nw)
    return out


def logprobs_fwd_grad(logits: Tensor,  # (S, T, V)
                      tokens: Tensor,  # (S, T)
                      mask: Tensor,  # (S, T) bool
                      coef: Tensor,  # (S, T) dL/dlogp
                      temperature: float,
                      with_entropy: bool,
                      out: Optional[Tensor] = None,  # (S, T, V), may be ``logits`` itself
                      check_ids: bool = True,
                      ent_coef: Optional[Tensor] = None,  # (S, T) dL/dH, accumulation dtype
                      *, block_v: Optional[int] = None, num_warps: Optional[int] = None,
                      programs: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass per row: ``(logp, lse, entropy, grad)`` with ``grad = coef·(1[v=y] − p)/τ``, and with
    ``ent_coef`` given, ``grad = (coef·(1[v=y] − p) − ent_coef·p·(z/τ − (lse − H)))/τ`` (the two-pass
    backward's formula with ``g_ℓ = coef``, ``g_H = ent_coef``; the entropy is then computed in pass 1 and
    returned whatever ``with_entropy`` says). ``ent_coef=None`` compiles the kernel without that term.

    ``logp, lse, entropy`` are as in :func:`logprobs_fwd`; ``grad`` is a new contiguous ``(S, T, V)`` tensor
    in the logits' dtype, or ``out`` (may be the logits: each row is fully reduced before it is
    overwritten, element by element after being reread). Masked rows: not read, zero outputs, zero grad.
    Persistent launch: ``programs`` rows in flight (default: the compiled kernel's residency, see
    :func:`_programs`); ``block_v`` and ``num_warps`` as in :func:`logprobs_fwd`.
    """
    tokens, mask_u8, inv_tau = _check_inputs(logits, tokens, mask, temperature)
    has_ec = ent_coef is not None
    if has_ec:
        check_ent_coef(ent_coef, logits)
    if check_ids:
        check_token_ids(logits, tokens, mask_u8.bool())
    S, T, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    if out is None:
        out = torch.empty((S, T, V), dtype=logits.dtype, device=logits.device)
    else:
        check_out(out, logits)
    coef = _row(coef, "coef", logits)
    logp = torch.empty((S, T), dtype=acc, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    if S * T == 0:
        return logp, lse, ent, out
    bv, nw = _launch_config(V, logits.dtype, block_v, num_warps, one_pass=True)
    _, _, fwd_grad = _kernels()
    args = (logits, tokens, mask_u8, coef, ent_coef if has_ec else coef, logp, lse, ent, out, S * T, T, V,
            logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), inv_tau)
    meta = dict(WITH_ENTROPY=bool(with_entropy) or has_ec, HAS_ENT_COEF=has_ec, BLOCK_V=bv,
                RNE_BF16=_rne_bf16(logits.dtype), VEC=_vec(logits.dtype), OUT_ALIGNED=_rows_aligned_alike(out, logits),
                num_warps=nw)
    with _on_device(logits):
        grid = (_programs(logits, S * T, bv, nw, programs, lambda: _compiled_resources(fwd_grad, args, meta)),)
        fwd_grad[grid](*args, **meta)
    return logp, lse, ent, out
