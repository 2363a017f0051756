"""Shared pieces of the pytest-benchmark suites (imported by the ``test_bench_*.py`` files next to it).

The suites reuse the harness of ``grpo-kernels bench`` (:mod:`grpo_kernels.bench`): the same inputs, the same
implementation list (backends that ``available_backends`` reports, installed peers) and the same byte-count
model, so a pytest-benchmark number and a ``results.md`` number mean the same thing.

Environment:
    GRPO_BENCH_DEVICE  ``cpu`` or ``cuda`` (default: cuda when available).
    GRPO_BENCH_QUICK   ``1``: tiny shapes (a smoke run of the suites in seconds).
    GRPO_BENCH_ROUNDS  timed rounds per benchmark (default 5 on CPU, 50 on CUDA).
    GRPO_BENCH_MEMORY  ``0``: skip the extra call that measures peak memory (``extra_info["peak_extra_bytes"]``).
"""

from __future__ import annotations

import os
from typing import List

import pytest
import torch

from grpo_kernels.bench import cases as C
from grpo_kernels.bench import impls as I
from grpo_kernels.bench import harness as H

DEVICE = torch.device(os.environ.get("GRPO_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
QUICK = os.environ.get("GRPO_BENCH_QUICK", "") not in ("", "0")
ROUNDS = int(os.environ.get("GRPO_BENCH_ROUNDS") or (50 if DEVICE.type == "cuda" else 5))
MEMORY = os.environ.get("GRPO_BENCH_MEMORY", "1") not in ("", "0")
IMPLS = C.BACKEND_NAMES + C.PEER_NAMES


def shapes(op: str) -> List[tuple]:
    """The shapes of the suites: (S, T, V) for the logits ops, (S, T, H, V) for fused_linear."""
    if QUICK:
        return [(4, 64, 64, 4000)] if op == "fused_linear" else [(4, 64, 4000)]
    if DEVICE.type == "cuda":
        if op == "fused_linear":
            return [(16, 512, 4096, V) for V in (32000, 151936)]
        return [(16, 512, V) for V in (32000, 151936, 262144)]
    if op == "fused_linear":
        return [(16, 256, 256, 32000)]
    return [(16, 256, 32000)]


def cases(op: str, dtypes=None, loss_types=("softmax",), modes=H.MODES) -> List[C.Case]:
    dtypes = dtypes or ((("bfloat16",) if DEVICE.type == "cuda" else ("float32", "bfloat16")))
    out = []
    for dims in shapes(op):
        for mode in modes:
            for dt in dtypes:
                for lt in loss_types if op != "token_logprobs" else (C.NO_LOSS,):
                    if op == "fused_linear":
                        S, T, Hd, V = dims
                        out.append(C.Case(op, mode, S, T, V, dt, lt, H=Hd))
                    else:
                        S, T, V = dims
                        out.append(C.Case(op, mode, S, T, V, dt, lt))
    return out


def case_id(case: C.Case) -> str:
    lt = "" if case.op == "token_logprobs" else f"-{case.loss_type}"
    return f"{case.mode}-{case.shape}-{case.dtype}{lt}"


def run_benchmark(benchmark, case: C.Case, impl_name: str) -> None:
    """Benchmark ``impl_name`` on ``case`` with pytest-benchmark (skips, with the reason, what cannot run)."""
    impls = {i.name: i for i in I.implementations(case, DEVICE)}
    impl = impls.get(impl_name)
    if impl is None:
        pytest.skip(f"{impl_name} does not apply to {case.op}")
    reason = impl.skip_reason or C._memory_guard(case, impl, DEVICE)
    if reason:
        pytest.skip(f"{impl_name}: {reason}")
    inputs = C.build_inputs(case, DEVICE)
    fn = impl.make(inputs)
    if DEVICE.type == "cuda":
        def target():
            fn()
            torch.cuda.synchronize()
    else:
        target = fn
    benchmark.group = f"{case.op} {case_id(case)}"
    benchmark.extra_info.update(op=case.op, mode=case.mode, shape=case.shape, dtype=case.dtype,
                                loss_type=case.loss_type, impl=impl_name, ideal_bytes=case.ideal_bytes(),
                                ideal_flops=case.ideal_flops(), device=str(DEVICE))
    try:
        benchmark.pedantic(target, setup=lambda: C.clear_grads(inputs), rounds=ROUNDS, warmup_rounds=1,
                           iterations=1)
    finally:
        C.clear_grads(inputs)
    if MEMORY:
        C.clear_grads(inputs)
        peak, method = H.peak_extra(fn, DEVICE)
        C.clear_grads(inputs)
        benchmark.extra_info.update(peak_extra_bytes=peak, memory_method=method,
                                    peak_extra_x_logits=None if peak is None else peak / case.logits_bytes())
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info["gbps"] = case.ideal_bytes() / median / 1e9
        if case.ideal_flops():
            benchmark.extra_info["tflops"] = case.ideal_flops() / median / 1e12
