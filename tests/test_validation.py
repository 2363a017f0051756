"""The bad-input table (every row raises a clear error naming the argument) and the valid edge cases."""

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference as ref

S, T, V, G = 4, 3, 7, 2
LOSS_TYPES = ["softmax", "grpo", "bnpo", "dr_grpo", "dapo"]


def _args():
    return dict(logits=torch.randn(S, T, V), tokens=torch.randint(0, V, (S, T)), rewards=torch.rand(S),
                mask=torch.ones(S, T))


def _call(**over):
    a = _args()
    kw = dict(group_size=G, backend="torch")
    for k, v in over.items():
        (a if k in a else kw)[k] = v
    return gk.grpo_loss(a["logits"], a["tokens"], a["rewards"], a["mask"], **kw)


BAD = [
    # (id, overrides, exception, text that must appear in the message)
    ("logits-rank", dict(logits=torch.randn(S, V)), ValueError, "logits"),
    ("logits-int", dict(logits=torch.randint(0, 3, (S, T, V))), TypeError, "logits"),
    ("logits-not-tensor", dict(logits=[[1.0]]), TypeError, "logits"),
    ("tokens-float", dict(tokens=torch.zeros(S, T)), TypeError, "tokens"),
    ("tokens-bool", dict(tokens=torch.zeros(S, T, dtype=torch.bool)), TypeError, "tokens"),
    ("tokens-shape", dict(tokens=torch.zeros(S, T + 1, dtype=torch.long)), ValueError, "tokens"),
    ("tokens-too-large", dict(tokens=torch.full((S, T), V, dtype=torch.long)), ValueError, "tokens"),
    ("tokens-negative", dict(tokens=torch.full((S, T), -5, dtype=torch.long)), ValueError, "tokens"),
    ("rewards-length", dict(rewards=torch.rand(S + 1)), ValueError, "rewards"),
    ("rewards-rank", dict(rewards=torch.rand(S, 2)), ValueError, "rewards"),
    ("rewards-nan", dict(rewards=torch.tensor([0.0, float("nan"), 1.0, 0.0])), ValueError, "rewards"),
    ("rewards-inf", dict(rewards=torch.tensor([0.0, float("inf"), 1.0, 0.0])), ValueError, "rewards"),
    ("rewards-missing", dict(rewards=None), TypeError, "rewards"),
    ("advantages-length", dict(loss_type="grpo", advantages=torch.rand(S - 1)), ValueError, "advantages"),
    ("advantages-nan", dict(loss_type="grpo", advantages=torch.tensor([0.0, float("nan"), 1.0, 0.0])), ValueError,
     "advantages"),
    ("advantages-softmax", dict(advantages=torch.rand(S)), ValueError, "advantages"),
    ("group-size-divides", dict(group_size=3), ValueError, "group_size"),
    ("group-size-zero", dict(group_size=0), ValueError, "group_size"),
    ("group-size-float", dict(group_size=2.0), TypeError, "group_size"),
    ("loss-type", dict(loss_type="ppo"), ValueError, "loss_type"),
    ("backend-unknown", dict(backend="tpu"), ValueError, "backend"),
    ("backend-cuda-on-cpu", dict(backend="cuda"), ValueError, "backend"),
    ("is-level", dict(loss_type="grpo", importance_sampling_level="seq"), ValueError, "importance_sampling_level"),
    ("scale-rewards", dict(loss_type="grpo", scale_rewards="std"), ValueError, "scale_rewards"),
    ("beta-zero", dict(beta=0.0), ValueError, "beta"),
    ("beta-negative", dict(beta=-1.0), ValueError, "beta"),
    ("beta-nan", dict(beta=float("nan")), ValueError, "beta"),
    ("temperature-zero", dict(temperature=0.0), ValueError, "temperature"),
    ("epsilon-negative", dict(loss_type="grpo", epsilon=-0.1), ValueError, "epsilon"),
    ("epsilon-high-negative", dict(loss_type="grpo", epsilon_high=-0.1), ValueError, "epsilon_high"),
    ("delta-zero", dict(loss_type="grpo", delta=0.0), ValueError, "delta"),
    ("kl-coef-str", dict(kl_coef="0.1"), TypeError, "kl_coef"),
    ("mask-shape", dict(mask=torch.ones(S, T + 1)), ValueError, "mask"),
    ("old-shape", dict(loss_type="grpo", old_logprobs=torch.zeros(S, T + 1)), ValueError, "old_logprobs"),
    ("ref-int", dict(ref_logprobs=torch.zeros(S, T, dtype=torch.long)), TypeError, "ref_logprobs"),
    ("max-len-zero", dict(loss_type="dr_grpo", max_completion_length=0), ValueError, "max_completion_length"),
    ("num-items-wrong-type", dict(loss_type="grpo", num_items_in_batch=10), ValueError, "num_items_in_batch"),
    ("num-items-negative", dict(loss_type="dapo", num_items_in_batch=-3), ValueError, "num_items_in_batch"),
    ("tokens-other-device", dict(tokens=torch.zeros(S, T, dtype=torch.long, device="meta")), ValueError, "tokens"),
    ("rewards-other-device", dict(rewards=torch.zeros(S, device="meta")), ValueError, "rewards"),
    ("mask-other-device", dict(mask=torch.ones(S, T, device="meta")), ValueError, "mask"),
]


