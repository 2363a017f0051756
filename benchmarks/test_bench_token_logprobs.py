"""``token_logprobs`` forward and forward+backward (random upstream gradient): backends and peers."""

import pytest

from bench_common import IMPLS, case_id, cases, run_benchmark

CASES = cases("token_logprobs")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_token_logprobs(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)
