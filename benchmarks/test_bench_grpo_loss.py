"""``grpo_loss`` forward and forward+backward: every backend here and the installed peers."""

import pytest

from bench_common import IMPLS, case_id, cases, run_benchmark

CASES = cases("grpo_loss", loss_types=("softmax", "grpo"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grpo_loss(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