@pytest.mark.parametrize("over,exc,text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(over, exc, text):
    with pytest.raises(exc, match=text):
        _call(**over)


_NO_BACKEND = [b for b in BAD if "backend" not in b[1]]


@pytest.mark.parametrize("over,exc,text", [b[1:] for b in _NO_BACKEND], ids=[b[0] for b in _NO_BACKEND])
def test_bad_input_same_errors_with_auto_backend(over, exc, text):
    # The validator runs before dispatch, so backend="auto" reports exactly the same errors.
    with pytest.raises(exc, match=text):
        _call(**{**over, "backend": "auto"})


def test_unavailable_backend_lists_available_ones():
    with pytest.raises(ValueError, match="Available here: .*'torch'"):
        _call(backend="cuda")


def test_compute_grpo_loss_bad_input():
    with pytest.raises(ValueError, match="rewards"):
        gk.compute_grpo_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="beta"):
        gk.compute_grpo_loss(torch.zeros(3), torch.zeros(3), beta=0)
    with pytest.raises(ValueError, match="log_probs"):
        gk.compute_grpo_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="rewards"):
        gk.compute_grpo_loss(torch.zeros(3), torch.tensor([0.0, float("nan"), 1.0]))


def test_token_logprobs_bad_input():
    with pytest.raises(ValueError, match="tokens"):
        gk.token_logprobs(torch.randn(3, 5), torch.tensor([0, 5, 1]), backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        gk.token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 1]), temperature=-1.0, backend="torch")
    with pytest.raises(ValueError, match="tokens"):
        gk.token_logprobs(torch.randn(3, 5), torch.tensor([0, 1]), backend="torch")


def test_grpo_loss_module_rejects_unknown_keyword():
    with pytest.raises(TypeError, match="betta"):
        gk.GRPOLoss(group_size=2, betta=0.1)


# ----------------------------------------------------------------------------------------------------------
# Valid edge cases
# ----------------------------------------------------------------------------------------------------------
def _grads(loss_type, logits, tokens, rewards, mask, group_size, **kw):
    lg = logits.clone().requires_grad_()
    r = rewards.clone().requires_grad_()
    loss = gk.grpo_loss(lg, tokens, r, mask, group_size=group_size, loss_type=loss_type, backend="torch", **kw)
    loss.backward()
    return loss, lg.grad, r.grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_masked_batch_is_zero_without_nan(loss_type):
    a = _args()
    old = torch.full((S, T), float("nan"))  # garbage on masked positions must not leak
    refl = torch.full((S, T), float("inf"))
    loss, gl, gr = _grads(loss_type, a["logits"], a["tokens"], a["rewards"], torch.zeros(S, T), G,
                          old_logprobs=old if loss_type != "softmax" else None, ref_logprobs=refl, kl_coef=0.1)
    assert loss.item() == 0.0
    assert torch.count_nonzero(gl) == 0
    assert torch.isfinite(gr).all() and torch.count_nonzero(gr) == 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_ignored_tokens(loss_type):
    a = _args()
    loss, gl, _ = _grads(loss_type, a["logits"], torch.full((S, T), -100), a["rewards"], None, G)
    assert loss.item() == 0.0 and torch.count_nonzero(gl) == 0


