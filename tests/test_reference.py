"""The eager reference against hand-derived numbers and an independent, loop-by-loop fp64 formulation.

The independent formulation below is deliberately written differently from ``reference.py`` (Python loops,
explicit exp/sum softmax, explicit unbiased std) so that a mistake in one is unlikely to be repeated in the
other. It is a test oracle for the oracle, not a second implementation used by the package.
"""

import math

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference as ref

LOSS_TYPES = ["softmax", "grpo", "bnpo", "dr_grpo", "dapo"]


# ----------------------------------------------------------------------------------------------------------
# Independent formulation (fp64, loops)
# ----------------------------------------------------------------------------------------------------------
def _lse(z):
    mx = max(z.detach().tolist())
    return torch.log(torch.stack([torch.exp(v - mx) for v in z]).sum()) + mx


def independent_loss(logits, tokens, rewards, mask, G, *, loss_type="softmax", beta=0.1, temperature=1.0,
                     old=None, refl=None, kl_coef=0.0, eps=0.2, eps_high=None, delta=None, scale="group",
                     adv=None, max_len=None, n_items=None, level="token", kl_ratio=False):
    S, T, V = logits.shape
    eps_high = eps if eps_high is None else eps_high
    m = [[float(tokens[s, t] != -100 and (mask is None or mask[s, t] != 0)) for t in range(T)] for s in range(S)]
    lp = [[None] * T for _ in range(S)]
    for s in range(S):
        for t in range(T):
            if m[s][t]:
                z = logits[s, t] / temperature
                lp[s][t] = z[int(tokens[s, t])] - _lse(z)
            else:
                lp[s][t] = torch.zeros((), dtype=torch.float64)
    n_tok = sum(sum(row) for row in m)
    zero = torch.zeros((), dtype=torch.float64)

    def kl(s, t):
        if refl is None or not m[s][t]:
            return zero
        d = refl[s, t] - lp[s][t]
        return torch.exp(d) - d - 1

    kl_total = sum(m[s][t] * kl(s, t) for s in range(S) for t in range(T))
    kl_term = kl_coef * kl_total / max(n_tok, 1) if (refl is not None and kl_coef != 0) else zero

    if loss_type == "softmax":
        loss = zero
        for g in range(S // G):
            rs = [rewards[g * G + i] / beta for i in range(G)]
            mx = max(r.item() for r in rs)
            e = [torch.exp(r - mx) for r in rs]
            tot = sum(e)
            for i in range(G):
                s = g * G + i
                L = sum(m[s][t] * lp[s][t] for t in range(T))
                loss = loss - (e[i] / tot) * L
        return loss / (S // G) + kl_term

    # advantages
    if adv is not None:
        A = [adv[s] for s in range(S)]
    else:
        A = []
        allmean = sum(rewards[s] for s in range(S)) / S
        allstd = (torch.sqrt(sum((rewards[s] - allmean) ** 2 for s in range(S)) / (S - 1)) if S > 1 else zero)
        for g in range(S // G):
            grp = [rewards[g * G + i] for i in range(G)]
            mean = sum(grp) / G
            std = torch.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1)) if G > 1 else zero
            for x in grp:
                if scale == "group":
                    A.append((x - mean) / (std + 1e-4))
                elif scale == "batch":
                    A.append((x - mean) / (allstd + 1e-4))
                else:
                    A.append(x - mean)
    per = [[None] * T for _ in range(S)]
    for s in range(S):
        msum = sum(m[s])
        if level == "sequence":
            lr_seq = sum(m[s][t] * (lp[s][t] - (old[s, t] if old is not None else lp[s][t].detach()))
                         for t in range(T)) / max(msum, 1)
        for t in range(T):
            o = old[s, t] if (old is not None and m[s][t]) else lp[s][t].detach()
            lr = lr_seq if level == "sequence" else lp[s][t] - o
            rho = torch.exp(lr)
            rho1 = torch.clamp(rho, max=delta) if delta is not None else rho
            clipped = torch.clamp(rho, 1 - eps, 1 + eps_high)
            k = kl(s, t) * (rho if kl_ratio else 1.0)  # DeepSeek-V3.2's bias correction: KL times the ratio
            per[s][t] = -torch.minimum(rho1 * A[s], clipped * A[s]) + (kl_coef * k if refl is not None else 0)
    if loss_type == "grpo":
        return sum(sum(m[s][t] * per[s][t] for t in range(T)) / max(sum(m[s]), 1) for s in range(S)) / S
    total = sum(m[s][t] * per[s][t] for s in range(S) for t in range(T))
    if loss_type == "bnpo" or (loss_type == "dapo" and n_items is None):
        return total / max(n_tok, 1)
    if loss_type == "dapo":
        return total / n_items
    return total / (S * (max_len if max_len is not None else T))


def _problem(S=6, T=4, V=11, G=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(S, T, V, generator=g, dtype=dtype) * 2)
    tokens = torch.randint(0, V, (S, T), generator=g)
    tokens[1, 2] = -100
    mask = torch.ones(S, T)
    mask[2, 3:] = 0
    mask[S - 2, :] = 0  # a fully masked sequence
    rewards = torch.rand(S, generator=g, dtype=dtype)
    old = ref.token_logprobs(logits, tokens).detach() + 0.3 * torch.randn(S, T, generator=g, dtype=dtype)
    refl = ref.token_logprobs(logits, tokens).detach() + 0.5 * torch.randn(S, T, generator=g, dtype=dtype)
    return logits, tokens, mask, rewards, old, refl


# ----------------------------------------------------------------------------------------------------------
# Hand-derived numbers
# ----------------------------------------------------------------------------------------------------------
def test_lesson_two_responses_hand_derived():
    # rewards [1, 0], beta 0.1 -> weights softmax([10, 0]) = [1/(1+e^-10), e^-10/(1+e^-10)]
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    w1 = math.exp(-10) / (1 + math.exp(-10))
    w0 = 1 - w1
    assert gk.compute_grpo_loss(lp, r, beta=0.1).item() == pytest.approx(w0 * 1.0 + w1 * 2.0, abs=1e-15)
    assert gk.group_weights(r, 2, beta=0.1).tolist() == pytest.approx([w0, w1], abs=1e-15)
    # beta = 1: weights [e/(1+e), 1/(1+e)]
    e = math.e
    assert gk.compute_grpo_loss(lp, r, beta=1.0).item() == pytest.approx(e / (1 + e) + 2 / (1 + e), abs=1e-15)


def test_compute_grpo_loss_batched_is_mean_over_groups():
    lp = torch.randn(3, 4, dtype=torch.float64)
    r = torch.randn(3, 4, dtype=torch.float64)
    per_group = [gk.compute_grpo_loss(lp[b], r[b], beta=0.5) for b in range(3)]
    assert gk.compute_grpo_loss(lp, r, beta=0.5).item() == pytest.approx(sum(p.item() for p in per_group) / 3, abs=1e-14)


def test_seed_formula_matches_grpo_loss_softmax():
    # One group, sequence log-probs L_s = Σ_t ℓ: grpo_loss(softmax) == the lesson's compute_grpo_loss(L, r, beta)
    logits, tokens, _, rewards, _, _ = _problem(S=4, G=4)
    L = ref.token_logprobs(logits, tokens).sum(-1)
    seed = gk.compute_grpo_loss(L, rewards, beta=0.3)
    ours = gk.grpo_loss(logits, tokens, rewards, group_size=4, beta=0.3, backend="torch")
    assert ours.item() == pytest.approx(seed.item(), abs=1e-12)


def test_token_logprobs_hand_derived():
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)  # p = [1/4, 3/4]
    tokens = torch.tensor([[1]])
    lp, ent = ref.token_logprobs(logits, tokens, return_entropy=True)
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-15)
    assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-15)
    # temperature 2 halves the logits: p ∝ [1, sqrt 3]
    lp2 = ref.token_logprobs(logits, tokens, temperature=2.0)
    s3 = math.sqrt(3.0)
    assert lp2.item() == pytest.approx(math.log(s3 / (1 + s3)), abs=1e-15)


