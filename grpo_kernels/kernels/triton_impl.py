"""Triton backend: streaming per-row log-softmax kernels (forward, backward, one-pass forward+gradient).

This module is the ``"triton"`` kernel module of :mod:`grpo_kernels.kernels` (see the contract in its
docstring). Layout of the file: kernel bodies -> the lazily built kernel set -> launchers (checks,
allocation, grid) -> the contract functions :func:`logprobs_fwd`, :func:`logprobs_bwd`,
:func:`logprobs_fwd_grad`. The ``torch.library`` ops, fakes and autograd live in :mod:`grpo_kernels.kernels.ops`.

Shapes: ``logits (S, T, V)`` with a unit vocabulary stride (the S and T strides are arbitrary),
``tokens (S, T)`` int64, ``mask (S, T)`` bool; per-row outputs ``(S, T)`` in fp32 (fp64 for fp64 logits).

Design (docs/design.md §5-6):

* One program per ``(s, t)`` row on a 1-D grid (axis 0 takes up to 2^31-1 programs, so neither S nor T
  ever meets CUDA's 65,535 limit of grid axes 1 and 2). Pointer offsets are int64 (S·T·V may exceed 2^31).
* The row is streamed in ``BLOCK_V`` chunks with an online max / sum-exp (fp32 accumulation, fp64 for fp64
  logits). ``-inf`` logits (a masked vocabulary) contribute nothing and never make a NaN. V need not be a
  power of two.
* Rows with ``mask == False`` write zeros and return before reading a single logit.
* ``temperature`` is a runtime argument (passed as fp64, cast to the accumulation type once per program),
  and so are S, T, V and the strides: changing them does not recompile (Triton still specializes integer
  arguments on divisibility by 16, which is at most a second variant). ``BLOCK_V`` and ``num_warps`` are
  chosen from V and the dtype.
* Confident tokens (p_y ~ 1): ``log p_y = −log1p(Σ_{v≠y} e^{z_v−z_y})`` and the target's gradient uses
  ``1 − p_y = Σ_{v≠y} p_v``, both summed over the other classes, so neither is the cancellation
  ``z_y − lse`` / ``1 − exp(ℓ)`` (which in fp32 leaves nothing of a 1 − p_y below ~1e-7).
* Deterministic: every row is reduced by one program in a fixed order; there are no atomics.
* Memory traffic: the forward reads each unmasked row once. The backward reads it once and writes the
  gradient once. The one-pass kernel (:func:`logprobs_fwd_grad`) reads the row, then rereads it and writes
  the gradient: at most two reads and one write per training step, instead of three reads and one write for
  forward + backward. The reread is served by L2 to the extent that the rows in flight fit in it; it walks
  the row backwards, so the chunks read last (still cached) are reread first.
* In-place gradient (``out=`` the logits themselves): each program touches only its own row, and every
  element of the row is loaded before the same element is stored, so overwriting is safe.

Triton's ``@triton.jit`` decides at *decoration* time whether a kernel is compiled or interpreted (it reads
``TRITON_INTERPRET`` when the decorator runs, triton 3.x ``runtime/jit.py``). The kernels are therefore
plain functions here and are wrapped by :func:`_kernels`, a cache keyed by the interpreter flag in force
at launch, so setting ``TRITON_INTERPRET=1`` after importing this module (as the tests' fixture does) works.
For the same reason the kernel bodies avoid triton's *jitted* standard-library helpers (``tl.max``, ``tl.sum``,
``tl.zeros``: decorated when triton itself was imported, so they cannot run in the interpreter if the flag was
set later) and use builtins instead: ``tl.reduce`` with triton's own combine functions (which the interpreter
recognises and runs with numpy) and ``tl.full``. Under the interpreter, fp32 -> bf16 stores are rounded to
nearest even by hand (``RNE_BF16``), because Triton 3.9's interpreter truncates that cast while compiled
kernels round.

Loops whose bounds are runtime values (``V``, ``n_rows``, the program id) are ``while`` loops, not
``range(...)``: the interpreter of Triton <= 3.6 turns ``range``'s bounds into ints with ``int()`` of a
1-element array, which NumPy >= 2.4 rejects (triton-lang/triton#9171, fixed after 3.6), so every CPU test
failed there. Compiled, the ``while`` form gives the same code: same PTX instruction counts, registers and
spills for every kernel, dtype and flag, on Triton 3.6 and 3.9 (``.ci/check_triton_sm90.py`` prints them).
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import check_out, check_token_ids
from ..reference import accumulation_dtype

Tensor = torch.Tensor

#: :func:`logprobs_fwd_grad` (one-pass forward + gradient) is implemented.
FWD_GRAD = True

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Kernel bodies (plain functions; wrapped with triton.jit lazily by _kernels()). They must not call other
# Python-level helpers: a jitted kernel may only call jitted functions, and these are wrapped late.
# ----------------------------------------------------------------------------------------------------------
def _fwd_kernel(logits_ptr, tokens_ptr, mask_ptr,  # (S,T,V) strided rows, (S,T) int64, (S,T) uint8
                logp_ptr, lse_ptr, ent_ptr,  # (S,T) outputs, accumulation dtype
                T, V, stride_s, stride_t,
                inv_tau: tl.float64,
                WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
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
    offs = tl.arange(0, BLOCK_V)
    y = tl.load(tokens_ptr + row)
    m = tl.full([], float("-inf"), acc_ty)  # running max of z = logits / tau
    l_other = tl.full([], 0.0, acc_ty)  # running sum of exp(z_v - m) over v != y
    w = tl.full([], 0.0, acc_ty)  # running sum of exp(z_v - m) * z_v over all v (entropy)
    start = 0
    while start < V:
        cols = start + offs
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(acc_ty) * scale
        m_new = tl.maximum(m, tl.reduce(z, 0, tl.standard._elementwise_max))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new).to(acc_ty)  # all -inf so far: no NaN
        alpha = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)
        l_other = l_other * alpha + tl.reduce(tl.where(cols == y, 0.0, e), 0, tl.standard._sum_combine)
        if WITH_ENTROPY:  # p = 0, z = -inf contributes 0, not NaN
            w = w * alpha + tl.reduce(e * tl.where(e == 0.0, 0.0, z), 0, tl.standard._sum_combine)
        m = m_new
        start += BLOCK_V
    zy = tl.load(base + y).to(acc_ty) * scale
    # log p_y = -log1p(l_other / e_y) (accurate when p_y ~ 1, unlike z_y - lse), log1p from log (Goldberg)
    e_y = tl.exp(zy - m)
    l = l_other + e_y
    log_l = tl.log(l)
    lse = m + log_l
    x = l_other / tl.where(e_y > 0.0, e_y, 1.0)
    u = 1.0 + x
    log1p_x = tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))
    tl.store(logp_ptr + row, tl.where(e_y > 0.0, -log1p_x, (zy - m) - log_l))
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, lse - w / l)
    else:
        tl.store(ent_ptr + row, 0.0)


def _bwd_kernel(grad_logp_ptr, grad_ent_ptr,  # (S,T) accumulation dtype (grad_ent unused without HAS_GRAD_ENT)
                logits_ptr, tokens_ptr, mask_ptr, lse_ptr, ent_ptr,
                out_ptr,  # (S,T,V) strided rows, logits dtype; may alias logits_ptr
                T, V, stride_s, stride_t, out_stride_s, out_stride_t,
                inv_tau: tl.float64,
                HAS_GRAD_ENT: tl.constexpr, BLOCK_V: tl.constexpr, RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc_ty = lse_ptr.dtype.element_ty
    out_ty = out_ptr.dtype.element_ty
    s = row // T
    t = row - s * T
    out_base = out_ptr + s * out_stride_s + t * out_stride_t
    offs = tl.arange(0, BLOCK_V)
    if tl.load(mask_ptr + row) == 0:  # masked: exact zeros, no logits read
        start = 0
        while start < V:
            cols = start + offs
            tl.store(out_base + cols, tl.full([BLOCK_V], 0.0, out_ty), mask=cols < V)
            start += BLOCK_V
        return
    base = logits_ptr + s * stride_s + t * stride_t
    scale = tl.full([], inv_tau, acc_ty)
    g = tl.load(grad_logp_ptr + row)
    lse = tl.load(lse_ptr + row)
    y = tl.load(tokens_ptr + row)
    zy = tl.load(base + y).to(acc_ty) * scale  # before the loop: out may alias the logits
    if HAS_GRAD_ENT:
        gh = tl.load(grad_ent_ptr + row)
        mean_z = lse - tl.load(ent_ptr + row)  # sum_v p_v z_v
    p_other = tl.full([], 0.0, acc_ty)  # sum of p_v over v != y, i.e. 1 - p_y without cancellation
    start = 0
    while start < V:
        cols = start + offs
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(acc_ty) * scale
        p = tl.exp(z - lse)
        p_other += tl.reduce(tl.where(cols == y, 0.0, p), 0, tl.standard._sum_combine)
        grad = g * (tl.where(cols == y, 1.0, 0.0).to(acc_ty) - p)  # the target entry is rewritten below
        if HAS_GRAD_ENT:
            grad -= gh * p * tl.where(p == 0.0, 0.0, z - mean_z)  # p = 0 (z = -inf) -> 0, not NaN
        grad = grad * scale
        if RNE_BF16:  # interpreter only (see _rne_bf16): round to nearest even by hand
            u = grad.to(tl.uint32, bitcast=True)
            u = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
            tl.store(out_base + cols, u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=cols < V)
        else:
            tl.store(out_base + cols, grad.to(out_ty), mask=cols < V)
        start += BLOCK_V
    # The target entry again, with 1 - p_y = sum_{v != y} p_v (accurate when p_y ~ 1, where 1 - exp(z_y - lse)
    # is all rounding error). The barrier orders this store after the loop's store of the same element,
    # which another thread of the program may have made.
    p_y = tl.exp(zy - lse)
    g_y = g * p_other
    if HAS_GRAD_ENT:
        g_y -= gh * p_y * tl.where(p_y == 0.0, 0.0, zy - mean_z)
    g_y = g_y * scale
    tl.debug_barrier()
    if RNE_BF16:
        u_y = g_y.to(tl.uint32, bitcast=True)
        u_y = (u_y + (0x7FFF + ((u_y >> 16) & 1))) >> 16
        tl.store(out_base + y, u_y.to(tl.uint16).to(tl.bfloat16, bitcast=True))
    else:
        tl.store(out_base + y, g_y.to(out_ty))


def _fwd_grad_kernel(logits_ptr, tokens_ptr, mask_ptr, coef_ptr,  # coef (S,T) accumulation dtype
                     logp_ptr, lse_ptr, ent_ptr,
                     out_ptr,  # (S,T,V) strided rows, logits dtype; may alias logits_ptr
                     n_rows, T, V, stride_s, stride_t, out_stride_s, out_stride_t,
                     inv_tau: tl.float64,
                     WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, RNE_BF16: tl.constexpr):
    # Persistent: program p handles rows p, p + P, p + 2P, ... (P = the grid size), so exactly P rows are in
    # flight at any time -- the launcher sizes P so that they fit in L2 and pass 2 rereads from the cache.
    acc_ty = logp_ptr.dtype.element_ty
    out_ty = out_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_V)
    scale = tl.full([], inv_tau, acc_ty)
    n_chunks = (V + BLOCK_V - 1) // BLOCK_V
    r = tl.program_id(0)
    while r < n_rows:
        row = r.to(tl.int64)
        s = row // T
        t = row - s * T
        out_base = out_ptr + s * out_stride_s + t * out_stride_t
        if tl.load(mask_ptr + row) == 0:  # masked: exact zeros, no logits read
            tl.store(logp_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            tl.store(ent_ptr + row, 0.0)
            start = 0
            while start < V:
                cols = start + offs
                tl.store(out_base + cols, tl.full([BLOCK_V], 0.0, out_ty), mask=cols < V)
                start += BLOCK_V
        else:
            base = logits_ptr + s * stride_s + t * stride_t
            # Pass 1: online max / sum-exp (and the entropy sum) over the row, as in _fwd_kernel.
            y = tl.load(tokens_ptr + row)
            m = tl.full([], float("-inf"), acc_ty)
            l_other = tl.full([], 0.0, acc_ty)
            w = tl.full([], 0.0, acc_ty)
            start = 0
            while start < V:
                cols = start + offs
                z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(acc_ty) * scale
                m_new = tl.maximum(m, tl.reduce(z, 0, tl.standard._elementwise_max))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new).to(acc_ty)
                alpha = tl.exp(m - m_ref)
                e = tl.exp(z - m_ref)
                l_other = l_other * alpha + tl.reduce(tl.where(cols == y, 0.0, e), 0, tl.standard._sum_combine)
                if WITH_ENTROPY:
                    w = w * alpha + tl.reduce(e * tl.where(e == 0.0, 0.0, z), 0, tl.standard._sum_combine)
                m = m_new
                start += BLOCK_V
            zy = tl.load(base + y).to(acc_ty) * scale  # read before pass 2 may overwrite it (out = logits)
            e_y = tl.exp(zy - m)
            l = l_other + e_y
            log_l = tl.log(l)
            lse = m + log_l
            x = l_other / tl.where(e_y > 0.0, e_y, 1.0)
            u = 1.0 + x
            log1p_x = tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))
            tl.store(logp_ptr + row, tl.where(e_y > 0.0, -log1p_x, (zy - m) - log_l))
            tl.store(lse_ptr + row, lse)
            if WITH_ENTROPY:
                tl.store(ent_ptr + row, lse - w / l)
            else:
                tl.store(ent_ptr + row, 0.0)
            # Pass 2: reread the row and write coef * (1[v=y] - p_v) / tau. Chunks are visited last to first:
            # the most recently read ones are the likeliest to still be in L2 (a forward sweep over a row larger
            # than this program's share of the cache would evict each chunk just before it is needed).
            # The target's 1 - p_y is l_other / l: no cancellation when p_y ~ 1.
            c = tl.load(coef_ptr + row) * scale
            c_y = c * (l_other / l)
            i = 0
            while i < n_chunks:
                cols = (n_chunks - 1 - i) * BLOCK_V + offs
                z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(acc_ty) * scale
                p = tl.exp(z - lse)
                grad = tl.where(cols == y, c_y, -c * p)
                if RNE_BF16:
                    u = grad.to(tl.uint32, bitcast=True)
                    u = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
                    tl.store(out_base + cols, u.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=cols < V)
                else:
                    tl.store(out_base + cols, grad.to(out_ty), mask=cols < V)
                i += 1
        r += tl.num_programs(0)


def _interpreting() -> bool:
    """Whether Triton would interpret kernels decorated now (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


_KERNEL_SETS: Dict[bool, tuple] = {}  # interpreter flag -> (fwd, bwd, fwd_grad)


def _kernels() -> tuple:
    """``(fwd, bwd, fwd_grad)`` jitted for the interpreter flag in force now (decorated lazily, see the
    module doc; triton.jit reads the flag itself when it decorates)."""
    interpret = _interpreting()
    kernels = _KERNEL_SETS.get(interpret)
    if kernels is None:
        kernels = (triton.jit(_fwd_kernel, do_not_specialize=["T"]),
                   triton.jit(_bwd_kernel, do_not_specialize=["T"]),
                   triton.jit(_fwd_grad_kernel, do_not_specialize=["n_rows", "T"]))
        _KERNEL_SETS[interpret] = kernels
    return kernels


# ----------------------------------------------------------------------------------------------------------
# Launch configuration and checks
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


@functools.lru_cache(maxsize=None)
def _device_caps(index: int) -> Tuple[int, int]:
    """``(streaming multiprocessors, L2 bytes)`` of CUDA device ``index`` (queried at the first launch)."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, int(getattr(props, "L2_cache_size", 0) or 50 * 2 ** 20)


def _programs(logits: Tensor, n_rows: int, block_v: int, programs: Optional[int]) -> int:
    """Grid size of the persistent one-pass kernel, i.e. the number of rows in flight.

    Pass 2 rereads a row right after pass 1 read it; the reread is served by L2 if the rows in flight (read
    plus gradient written, ~2 row sizes each) fit in about half of it. So: as many programs as fit, but at
    least one per SM (fewer would idle SMs; for V ~ 150k in bf16 this floor already exceeds the budget, and
    the backwards sweep of pass 2 then recovers the part that is still cached) and at most 4 per SM. A row
    that fits in one chunk is reread right after it was loaded: one program per row then, no persistence.
    Not tuned on hardware; ``programs`` overrides.
    """
    if programs is not None:
        if isinstance(programs, bool) or not isinstance(programs, int) or programs < 1:
            raise ValueError(f"programs must be a positive int, got {programs!r}")
        return min(programs, n_rows)
    V = logits.shape[-1]
    if not logits.is_cuda or V <= block_v:
        return n_rows
    sms, l2 = _device_caps(logits.device.index if logits.device.index is not None else torch.cuda.current_device())
    fit = (l2 // 2) // (2 * V * logits.element_size())
    return min(n_rows, max(sms, min(fit, 4 * sms)))


def _rne_bf16(dtype: torch.dtype) -> bool:
    """Round fp32 -> bf16 gradients to nearest even by hand? Only under the interpreter: Triton 3.9's
    interpreter truncates that cast, while compiled kernels round to nearest even (``cvt.rn.bf16x2.f32``)."""
    return dtype == torch.bfloat16 and _interpreting()


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
                      WITH_ENTROPY=bool(with_entropy), BLOCK_V=bv, num_warps=nw)
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
                      HAS_GRAD_ENT=has_ge, BLOCK_V=bv, RNE_BF16=_rne_bf16(logits.dtype), num_warps=nw)
    return out


def logprobs_fwd_grad(logits: Tensor,  # (S, T, V)
                      tokens: Tensor,  # (S, T)
                      mask: Tensor,  # (S, T) bool
                      coef: Tensor,  # (S, T) dL/dlogp
                      temperature: float,
                      with_entropy: bool,
                      out: Optional[Tensor] = None,  # (S, T, V), may be ``logits`` itself
                      check_ids: bool = True,
                      *, block_v: Optional[int] = None, num_warps: Optional[int] = None,
                      programs: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass per row: ``(logp, lse, entropy, grad)`` with ``grad = coef·(1[v=y] − p)/τ``.

    ``logp, lse, entropy`` are as in :func:`logprobs_fwd`; ``grad`` is a new contiguous ``(S, T, V)`` tensor
    in the logits' dtype, or ``out`` (may be the logits: each row is fully reduced before it is
    overwritten, element by element after being reread). Masked rows: not read, zero outputs, zero grad.
    Persistent launch: ``programs`` rows in flight (default: see :func:`_programs`); ``block_v`` and
    ``num_warps`` as in :func:`logprobs_fwd`.
    """
    tokens, mask_u8, inv_tau = _check_inputs(logits, tokens, mask, temperature)
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
    grid = (_programs(logits, S * T, bv, programs),)
    _, _, fwd_grad = _kernels()
    with _on_device(logits):
        fwd_grad[grid](logits, tokens, mask_u8, coef, logp, lse, ent, out, S * T, T, V,
                       logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), inv_tau,
                       WITH_ENTROPY=bool(with_entropy), BLOCK_V=bv, RNE_BF16=_rne_bf16(logits.dtype),
                       num_warps=nw)
    return logp, lse, ent, out
