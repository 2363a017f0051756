"""Timing, byte-count model, copy bandwidth and peak memory: the measuring half of the benchmarks.

Everything a number in ``results.md`` is derived from lives here, so that it can be unit-tested on
hand-computed values (``tests/test_bench_harness.py``).

**Byte-count model ("ideal traffic").** A benchmark row's GB/s is ``ideal_bytes / median time``: the bytes that
an ideal implementation *must* move, the same count for every backend and peer of a case, so that GB/s compares
like with like (it is an *effective* bandwidth against the ideal traffic, not the traffic a backend really
causes). With ``N = S*T`` tokens, ``e`` the logits' element size and int64 tokens:

==================  ==========  ===========================================================================
op                  mode        ideal bytes
==================  ==========  ===========================================================================
grpo_loss           fwd         ``N*V*e`` (one read of the logits) + ``8N`` tokens + ``N`` bool mask (if
                                given) + ``4S`` rewards
grpo_loss           fwd_bwd     ``2*N*V*e`` (one read of the logits + one write of their gradient: the
                                one-pass floor of docs/design.md §6, since ``c = ∂loss/∂ℓ`` is known up-front)
                                + the same small tensors
token_logprobs      fwd         ``N*V*e`` + ``8N`` tokens (+ ``N`` mask) + ``4N`` log-probs written (fp32)
token_logprobs      fwd_bwd     ``3*N*V*e`` (the upstream gradient only exists after the forward, so the
                                backward must read the logits again: read, read, write) + ``8N`` (+ ``N``)
                                + ``4N`` log-probs written + ``4N`` upstream gradient read
fused_linear        fwd         ``N*H*e`` hidden + ``V*H*e`` weight (+ ``V*e`` bias) + ``8N`` + ``4S``
fused_linear        fwd_bwd     the fwd reads + ``N*H*e`` grad_hidden + ``V*H*e`` grad_weight (+ ``V*e``)
                                written. The logits are never materialized, so this op is compute-bound;
                                its rows also report TFLOP/s from ``2NHV`` (fwd) / ``6NHV`` (fwd_bwd) FLOPs.
==================  ==========  ===========================================================================

The device's copy bandwidth is measured in the same run (a large tensor copy, counting read + write) and each
row reports ``GB/s`` as a percentage of it.

**Peak memory.** On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
memory allocated before the call. On CPU, the high-water mark of the process's resident set (``VmHWM``) around
the call: ``ru_maxrss`` cannot be reset, but Linux resets ``VmHWM`` to the current RSS when ``5`` is written to
``/proc/self/clear_refs``; freed heap memory is first returned to the OS (``malloc_trim``) so the call has to
fault in every page it touches. The extra memory is ``VmHWM after - VmRSS before`` (inputs already resident are
not counted). This is done in the benchmark process itself, on a call that is never the implementation's first
(:func:`grpo_kernels.bench.cases.measure`: lazy initialization such as loading an extension is already paid);
large buffers (> 32 MiB) are always returned to the OS on free by glibc and PyTorch's CPU allocator does not
cache, so earlier rows cannot hide this row's allocations. Where ``clear_refs`` is not
writable (non-Linux), the row reports no memory number and says why.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

OPS = ("grpo_loss", "token_logprobs", "fused_linear")
MODES = ("fwd", "fwd_bwd")
FLUSH_BYTES = 256 * 2 ** 20  # L2-cold mode: a buffer this large is overwritten between repetitions


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TimingStats:
    """Statistics over repetitions, in milliseconds (``rounds`` timed calls, after ``warmup`` untimed ones)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    rounds: int
    warmup: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] of ``values`` (numpy's default "linear" method)."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], warmup: int) -> TimingStats:
    """:class:`TimingStats` of a list of per-call times in ms."""
    return TimingStats(median_ms=statistics.median(times_ms), p10_ms=quantile(times_ms, 0.1),
                       p90_ms=quantile(times_ms, 0.9), mean_ms=statistics.fmean(times_ms), min_ms=min(times_ms),
                       max_ms=max(times_ms), rounds=len(times_ms), warmup=warmup)


def _check_timing_args(warmup: int, min_rounds: int, max_rounds: int, min_time_s: float) -> None:
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(min_rounds, int) or min_rounds < 1:
        raise ValueError(f"min_rounds must be an int >= 1, got {min_rounds!r}")
    if not isinstance(max_rounds, int) or max_rounds < min_rounds:
        raise ValueError(f"max_rounds must be an int >= min_rounds ({min_rounds}), got {max_rounds!r}")
    if not min_time_s >= 0:
        raise ValueError(f"min_time_s must be >= 0, got {min_time_s!r}")


def time_cpu(fn: Callable[[], object], *, warmup: int = 1, min_rounds: int = 5, max_rounds: int = 200,
             min_time_s: float = 1.0, max_time_s: Optional[float] = None, flush: Optional[Callable[[], None]] = None,
             before_each: Optional[Callable[[], None]] = None) -> TimingStats:
    """Time ``fn()`` with ``time.perf_counter``: ``warmup`` untimed calls, then at least ``min_rounds`` timed
    calls and more until ``min_time_s`` of timed work or ``max_rounds`` is reached. With ``max_time_s``, slow
    calls stop after ``min(3, min_rounds)`` rounds once that much time was spent. ``before_each`` (e.g. dropping
    the previous call's ``.grad``) and ``flush`` (cache-cold mode) run untimed before every call."""
    _check_timing_args(warmup, min_rounds, max_rounds, min_time_s)
    floor_rounds = min(3, min_rounds)
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        fn()
    times = []
    total = 0.0
    while (len(times) < floor_rounds
           or (len(times) < min_rounds and (max_time_s is None or total < max_time_s))
           or (total < min_time_s and len(times) < max_rounds)):
        if before_each is not None:
            before_each()
        if flush is not None:
            flush()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        total += dt
    return summarize(times, warmup)


def time_cuda(fn: Callable[[], object], *, warmup: int = 2, min_rounds: int = 10, max_rounds: int = 1000,
              min_time_s: float = 0.2, flush: Optional[Callable[[], None]] = None,
              before_each: Optional[Callable[[], None]] = None) -> TimingStats:
    """Time ``fn()`` on the current CUDA device with CUDA events: ``warmup`` calls (at least ~25 ms of them),
    then enough timed calls for ``min_time_s`` (within ``[min_rounds, max_rounds]``), one event pair per call;
    ``before_each`` (host side) and ``flush`` (L2-cold mode) run between calls, outside the timed region."""
    _check_timing_args(warmup, min_rounds, max_rounds, min_time_s)
    prep = before_each if before_each is not None else (lambda: None)
    torch.cuda.synchronize()
    prep()
    fn()  # first call: compilation, autotuning, lazy init
    torch.cuda.synchronize()
    probe_s, probe_e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_s.record()
    for _ in range(3):
        prep()
        fn()
    probe_e.record()
    torch.cuda.synchronize()
    est_ms = max(probe_s.elapsed_time(probe_e) / 3, 1e-3)
    n_warm = max(warmup, int(25.0 / est_ms))
    for _ in range(n_warm):
        prep()
        fn()
    n = int(min(max(min_rounds, math.ceil(min_time_s * 1e3 / est_ms)), max_rounds))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        prep()
        if flush is not None:
            flush()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], n_warm + 4)


