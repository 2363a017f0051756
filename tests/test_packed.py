"""Packed (padding-free) batches with ``cu_seqlens`` (issue 14, item 2): the same loss, gradients and metrics as the
padded form for every loss type and knob, through grpo_loss (every backend) and fused_linear_grpo_loss; no padding
is read; bad ``cu_seqlens`` is named."""

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference as ref

LENS = [3, 5, 0, 2, 4, 1]  # a zero-length completion included
S, G, V, H = len(LENS), 3, 11, 6
T, N = max(LENS), sum(LENS)


def _cu(dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=dtype)


def _pad(flat, fill=0.0):
    out = torch.full((S, T) + tuple(flat.shape[1:]), fill, dtype=flat.dtype)
    i = 0
    for s, n in enumerate(LENS):
        out[s, :n] = flat[i:i + n]
        i += n
    return out


def _unpad(padded):
    return torch.cat([padded[s, :n] for s, n in enumerate(LENS)])


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, V, (N,), generator=g)
    tokens[4] = -100
    mask = torch.ones(N)
    mask[7] = 0
    lp = ref.token_logprobs(logits, tokens)
    old = lp + 0.2 * torch.randn(N, generator=g, dtype=torch.float64)
    refl = lp + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
    sampling = old + 0.05 * torch.randn(N, generator=g, dtype=torch.float64)
    rewards = torch.rand(S, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    return logits, tokens, mask, rewards, dict(old=old, ref=refl, sampling=sampling, adv=adv)


CASES = {
    "softmax": (dict(), ""),
    "grpo": (dict(loss_type="grpo"), "o"),
    "grpo_on_policy": (dict(loss_type="grpo"), ""),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence"), "o"),
    "bnpo_kl": (dict(loss_type="bnpo", kl_coef=0.1), "or"),
    "dr_grpo": (dict(loss_type="dr_grpo", max_completion_length=7), "o"),
    "dapo_entropy": (dict(loss_type="dapo", entropy_coef=0.1), ""),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.3), "o"),
    "sapo": (dict(loss_type="sapo"), "o"),
    "luspo": (dict(loss_type="luspo", importance_sampling_level="sequence"), "o"),
    "vespo_is": (dict(loss_type="vespo", vllm_importance_sampling_mode="token_truncate"), "os"),
    "entropy_mask": (dict(loss_type="grpo", top_entropy_quantile=0.5), "o"),
    "off_policy_mask": (dict(loss_type="grpo", off_policy_mask_threshold=0.0), "os"),
    "is_sequence": (dict(loss_type="grpo"), "os"),
    "per_token_advantages": (dict(loss_type="grpo"), "oa"),
    "agg_seq_mean_token_mean": (dict(loss_type="grpo", loss_agg_mode="seq-mean-token-mean"), "o"),
}


def _data(which, extra, padded):
    f = _pad if padded else (lambda x: x)
    return dict(old_logprobs=f(extra["old"]) if "o" in which else None,
                ref_logprobs=f(extra["ref"]) if "r" in which else None,
                sampling_logprobs=f(extra["sampling"]) if "s" in which else None,
                advantages=f(extra["adv"]) if "a" in which else None)


@pytest.fixture(params=["torch", "cpu", "triton"])
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_interpret")
    return request.param


@pytest.mark.parametrize("case", list(CASES))
def test_packed_equals_padded(backend, case):
    opts, which = CASES[case]
    logits, tokens, mask, rewards, extra = _problem()
    r = None if "a" in which else rewards
    want_x = _pad(logits).requires_grad_(True)
    want, wm = ref.grpo_loss(want_x, _pad(tokens, -100), r, _pad(mask), group_size=G, return_metrics=True,
                             **_data(which, extra, True), **opts)
    (want_g,) = torch.autograd.grad(want, want_x)
    for shape in ((N, V), (1, N, V)):
        x = logits.clone().reshape(shape).requires_grad_(True)
        got, gm = gk.grpo_loss(x, tokens, r, mask, group_size=G, cu_seqlens=_cu(), backend=backend,
                               return_metrics=True, **_data(which, extra, False), **opts)
        (g,) = torch.autograd.grad(got, x)
        assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
        torch.testing.assert_close(g.reshape(N, V), _unpad(want_g), rtol=1e-9, atol=1e-11)
        for k, v in wm.items():
            torch.testing.assert_close(gm[k], v, rtol=1e-9, atol=1e-11, equal_nan=True, msg=k)


