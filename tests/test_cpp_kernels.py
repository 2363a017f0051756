"""What is specific to the C++ kernels of ``csrc/`` (backends ``"cpu"`` and ``"cuda"``, module
``grpo_kernels.kernels.native``): loading and the JIT build, the ``grpo_kernels_C`` ops themselves (their
argument checks, opcheck and torch.compile), the SIMD variants and thread-count independence, fp16, parity
with the eager reference, ``fwd_grad`` with ``ent_coef``, and the relative accuracy of confident targets. The kernel
contract itself (masked rows, ``-inf``, bf16 error, p ≈ 1, determinism, ``out=`` in place and strided,
``check_ids``, opcheck of the gateway ops, bad input) is checked for every backend, these two included, by
``test_kernel_contract.py``. The CUDA kernels' row arithmetic is also checked without a GPU, on the CPU, by
``test_cuda_rowmath.py``.

Everything is checked against the eager reference (``grpo_kernels.reference``) and autograd, on small ragged
shapes (S=6, G=3, T=5, V=67: V is not a multiple of any vector width, so every row has a scalar tail) that
include a fully masked sequence, a ``-100`` token and rows with ``-inf`` logits. Tests run on CPU tensors
(the ``cpu`` backend, always) and on CUDA tensors (the ``cuda`` backend, marked ``gpu``).

The extension is built on first use (JIT, cached) when the package was installed without it; that first build
takes a minute or two on a small machine.
"""

import os
import subprocess
import sys

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import kernels as backends
from grpo_kernels import reference as ref

import kernel_cases as KC
from kernel_cases import DTYPES, G, LOSS_TYPES, S, T, V  # noqa: F401 - shared parity matrix
from kernel_cases import acc_dtype as _acc
from kernel_cases import gtol as _gtol
from kernel_cases import keep_mask as _keep
from kernel_cases import make_inputs as _inputs
from kernel_cases import ref_logprobs as _ref
from kernel_cases import tol as _tol

cx = pytest.importorskip("grpo_kernels.kernels.native")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _backend(device):
    return "cuda" if device == "cuda" else "cpu"


def _ops():
    cx.ensure_loaded("cpu")
    return torch.ops.grpo_kernels_C


# --------------------------------------------------------------------------------------------------------------
# Availability and loading
# --------------------------------------------------------------------------------------------------------------
def test_cpu_ops_are_available_and_report_their_simd_variant():
    ok, reason = cx.is_available(torch.device("cpu"))
    assert ok, reason
    assert _ops().cpu_isa() in reason and _ops().cpu_isa() in ("DEFAULT", "AVX2", "AVX512")
    assert backends.resolve_backend("auto", "cpu") == "cpu" or os.environ.get("GRPO_KERNELS_BACKEND")


def test_other_devices_are_refused_with_a_reason():
    ok, reason = cx.is_available(torch.device("meta"))
    assert not ok and "meta" in reason
    if not torch.cuda.is_available():
        ok, reason = cx.is_available(torch.device("cuda"))
        assert not ok and "CUDA" in reason


def test_importing_the_package_does_not_load_the_extension():
    code = ("import sys, torch, grpo_kernels\n"
            "assert 'grpo_kernels.kernels.native' not in sys.modules\n"
            "try:\n"
            "    torch.ops.grpo_kernels_C.logprobs_fwd\n"
            "    raise SystemExit('the grpo_kernels_C ops were registered at import')\n"
            "except (AttributeError, RuntimeError):\n"
            "    pass\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_jit_build_errors_are_clear(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler.*backend='torch'"):
        cx._check_compiler(cuda=False)
    with pytest.raises(ImportError, match="csrc/ sources needed to build it on first use are not reachable"):
        cx._check_sources(["no_such_source.cpp"])


# --------------------------------------------------------------------------------------------------------------
# The ops themselves against the reference
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fwd_matches_reference(device, dtype, temperature):
    z, tok, m, _ = _inputs(dtype, device)
    keep = _keep(tok, m)
    logp, lse, ent = cx.logprobs_fwd(z, tok.clamp(min=0), keep, temperature, True)
    rl, rh = _ref(z, tok, keep, temperature)
    assert logp.dtype == _acc(dtype) and logp.shape == (S, T)
    torch.testing.assert_close(logp, rl.to(logp.dtype), **_tol(dtype))
    torch.testing.assert_close(ent, rh.to(ent.dtype), **_tol(dtype))
    rlse = torch.logsumexp(z.to(_acc(dtype)) / temperature, -1)
    torch.testing.assert_close(lse[keep], rlse[keep], **_tol(dtype))
    assert (logp[~keep] == 0).all() and (lse[~keep] == 0).all() and (ent[~keep] == 0).all()
    # without entropy: same log-probs, zero entropy
    logp2, _, ent2 = cx.logprobs_fwd(z, tok.clamp(min=0), keep, temperature, False)
    torch.testing.assert_close(logp2, logp, rtol=0, atol=0)
    assert (ent2 == 0).all()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy_grad", [False, True])
