"""The custom-op plumbing (two-pass and one-pass paths), exercised through the eager kernel module
``grpo_kernels.torch_kernels`` so it is tested on every machine, against the reference and autograd."""

import pytest
import torch

from grpo_kernels.kernels import ops as _ops
from grpo_kernels import loss as L
from grpo_kernels import reference as ref
from grpo_kernels.kernels import eager as torch_kernels

import kernel_cases as KC

S, T, V, G = 6, 5, 67, 3
LOSS_TYPES = ["softmax", "grpo", "bnpo", "dr_grpo", "dapo"]

DEFAULTS = dict(group_size=G, old_logprobs=None, ref_logprobs=None, kl_coef=0.0, epsilon=0.2, epsilon_high=None,
                delta=None, scale_rewards="group", advantages=None, max_completion_length=None,
                num_items_in_batch=None, importance_sampling_level="token")


def _inputs(dtype=torch.float32):
    z = torch.randn(S, T, V, dtype=dtype) * 2
    tok = torch.randint(0, V, (S, T))
    tok[0, 1] = -100
    m = torch.ones(S, T)
    m[2] = 0  # a fully masked sequence
    m[3, 3:] = 0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    r = torch.randn(S, dtype=acc)
    return z, tok, m, r


def _reference(z, tok, m, r, kw, metrics=False):
    zz = z.detach().clone().requires_grad_(True)
    rr = r.detach().clone().requires_grad_(True)
    out = ref.grpo_loss(zz, tok, rr, m, return_metrics=metrics, **kw)
    loss, met = out if metrics else (out, None)
    (3.0 * loss).backward()
    return loss.detach(), zz.grad, rr.grad, met


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_two_pass_ops_match_reference(dtype, temperature):
    z, tok, m, _ = _inputs(dtype)
    zz = z.clone().requires_grad_(True)
    logp, ent = _ops.fused_token_logprobs(zz, tok, m, temperature, True, "torch")
    w = torch.randn(S, T, dtype=logp.dtype)
    ((logp * w).sum() + (ent * w.flip(0)).sum()).backward()

    z2 = z.clone().requires_grad_(True)
    keep = (tok != -100) & (m != 0)
    lp2, ent2 = ref.token_logprobs(z2, torch.where(keep, tok, -100), temperature, return_entropy=True)
    ((lp2 * w).sum() + (ent2 * w.flip(0)).sum()).backward()
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp, lp2, **tol)
    torch.testing.assert_close(ent, ent2, **tol)
    gtol = tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(zz.grad.double(), z2.grad.double(), **gtol)
    assert (zz.grad[~keep] == 0).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_one_pass_matches_reference(loss_type, level, dtype):
    """One pass (gradient written during the forward) = reference autograd, incl. rewards' gradient,
    metrics and a grad_output != 1."""
    z, tok, m, r = _inputs(dtype)
    kw = {**DEFAULTS, "loss_type": loss_type, "importance_sampling_level": level}
    assert KC.coefficients_are_constant(**kw)
    exp_loss, exp_gz, exp_gr, exp_met = _reference(z, tok, m, r, kw, metrics=True)

    zz = z.clone().requires_grad_(True)
    rr = r.clone().requires_grad_(True)
    mm = ref.effective_mask(tok, m, r.dtype)
    coef = KC.logprob_coefficients(mm, rr, **kw)
    loss, met = _ops.one_pass_loss(
        zz, lambda lp, e: KC.loss_from_logprobs(lp, mm, rr, return_metrics=True, entropy=e, **kw),
        tok, m, coef, 1.0, True, "torch")
    (3.0 * loss).backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), exp_loss, **tol)
    gtol = tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(zz.grad.double(), exp_gz.double(), **gtol)
    torch.testing.assert_close(rr.grad, exp_gr, **tol)
    assert set(met) == set(exp_met)
    for k in met:
        torch.testing.assert_close(met[k], exp_met[k], **tol)