def test_group_of_one():
    a = _args()
    lp = ref.token_logprobs(a["logits"], a["tokens"])
    loss, _, _ = _grads("softmax", a["logits"], a["tokens"], a["rewards"], None, 1)
    assert loss.item() == pytest.approx(-(lp.sum(-1)).mean().item(), rel=1e-6)  # every weight is 1
    loss, gl, _ = _grads("grpo", a["logits"], a["tokens"], a["rewards"], None, 1)
    assert loss.item() == 0.0 and torch.count_nonzero(gl) == 0  # A = 0 for a group of one


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_single_token(loss_type):
    logits = torch.randn(S, 1, V)
    tokens = torch.randint(0, V, (S, 1))
    loss, gl, _ = _grads(loss_type, logits, tokens, torch.rand(S), None, G)
    assert torch.isfinite(loss) and torch.isfinite(gl).all()


def test_non_contiguous_logits_match_contiguous():
    big = torch.randn(S, T + 1, V + 3)
    sliced = big[:, :-1, :V]  # strided in S, T and V
    assert not sliced.is_contiguous()
    tokens = torch.randint(0, V, (S, T))
    r = torch.rand(S)
    a = gk.grpo_loss(sliced, tokens, r, group_size=G, backend="torch")
    b = gk.grpo_loss(sliced.contiguous(), tokens, r, group_size=G, backend="torch")
    assert a.item() == b.item()
    t = torch.randn(S, V, T).transpose(1, 2)  # vocabulary dimension strided
    assert gk.grpo_loss(t, tokens, r, group_size=G, backend="torch").item() == pytest.approx(
        gk.grpo_loss(t.contiguous(), tokens, r, group_size=G, backend="torch").item(), abs=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_minus_inf_logits_masked_vocabulary(loss_type):
    a = _args()
    logits = a["logits"].clone()
    logits[..., 0] = float("-inf")
    tokens = a["tokens"].clamp(min=1)
    tokens[0, 0] = -100  # ignored position whose gather index would hit the -inf column
    (loss, met) = gk.grpo_loss(logits, tokens, a["rewards"], None, group_size=G, loss_type=loss_type,
                               return_metrics=True, backend="torch")
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in met.values())
    _, gl, gr = _grads(loss_type, logits, tokens, a["rewards"], None, G)
    assert torch.isfinite(gl).all() and torch.isfinite(gr).all()
    assert torch.count_nonzero(gl[..., 0]) == 0


def test_very_large_logits_are_finite():
    a = _args()
    for scale in (1e4, 1e30):
        logits = a["logits"] * scale
        _, gl, _ = _grads("grpo", logits, a["tokens"], a["rewards"], None, G)
        loss, _, _ = _grads("softmax", logits, a["tokens"], a["rewards"], None, G)
        assert torch.isfinite(loss) and torch.isfinite(gl).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_loss_is_fp32_and_grad_keeps_dtype(dtype):
    a = _args()
    lg = a["logits"].to(dtype).requires_grad_()
    loss = gk.grpo_loss(lg, a["tokens"], a["rewards"], group_size=G, backend="torch")
    loss.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lg.grad.dtype == dtype


def test_module_matches_function_and_overrides():
    a = _args()
    crit = gk.GRPOLoss(group_size=G, loss_type="bnpo", epsilon=0.1, backend="torch")
    assert "bnpo" in repr(crit)
    f = gk.grpo_loss(a["logits"], a["tokens"], a["rewards"], a["mask"], group_size=G, loss_type="bnpo", epsilon=0.1,
                     backend="torch")
    assert crit(a["logits"], a["tokens"], a["rewards"], a["mask"]).item() == f.item()
    g = gk.grpo_loss(a["logits"], a["tokens"], a["rewards"], a["mask"], group_size=G, loss_type="softmax",
                     backend="torch")
    assert crit(a["logits"], a["tokens"], a["rewards"], a["mask"], loss_type="softmax").item() == g.item()


def test_public_token_logprobs_shapes_and_mask():
    logits = torch.randn(2, 3, 4, V, dtype=torch.float64)
    tokens = torch.randint(0, V, (2, 3, 4))
    mask = torch.rand(2, 3, 4) > 0.5
    lp, ent = gk.token_logprobs(logits, tokens, 0.9, True, mask=mask, backend="torch")
    full = torch.log_softmax(logits / 0.9, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(lp, torch.where(mask, full, 0.0))
    assert ent.shape == (2, 3, 4) and (ent[~mask] == 0).all()


def test_integer_rewards_are_accepted():
    a = _args()
    x = gk.grpo_loss(a["logits"], a["tokens"], torch.tensor([1, 0, 0, 1]), group_size=G, backend="torch")
    y = gk.grpo_loss(a["logits"], a["tokens"], torch.tensor([1.0, 0, 0, 1]), group_size=G, backend="torch")
    assert x.item() == y.item()