def make_flush(device: torch.device, nbytes: int = FLUSH_BYTES) -> Callable[[], None]:
    """A callable that overwrites a ``nbytes`` buffer (evicts the L2 / last-level cache between repetitions)."""
    buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def flush() -> None:
        buf.zero_()

    return flush


def time_callable(fn: Callable[[], object], device, *, quick: bool = False, cold_l2: bool = False,
                  before_each: Optional[Callable[[], None]] = None, **overrides) -> TimingStats:
    """Time ``fn`` on ``device`` with the defaults of a normal (or ``quick``) run; keyword overrides go to
    :func:`time_cpu` / :func:`time_cuda`."""
    device = torch.device(device)
    flush = make_flush(device) if cold_l2 else None
    if device.type == "cuda":
        kw = dict(warmup=2, min_rounds=5 if quick else 10, min_time_s=0.05 if quick else 0.3)
        kw.update(overrides)
        return time_cuda(fn, flush=flush, before_each=before_each, **kw)
    kw = dict(warmup=1, min_rounds=3 if quick else 5, min_time_s=0.05 if quick else 1.0,
              max_time_s=1.0 if quick else 10.0)
    kw.update(overrides)
    return time_cpu(fn, flush=flush, before_each=before_each, **kw)


# ----------------------------------------------------------------------------------------------------------
# Byte-count and FLOP models
# ----------------------------------------------------------------------------------------------------------
def dtype_size(dtype) -> int:
    """Element size in bytes of a torch dtype (or its name, e.g. ``"bfloat16"``)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def _check_mode(op: str, mode: str) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def logits_bytes(S: int, T: int, V: int, elt: int) -> int:
    """Size of the ``(S, T, V)`` logits in bytes (what the fused-linear path never materializes)."""
    return S * T * V * elt


def ideal_bytes(op: str, mode: str, *, S: int, T: int, V: int, elt: int, H: Optional[int] = None,
                has_mask: bool = False, has_bias: bool = False) -> int:
    """The ideal memory traffic of one call, in bytes (the model in this module's docstring)."""
    _check_mode(op, mode)
    N = S * T
    small = 8 * N + (N if has_mask else 0)  # int64 tokens, bool mask
    if op == "grpo_loss":
        passes = 1 if mode == "fwd" else 2
        return passes * N * V * elt + small + 4 * S
    if op == "token_logprobs":
        if mode == "fwd":
            return N * V * elt + small + 4 * N
        return 3 * N * V * elt + small + 4 * N + 4 * N
    if H is None:
        raise ValueError("fused_linear needs the hidden size H")
    params = V * H * elt + (V * elt if has_bias else 0)
    fwd = N * H * elt + params + small + 4 * S
    return fwd if mode == "fwd" else fwd + N * H * elt + params


def ideal_flops(op: str, mode: str, *, S: int, T: int, V: int, H: Optional[int] = None) -> Optional[int]:
    """Matmul FLOPs of the fused-linear op (``2NHV`` forward, ``6NHV`` forward+backward); None for the others."""
    _check_mode(op, mode)
    if op != "fused_linear":
        return None
    if H is None:
        raise ValueError("fused_linear needs the hidden size H")
    return (2 if mode == "fwd" else 6) * S * T * H * V


def copy_bandwidth(device, nbytes: int = 256 * 2 ** 20, *, quick: bool = False) -> float:
    """The device's copy bandwidth in GB/s (1e9 bytes/s), counting read + write: ``2 * nbytes / t``."""
    device = torch.device(device)
    if quick:
        nbytes = min(nbytes, 32 * 2 ** 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    stats = time_callable(lambda: dst.copy_(src), device, quick=quick, min_time_s=0.05 if quick else 0.5)
    return 2 * nbytes / (stats.median_ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------
def _proc_status_bytes(*keys: str) -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0]) * 1024  # kB
    return out


def cpu_hwm_supported() -> Tuple[bool, str]:
    """Whether :func:`cpu_peak_extra` can measure here (Linux ``/proc/self/clear_refs`` writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_bytes("VmHWM", "VmRSS")["VmHWM"]
    except (OSError, KeyError) as e:
        return False, f"cannot reset the RSS high-water mark ({type(e).__name__}: {e})"
    return True, "VmHWM reset via /proc/self/clear_refs"


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def cpu_peak_extra(fn: Callable[[], object]) -> int:
    """Peak resident memory that ``fn()`` adds on top of what is resident before it, in bytes (Linux).

    Frees the heap's unused pages, resets the process's RSS high-water mark (``/proc/self/clear_refs``),
    calls ``fn`` and reads ``VmHWM``. Whatever ``fn`` returns is kept alive until the reading (a returned
    gradient counts). Raises OSError where the high-water mark cannot be reset.
    """
    _trim_heap()
    before = _proc_status_bytes("VmRSS")["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    hwm = _proc_status_bytes("VmHWM")["VmHWM"]
    del out
    return max(0, hwm - before)


def cuda_peak_extra(fn: Callable[[], object], device) -> int:
    """Peak CUDA memory allocated during ``fn()`` beyond what was allocated before it, in bytes."""
    device = torch.device(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return max(0, peak - before)


def peak_extra(fn: Callable[[], object], device) -> Tuple[Optional[int], str]:
    """``(bytes or None, method)``: peak extra memory of one call of ``fn`` on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_extra(fn, device), "torch.cuda.max_memory_allocated"
    ok, why = cpu_hwm_supported()
    if not ok:
        return None, why
    return cpu_peak_extra(fn), "VmHWM delta (clear_refs reset)"


def mem_available_bytes() -> Optional[int]:
    """``MemAvailable`` from ``/proc/meminfo`` (None where unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_memory(device) -> None:
    """Drop cached memory between implementations so one row's leftovers do not show in the next."""
    _trim_heap()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