@pytest.mark.parametrize("loss_type", LOSS_TYPES[1:])
def test_constant_coefficients_equal_autograd_at_the_actual_logprobs(loss_type):
    """The claim behind the one-pass path: on-policy, ∂loss/∂ℓ evaluated at ℓ = 0 equals it at any ℓ."""
    _, _, m, r = _inputs(torch.float64)
    kw = {**DEFAULTS, "loss_type": loss_type, "epsilon": 0.0}
    m = m.double()
    c0 = KC.logprob_coefficients(m, r, **kw)
    lp = (-torch.rand(S, T, dtype=torch.float64) * 3).requires_grad_(True)
    (c,) = torch.autograd.grad(KC.loss_from_logprobs(lp, m, r, **kw), lp)
    torch.testing.assert_close(c0, c, rtol=0, atol=1e-15)
    assert c0.abs().sum() > 0


def test_coefficients_are_constant_only_when_linear():
    old = torch.zeros(S, T)
    assert not KC.coefficients_are_constant(**{**DEFAULTS, "loss_type": "grpo", "old_logprobs": old})
    assert not KC.coefficients_are_constant(**{**DEFAULTS, "loss_type": "softmax", "ref_logprobs": old,
                                              "kl_coef": 0.1})
    assert KC.coefficients_are_constant(**{**DEFAULTS, "loss_type": "softmax", "old_logprobs": old})
    assert KC.coefficients_are_constant(**{**DEFAULTS, "loss_type": "grpo", "ref_logprobs": old})  # kl_coef = 0


def test_one_pass_retained_graph_and_scaled_backward():
    """grad_output scales the precomputed gradient in place; a retained graph can be backpropagated again
    with another scale and gives the right gradient (not a compounded one)."""
    z, tok, m, r = _inputs()
    mm = ref.effective_mask(tok, m, torch.float32)
    kw = {**DEFAULTS, "loss_type": "softmax"}
    coef = KC.logprob_coefficients(mm, r, **kw)
    zz = z.clone().requires_grad_(True)
    loss = _ops.one_pass_loss(zz, lambda lp, e: KC.loss_from_logprobs(lp, mm, r, **kw), tok, m, coef, 1.0,
                              False, "torch")
    (g1,) = torch.autograd.grad(0.25 * loss, zz, retain_graph=True)
    g1 = g1.clone()
    (g2,) = torch.autograd.grad(3.0 * loss, zz)
    z2 = z.clone().requires_grad_(True)
    (e,) = torch.autograd.grad(ref.grpo_loss(z2, tok, r, m, group_size=G), z2)
    torch.testing.assert_close(g1, 0.25 * e, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g2, 3.0 * e, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="backward through the graph a second time|freed"):
        torch.autograd.grad(loss, zz)


def test_fwd_grad_out_into_logits_and_masked_rows_zero():
    z, tok, m, _ = _inputs()
    keep = ((tok != -100) & (m != 0)).contiguous()
    coef = torch.randn(S, T)
    lp, lse, ent, grad = torch_kernels.logprobs_fwd_grad(z, tok, keep, coef, 0.9, False)
    buf = z.clone()
    lp2, _, _, g2 = torch_kernels.logprobs_fwd_grad(buf, tok, keep, coef, 0.9, False, out=buf)
    assert g2.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(g2, grad)
    torch.testing.assert_close(lp2, lp)
    assert (grad[~keep] == 0).all()
    zz = z.clone().requires_grad_(True)
    (ref.token_logprobs(zz, torch.where(keep, tok, -100), 0.9) * coef).sum().backward()
    torch.testing.assert_close(grad, zz.grad, rtol=1e-5, atol=1e-6)


def test_opcheck_fwd_grad():
    z, tok, m, _ = _inputs()
    keep = ((tok != -100) & (m != 0)).contiguous()
    coef = torch.randn(S, T)
    torch.library.opcheck(torch.ops.grpo_kernels.logprobs_fwd_grad.default, (z, tok, keep, coef, 1.0, True, "torch"))
    torch.library.opcheck(torch.ops.grpo_kernels.logprobs_fwd.default,
                          (z.requires_grad_(True), tok, keep, 1.0, True, "torch"))