def test_advantages_hand_derived():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0], dtype=torch.float64)
    A = gk.group_advantages(r, 3)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert A[:3].tolist() == pytest.approx([(2 / 3) / (std + 1e-4), -(1 / 3) / (std + 1e-4), -(1 / 3) / (std + 1e-4)])
    s2 = math.sqrt(4 / 3)  # group [0, 2, 2]: deviations [-4/3, 2/3, 2/3]
    assert A[3:].tolist() == pytest.approx([-(4 / 3) / (s2 + 1e-4), (2 / 3) / (s2 + 1e-4), (2 / 3) / (s2 + 1e-4)],
                                           rel=1e-12)
    assert gk.group_advantages(r, 3, scale_rewards="none").tolist() == pytest.approx(
        [2 / 3, -1 / 3, -1 / 3, -4 / 3, 2 / 3, 2 / 3])
    # a group of one has advantage 0 (no NaN from the std of one sample)
    assert gk.group_advantages(r, 1).abs().max().item() == 0.0


def test_softmax_rewards_gradient_matches_design_formula():
    logits, tokens, mask, rewards, _, _ = _problem()
    r = rewards.clone().requires_grad_()
    beta = 0.5
    gk.grpo_loss(logits, tokens, r, mask, group_size=3, beta=beta, backend="torch").backward()
    L = (ref.token_logprobs(logits, tokens) * ref.effective_mask(tokens, mask, torch.float64)).sum(-1).view(-1, 3)
    w = gk.group_weights(rewards, 3, beta).view(-1, 3)
    expected = -(w / beta) * (L - (w * L).sum(-1, keepdim=True)) / 2
    torch.testing.assert_close(r.grad, expected.view(-1), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Every loss type against the independent formulation (value, logits grad, rewards grad) to 1e-9
# ----------------------------------------------------------------------------------------------------------
CASES = [
    dict(),
    dict(temperature=0.7, kl_coef=0.1, use_ref=True),
    dict(use_old=True, eps_high=0.28),
    dict(use_old=True, use_ref=True, kl_coef=0.05, delta=1.5),
    dict(use_old=True, level="sequence"),
    dict(scale="batch", use_old=True),
    dict(scale="none", use_ref=True, kl_coef=0.2),
    dict(use_ref=True, kl_coef=0.1, bias=True),  # on-policy: the ratio has value 1 but gradient 1
    dict(use_old=True, use_ref=True, kl_coef=0.05, bias=True, level="sequence"),
]


# level / scale_rewards are options of the clipped family only
_PAIRS = [(lt, i) for lt in LOSS_TYPES for i, c in enumerate(CASES)
          if not (lt == "softmax" and (c.get("level") or c.get("scale")))]


@pytest.mark.parametrize("loss_type,case", _PAIRS, ids=[f"{lt}-case{i}" for lt, i in _PAIRS])
@pytest.mark.parametrize("impl", ["oracle", "torch"])
def test_against_independent_formulation(loss_type, case, impl):
    """The autograd oracle (reference.grpo_loss) and the torch backend (the eager kernels) both equal an
    independent formulation written in this file."""
    c = CASES[case]
    logits, tokens, mask, rewards, old, refl = _problem(seed=case)
    kw = dict(loss_type=loss_type, beta=0.3 if loss_type == "softmax" else None, temperature=c.get("temperature", 1.0),
              old_logprobs=old if c.get("use_old") else None, ref_logprobs=refl if c.get("use_ref") else None,
              kl_coef=c.get("kl_coef", 0.0), epsilon=0.2, epsilon_high=c.get("eps_high"), delta=c.get("delta"),
              scale_rewards=c.get("scale", "group"), importance_sampling_level=c.get("level", "token"),
              use_bias_correction_kl=c.get("bias", False))
    if loss_type == "dr_grpo":
        kw["max_completion_length"] = 7
    if loss_type == "dapo" and case % 2:
        kw["num_items_in_batch"] = 13
    lg1 = logits.clone().requires_grad_()
    r1 = rewards.clone().requires_grad_()
    if impl == "oracle":
        ours = ref.grpo_loss(lg1, tokens, r1, mask, group_size=3, **kw)
    else:
        ours = gk.grpo_loss(lg1, tokens, r1, mask, group_size=3, backend="torch", **kw)
    ours.backward()
    lg2 = logits.clone().requires_grad_()
    r2 = rewards.clone().requires_grad_()
    theirs = independent_loss(lg2, tokens, r2, mask, 3, loss_type=loss_type, beta=0.3,
                              temperature=kw["temperature"], old=kw["old_logprobs"], refl=kw["ref_logprobs"],
                              kl_coef=kw["kl_coef"], eps=0.2, eps_high=kw["epsilon_high"], delta=kw["delta"],
                              scale=kw["scale_rewards"], max_len=kw.get("max_completion_length"),
                              n_items=kw.get("num_items_in_batch"), level=kw["importance_sampling_level"],
                              kl_ratio=kw["use_bias_correction_kl"] and loss_type != "softmax")
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-9
    torch.testing.assert_close(lg1.grad, lg2.grad, atol=1e-9, rtol=0)
    torch.testing.assert_close(r1.grad, r2.grad, atol=1e-9, rtol=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES[1:])
def test_advantages_argument_matches_rewards_path(loss_type):
    logits, tokens, mask, rewards, old, _ = _problem()
    A = gk.group_advantages(rewards, 3)
    a = gk.grpo_loss(logits, tokens, rewards, mask, group_size=3, loss_type=loss_type, old_logprobs=old, backend="torch")
    b = gk.grpo_loss(logits, tokens, None, mask, group_size=3, loss_type=loss_type, old_logprobs=old, advantages=A,
                     backend="torch")
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# gradcheck in fp64 (logits and rewards)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type,level", [("softmax", "token")] + [(lt, lv) for lt in LOSS_TYPES[1:]
                                                                        for lv in ("token", "sequence")])
