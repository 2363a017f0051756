"""Nothing silently wrong in the loss (issue 15, the loss-side items): a gradient handed out never changes
afterwards, overlapping logits are refused for in-place writes, masked NaN rows get no gradient, an empty batch is
a zero loss, non-finite inputs are named, and double backward says what to use instead."""

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference as ref

S, T, V, G = 4, 3, 11, 2


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(S, T, V, generator=g).to(dtype)
    tok = torch.randint(0, V, (S, T), generator=g)
    r = torch.rand(S, generator=g)
    return z, tok, r


@pytest.fixture(params=["torch", "cpu", "triton"])
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_interpret")
    return request.param


# ---------------------------------------------------------------------------------------------- item 3
def test_a_gradient_handed_out_does_not_change(backend):
    z, tok, r = _inputs()
    x = z.clone().requires_grad_(True)
    loss = gk.grpo_loss(x, tok, r, group_size=G, backend=backend)  # the one-pass path
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    kept = g1.clone()
    (g3,) = torch.autograd.grad(3 * loss, x, retain_graph=True)
    (g0,) = torch.autograd.grad(0 * loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(2 * loss, x)
    assert torch.equal(g1, kept)  # not rescaled in place by the later backward passes
    torch.testing.assert_close(g3, 3 * kept, rtol=1e-6, atol=0)
    assert torch.equal(g0, torch.zeros_like(kept))
    torch.testing.assert_close(g2, 2 * kept, rtol=1e-6, atol=0)


def test_the_first_and_only_backward_is_zero_copy():
    z, tok, r = _inputs()
    x = z.clone().requires_grad_(True)
    y = x * 1.0  # non-leaf logits, as from an LM head
    loss = gk.grpo_loss(y, tok, r, group_size=G, backend="cpu")
    saved = loss.grad_fn.saved_tensors[0]
    (g,) = torch.autograd.grad(loss, y)
    assert g.data_ptr() == saved.data_ptr()


def test_fused_linear_gradients_handed_out_do_not_change():
    torch.manual_seed(0)
    h = torch.randn(S, T, 5, requires_grad=True)
    w = torch.randn(V, 5, requires_grad=True)
    tok = torch.randint(0, V, (S, T))
    r = torch.rand(S)
    for backend in ("torch", "cpu"):
        loss = gk.fused_linear_grpo_loss(h, w, tok, r, group_size=G, backend=backend)
        first = torch.autograd.grad(loss, (h, w), retain_graph=True)
        kept = [t.clone() for t in first]
        again = torch.autograd.grad(3 * loss, (h, w))
        for a, k, b in zip(first, kept, again):
            assert torch.equal(a, k)
            torch.testing.assert_close(b, 3 * k, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------- item 4
def test_inplace_backward_refuses_overlapping_logits(backend):
    z, tok, r = _inputs()
    base = z[:1].clone().requires_grad_(True)
    expanded = base.expand(S, T, V)  # every sequence row is the same memory
    with pytest.raises(ValueError, match="rows do not overlap"):
        gk.grpo_loss(expanded, tok, r, group_size=G, backend=backend, inplace_backward=True)


@pytest.mark.parametrize("module", ["eager", "triton_impl", "native"])
def test_kernel_out_refuses_overlapping_rows(module, request):
    if module == "triton_impl":
        request.getfixturevalue("triton_interpret")
    import importlib

    mod = importlib.import_module(f"grpo_kernels.kernels.{module}")
    z, tok, r = _inputs()
    keep = torch.ones(S, T, dtype=torch.bool)
    lp, lse, ent = mod.logprobs_fwd(z, tok, keep, 1.0, False)
    # an expanded view, and strides that each clear a row but not each other (s and t rows coincide)
    for out in (torch.empty(1, T, V).expand(S, T, V), torch.empty(S * T, V).as_strided((S, T, V), (V, V, 1))):
        with pytest.raises(ValueError, match="out rows must not overlap"):
            mod.logprobs_bwd(torch.ones(S, T), None, z, tok, keep, lse, ent, 1.0, out=out)
        with pytest.raises(ValueError, match="out rows must not overlap"):
            mod.logprobs_fwd_grad(z, tok, keep, torch.ones(S, T), 1.0, False, out=out)
    view = z.view(-1)[V:].view(S * T - 1, V)  # another view of the logits' storage
    with pytest.raises(ValueError, match="not another view of the logits"):
        mod.logprobs_bwd(torch.ones(S, T - 1), None, z[:, :T - 1], tok[:, :T - 1], keep[:, :T - 1],
                         lse[:, :T - 1], ent[:, :T - 1], 1.0, out=view[:S * (T - 1)].view(S, T - 1, V))


# ---------------------------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("loss_type", ["softmax", "grpo"])
def test_masked_rows_with_nan_logits_get_no_gradient(backend, loss_type):
    z, tok, r = _inputs()
    mask = torch.ones(S, T)
    mask[1] = 0
    mask[2, 1:] = 0
    z[1] = float("nan")
    z[2, 1:] = float("nan")
    old = torch.full((S, T), -2.0) if loss_type == "grpo" else None  # two-pass: the backward kernel too
    x = z.clone().requires_grad_(True)
    loss = gk.grpo_loss(x, tok, r, mask, group_size=G, backend=backend, loss_type=loss_type, old_logprobs=old)
    (g,) = torch.autograd.grad(loss, x)
    assert bool(torch.isfinite(loss)) and not bool(g.isnan().any())
    assert torch.equal(g[1], torch.zeros_like(g[1])) and torch.equal(g[2, 1:], torch.zeros_like(g[2, 1:]))
    clean = z.clone()
    clean[1] = 0.0
    clean[2, 1:] = 0.0
    expected = ref.grpo_loss(clean, tok, r, mask, group_size=G, loss_type=loss_type, old_logprobs=old)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("loss_type", ["softmax", "grpo", "bnpo", "dr_grpo", "dapo"])
def test_an_empty_batch_is_a_zero_loss_with_zero_gradients(loss_type):
    for backend in ("torch", "cpu"):
        z = torch.randn(0, T, V, requires_grad=True)
        r = torch.zeros(0, requires_grad=True)
        loss = gk.grpo_loss(z, torch.zeros(0, T, dtype=torch.long), r, group_size=G, loss_type=loss_type,
                            backend=backend)
        assert loss.item() == 0.0
        gz, gr = torch.autograd.grad(loss, (z, r))
        assert gz.shape == z.shape and gr.shape == r.shape
    oracle = ref.grpo_loss(torch.randn(0, T, V), torch.zeros(0, T, dtype=torch.long), torch.zeros(0), group_size=G,
                           loss_type=loss_type)
    assert oracle.item() == 0.0
    h = torch.randn(0, T, 5, requires_grad=True)
    w = torch.randn(V, 5, requires_grad=True)
    loss = gk.fused_linear_grpo_loss(h, w, torch.zeros(0, T, dtype=torch.long), torch.zeros(0), group_size=G,
                                     loss_type=loss_type)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0.0 and gh.shape == h.shape and torch.equal(gw, torch.zeros_like(w))


def test_compute_grpo_loss_of_no_group_is_zero():
    assert gk.compute_grpo_loss(torch.zeros(0, 4), torch.zeros(0, 4)).item() == 0.0


# ---------------------------------------------------------------------------------------------- item 8
@pytest.mark.parametrize("case, match", [
    ("nan-mask", "mask must be finite"),
    ("inf-mask", "mask must be finite"),
    ("nan-old", "old_logprobs must be finite at the positions that count"),
    ("inf-old", "old_logprobs must be finite at the positions that count"),
    ("nan-ref", "ref_logprobs must be finite at the positions that count"),
    ("minus-inf-ref", "ref_logprobs must be finite at the positions that count"),
    ("tiny-temperature", "temperature=1e-40 is too small for torch.float32 logits"),
])
def test_non_finite_inputs_are_named(case, match):
    z, tok, r = _inputs()
    mask = torch.ones(S, T)
    kw = dict(loss_type="grpo", old_logprobs=torch.zeros(S, T), ref_logprobs=torch.zeros(S, T), kl_coef=0.1)
    kind, _, what = case.partition("-")
    value = {"nan": float("nan"), "inf": float("inf"), "minus": -float("inf")}.get(kind)
    if what == "mask":
        mask[0, 1] = value
    elif what in ("old", "ref"):
        kw[f"{what}_logprobs"][2, 0] = value
    elif what.startswith("inf-ref"):
        kw["ref_logprobs"][2, 0] = value
    else:
        kw["temperature"] = 1e-40
    for fn in (lambda: gk.grpo_loss(z, tok, r, mask, group_size=G, backend="cpu", **kw),
               lambda: ref.grpo_loss(z, tok, r, mask, group_size=G, **kw),
               lambda: gk.fused_linear_grpo_loss(torch.randn(S, T, 5), torch.randn(V, 5), tok, r, mask, group_size=G,
                                                 **kw)):
        with pytest.raises(ValueError, match=match):
            fn()


def test_non_finite_log_probs_where_they_do_not_count_are_fine():
    z, tok, r = _inputs()
    mask = torch.ones(S, T)
    mask[0, 0] = 0
    tok[1, 2] = -100
    old = torch.zeros(S, T)
    old[0, 0] = float("nan")
    old[1, 2] = -float("inf")
    loss = gk.grpo_loss(z, tok, r, mask, group_size=G, loss_type="grpo", old_logprobs=old)
    assert bool(torch.isfinite(loss))


def test_fp64_logits_take_a_temperature_that_fp32_cannot():
    z, tok, r = _inputs(dtype=torch.float64)
    assert bool(torch.isfinite(gk.grpo_loss(z, tok, r, group_size=G, temperature=1e-300)))
    with pytest.raises(ValueError, match="too small"):
        gk.token_logprobs(z.float(), tok, temperature=1e-40)


# ---------------------------------------------------------------------------------------------- item 9
@pytest.mark.parametrize("loss_type, old", [("softmax", False), ("grpo", True)], ids=["one-pass", "two-pass"])
def test_double_backward_says_to_use_the_reference(backend, loss_type, old):
    z, tok, r = _inputs()
    x = z.clone().requires_grad_(True)
    kw = dict(loss_type=loss_type, old_logprobs=torch.full((S, T), -2.0) if old else None)
    loss = gk.grpo_loss(x, tok, r, group_size=G, backend=backend, **kw)
    with pytest.raises(NotImplementedError, match="grpo_kernels.reference.grpo_loss"):
        torch.autograd.grad(loss, x, create_graph=True)
    # the reference does second derivatives
    x2 = z.double().requires_grad_(True)
    (g,) = torch.autograd.grad(ref.grpo_loss(x2, tok, r.double(), group_size=G, **kw), x2, create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), x2)
    assert bool(torch.isfinite(hv).all())


def test_meta_logits_are_a_clear_error():
    tok = torch.zeros(S, T, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        gk.grpo_loss(torch.empty(S, T, V, device="meta"), tok, torch.zeros(S, device="meta"), group_size=G)