@pytest.mark.parametrize("where", ["new", "out", "logits"])
def test_bwd_matches_autograd(device, dtype, temperature, with_entropy_grad, where):
    z, tok, m, _ = _inputs(dtype, device)
    keep = _keep(tok, m)
    tk = tok.clamp(min=0)
    logp, lse, ent = cx.logprobs_fwd(z, tk, keep, temperature, True)
    gl = torch.randn(S, T, dtype=_acc(dtype), device=device)
    gh = torch.randn(S, T, dtype=_acc(dtype), device=device) if with_entropy_grad else None
    zr = z.detach().to(torch.float64).requires_grad_()
    rl, rh = _ref(zr, tok, keep, temperature)
    obj = (rl * gl.double()).sum() + ((rh * gh.double()).sum() if gh is not None else 0)
    (want,) = torch.autograd.grad(obj, zr)
    if where == "new":
        g = cx.logprobs_bwd(gl, gh, z, tk, keep, lse, ent, temperature)
    elif where == "out":
        out = torch.full_like(z, float("nan"))
        g = cx.logprobs_bwd(gl, gh, z, tk, keep, lse, ent, temperature, out=out)
        assert g is out
    else:
        zc = z.clone()
        g = cx.logprobs_bwd(gl, gh, zc, tk, keep, lse, ent, temperature, out=zc)
        assert g is zc
    assert g.dtype == dtype and g.shape == z.shape
    torch.testing.assert_close(g.double(), want, **_gtol(dtype))
    assert (g[~keep] == 0).all()
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("where", ["new", "out", "logits"])
def test_fwd_grad_matches_autograd(device, dtype, temperature, where):
    z, tok, m, _ = _inputs(dtype, device)
    keep = _keep(tok, m)
    tk = tok.clamp(min=0)
    coef = torch.randn(S, T, dtype=_acc(dtype), device=device)
    zr = z.detach().to(torch.float64).requires_grad_()
    rl, rh = _ref(zr, tok, keep, temperature)
    (want,) = torch.autograd.grad((coef.double() * rl).sum(), zr)
    if where == "new":
        logp, lse, ent, g = cx.logprobs_fwd_grad(z, tk, keep, coef, temperature, True)
    elif where == "out":
        out = torch.full_like(z, float("nan"))
        logp, lse, ent, g = cx.logprobs_fwd_grad(z, tk, keep, coef, temperature, True, out=out)
        assert g is out
    else:
        zc = z.clone()
        logp, lse, ent, g = cx.logprobs_fwd_grad(zc, tk, keep, coef, temperature, True, out=zc)
        assert g is zc
    assert g.dtype == dtype and g.shape == z.shape and g.is_contiguous()
    torch.testing.assert_close(g.double(), want, **_gtol(dtype))
    assert (g[~keep] == 0).all()
    torch.testing.assert_close(logp, rl.detach().to(logp.dtype), **_tol(dtype))
    torch.testing.assert_close(ent, rh.detach().to(ent.dtype), **_tol(dtype))
    # the same outputs as the two-pass ops
    f_logp, f_lse, f_ent = cx.logprobs_fwd(z, tk, keep, temperature, True)
    torch.testing.assert_close(lse, f_lse, rtol=0, atol=0)
    torch.testing.assert_close(logp, f_logp, rtol=0, atol=0)