@pytest.mark.parametrize("case", ["softmax", "grpo", "gspo", "dapo_entropy", "luspo", "entropy_mask",
                                  "per_token_advantages"])
def test_packed_fused_linear_equals_padded(case):
    opts, which = CASES[case]
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    _, tokens, mask, rewards, extra = _problem()
    r = None if "a" in which else rewards
    hp, wp = _pad(hidden).requires_grad_(True), weight.clone().requires_grad_(True)
    want = gk.fused_linear_grpo_loss(hp, wp, _pad(tokens, -100), r, _pad(mask), group_size=G, chunk_size=4,
                                     **_data(which, extra, True), **opts)
    want.backward()
    for shape in ((N, H), (1, N, H)):
        h, w = hidden.clone().reshape(shape).requires_grad_(True), weight.clone().requires_grad_(True)
        got = gk.fused_linear_grpo_loss(h, w, tokens, r, mask, group_size=G, chunk_size=4, cu_seqlens=_cu(),
                                        **_data(which, extra, False), **opts)
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
        torch.testing.assert_close(h.grad.reshape(N, H), _unpad(hp.grad), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(w.grad, wp.grad, rtol=1e-9, atol=1e-11)


def test_no_padding_is_read(monkeypatch):
    """The kernels see the N packed rows, not S·T padded ones."""
    from grpo_kernels.kernels import ops

    shapes = []
    real = ops.kernel_fwd_grad
    monkeypatch.setattr(ops, "kernel_fwd_grad", lambda be, z, *a, **k: shapes.append(tuple(z.shape)) or
                        real(be, z, *a, **k))
    logits, tokens, mask, rewards, _ = _problem()
    gk.grpo_loss(logits.clone().requires_grad_(True), tokens, rewards, mask, group_size=G, cu_seqlens=_cu())
    assert shapes == [(1, N, V)]


def test_module_form_takes_cu_seqlens():
    logits, tokens, mask, rewards, _ = _problem()
    crit = gk.GRPOLoss(group_size=G, loss_type="grpo")
    got = crit(logits, tokens, rewards, mask, cu_seqlens=_cu(torch.int64))
    want = ref.grpo_loss(_pad(logits), _pad(tokens, -100), rewards, _pad(mask), group_size=G, loss_type="grpo")
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.parametrize("cu, exc, match", [
    (torch.tensor([0, 3, 2, 15], dtype=torch.int32), ValueError, "must be non-decreasing"),
    (torch.tensor([1, 3, 8, 15], dtype=torch.int32), ValueError, "must start at 0"),
    (torch.tensor([0, 3, 8, 14], dtype=torch.int32), ValueError, "must end at the number of packed tokens N = 15"),
    (torch.tensor([0.0, 3.0, 8.0, 15.0]), TypeError, "cu_seqlens must be int32 or int64"),
    (torch.tensor([[0, 15]], dtype=torch.int32), ValueError, "cu_seqlens must be 1-D"),
    ([0, 3, 8, 15], TypeError, "cu_seqlens must be a 1-D int32/int64 tensor"),
    (torch.tensor([0, 3, 8, 10, 15], dtype=torch.int32), ValueError, "multiple of group_size=3"),
])
def test_bad_cu_seqlens_is_named(cu, exc, match):
    logits, tokens, mask, rewards, _ = _problem()
    r = torch.rand(cu.numel() - 1 if isinstance(cu, torch.Tensor) and cu.dim() == 1 else 3, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        gk.grpo_loss(logits, tokens, r, group_size=G, cu_seqlens=cu)


def test_bad_packed_shapes_are_named():
    logits, tokens, mask, rewards, extra = _problem()
    with pytest.raises(ValueError, match=r"logits must be packed: shape \(N, D\) or \(1, N, D\)"):
        gk.grpo_loss(logits.reshape(3, 5, V), tokens, rewards, group_size=G, cu_seqlens=_cu())
    with pytest.raises(ValueError, match=r"tokens must have shape \(15,\) or \(1, 15\)"):
        gk.grpo_loss(logits, tokens[:-1], rewards, group_size=G, cu_seqlens=_cu())
    with pytest.raises(ValueError, match=r"old_logprobs must have shape \(15,\) or \(1, 15\)"):
        gk.grpo_loss(logits, tokens, rewards, group_size=G, cu_seqlens=_cu(), loss_type="grpo",
                     old_logprobs=extra["old"][:4])
    with pytest.raises(ValueError, match=r"rewards must have one value per sequence: expected length 6"):
        gk.grpo_loss(logits, tokens, rewards[:3], group_size=G, cu_seqlens=_cu())