@pytest.mark.parametrize("loss_type, old", [("softmax", False), ("grpo", True)])
def test_torch_compile_fullgraph_cpu(loss_type, old):
    """torch.compile(fullgraph=True) traces through the public function and the custom ops (CPU kernel)."""
    import grpo_kernels as gk

    assert "cpu" in gk.available_backends("cpu"), "the C++ CPU extension must build on every supported machine"
    z, tok, m, r = _inputs()
    old_lp = torch.full((S, T), -4.0) if old else None

    def f(z, tok, r, m):
        return gk.grpo_loss(z, tok, r, m, group_size=G, loss_type=loss_type, old_logprobs=old_lp, backend="cpu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(compiled(zz, tok, r, m), zz)
    z2 = z.clone().requires_grad_(True)
    exp = ref.grpo_loss(z2, tok, r, m, group_size=G, loss_type=loss_type, old_logprobs=old_lp)
    (e,) = torch.autograd.grad(exp, z2)
    torch.testing.assert_close(compiled(z, tok, r, m), exp.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Host syncs: one transfer for all content checks; the ops trust ids validated by the public functions
# ----------------------------------------------------------------------------------------------------------
def test_content_checks_cost_one_host_transfer(monkeypatch):
    from grpo_kernels import validation as val

    calls = []
    real = val._flags_to_host
    monkeypatch.setattr(val, "_flags_to_host", lambda flags: calls.append(len(flags)) or real(flags))
    z, tok, m, r = _inputs()
    L.grpo_loss(z, tok, r, m, group_size=G, loss_type="grpo", advantages=r.clone(), backend="torch")
    assert calls == [4]  # token range, finite mask, finite advantages, finite rewards: one transfer
    calls.clear()
    L.grpo_loss(z, tok, r, m, group_size=G, backend="torch")
    assert calls == [3]
    calls.clear()
    lp = torch.zeros(S, T)
    L.grpo_loss(z, tok, r, m, group_size=G, loss_type="grpo", old_logprobs=lp, ref_logprobs=lp, kl_coef=0.1)
    assert calls == [5]  # + finite old and reference log-probs where they count
    # errors still name the argument; with several bad arguments, the first in argument order
    bad_tok, bad_r = tok.clone(), r.clone()
    bad_tok[1, 1] = V
    bad_r[0] = float("nan")
    with pytest.raises(ValueError, match="tokens must hold ids"):
        L.grpo_loss(z, bad_tok, bad_r, m, group_size=G, backend="torch")
    with pytest.raises(ValueError, match="rewards must be finite"):
        L.grpo_loss(z, tok, bad_r, m, group_size=G, backend="torch")


def test_ops_skip_their_id_check_only_after_validation(monkeypatch):
    """check_ids is an explicit argument of the kernel contract: False after the public function validated the
    ids, and in the backward (it trusts its forward); True (the default) when an op is called directly."""
    import grpo_kernels as gk
    from grpo_kernels.kernels import native

    seen = []
    for name in ("logprobs_fwd", "logprobs_fwd_grad", "logprobs_bwd"):
        monkeypatch.setattr(native, name, lambda *a, _real=getattr(native, name), _n=name, **k:
                            seen.append((_n, k.get("check_ids", True))) or _real(*a, **k))
    z, tok, m, r = _inputs()
    gk.grpo_loss(z.clone().requires_grad_(True), tok, r, m, group_size=G, backend="cpu")  # one pass
    gk.grpo_loss(z, tok, r, m, group_size=G, backend="cpu")  # no grad: forward op
    gk.token_logprobs(z, tok, backend="cpu")
    # two passes (off-policy): the backward's kernel trusts the ids its forward op checked
    gk.grpo_loss(z.clone().requires_grad_(True), tok, r, m, group_size=G, loss_type="grpo", backend="cpu",
                 old_logprobs=torch.full((S, T), -4.0)).backward()
    assert seen == [("logprobs_fwd_grad", False), ("logprobs_fwd", False), ("logprobs_fwd", False),
                    ("logprobs_fwd", False), ("logprobs_bwd", False)]
    assert "check_ids" in str(torch.ops.grpo_kernels_C.logprobs_fwd.default._schema)
    # called directly, the op checks the ids itself, on the device (no host sync), before any kernel runs
    seen.clear()
    bad = tok.clamp(min=0)
    bad[0, 0] = V
    with pytest.raises(RuntimeError, match="tokens must hold ids"):
        torch.ops.grpo_kernels.logprobs_fwd(z, bad, torch.ones(S, T, dtype=torch.bool), 1.0, False, "cpu")
    assert seen == []  # the kernel module was never called


# ----------------------------------------------------------------------------------------------------------
# loss_scale: the gradient-accumulation factor inside the loss, so the one-pass backward has nothing to rescale
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("loss_type, old", [("softmax", False), ("dapo", False), ("grpo", True)])
def test_loss_scale_equals_scaling_the_loss(backend, loss_type, old):
    import grpo_kernels as gk

    z, tok, m, r = _inputs()
    kw = dict(group_size=G, loss_type=loss_type, return_metrics=True,
              old_logprobs=torch.full((S, T), -4.0) if old else None)
    z1, r1 = z.clone().requires_grad_(True), r.clone().requires_grad_(True)
    loss1, met1 = gk.grpo_loss(z1, tok, r1, m, backend=backend, loss_scale=0.25, **kw)
    loss1.backward()
    z2, r2 = z.clone().requires_grad_(True), r.clone().requires_grad_(True)
    loss2, met2 = ref.grpo_loss(z2, tok, r2, m, **kw)
    (0.25 * loss2).backward()
    torch.testing.assert_close(loss1, 0.25 * loss2.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-5, atol=1e-7)
    assert met1.keys() == met2.keys()
    for k in met1:  # metrics are not scaled
        torch.testing.assert_close(met1[k], met2[k], rtol=1e-5, atol=1e-6)


def test_loss_scale_leaves_no_rescaling_pass_for_the_backward(monkeypatch):
    """One pass with loss_scale=1/k and backward() at grad_output 1: the stored gradient is handed on as is
    (no in-place multiply of the [S, T, V] buffer); (loss / k).backward() needs that multiply."""
    import grpo_kernels as gk

    big = []
    real = torch.Tensor.mul_
    monkeypatch.setattr(torch.Tensor, "mul_", lambda t, *a, **k: big.append(t.numel() == S * T * V) or real(t, *a, **k))
    z, tok, m, r = _inputs()
    zz = z.clone().requires_grad_(True)
    gk.grpo_loss(zz, tok, r, m, group_size=G, backend="cpu", loss_scale=0.5).backward()
    assert not any(big)
    g1 = zz.grad.clone()
    zz.grad = None
    (gk.grpo_loss(zz, tok, r, m, group_size=G, backend="cpu") / 2).backward()
    assert any(big)
    torch.testing.assert_close(zz.grad, g1, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("value, exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                        ("1", TypeError), (torch.tensor(1.0), TypeError)])
def test_loss_scale_is_validated(value, exc):
    import grpo_kernels as gk

    z, tok, m, r = _inputs()
    with pytest.raises(exc, match="loss_scale"):
        gk.grpo_loss(z, tok, r, m, group_size=G, loss_scale=value)
    with pytest.raises(exc, match="loss_scale"):
        ref.grpo_loss(z, tok, r, m, group_size=G, loss_scale=value)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_one_pass_in_place_writes_the_gradient_into_the_logits(backend):
    """inplace_backward=True with a loss linear in ℓ: the one-pass kernel writes ∂loss/∂logits over the logits
    during the forward (no [S, T, V] buffer); the gradient handed to autograd is that storage, it equals the
    oracle's, and another node that saved the logits fails loudly instead of reading the gradient."""
    z, tok, m, r = _inputs()
    x = z.clone().requires_grad_(True)
    y = x * 1.0  # non-leaf logits, as an LM head produces them
    loss = L.grpo_loss(y, tok, r, m, group_size=G, backend=backend, inplace_backward=True)
    assert not torch.equal(y.detach(), z)  # overwritten in the forward
    (g,) = torch.autograd.grad(loss, y)
    assert g.data_ptr() == y.data_ptr()
    z2 = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(ref.grpo_loss(z2, tok, r, m, group_size=G), z2)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7)
    x = z.clone().requires_grad_(True)
    y = x * 1.0
    other = (y * y).sum()  # saves y
    loss = L.grpo_loss(y, tok, r, m, group_size=G, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()