def _entropy_objective_grad(z, tok, keep, coef, ent_coef, temperature):
    """fp64 autograd of Σ coef·ℓ + Σ ent_coef·H through the eager reference (the eager formula of fwd_grad with
    ent_coef), and the same from the closed form (coef (1[v=y] − p) − ent_coef p (z/τ − (lse − H)))/τ."""
    zr = z.detach().to(torch.float64).requires_grad_()
    rl, rh = _ref(zr, tok, keep, temperature)
    (want,) = torch.autograd.grad((coef.double() * rl).sum() + (ent_coef.double() * rh).sum(), zr)
    zd = z.detach().double() / temperature
    lse = torch.logsumexp(zd, -1, keepdim=True)
    p = (zd - lse).exp()
    H = rh.detach()[..., None]
    onehot = torch.nn.functional.one_hot(tok.clamp(min=0), z.shape[-1]).double()
    t = torch.where(p > 0, zd - (lse - H), torch.zeros_like(zd))
    closed = (coef.double()[..., None] * (onehot - p) - ent_coef.double()[..., None] * p * t) / temperature
    closed = torch.where(keep[..., None], closed, torch.zeros_like(closed))
    return want, closed, rl.detach(), rh.detach()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("where", ["new", "out", "logits"])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_fwd_grad_with_ent_coef(device, dtype, temperature, where, with_entropy):
    """``ent_coef=`` adds the entropy term: the gradient equals the same module's two-pass ``logprobs_bwd(coef,
    ent_coef)`` and the eager formula (autograd of Σ coef·ℓ + ent_coef·H); the entropy is returned whatever
    ``with_entropy`` says; masked rows are exactly zero, -inf entries exactly zero and finite elsewhere; into a new
    buffer, ``out=`` and ``out=logits``."""
    z, tok, m, _ = _inputs(dtype, device)
    keep = _keep(tok, m)
    tk = tok.clamp(min=0)
    coef = torch.randn(S, T, dtype=_acc(dtype), device=device)
    ec = torch.randn(S, T, dtype=_acc(dtype), device=device)
    want, closed, rl, rh = _entropy_objective_grad(z, tok, keep, coef, ec, temperature)
    torch.testing.assert_close(closed, want, rtol=1e-9, atol=1e-12)  # the formula is the objective's gradient
    if where == "new":
        logp, lse, ent, g = cx.logprobs_fwd_grad(z, tk, keep, coef, temperature, with_entropy, ent_coef=ec)
    elif where == "out":
        out = torch.full_like(z, float("nan"))
        logp, lse, ent, g = cx.logprobs_fwd_grad(z, tk, keep, coef, temperature, with_entropy, out=out, ent_coef=ec)
        assert g is out
    else:
        zc = z.clone()
        logp, lse, ent, g = cx.logprobs_fwd_grad(zc, tk, keep, coef, temperature, with_entropy, out=zc, ent_coef=ec)
        assert g is zc
    assert g.dtype == dtype and g.shape == z.shape
    torch.testing.assert_close(g.double(), want, **_gtol(dtype))
    torch.testing.assert_close(logp, rl.to(logp.dtype), **_tol(dtype))
    torch.testing.assert_close(ent, rh.to(ent.dtype), **_tol(dtype))
    assert (g[~keep] == 0).all() and not torch.signbit(g[~keep]).any()
    assert torch.isfinite(g).all()
    assert (g[0, 0, : V // 3] == 0).all() and (g[1, 2, 1::2] == 0).all()  # the -inf entries of make_inputs
    # the same module's two-pass backward with g_ℓ = coef, g_H = ent_coef, from the same forward
    f_logp, f_lse, f_ent = cx.logprobs_fwd(z, tk, keep, temperature, True)
    torch.testing.assert_close(lse, f_lse, rtol=0, atol=0)
    torch.testing.assert_close(logp, f_logp, rtol=0, atol=0)
    torch.testing.assert_close(ent, f_ent, rtol=0, atol=0)
    gb = cx.logprobs_bwd(coef, ec, z, tk, keep, f_lse, f_ent, temperature)
    torch.testing.assert_close(g.double(), gb.double(), **_gtol(dtype))
    # ent_coef = 0 is the plain one-pass gradient
    g0 = cx.logprobs_fwd_grad(z, tk, keep, coef, temperature, True, ent_coef=torch.zeros_like(ec))[3]
    g1 = cx.logprobs_fwd_grad(z, tk, keep, coef, temperature, True)[3]
    torch.testing.assert_close(g0.double(), g1.double(), **_gtol(dtype))


def test_fwd_grad_ent_coef_errors(device):
    """A bad ent_coef is a ValueError naming it (shape, dtype, device, layout), from both op forms."""
    z, tok, keep, row = _good(device)
    out = torch.empty_like(z)
    bad = [(row[:1], "ent_coef must have shape"), (row.double(), "ent_coef must be Float for Float logits"),
           (torch.zeros(3, 2, device=device).t(), "ent_coef must be contiguous"),
           (torch.zeros(2, 3, 1, device=device), "ent_coef must have shape")]
    if device == "cuda":
        bad.append((row.cpu(), "ent_coef must be on the logits' device"))
    for ec, match in bad:
        with pytest.raises(ValueError, match=match):
            cx.logprobs_fwd_grad(z, tok, keep, row, 1.0, False, ent_coef=ec)
        with pytest.raises(ValueError, match=match):
            cx.logprobs_fwd_grad(z, tok, keep, row, 1.0, False, out=out, ent_coef=ec)
    with pytest.raises(ValueError, match="ent_coef must be Double for Double logits"):
        cx.logprobs_fwd_grad(z.double(), tok, keep, row.double(), 1.0, False, ent_coef=row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_confident_targets_keep_relative_accuracy(device, dtype, temperature):
    """Targets with p_y = 1 − (1e-7 … 1e-17): log p_y (fwd and fwd_grad) and the target's gradient c·(1 − p_y)/τ
    (fwd_grad, also with ent_coef; the two-pass bwd, also with grad_entropy) to fp32 relative accuracy -- the sum of the other classes is never rounded
    against the target's term (the earlier CPU kernels lost up to ~60% of 1 − p_y here, the CUDA ones all of it)."""
    z, tok, ref_lp, ref_omp, bound = KC.confident_target_rows(device, dtype, temperature)
    R = tok.shape[1]
    keep = torch.ones_like(tok, dtype=torch.bool)
    coef = torch.linspace(-2, 2, R, device=device)[None]
    lp_f = cx.logprobs_fwd(z, tok, keep, temperature, False)[0]
    lp, _, _, g = cx.logprobs_fwd_grad(z, tok, keep, coef, temperature, False)
    for x in (lp_f, lp):
        rel = (x.double().cpu() / ref_lp - 1).abs()
        assert (rel <= bound).all(), (rel / 2.0 ** -24).max().item()
    gy = g.gather(-1, tok[..., None])[..., 0].double().cpu()
    want = coef.double().cpu() * ref_omp / temperature
    rel = (gy / want - 1).abs()
    tol = bound + (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24)  # + the rounding to the gradient's dtype
    assert (rel <= tol).all(), (rel / 2.0 ** -24).max().item()
    # with ent_coef: the target's entry (coef (1 − p_y) − ent_coef p_y (t_y − mu))/τ, t_y − mu = Σ_v p_v (z_y − z_v)/τ
    ec = torch.linspace(1, -1, R, device=device)[None]
    g2 = cx.logprobs_fwd_grad(z, tok, keep, coef, temperature, False, ent_coef=ec)[3]
    zd = z.double().cpu()
    ref_h, ty_mu = KC.confident_entropy_reference(z, tok, temperature)  # t_y − mu: the target is the max
    want2 = (coef.double().cpu() * ref_omp - ec.double().cpu() * (1 - ref_omp) * ty_mu) / temperature
    gy2 = g2.gather(-1, tok[..., None])[..., 0].double().cpu()
    assert ((gy2 / want2 - 1).abs() <= tol + 1e-6).all()
    # the two-pass backward, from the forward's fp32 lse and H: 1 − p_y = Σ_{v≠y} p_v summed in the bwd pass (the
    # earlier −expm1(z_y/τ − lse) lost all of it), with g_H the entropy term's z_y/τ − (lse − H) = log1p(−Σ) + H.
    # Allowed: 8 ulps, the rounding of each term's exponent argument z_v/τ − lse (|z_v/τ| + |t_v| ulps, weighted by
    # the terms) and the error of the fp32 lse itself (a factor common to every p_v), + the gradient's rounding
    _, lse, ent = cx.logprobs_fwd(z, tok, keep, temperature, True)
    # the entropy of a confident row (tiny, ~rest·|t|) to relative accuracy, from fwd and fwd_grad alike
    assert ((ent.double().cpu() / ref_h - 1).abs() <= 64 * bound).all()
    assert torch.equal(cx.logprobs_fwd_grad(z, tok, keep, coef, temperature, True)[2], ent)
    zt = zd / temperature
    lse_true = torch.logsumexp(zt, -1)
    t_v = zt - lse_true[..., None]
    w = t_v.exp().scatter(-1, tok.cpu()[..., None], 0.0)
    arg = torch.where(w > 0, zt.abs() + t_v.abs(), torch.zeros_like(zt))
    bwd_tol = (2.0 ** -24 * (8 + (w * arg).sum(-1) / w.sum(-1)) + (lse.double().cpu() - lse_true).abs()
               + (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24))
    g3 = cx.logprobs_bwd(coef, None, z, tok, keep, lse, ent, temperature)
    gy3 = g3.gather(-1, tok[..., None])[..., 0].double().cpu()
    rel3 = (gy3 / want - 1).abs()
    assert (rel3 <= bwd_tol).all(), (rel3 / bwd_tol).max().item()
    g4 = cx.logprobs_bwd(coef, ec, z, tok, keep, lse, ent, temperature)
    gy4 = g4.gather(-1, tok[..., None])[..., 0].double().cpu()
    assert ((gy4 / want2 - 1).abs() <= bwd_tol + 1e-5).all(), (gy4 / want2 - 1).abs().max().item()


def test_minus_inf_target_with_the_entropy_term(device):
    """A target logit of -inf in a finite row (ℓ = -inf, p_y = 0): the entropy term of its gradient entry is 0, not
    0·(-inf) = NaN, in the one-pass kernel with ent_coef and in the two-pass bwd with grad_entropy; the entry is
    g·(1 − p_y)/τ = g/τ, as autograd gives."""
    z = torch.randn(1, 3, 300, device=device)
    tok = torch.tensor([[9, 4, 200]], device=device)
    z[0, 0, 9] = float("-inf")
    z[0, 2, 200] = float("-inf")
    keep = torch.ones(1, 3, dtype=torch.bool, device=device)
    c = torch.tensor([[1.0, -0.5, 2.0]], device=device)
    lp, lse, ent, g = cx.logprobs_fwd_grad(z, tok, keep, c, 0.8, True, ent_coef=c)
    g2 = cx.logprobs_bwd(c, c, z, tok, keep, lse, ent, 0.8)
    zr = z.detach().double().cpu().requires_grad_(True)
    rl, rh = _ref(zr, tok.cpu(), keep.cpu(), 0.8)
    (want,) = torch.autograd.grad((c.double().cpu() * (rl + rh)).sum(), zr)
    assert torch.isinf(lp[0, 0]) and torch.isinf(lp[0, 2])
    for gr in (g, g2):
        assert torch.isfinite(gr).all()
        torch.testing.assert_close(gr.double().cpu(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("order", ["finite_first", "inf_first"])
def test_entropy_floors_at_their_boundary(device, dtype, temperature, order):
    """The entropy paths run without their floors on t_v = (z_v − m)/τ (which turn a −inf logit's 0·(−inf) into 0)
    and sum a row again with them where that made the entropy sum NaN; after such a row the next rows take the
    floors from the start. Rows whose spread sits just inside and outside the last pass's floor (−200/τ in fp32,
    −1000/τ in fp64, where exp is 0), far outside (finite logits of −1e30 and −3e38, which overflow t_v to −inf at
    τ < 1) and a −inf entry, in the vector body and the scalar tail, before or after the −inf rows: the entropy,
    log-probs and the gradient with ent_coef match fp64 autograd of the reference, finite, the far entries exactly
    0; the same bits from fwd, and from fwd_grad without ent_coef in place (z overwritten by the exp pass)."""
    v = 300  # vector body + tail at every SIMD width
    floor = 1000.0 if dtype == torch.float64 else 200.0
    spreads = [floor * temperature - 1, floor * temperature + 1, floor / temperature + 1, 1e30, 3e38, float("inf")]
    if order == "inf_first":
        spreads = spreads[::-1]
    rows = torch.randn(len(spreads), 2, v, dtype=torch.float64)
    rows[..., 0] = 5.0  # the max
    for r, c in enumerate(spreads):
        rows[r, 0, 3] = rows[r, 1, v - 2] = 5.0 - c  # one in the body, one in the tail
    z = rows.to(dtype).to(device)
    if dtype != torch.float64:  # the finite spreads stay finite in the logits' dtype
        assert torch.isfinite(z[[r for r, c in enumerate(spreads) if c != float("inf")]]).all()
    tok = torch.randint(1, v - 3, (len(spreads), 2), device=device)
    keep = torch.ones(len(spreads), 2, dtype=torch.bool, device=device)
    coef = torch.randn(len(spreads), 2, dtype=_acc(dtype), device=device)
    ec = torch.randn(len(spreads), 2, dtype=_acc(dtype), device=device)
    want, _, rl, rh = _entropy_objective_grad(z.cpu(), tok.cpu(), keep.cpu(), coef.cpu(), ec.cpu(), temperature)
    logp, lse, ent, g = cx.logprobs_fwd_grad(z, tok, keep, coef, temperature, False, ent_coef=ec)
    f_logp, f_lse, f_ent = cx.logprobs_fwd(z, tok, keep, temperature, True)
    assert torch.equal(ent, f_ent) and torch.equal(logp, f_logp) and torch.equal(lse, f_lse)
    torch.testing.assert_close(ent.cpu(), rh.to(ent.dtype), **_tol(dtype))
    torch.testing.assert_close(logp.cpu(), rl.to(logp.dtype), **_tol(dtype))
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double().cpu(), want, **_gtol(dtype))
    assert (g[:, 0, 3] == 0).all() and (g[:, 1, v - 2] == 0).all()
    zc = z.clone()
    ip = cx.logprobs_fwd_grad(zc, tok, keep, coef, temperature, True, out=zc)
    assert torch.equal(ip[2], ent) and torch.equal(ip[0], logp) and torch.isfinite(zc).all()


def test_large_vocabulary_rows(device):
    v = 262_144
    for dtype in (torch.float32, torch.bfloat16):
        z = (torch.randn(1, 2, v, device=device) * 4).to(dtype)
        tok = torch.tensor([[5, v - 1]], device=device)
        keep = torch.ones(1, 2, dtype=torch.bool, device=device)
        coef = torch.tensor([[0.5, -2.0]], device=device)
        logp, _, ent, g = cx.logprobs_fwd_grad(z, tok, keep, coef, 0.9, True)
        zr = z.detach().double().requires_grad_()
        rl, rh = _ref(zr, tok, keep, 0.9)
        (want,) = torch.autograd.grad((coef.double() * rl).sum(), zr)
        torch.testing.assert_close(logp.double(), rl.detach(), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ent.double(), rh.detach(), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(g.double(), want, **_gtol(dtype))


def test_independent_of_thread_count():
    """The CPU ops split rows across at::parallel_for threads; the result does not depend on how many."""
    z, tok, m, _ = _inputs(torch.float32, "cpu", s=8, t=16, v=3001)
    keep = _keep(tok, m)
    coef = torch.randn(8, 16)
    a = cx.logprobs_fwd_grad(z, tok, keep, coef, 0.7, True)
    f = cx.logprobs_fwd(z, tok, keep, 0.7, True)
    g = cx.logprobs_bwd(coef, coef, z, tok, keep, f[1], f[2], 0.7)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = cx.logprobs_fwd_grad(z, tok, keep, coef, 0.7, True)
        f1 = cx.logprobs_fwd(z, tok, keep, 0.7, True)
        g1 = cx.logprobs_bwd(coef, coef, z, tok, keep, f1[1], f1[2], 0.7)
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(x, w) for x, w in zip(a, c))
    assert all(torch.equal(x, w) for x, w in zip(f, f1)) and torch.equal(g, g1)


# --------------------------------------------------------------------------------------------------------------
# The public loss through the C++ backend
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("extras", ["none", "old+ref"])
def test_grpo_loss_parity(device, loss_type, dtype, temperature, extras):
    z, tok, m, r = _inputs(dtype, device)
    kw = dict(group_size=G, loss_type=loss_type, temperature=temperature)
    if extras == "old+ref":
        kw["old_logprobs"] = torch.randn(S, T, device=device) * 0.1 - 2
        kw["ref_logprobs"] = torch.randn(S, T, device=device) * 0.1 - 2
        kw["kl_coef"] = 0.05
    zk = z.detach().clone().requires_grad_()
    rk = r.detach().clone().requires_grad_()
    zt = z.detach().clone().requires_grad_()
    rt = r.detach().clone().requires_grad_()
    lk = gk.grpo_loss(zk, tok, rk, m, backend=_backend(device), **kw)
    lt = ref.grpo_loss(zt, tok, rt, m, **kw)  # the autograd oracle
    lk.backward()
    lt.backward()
    assert lk.dtype == lt.dtype
    torch.testing.assert_close(lk, lt, **_tol(dtype))
    torch.testing.assert_close(zk.grad.double(), zt.grad.double(), **_gtol(dtype))
    torch.testing.assert_close(rk.grad, rt.grad, **_tol(dtype))
    assert (zk.grad[~_keep(tok, m)] == 0).all()


@pytest.mark.parametrize("loss_type", ["softmax", "grpo", "dapo"])
def test_grpo_loss_gspo_metrics_and_rewards_gradient(device, loss_type):
    z, tok, m, r = _inputs(torch.float32, device)
    kw = dict(group_size=G, loss_type=loss_type, temperature=0.8, return_metrics=True,
              ref_logprobs=torch.randn(S, T, device=device) * 0.1 - 3, kl_coef=0.1)
    if loss_type != "softmax":
        kw.update(importance_sampling_level="sequence", old_logprobs=torch.randn(S, T, device=device) * 0.1 - 3,
                  epsilon_high=0.28, delta=1.5)
    res = {}
    for b in (_backend(device), "torch"):
        zz = z.detach().clone().requires_grad_()
        rr = r.detach().clone().requires_grad_()
        if b == "torch":  # the autograd oracle
            loss, metrics = ref.grpo_loss(zz, tok, rr, m, **kw)
        else:
            loss, metrics = gk.grpo_loss(zz, tok, rr, m, backend=b, **kw)
        loss.backward()
        res[b] = (loss, metrics, zz.grad, rr.grad)
    (lk, mk, gzk, grk), (lt, mt, gzt, grt) = res[_backend(device)], res["torch"]
    torch.testing.assert_close(lk, lt, rtol=1e-5, atol=1e-6)
    assert mk.keys() == mt.keys() and "entropy" in mk
    for k in mt:
        torch.testing.assert_close(mk[k], mt[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gzk, gzt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grk, grt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["softmax", "grpo"])
def test_fp64_gradcheck(device, loss_type):
    s, t, v = 4, 3, 11
    z = torch.randn(s, t, v, dtype=torch.float64, device=device, requires_grad=True)
    tok = torch.randint(0, v, (s, t), device=device)
    tok[1, 1] = -100
    m = torch.ones(s, t, dtype=torch.float64, device=device)
    m[2, 2] = 0
    r = torch.randn(s, dtype=torch.float64, device=device, requires_grad=True)
    old = torch.randn(s, t, dtype=torch.float64, device=device) * 0.05 - 2.4

    def f(z, r):
        return gk.grpo_loss(z, tok, r, m, group_size=2, loss_type=loss_type, temperature=0.9,
                            old_logprobs=old if loss_type == "grpo" else None, backend=_backend(device))

    assert torch.autograd.gradcheck(f, (z, r))


# --------------------------------------------------------------------------------------------------------------
# Bad input reaching the ops: clear errors, never a crash
# --------------------------------------------------------------------------------------------------------------
def _good(device):
    z = torch.randn(2, 3, 7, device=device)
    tok = torch.randint(0, 7, (2, 3), device=device)
    keep = torch.ones(2, 3, dtype=torch.bool, device=device)
    row = torch.zeros(2, 3, device=device)
    return z, tok, keep, row


BAD_FWD = [
    ("int logits", lambda z, tok, keep: (z.long(), tok, keep, 1.0), TypeError, "logits must be float"),
    ("2-D logits", lambda z, tok, keep: (z[0], tok, keep, 1.0), ValueError, "logits must have shape"),
    ("strided vocab", lambda z, tok, keep: (z.transpose(1, 2).contiguous().transpose(1, 2), tok, keep, 1.0),
     ValueError, "unit vocabulary stride"),
    ("int32 tokens", lambda z, tok, keep: (z, tok.int(), keep, 1.0), TypeError, "tokens must be int64"),
    ("tokens shape", lambda z, tok, keep: (z, tok[:1], keep, 1.0), ValueError, "tokens must have shape"),
    ("float mask", lambda z, tok, keep: (z, tok, keep.float(), 1.0), TypeError, "mask must be bool"),
    ("mask shape", lambda z, tok, keep: (z, tok, keep[:, :2], 1.0), ValueError, "mask must have shape"),
    ("zero temperature", lambda z, tok, keep: (z, tok, keep, 0.0), ValueError, "temperature"),
    ("nan temperature", lambda z, tok, keep: (z, tok, keep, float("nan")), ValueError, "temperature"),
]


@pytest.mark.parametrize("case", BAD_FWD, ids=[c[0] for c in BAD_FWD])
def test_bad_input_to_the_ops(device, case):
    _, make, exc, match = case
    z, tok, keep, row = _good(device)
    args = make(z, tok, keep)
    with pytest.raises(exc, match=match):
        cx.logprobs_fwd(*args, True)
    z2, tok2, keep2, temp = args
    with pytest.raises(exc, match=match):
        cx.logprobs_fwd_grad(z2, tok2, keep2, row, temp, False)
    with pytest.raises(exc, match=match):
        cx.logprobs_bwd(row, None, z2, tok2, keep2, row, row, temp)


def test_bad_row_tensors_and_out(device):
    z, tok, keep, row = _good(device)
    with pytest.raises(TypeError, match="coef must be"):
        cx.logprobs_fwd_grad(z, tok, keep, row.double(), 1.0, False)
    with pytest.raises(ValueError, match="coef must have shape"):
        cx.logprobs_fwd_grad(z, tok, keep, row[:1], 1.0, False)
    with pytest.raises(TypeError, match="lse must be"):
        cx.logprobs_bwd(row, None, z, tok, keep, row.half(), row, 1.0)
    with pytest.raises(ValueError, match="grad_entropy must have shape"):
        cx.logprobs_bwd(row, row[0], z, tok, keep, row, row, 1.0)
    with pytest.raises(ValueError, match="out must have the logits' shape"):
        cx.logprobs_fwd_grad(z, tok, keep, row, 1.0, False, out=torch.empty(2, 3, 8, device=device))
    with pytest.raises(TypeError, match="out must have the logits' dtype"):
        cx.logprobs_bwd(row, None, z, tok, keep, row, row, 1.0, out=torch.empty_like(z, dtype=torch.float64))
    with pytest.raises(ValueError, match="not another view"):
        zz = torch.randn(2, 3, 14, device=device)
        cx.logprobs_fwd_grad(zz[:, :, :7], tok, keep, row, 1.0, False, out=zz[:, :, 7:])
    with pytest.raises(ValueError, match="must not overlap"):
        cx.logprobs_fwd_grad(z, tok, keep, row, 1.0, False, out=torch.empty(1, 1, 7, device=device).expand(2, 3, 7))


@pytest.mark.gpu
def test_cuda_tensors_on_the_cpu_op_are_refused():
    z, tok, keep, _ = _good("cpu")
    with pytest.raises((ValueError, RuntimeError), match="device"):
        _ops().logprobs_fwd(z, tok.cuda(), keep, 1.0, False)


# --------------------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------------------
def test_opcheck_grpo_kernels_C_ops(device):
    ops = _ops()
    z, tok, m, _ = _inputs(torch.float32, device, s=4, t=4, v=19)
    keep = _keep(tok, m)
    tk = tok.clamp(min=0)
    coef = torch.randn(4, 4, device=device)
    logp, lse, ent = ops.logprobs_fwd(z, tk, keep, 0.9, True)
    torch.library.opcheck(ops.logprobs_fwd, (z, tk, keep, 0.9, True))
    torch.library.opcheck(ops.logprobs_bwd, (coef, coef, z, tk, keep, lse, ent, 0.9))
    torch.library.opcheck(ops.logprobs_bwd, (coef, None, z, tk, keep, lse, ent, 0.9))
    torch.library.opcheck(ops.logprobs_bwd_out, (coef, None, z, tk, keep, lse, ent, 0.9, torch.empty_like(z)))
    torch.library.opcheck(ops.logprobs_fwd_grad, (z, tk, keep, coef, 0.9, True))
    torch.library.opcheck(ops.logprobs_fwd_grad_out, (z, tk, keep, coef, 0.9, False, torch.empty_like(z)))
    ec = torch.randn(4, 4, device=device)
    torch.library.opcheck(ops.logprobs_fwd_grad, (z, tk, keep, coef, 0.9, False, True, ec))
    torch.library.opcheck(ops.logprobs_fwd_grad_out, (z, tk, keep, coef, 0.9, False, torch.empty_like(z), False, ec))


def test_torch_compile_fullgraph(device):
    ops = _ops()
    z, tok, m, _ = _inputs(torch.float32, device, s=4, t=4, v=19)
    keep = _keep(tok, m)
    tk = tok.clamp(min=0)
    coef = torch.randn(4, 4, device=device)

    def f(z, coef):
        logp, lse, ent, g = ops.logprobs_fwd_grad(z, tk, keep, coef, 0.9, True)
        return (logp * coef).sum() + ent.sum(), g * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for x, y in zip(compiled(z, coef), f(z, coef)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# The SIMD variants, each forced in a subprocess (the process above runs the best one for this CPU)
# --------------------------------------------------------------------------------------------------------------
_VARIANT_SCRIPT = r"""
import torch, grpo_kernels.kernels.native as cx
from grpo_kernels import reference as ref
cx.ensure_loaded("cpu")
print(torch.ops.grpo_kernels_C.cpu_isa())
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = (torch.randn(4, 3, 37, dtype=torch.float64) * 3).to(dtype)
    z[0, 0, :5] = float("-inf")
    tok = torch.randint(0, 37, (4, 3)); keep = torch.rand(4, 3) > 0.2
    coef = torch.randn(4, 3, dtype=acc)
    ec = torch.randn(4, 3, dtype=acc)
    logp, lse, ent, g = cx.logprobs_fwd_grad(z, tok, keep, coef, 0.8, True)
    zr = z.double().requires_grad_()
    rl, rh = ref.token_logprobs(zr, torch.where(keep, tok, -100), 0.8, return_entropy=True)
    want, = torch.autograd.grad((coef.double() * rl).sum() + (coef.double() * rh).sum(), zr, retain_graph=True)
    want_ec, = torch.autograd.grad((coef.double() * rl).sum() + (ec.double() * rh).sum(), zr, retain_graph=True)
    want_fg, = torch.autograd.grad((coef.double() * rl).sum(), zr)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(logp.double(), rl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), rh.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double(), want_fg, **tol)
    gb = cx.logprobs_bwd(coef, coef, z, tok, keep, lse, ent, 0.8)
    torch.testing.assert_close(gb.double(), want, **tol)
    # the one-pass gradient with the entropy term, new buffer and in place
    logp2, lse2, ent2, g2 = cx.logprobs_fwd_grad(z, tok, keep, coef, 0.8, False, ent_coef=ec)
    torch.testing.assert_close(g2.double(), want_ec, **tol)
    assert torch.equal(logp2, logp) and torch.equal(ent2, ent) and (g2[~keep] == 0).all()
    zc = z.clone()
    cx.logprobs_fwd_grad(zc, tok, keep, coef, 0.8, False, out=zc, ent_coef=ec)
    assert torch.equal(zc, g2)
# a confident target: 1 - p_y ≈ e^-30 keeps its relative accuracy (log p_y and the target's gradient)
z = torch.randn(1, 2, 1000) * 2
z[0, :, 7] = z.max() + 30
tok = torch.full((1, 2), 7); keep = torch.ones(1, 2, dtype=torch.bool)
d = (z.double() - z[..., 7:8].double()); d[..., 7] = float("-inf")
rest = d.exp().sum(-1)
lp, _, _, g = cx.logprobs_fwd_grad(z, tok, keep, torch.ones(1, 2), 1.0, False)
assert ((lp.double() / -torch.log1p(rest) - 1).abs() < 1e-5).all(), lp
assert ((g[..., 7].double() / (rest / (1 + rest)) - 1).abs() < 1e-5).all()
print("ok")
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_simd_variants_match_reference(capability):
    """Each SIMD variant, forced with ATEN_CPU_CAPABILITY in a subprocess (a CPU without it runs the next one
    down): fwd, bwd, fwd_grad with and without ent_coef, in place, and a confident target."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    res = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.split()
    assert lines[-1] == "ok"
    if capability == "default":
        assert lines[0] == "DEFAULT"
    elif capability == "avx2":
        assert lines[0] in ("AVX2", "DEFAULT")  # DEFAULT on CPUs without AVX2
    else:
        assert lines[0] in ("AVX512", "AVX2", "DEFAULT")