def test_gradcheck(loss_type, level):
    logits, tokens, mask, rewards, old, refl = _problem(S=4, T=3, V=5, G=2)
    lg = logits.clone().requires_grad_()
    r = rewards.clone().requires_grad_()

    def f(lg, r):
        return gk.grpo_loss(lg, tokens, r, mask, group_size=2, loss_type=loss_type, old_logprobs=old,
                            ref_logprobs=refl, kl_coef=0.1, temperature=0.8, importance_sampling_level=level,
                            backend="torch")

    assert torch.autograd.gradcheck(f, (lg, r), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------
def test_metrics_values():
    logits, tokens, mask, rewards, old, refl = _problem()
    loss, met = gk.grpo_loss(logits, tokens, rewards, mask, group_size=3, loss_type="grpo", old_logprobs=old,
                             ref_logprobs=refl, kl_coef=0.1, return_metrics=True, backend="torch")
    m = ref.effective_mask(tokens, mask, torch.float64)
    lp, ent = ref.token_logprobs(logits, tokens, return_entropy=True)
    n = m.sum()
    assert met["num_tokens"].item() == n.item()
    assert met["logprob"].item() == pytest.approx((lp * m).sum().item() / n.item(), abs=1e-12)
    assert met["entropy"].item() == pytest.approx((ent * m).sum().item() / n.item(), abs=1e-12)
    d = torch.where(m > 0, refl, 0) - torch.where(m > 0, lp, 0)
    ratio = torch.exp(torch.where(m > 0, lp - old, 0))
    # the KL as it enters the loss: bias-corrected by the ratio (use_bias_correction_kl, TRL's default)
    assert met["kl"].item() == pytest.approx(((d.exp() - d - 1) * ratio * m).sum().item() / n.item(), abs=1e-12)
    A = gk.group_advantages(rewards, 3)[:, None]
    low = ((ratio < 0.8) & (A < 0)).double()
    high = ((ratio > 1.2) & (A > 0)).double()
    assert met["clip_ratio/low_mean"].item() == pytest.approx((low * m).sum().item() / n.item(), abs=1e-12)
    assert met["clip_ratio/high_mean"].item() == pytest.approx((high * m).sum().item() / n.item(), abs=1e-12)
    assert met["clip_ratio/region_mean"].item() == pytest.approx(
        met["clip_ratio/low_mean"].item() + met["clip_ratio/high_mean"].item(), abs=1e-12)
    assert all(not v.requires_grad for v in met.values())
    assert not torch.isnan(loss)
