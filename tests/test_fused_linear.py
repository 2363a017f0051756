"""fused_linear_grpo_loss against reference.grpo_loss(hidden @ weight.T + bias, ...): loss, metrics and the
gradients of hidden, weight, bias and rewards, for every loss type and option, ragged shapes and chunk sizes
that do not divide S·T; fp64 gradcheck; validation."""

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference as ref

LOSS_TYPES = ["softmax", "grpo", "bnpo", "dr_grpo", "dapo"]


def _backends():
    return [b for b in ("torch", "cpu") if b in gk.available_backends("cpu")]


def _case(S=6, T=5, H=16, V=67, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype)
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    tokens = torch.randint(0, V, (S, T), generator=g)
    tokens[0, 1] = -100
    mask = torch.ones(S, T)
    mask[2] = 0  # a fully masked sequence
    mask[S - 1, 2:] = 0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rewards = torch.randn(S, generator=g, dtype=torch.float64).to(acc)
    old = (torch.randn(S, T, generator=g, dtype=torch.float64) * 0.2 - 2.0).to(acc)
    refl = (torch.randn(S, T, generator=g, dtype=torch.float64) * 0.2 - 2.0).to(acc)
    return hidden, weight, bias, tokens, mask, rewards, old, refl


def _run(fn, hidden, weight, bias, rewards, scale=2.0):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias, rewards)]
    loss, metrics = fn(*leaves)
    (scale * loss).backward()
    return loss.detach(), metrics, [t.grad for t in leaves]


def _compare(kw, backend="torch", chunk_size=7, dtype=torch.float64, G=3, **shape):
    hidden, weight, bias, tokens, mask, rewards, old, refl = _case(dtype=dtype, **shape)
    extra = {}
    if kw.pop("old", False):
        extra["old_logprobs"] = old
    if kw.pop("ref", False):
        extra.update(ref_logprobs=refl, kl_coef=0.05)
    kw = {**kw, **extra}

    def fused(h, w, b, r):
        return gk.fused_linear_grpo_loss(h, w, tokens, r, mask, group_size=G, bias=b, chunk_size=chunk_size,
                                         return_metrics=True, backend=backend, **kw)

    def eager(h, w, b, r):
        logits = (h.double() @ w.double().t() + b.double()) if dtype != torch.float64 else h @ w.t() + b
        return ref.grpo_loss(logits, tokens, r, mask, group_size=G, return_metrics=True, **kw)

    got = _run(fused, hidden, weight, bias, rewards)
    exp = _run(eager, hidden, weight, bias, rewards)
    return got, exp, mask, tokens


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("opts", [{}, {"old": True}, {"ref": True}, {"old": True, "importance_sampling_level": "sequence"},
                                  {"importance_sampling_level": "sequence"},
                                  {"old": True, "epsilon_high": 0.28, "delta": 1.5, "temperature": 0.7}])
