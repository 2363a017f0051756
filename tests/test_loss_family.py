"""The loss family beyond the clipped surrogate (cispo, sapo, luspo, vespo) and its knobs (entropy bonus and
mask, off-policy masking, the engine IS correction, bias-corrected KL, per-token advantages, verl's
``loss_agg_mode``) in every backend: equal to the eager reference (whose parity with TRL's own code is
tests/test_trl_parity.py), fp64 gradcheck through the kernels, bf16 error within 2x eager's, the one-pass entropy
gradient equal to the two-pass one, and bad input named."""

import warnings

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference as ref
from grpo_kernels.kernels import ops as _ops

S, T, V, G = 6, 5, 17, 3


def _problem(seed=0, dtype=torch.float64, per_token=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(S, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    tokens = torch.randint(0, V, (S, T), generator=g)
    tokens[0, 4] = -100
    mask = torch.ones(S, T)
    mask[2, 3:] = 0
    mask[4] = 0  # an empty completion
    lp = ref.token_logprobs(logits.double(), tokens)
    old = lp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    refl = lp + 0.2 * torch.randn(S, T, generator=g, dtype=torch.float64)
    sampling = old + 0.1 * torch.randn(S, T, generator=g, dtype=torch.float64)
    rewards = torch.rand(S, generator=g, dtype=torch.float64)
    adv = torch.randn(S, T, generator=g, dtype=torch.float64) if per_token else None
    return logits, tokens, mask, rewards, old, refl, sampling, adv


# name -> (options, which per-batch tensors: o = old, r = ref, s = sampling, a = per-token advantages)
CASES = {
    "cispo": (dict(loss_type="cispo", epsilon_high=1.2), "o"),
    "cispo_on_policy": (dict(loss_type="cispo", epsilon_high=1.2), ""),
    "sapo": (dict(loss_type="sapo"), "o"),
    "sapo_on_policy": (dict(loss_type="sapo", sapo_temperature_neg=2.0), ""),
    "luspo": (dict(loss_type="luspo", importance_sampling_level="sequence"), "o"),
    "vespo": (dict(loss_type="vespo"), "o"),
    "vespo_on_policy": (dict(loss_type="vespo"), ""),
    "vespo_is": (dict(loss_type="vespo", vllm_importance_sampling_mode="token_mask",
                      vllm_importance_sampling_clip_min=0.8, vllm_importance_sampling_clip_max=1.1), "os"),
    "entropy_bonus": (dict(loss_type="grpo", entropy_coef=0.1), ""),
    "entropy_bonus_softmax": (dict(entropy_coef=0.05), ""),
    "entropy_bonus_off_policy": (dict(loss_type="dapo", entropy_coef=0.1, kl_coef=0.05), "or"),
    "entropy_mask": (dict(loss_type="grpo", top_entropy_quantile=0.4), ""),
    "entropy_mask_and_bonus": (dict(loss_type="bnpo", top_entropy_quantile=0.5, entropy_coef=0.2), "o"),
    "off_policy_mask": (dict(loss_type="grpo", off_policy_mask_threshold=0.01), "os"),
    "is_sequence_mask": (dict(loss_type="dapo", vllm_importance_sampling_clip_max=1.3), "os"),
    "is_token_truncate": (dict(loss_type="grpo", vllm_importance_sampling_mode="token_truncate"), "s"),
    "bias_corrected_kl": (dict(loss_type="grpo", kl_coef=0.1), "r"),
    "bias_corrected_kl_gspo": (dict(loss_type="grpo", kl_coef=0.1, importance_sampling_level="sequence"), "or"),
    "per_token_advantages": (dict(loss_type="dr_grpo"), "oa"),
    "agg_token_mean": (dict(loss_type="grpo", loss_agg_mode="token-mean"), "o"),
    "agg_seq_mean_token_sum": (dict(loss_type="sapo", loss_agg_mode="seq-mean-token-sum"), "o"),
    "agg_seq_mean_token_mean": (dict(loss_type="cispo", loss_agg_mode="seq-mean-token-mean"), "o"),
    "agg_seq_mean_token_sum_norm": (dict(loss_type="dapo", loss_agg_mode="seq-mean-token-sum-norm",
                                         max_completion_length=9), "o"),
}


def _data(which, old, refl, sampling, adv):
    return dict(old_logprobs=old if "o" in which else None, ref_logprobs=refl if "r" in which else None,
                sampling_logprobs=sampling if "s" in which else None, advantages=adv if "a" in which else None)


def _loss(fn, logits, tokens, rewards, mask, opts, data, **kw):
    return fn(logits, tokens, None if data["advantages"] is not None else rewards, mask, group_size=G,
              **opts, **data, **kw)


@pytest.fixture(params=["torch", "cpu", "triton", "fused_linear[torch]", "fused_linear[cpu]"])
def impl(request):
    if request.param == "triton":
        request.getfixturevalue("triton_interpret")
    return request.param


def _run(impl, logits, tokens, rewards, mask, opts, data, **kw):
    """``(loss, grad wrt logits)`` through one implementation (the fused-linear path builds the logits from
    hidden @ I, so its weight gradient is the logits gradient)."""
    if impl.startswith("fused_linear"):
        backend = impl[len("fused_linear["):-1]
        hidden = logits.detach().clone().requires_grad_(True)
        eye = torch.eye(V, dtype=logits.dtype)
        loss = gk.fused_linear_grpo_loss(hidden, eye, tokens, None if data["advantages"] is not None else rewards,
                                         mask, group_size=G, chunk_size=7, backend=backend, **opts, **data, **kw)
        (g,) = torch.autograd.grad(loss, hidden)
        return loss, g
    x = logits.detach().clone().requires_grad_(True)
    fn = ref.grpo_loss if impl == "reference" else gk.grpo_loss
    extra = {} if impl == "reference" else {"backend": impl}
    loss = _loss(fn, x, tokens, rewards, mask, opts, data, **extra, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss, g


@pytest.mark.parametrize("case", list(CASES))
def test_every_backend_equals_the_reference(impl, case):
    opts, which = CASES[case]
    logits, tokens, mask, rewards, old, refl, sampling, adv = _problem(per_token="a" in which)
    data = _data(which, old, refl, sampling, adv)
    want, want_g = _run("reference", logits, tokens, rewards, mask, opts, data)
    got, got_g = _run(impl, logits, tokens, rewards, mask, opts, data)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(got_g, want_g, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", ["cispo_on_policy", "sapo", "luspo", "vespo_on_policy", "entropy_bonus_softmax",
                                  "entropy_bonus_off_policy", "entropy_mask_and_bonus", "per_token_advantages"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_fp64_through_the_kernels(case, backend):
    """Finite differences of the fused loss against its kernel gradient (the entropy gradient included). CISPO and
    VESPO detach their weights by definition (a surrogate whose gradient is not the derivative of its value), so
    they are checked on-policy, where the weight is identically 1 under any perturbation of the logits; the
    clipped surrogate is the other way round (on-policy its value is constant, its gradient is not), so it is
    checked off-policy."""
    opts, which = CASES[case]
    logits, tokens, mask, rewards, old, refl, sampling, adv = _problem(per_token="a" in which)
    data = _data(which, old, refl, sampling, adv)
    x = logits.clone().requires_grad_(True)

    def f(z):
        return _loss(gk.grpo_loss, z, tokens, rewards, mask, opts, data, backend=backend)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", ["cispo_on_policy", "sapo_on_policy", "entropy_bonus", "entropy_bonus_softmax"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bf16_error_within_twice_eager(case, backend):
    opts, which = CASES[case]
    logits, tokens, mask, rewards, old, refl, sampling, adv = _problem(seed=3, dtype=torch.bfloat16)
    data = _data(which, old, refl, sampling, adv)
    _, truth = _run("reference", logits.double(), tokens, rewards, mask, opts, data)
    _, eager = _run("reference", logits, tokens, rewards, mask, opts, data)
    _, ours = _run(backend, logits, tokens, rewards, mask, opts, data)
    e_eager = (eager.double() - truth).abs().max().item()
    e_ours = (ours.double() - truth).abs().max().item()
    assert e_ours <= 2 * e_eager + 1e-12, (e_ours, e_eager)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("inplace", [False, True])
def test_one_pass_entropy_gradient_equals_the_two_pass_one(backend, inplace, monkeypatch, request):
    """A constant entropy bonus goes through the one-pass kernel (ent_coef), and gives the two-pass result."""
    if backend == "triton":
        request.getfixturevalue("triton_interpret")
    logits, tokens, mask, rewards, *_ = _problem(dtype=torch.float32)
    opts = dict(loss_type="grpo", entropy_coef=0.3)
    calls = []
    real = _ops.kernel_fwd_grad

    def spy(*a, **kw):
        calls.append(kw.get("ent_coef"))
        return real(*a, **kw)

    monkeypatch.setattr(_ops, "kernel_fwd_grad", spy)
    x1 = logits.clone().requires_grad_(True)
    y1 = x1 * 1.0
    l1 = gk.grpo_loss(y1, tokens, rewards, mask, group_size=G, backend=backend, inplace_backward=inplace, **opts)
    (g1,) = torch.autograd.grad(l1, x1)
    assert len(calls) == 1 and calls[0] is not None  # one pass, with the entropy coefficients

    monkeypatch.setattr(_ops, "supports_one_pass", lambda impl: False)
    x2 = logits.clone().requires_grad_(True)
    l2 = gk.grpo_loss(x2 * 1.0, tokens, rewards, mask, group_size=G, backend=backend, **opts)
    (g2,) = torch.autograd.grad(l2, x2)
    assert len(calls) == 1  # the two-pass path did not call the one-pass kernel
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_entropy_gradient_hand_derived():
    """``∂H/∂z_v = −p_v (log p_v + H) / τ``: the gradient with the bonus minus the gradient without it (the
    policy part is the same on-policy) is ``−coef · ∂(token mean of H)/∂z``, in closed form."""
    logits, tokens, mask, rewards, *_ = _problem()
    tau, coef = 0.7, 0.25
    mask = torch.ones(S, T)
    tokens = tokens.clamp(min=0)
    opts = dict(loss_type="grpo", entropy_coef=coef, temperature=tau)
    with_bonus = _run("cpu", logits, tokens, rewards, mask, opts, _data("", None, None, None, None))[1]
    without = _run("cpu", logits, tokens, rewards, mask, dict(opts, entropy_coef=0.0),
                   _data("", None, None, None, None))[1]
    p = torch.softmax(logits / tau, -1)
    logp = torch.log_softmax(logits / tau, -1)
    H = -(p * logp).sum(-1, keepdim=True)
    dH = -p * (logp + H) / tau
    expected = -coef * dH / (S * T)  # − coef · (token mean of H)
    torch.testing.assert_close(with_bonus - without, expected, rtol=1e-9, atol=1e-12)


def test_high_entropy_mask_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    H = torch.rand(7, 9, generator=g, dtype=torch.float64)
    valid = torch.rand(7, 9, generator=g) > 0.3
    for q in (0.0, 0.2, 0.5, 0.77, 1.0):
        thr = torch.quantile(H[valid], q)
        expected = ((H >= thr) & valid).double()
        assert torch.equal(ref.high_entropy_mask(H, valid, q), expected), q
    assert torch.equal(ref.high_entropy_mask(H, torch.zeros_like(valid), 0.5), torch.zeros_like(H))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of .*'cispo', 'sapo', 'luspo', 'vespo'"),
    (dict(loss_type="luspo"), ValueError, "luspo.*importance_sampling_level='sequence'"),
    (dict(loss_type="grpo", top_entropy_quantile=1.5), ValueError, r"top_entropy_quantile must be in \[0, 1\]"),
    (dict(loss_type="grpo", top_entropy_quantile=-0.1), ValueError, r"top_entropy_quantile must be in \[0, 1\]"),
    (dict(loss_type="sapo", sapo_temperature_pos=0.0), ValueError, "sapo_temperature_pos must be > 0"),
    (dict(loss_type="sapo", sapo_temperature_neg=-1.0), ValueError, "sapo_temperature_neg must be > 0"),
    (dict(loss_type="vespo", vespo_lambda_pos=0.0), ValueError, "vespo_lambda_pos must be > 0"),
    (dict(loss_type="vespo", vespo_k_neg=-1.0), ValueError, "vespo_k_neg must be >= 0"),
    (dict(loss_type="grpo", entropy_coef=float("nan")), TypeError, "entropy_coef must be a finite number"),
    (dict(loss_type="grpo", off_policy_mask_threshold=-0.1), ValueError, "off_policy_mask_threshold must be >= 0"),
    (dict(loss_type="grpo", vllm_importance_sampling_mode="token"), ValueError, "vllm_importance_sampling_mode"),
    (dict(loss_type="grpo", vllm_importance_sampling_clip_min=2.0, vllm_importance_sampling_clip_max=1.0),
     ValueError, "clip_min .* must be less than"),
    (dict(loss_type="grpo", vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None),
     ValueError, "needs vllm_importance_sampling_clip_min or"),
    (dict(loss_type="grpo", loss_agg_mode="mean"), ValueError, "loss_agg_mode must be one of"),
    (dict(loss_agg_mode="token-mean"), ValueError, "loss_agg_mode='token-mean' aggregates"),
    (dict(off_policy_mask_threshold=0.1), ValueError, "off_policy_mask_threshold masks sequences"),
    (dict(loss_type="grpo", use_bias_correction_kl=1), TypeError, "use_bias_correction_kl must be True or False"),
])
def test_bad_options_are_named(kw, exc, match):
    logits, tokens, mask, rewards, *_ = _problem()
    for fn in (gk.grpo_loss, ref.grpo_loss):
        with pytest.raises(exc, match=match):
            fn(logits, tokens, rewards, mask, group_size=G, **kw)
    with pytest.raises(exc, match=match):
        gk.GRPOLoss(group_size=G, **kw)


def test_bad_tensors_are_named():
    logits, tokens, mask, rewards, old, refl, sampling, adv = _problem()
    call = lambda **kw: gk.grpo_loss(logits, tokens, rewards, mask, group_size=G, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"sampling_logprobs must have shape \(6, 5\)"):
        call(loss_type="grpo", sampling_logprobs=sampling[:, :3])
    with pytest.raises(TypeError, match="sampling_logprobs must be a floating-point tensor"):
        call(loss_type="grpo", sampling_logprobs=tokens)
    bad = sampling.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"sampling_logprobs must be finite .* found inf at \[1, 1\]"):
        call(loss_type="grpo", sampling_logprobs=bad)
    nan = sampling.clone()
    nan[1, 1] = float("nan")  # a token the engine could not score: allowed
    assert torch.isfinite(call(loss_type="grpo", sampling_logprobs=nan))
    with pytest.raises(ValueError, match="loss_type='softmax' does not use them"):
        call(sampling_logprobs=sampling)
    with pytest.raises(ValueError, match="vespo.*'token_truncate' or 'token_mask'"):
        call(loss_type="vespo", sampling_logprobs=sampling)
    with pytest.warns(UserWarning, match="sampling_logprobs are ignored"):
        call(loss_type="grpo", sampling_logprobs=sampling, vllm_importance_sampling_correction=False)
    with pytest.raises(ValueError, match=r"advantages must have shape \(6, 5\)"):
        call(loss_type="grpo", advantages=torch.randn(S, T + 1, dtype=torch.float64))
    pt = torch.randn(S, T, dtype=torch.float64)
    pt[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"advantages must be finite .* at \[0, 0\]"):
        call(loss_type="grpo", advantages=pt)
    pt[0, 4] = float("nan")  # tokens[0, 4] == -100: does not count
    pt[0, 0] = 0.0
    assert torch.isfinite(call(loss_type="grpo", advantages=pt))
    with pytest.raises(ValueError, match="num_items_in_batch is the token-mean normalizer"):
        call(loss_type="grpo", num_items_in_batch=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(loss_type="cispo", num_items_in_batch=10)
        call(loss_type="grpo", loss_agg_mode="token-mean", num_items_in_batch=10)
