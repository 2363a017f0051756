"""No host sync inside a compiled training step (issue 13, item 6): once ``torch.compile`` has traced the loss,
running it -- forward and backward, through the custom ops and the kernels -- never reads a tensor on the host
(``Tensor.__bool__``, ``.item()``, ``.tolist()`` raise here), so it can be captured in a CUDA graph
(``mode="reduce-overhead"``). A bad token id is still refused, by a device-side assertion."""

import contextlib

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference as ref

S, T, V, G = 4, 5, 13, 2


@contextlib.contextmanager
def no_host_reads():
    """Every way of reading a tensor's value on the host raises."""
    def fail(*a, **k):
        raise AssertionError("host sync: a tensor value was read on the host inside the compiled step")

    saved = {n: getattr(torch.Tensor, n) for n in ("__bool__", "item", "tolist", "__int__", "__float__")}
    for n in saved:
        setattr(torch.Tensor, n, fail)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every test compiles its own step (the recompile limit is per code object)
    yield
    torch._dynamo.reset()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(S, T, V, generator=g)
    tok = torch.randint(0, V, (S, T), generator=g)
    tok[0, 4] = -100
    m = torch.ones(S, T)
    m[1, 3:] = 0
    r = torch.rand(S, generator=g)
    lp = ref.token_logprobs(z, tok)
    return z, tok, m, r, lp


CASES = {
    "softmax": dict(),
    "grpo_off_policy_kl": dict(loss_type="grpo", kl_coef=0.1, use_old=True, use_ref=True),
    "dapo_entropy_quantile": dict(loss_type="dapo", entropy_coef=0.05, top_entropy_quantile=0.5, use_old=True),
    "sapo_sequence": dict(loss_type="sapo", importance_sampling_level="sequence", use_old=True),
    "vespo_engine_ratio": dict(loss_type="vespo", use_old=True, use_sampling=True,
                               vllm_importance_sampling_mode="token_truncate"),
    "grpo_off_policy_mask": dict(loss_type="grpo", off_policy_mask_threshold=0.01, use_old=True,
                                 use_sampling=True),
}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_reads_nothing_on_the_host(backend, case):
    kw = dict(CASES[case])
    z, tok, m, r, lp = _inputs()
    data = dict(old_logprobs=lp + 0.1 if kw.pop("use_old", False) else None,
                ref_logprobs=lp - 0.2 if kw.pop("use_ref", False) else None,
                sampling_logprobs=lp + 0.05 if kw.pop("use_sampling", False) else None)

    def step(z, tok, r, m):
        loss, metrics = gk.grpo_loss(z, tok, r, m, group_size=G, backend=backend, return_metrics=True, **data, **kw)
        return loss, metrics["entropy"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = z.clone().requires_grad_(True)
    loss, _ = compiled(x, tok, r, m)  # the first call traces (host reads allowed while tracing)
    loss.backward()
    x2 = z.clone().requires_grad_(True)
    with no_host_reads():
        loss2, ent = compiled(x2, tok, r, m)
        loss2.backward()
    x3 = z.clone().requires_grad_(True)
    want = ref.grpo_loss(x3, tok, r, m, group_size=G, **data, **kw)
    want.backward()
    torch.testing.assert_close(loss2.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x2.grad, x3.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_bad_id_is_still_refused_by_the_device_assertion(backend):
    z, tok, m, r, _ = _inputs()

    def step(z, tok, r, m):
        return gk.grpo_loss(z, tok, r, m, group_size=G, backend=backend, loss_type="grpo")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(z, tok, r, m)
    bad = tok.clone()
    bad[2, 2] = V + 3
    with pytest.raises(RuntimeError, match=rf"tokens must hold ids in \[0, {V}\)"):
        compiled(z, bad, r, m)