def test_parity_fp64(backend, loss_type, opts):
    (loss, met, grads), (eloss, emet, egrads), mask, tokens = _compare({"loss_type": loss_type, **opts},
                                                                       backend=backend)
    torch.testing.assert_close(loss, eloss, rtol=1e-10, atol=1e-12)
    assert set(met) == set(emet)
    for k in met:
        torch.testing.assert_close(met[k], emet[k], rtol=1e-10, atol=1e-12)
    for name, g, e in zip(("hidden", "weight", "bias", "rewards"), grads, egrads):
        assert g is not None, name
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12, msg=f"grad of {name}")
    keep = (mask != 0) & (tokens != -100)
    assert (grads[0][~keep] == 0).all()  # masked rows are never computed


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 29, 30, 1000, None])
def test_chunk_sizes(chunk_size):
    (loss, _, grads), (eloss, _, egrads), _, _ = _compare({"loss_type": "dapo", "old": True}, chunk_size=chunk_size)
    torch.testing.assert_close(loss, eloss, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, egrads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("loss_type", ["softmax", "grpo"])
def test_fp32_and_bf16(backend, loss_type):
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
        (loss, _, grads), (eloss, _, egrads), _, _ = _compare({"loss_type": loss_type}, backend=backend,
                                                              dtype=dtype, H=32, V=300, S=4, T=9, G=2)
        assert grads[0].dtype == dtype and grads[1].dtype == dtype and grads[2].dtype == dtype
        torch.testing.assert_close(loss.double(), eloss.double(), rtol=tol, atol=tol)
        for g, e in zip(grads, egrads):
            scale = e.double().abs().max().clamp(min=1e-2)
            assert (g.double() - e.double()).abs().max() / scale < tol * 2


def test_gradcheck_fp64():
    hidden, weight, bias, tokens, mask, rewards, old, _ = _case(S=4, T=3, H=5, V=11)
    for kw in ({"loss_type": "softmax"}, {"loss_type": "grpo", "old_logprobs": old[:4, :3],
                                          "importance_sampling_level": "sequence"}):
        def f(h, w, b, r):
            return gk.fused_linear_grpo_loss(h, w, tokens[:4, :3], r, mask[:4, :3], group_size=2, bias=b,
                                             chunk_size=5, **kw)
        args = tuple(t[..., :].detach().clone().requires_grad_(True) for t in (hidden[:4, :3], weight, bias))
        args = args + (rewards[:4].detach().clone().requires_grad_(True),)
        assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def test_no_grad_forward_and_partial_requires_grad():
    hidden, weight, bias, tokens, mask, rewards, _, _ = _case()
    with torch.no_grad():
        a = gk.fused_linear_grpo_loss(hidden, weight, tokens, rewards, mask, group_size=3, bias=bias)
    b = ref.grpo_loss(hidden @ weight.t() + bias, tokens, rewards, mask, group_size=3)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    w = weight.clone().requires_grad_(True)  # only the LM head trains
    loss = gk.fused_linear_grpo_loss(hidden, w, tokens, rewards, mask, group_size=3, chunk_size=8)
    loss.backward()
    w2 = weight.clone().requires_grad_(True)
    ref.grpo_loss(hidden @ w2.t(), tokens, rewards, mask, group_size=3).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-12)


