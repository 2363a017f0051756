"""Benchmark harness behind ``grpo-kernels bench`` and the pytest-benchmark suites in ``benchmarks/``.

* :mod:`.harness` -- timing (CUDA events / ``perf_counter``, quantiles, optional L2-cold mode), the explicit
  byte-count and FLOP models, the device's copy bandwidth, and peak-memory measurement.
* :mod:`.cases` -- the benchmark cases, their inputs, and :func:`~.cases.measure` (one case, one implementation).
* :mod:`.impls` -- one callable per implementation (every backend that ``available_backends`` reports, plus the
  peers that are installed, and the fused-linear floors).
* :mod:`.report` -- ``results.json``, ``results.md`` and the PNG plots.
* :mod:`.sweep` -- ``grpo-kernels sweep``, the Triton launch-parameter sweep (GPU sessions).
* :mod:`.cli` -- the ``grpo-kernels bench`` subcommand.

Nothing here runs at import time; peers (Liger-Kernel, TRL) are imported only when a case asks for them and are
never installed by the harness.
"""
