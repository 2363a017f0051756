"""``fused_linear_grpo_loss`` forward+backward against the unfused path (matmul + loss), the bare GEMMs and
Liger's fused linear GRPO loss when installed."""

import pytest

from bench_common import DEVICE, IMPLS, case_id, cases, run_benchmark

CASES = cases("fused_linear", dtypes=("bfloat16",) if DEVICE.type == "cuda" else ("float32",),
              loss_types=("softmax", "grpo"), modes=("fwd_bwd",))


@pytest.mark.parametrize("impl", ("unfused-eager", "unfused-auto", "gemm-floor") + IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_linear(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