def test_module_form_and_second_backward():
    hidden, weight, bias, tokens, mask, rewards, _, _ = _case()
    crit = gk.FusedLinearGRPOLoss(group_size=3, loss_type="bnpo", chunk_size=4)
    assert "bnpo" in repr(crit)
    h = hidden.clone().requires_grad_(True)
    loss = crit(h, weight, tokens, rewards, mask, bias=bias)
    expected = ref.grpo_loss(hidden @ weight.t() + bias, tokens, rewards, mask, group_size=3, loss_type="bnpo")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward(retain_graph=True)
    g1 = h.grad.clone()
    loss.backward()  # a retained graph backpropagates again: gradients accumulate, not compound
    torch.testing.assert_close(h.grad, 2 * g1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        gk.FusedLinearGRPOLoss(group_size=3, chunksize=4)


def test_all_masked_batch():
    hidden, weight, bias, tokens, _, rewards, _, _ = _case()
    h = hidden.clone().requires_grad_(True)
    loss = gk.fused_linear_grpo_loss(h, weight, tokens, rewards, torch.zeros(6, 5), group_size=3, loss_type="grpo")
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all()


@pytest.mark.parametrize("change, exc, match", [
    (dict(hidden=torch.randn(6, 5)), ValueError, "hidden must have 3 dimensions"),
    (dict(hidden=torch.ones(6, 5, 16, dtype=torch.int64)), TypeError, "hidden must be a floating-point"),
    (dict(weight=torch.randn(67, 15, dtype=torch.float64)), ValueError, r"weight must have shape \(V, H\)"),
    (dict(weight=torch.randn(67, 16)), TypeError, "weight must have the dtype of hidden"),
    (dict(weight=torch.randn(67)), ValueError, "weight must have 2 dimensions"),
    (dict(bias=torch.randn(66, dtype=torch.float64)), ValueError, "bias must have shape"),
    (dict(bias=torch.randn(67)), TypeError, "bias must have the dtype of hidden"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(tokens=torch.full((6, 5), 67)), ValueError, "tokens must hold ids"),
    (dict(rewards=torch.randn(5, dtype=torch.float64)), ValueError, "rewards must have one value per sequence"),
    (dict(group_size=4), ValueError, "group_size"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(grad_weight_accumulation="bf16"), ValueError, "grad_weight_accumulation must be one of"),
])
def test_bad_input(change, exc, match):
    hidden, weight, bias, tokens, mask, rewards, _, _ = _case()
    args = dict(hidden=hidden, weight=weight, bias=bias, tokens=tokens, rewards=rewards, chunk_size=None,
                group_size=3, backend="auto", grad_weight_accumulation="auto")
    args.update(change)
    with pytest.raises(exc, match=match):
        gk.fused_linear_grpo_loss(args["hidden"], args["weight"], args["tokens"], args["rewards"], mask,
                                  group_size=args["group_size"], bias=args["bias"], chunk_size=args["chunk_size"],
                                  backend=args["backend"], grad_weight_accumulation=args["grad_weight_accumulation"])


@pytest.mark.parametrize("accumulation, dtype, V, H, expected", [
    ("auto", torch.bfloat16, 151936, 4096, torch.bfloat16),  # fp32 accumulator would be 2.5 GB
    ("auto", torch.bfloat16, 32000, 4096, torch.float32),  # 524 MB
    ("auto", torch.float16, 65536, 4096, torch.float32),  # exactly 1 GiB
    ("auto", torch.float16, 65537, 4096, torch.float16),
    ("fp32", torch.bfloat16, 151936, 4096, torch.float32),
    ("weight", torch.bfloat16, 100, 16, torch.bfloat16),
    ("weight", torch.float32, 100, 16, torch.float32),
    ("fp32", torch.float64, 100, 16, torch.float64),
])
def test_grad_weight_accumulator_dtype(accumulation, dtype, V, H, expected):
    from grpo_kernels.fused_linear import grad_weight_accumulator_dtype
    assert grad_weight_accumulator_dtype(accumulation, dtype, V, H) == expected


def _bf16_weight_grad_error(fn, S=8, T=16, H=64, V=500, G=4):
    """Relative (Frobenius) error of bf16 grad_weight against the fp64 truth."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(S, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    tokens = torch.randint(0, V, (S, T), generator=g)
    rewards = torch.randn(S, generator=g, dtype=torch.float64)

    def grad(f, dtype):
        w = weight.to(dtype).clone().requires_grad_(True)
        f(hidden.to(dtype), w, tokens, rewards.to(torch.float64 if dtype == torch.float64 else torch.float32),
          G).backward()
        assert w.grad.dtype == dtype
        return w.grad.double()

    def eager(h, w, y, r, G):
        return ref.grpo_loss(h @ w.t(), y, r, group_size=G, loss_type="grpo")

    truth = grad(eager, torch.float64)
    return ((grad(fn, torch.bfloat16) - truth).norm() / truth.norm()).item(), \
        ((grad(eager, torch.bfloat16) - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("accumulation, chunk_size, factor", [
    ("fp32", 32, 1.3), ("weight", 32, 1.5), ("weight", 128, 1.0 + 1e-6),  # 128 = one chunk: rounded once
])
def test_grad_weight_accumulation_accuracy(accumulation, chunk_size, factor, monkeypatch):
    """bf16 grad_weight: fp32 accumulation stays within eager's error, accumulation in bf16 (4 chunks) within
    1.5x of it, and with a single chunk is as accurate as eager (one rounding)."""
    import grpo_kernels.fused_linear as fl
    monkeypatch.setattr(fl, "_SLAB_BYTES", 64 * 100 * 2)  # several vocabulary slabs per chunk

    def fused(h, w, y, r, G):
        return gk.fused_linear_grpo_loss(h, w, y, r, group_size=G, loss_type="grpo", chunk_size=chunk_size,
                                         grad_weight_accumulation=accumulation, backend="torch")

    err, eager_err = _bf16_weight_grad_error(fused)
    assert 0 < err <= factor * eager_err, (err, eager_err)


def test_module_accepts_grad_weight_accumulation():
    hidden, weight, bias, tokens, mask, rewards, _, _ = _case()
    crit = gk.FusedLinearGRPOLoss(group_size=3, grad_weight_accumulation="weight", chunk_size=4)
    assert "grad_weight_accumulation='weight'" in repr(crit)
    loss = crit(hidden, weight, tokens, rewards, mask, bias=bias)
    eager = ref.grpo_loss(hidden @ weight.t() + bias, tokens, rewards, mask, group_size=3)
    torch.testing.assert_close(loss, eager, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# CUDA tensors (marked gpu): the Triton and CUDA C++ kernels inside the chunk loop, at a real-ish shape
# ----------------------------------------------------------------------------------------------------------
def _gpu_backends():
    return [b for b in ("triton", "cuda") if b in gk.available_backends("cuda")] if torch.cuda.is_available() else []


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type, opts", [("softmax", {}), ("grpo", {"old": True}),
                                             ("dapo", {"old": True, "importance_sampling_level": "sequence"})])
def test_gpu_parity(loss_type, opts):
    backends = _gpu_backends()
    assert backends, "no fused backend for CUDA tensors"
    for backend in backends + ["auto"]:
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            hidden, weight, bias, tokens, mask, rewards, old, _ = _case(S=8, T=64, H=128, V=32003, dtype=dtype)
            dev = lambda t: t.cuda()  # noqa: E731
            hidden, weight, bias, tokens, mask, rewards, old = map(dev, (hidden, weight, bias, tokens, mask, rewards,
                                                                         old))
            kw = dict(loss_type=loss_type, **({"old_logprobs": old} if opts.get("old") else {}),
                      **{k: v for k, v in opts.items() if k != "old"})
            leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
            loss = gk.fused_linear_grpo_loss(*leaves[:2], tokens, rewards, mask, group_size=4, bias=leaves[2],
                                             chunk_size=100, backend=backend, **kw)
            loss.backward()
            exp_leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
            eloss = ref.grpo_loss(exp_leaves[0] @ exp_leaves[1].t() + exp_leaves[2], tokens, rewards.double(), mask,
                                  group_size=4, **{k: (v.double() if isinstance(v, torch.Tensor) else v)
                                                   for k, v in kw.items()})
            eloss.backward()
            assert abs(loss.item() - eloss.item()) <= tol * max(1.0, abs(eloss.item())), (backend, dtype)
            for name, a, e in zip(("hidden", "weight", "bias"), leaves, exp_leaves):
                assert a.grad.dtype == dtype and a.grad.is_cuda
                err = (a.grad.double() - e.grad).abs().max() / e.grad.abs().max().clamp(min=1e-12)
                assert err < tol * 2, (backend, dtype, name, err.item())


@pytest.mark.gpu
def test_gpu_default_chunk_and_accumulation_fit_the_memory_budget():
    """At a real LM-head shape (bf16, V=151,936, H=4,096, 2,048 tokens) the fused path's peak extra memory is
    the bf16 gradients it returns plus at most ~0.6 GiB (one default chunk of logits and small buffers)."""
    S, T, H, V = 4, 512, 4096, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(S, T, H, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_(True)
    tokens = torch.randint(0, V, (S, T), device="cuda", generator=g)
    rewards = torch.randn(S, device="cuda", generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    gk.fused_linear_grpo_loss(hidden, weight, tokens, rewards, group_size=4, loss_type="grpo").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    grads = hidden.numel() * 2 + weight.numel() * 2
    assert extra <= grads + (640 << 20), (extra / 2 ** 30, grads / 2 ** 30)
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("opts", [{"loss_type": "softmax"}, {"loss_type": "grpo", "old": True}])
def test_loss_scale(opts):
    """loss_scale matches the reference's (itself checked to equal scaling the loss, tests/test_ops.py), in both
    the one-phase and the two-phase schedule."""
    (loss, _, grads), (eloss, _, egrads), _, _ = _compare({**opts, "loss_scale": 0.25})
    torch.testing.assert_close(loss, eloss, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, egrads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    (loss1, _, grads1), _, _, _ = _compare(dict(opts))
    torch.testing.assert_close(loss, 0.25 * loss1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[1], 0.25 * grads1[1], rtol=1e-9, atol=1e-12)
