"""The CUDA kernels' row arithmetic (``csrc/cuda_rowmath.cuh``), tested on the CPU: no GPU is needed.

``cuda_rowmath.cuh`` holds everything the CUDA kernels compute for a row -- each thread's running statistics (max,
the sum of the non-max terms, the entropy sum; updated once per loaded vector), their merge, the per-row outputs,
the one-pass gradient with and without ``ent_coef`` -- as ``__host__ __device__`` functions.
``tests/cuda_rowmath_host.cpp`` compiles them with the host C++ compiler into a small shared library (no torch, no
CUDA) that runs one emulated 256-thread block per row: the kernel's element-to-thread assignment (a scalar head
to 16-byte alignment, 128-bit vectors of NV values, a scalar tail) and its reduction tree. The only difference from
the device is the hot loop's exp2 (``std::exp2`` here, ``ex2.approx`` there: ≤ 2 ulps more per term).

What is checked:

* confident targets (logit gap 20–40, 1 − p_y down to 1e-17): log p_y and the target's gradient c·(1 − p_y)/τ =
  −c·expm1(ℓ)/τ keep fp32 relative accuracy against an fp64 reference computed as −log1p(Σ_{v≠y} p_v/p_y): a few
  ulps plus the rounding of the exponent argument (an fp32 2^u with |u| ≈ 1.44·gap has a granularity of |u|·2⁻²⁴,
  so the bound grows with the gap). The earlier arithmetic (one fp32 sum with a Kahan compensation folded into it
  at the end) returned log p_y = 0 and a zero target gradient for every such row;
* ordinary rows: log-probs, lse, entropy and the whole gradient row (coef, and coef with ent_coef) against fp64
  eager math, for every vector width the kernels use (fp32: 4, bf16/fp16: 8, fp64: 2), unaligned rows (scalar
  heads), ragged tails, ``-inf`` entries, ties, a NaN row.
"""

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
SOURCE = os.path.join(HERE, "cuda_rowmath_host.cpp")
EPS32 = 2.0 ** -24  # unit roundoff of fp32
LOG2E = 1.4426950408889634


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)
    if cxx is None:
        pytest.skip("no C++ compiler for the host build of csrc/cuda_rowmath.cuh")
    out = str(tmp_path_factory.mktemp("rowmath") / "rowmath.so")
    res = subprocess.run([cxx, "-O2", "-std=c++17", "-fPIC", "-shared", "-I", CSRC, SOURCE, "-o", out],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    so = ctypes.CDLL(out)
    p = ctypes.c_void_p
    for f in (so.grpo_rowmath_f32, so.grpo_rowmath_f64):
        f.argtypes = [p, ctypes.c_int64, ctypes.c_int64, p, p, p, ctypes.c_double, ctypes.c_int, ctypes.c_int64,
                      ctypes.c_int, p, p, p, p]
        f.restype = ctypes.c_int
    for f in (so.grpo_rowmath_bwd_f32, so.grpo_rowmath_bwd_f64):
        f.argtypes = [p, ctypes.c_int64, ctypes.c_int64, p, p, p, p, p, ctypes.c_double, ctypes.c_int, ctypes.c_int64,
                      p]
        f.restype = ctypes.c_int
    return so


def run(lib, z, tok, coef, temperature, vec, head=0, with_entropy=True, ent_coef=None):
    """The kernel's ``(logp, lse, entropy, grad)`` of fwd_grad for rows ``z (R, V)`` (fp32 or fp64), one emulated
    block per row reading ``head`` scalars, then vectors of ``vec``, then the tail."""
    z = z.contiguous()
    R, V = z.shape
    f = lib.grpo_rowmath_f32 if z.dtype == torch.float32 else lib.grpo_rowmath_f64
    outs = [torch.empty(R, dtype=z.dtype) for _ in range(3)] + [torch.empty(R, V, dtype=z.dtype)]
    tok = tok.to(torch.int64).contiguous()
    coef = coef.to(z.dtype).contiguous()
    ec = ent_coef.to(z.dtype).contiguous() if ent_coef is not None else None
    rc = f(z.data_ptr(), R, V, tok.data_ptr(), coef.data_ptr(), ec.data_ptr() if ec is not None else None,
           1.0 / temperature, vec, head, int(with_entropy), *[o.data_ptr() for o in outs])
    assert rc == 0
    return outs


def run_bwd(lib, z, tok, gl, lse, ent, temperature, vec, head=0, gh=None, inplace=False):
    """The kernel's bwd gradient rows for ``z (R, V)`` (fp32 or fp64) from the forward's ``lse`` and ``ent``, one
    emulated block per row; ``inplace``: written into (a copy of) the logits themselves."""
    z = z.contiguous()
    R, V = z.shape
    f = lib.grpo_rowmath_bwd_f32 if z.dtype == torch.float32 else lib.grpo_rowmath_bwd_f64
    row = [t.to(z.dtype).contiguous() for t in (gl, lse, ent)]
    ghc = gh.to(z.dtype).contiguous() if gh is not None else None
    tok = tok.to(torch.int64).contiguous()
    src = z.clone() if inplace else z
    out = src if inplace else torch.empty_like(z)
    rc = f(src.data_ptr(), R, V, tok.data_ptr(), row[0].data_ptr(), ghc.data_ptr() if ghc is not None else None,
           row[1].data_ptr(), row[2].data_ptr(), 1.0 / temperature, vec, head, out.data_ptr())
    assert rc == 0
    return out


def confident_reference(z, tok, temperature):
    """fp64 ``(log p_y, 1 − p_y)`` computed from the other classes: ``−log1p(rest)``, ``rest/(1 + rest)`` with
    ``rest = Σ_{v≠y} exp((z_v − z_y)/τ)`` (exact where p_y ≈ 1, unlike z_y/τ − logsumexp)."""
    zd = z.double()
    d = (zd - zd.gather(-1, tok[:, None])) / temperature
    d.scatter_(-1, tok[:, None], float("-inf"))
    rest = torch.exp(d).sum(-1)
    return -torch.log1p(rest), rest / (1 + rest)


def confident_rows(R, V, dtype, temperature, gap_lo=20.0, gap_hi=40.0, seed=0):
    """Rows of ``randn·2`` logits whose target sits ``gap·τ`` above the others' max, gap uniform in
    [gap_lo, gap_hi], rounded to ``dtype`` (returned as fp32 values)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(R, V, generator=g, dtype=torch.float64) * 2
    tok = torch.randint(0, V, (R,), generator=g)
    gap = gap_lo + (gap_hi - gap_lo) * torch.rand(R, generator=g, dtype=torch.float64)
    z[torch.arange(R), tok] = z.max(-1).values + gap * temperature
    return z.to(dtype).float(), tok


def accuracy_bound(z, tok, temperature):
    """Relative error allowed for log p_y and 1 − p_y of a confident row: 8 ulps (the tree of positive additions,
    log1p/expm1, the output) plus the rounding of the exponent arguments of the dominant terms, |u|·2⁻²⁴ with
    u = (z_v − z_y)·log2(e)/τ in log2 units for the closest competitor (the kernel computes 2^u in fp32, whose
    argument alone carries that error)."""
    zd = z.double()
    zy = zd.gather(-1, tok[:, None])[:, 0]
    others = zd.scatter(-1, tok[:, None], float("-inf")).max(-1).values
    u_near = (zy - others) * LOG2E / temperature
    return EPS32 * (8 + u_near)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("dtype,vec", [(torch.float32, 4), (torch.bfloat16, 8), (torch.float16, 8)])
@pytest.mark.parametrize("V,head", [(4096, 0), (32000, 3), (1000, 5)])
def test_confident_targets_keep_fp32_relative_accuracy(lib, dtype, vec, temperature, V, head):
    """Targets with 1 − p_y from ~1e-7 down to ~1e-17: log p_y and the target's gradient −c·expm1(ℓ)/τ to fp32
    relative accuracy (the earlier arithmetic gave 0 for both)."""
    R = 64
    z, tok = confident_rows(R, V, dtype, temperature, seed=V + head)
    if dtype == torch.float16:  # keep the logits in fp16's range (the gap is what matters)
        z, tok = confident_rows(R, V, torch.float32, temperature, gap_lo=20, gap_hi=30, seed=V + head)
        z = z.clamp(-60000, 60000).half().float()
    coef = torch.linspace(-2, 2, R)
    logp, lse, ent, g = run(lib, z, tok, coef, temperature, vec, head, with_entropy=False)
    ref_lp, ref_omp = confident_reference(z, tok, temperature)
    assert (ref_omp < 1e-6).all() and (ref_omp > 0).all()
    bound = accuracy_bound(z, tok, temperature)
    rel_lp = (logp.double() / ref_lp - 1).abs()
    assert (rel_lp <= bound).all(), (rel_lp / EPS32).max().item()
    gy = g[torch.arange(R), tok].double()
    want = coef.double() * ref_omp / temperature
    rel_g = (gy / want - 1).abs()
    assert (rel_g <= bound + EPS32).all(), (rel_g / EPS32).max().item()
    # and the gradient row still sums to ~0 (the other entries are -c p_v / τ)
    assert torch.allclose(g.double().sum(-1), torch.zeros(R, dtype=torch.float64), atol=1e-6)


def test_confident_targets_with_entropy_and_ent_coef(lib):
    """The entropy sums and the ent_coef term change nothing in the log-prob; with ent_coef the target's gradient
    (coef·(1 − p_y) − ent_coef·p_y·(t_y − mu))/τ still carries its tiny value accurately."""
    R, V, tau = 32, 5000, 0.9
    z, tok = confident_rows(R, V, torch.bfloat16, tau, gap_lo=18, gap_hi=30, seed=7)
    coef = torch.linspace(-1, 1, R)
    ec = torch.linspace(0.5, -0.5, R)
    a = run(lib, z, tok, coef, tau, 8, with_entropy=False)
    b = run(lib, z, tok, coef, tau, 8, with_entropy=True)
    c = run(lib, z, tok, coef, tau, 8, with_entropy=False, ent_coef=ec)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert torch.equal(b[2], c[2])
    # fp64 reference of the target's gradient with the entropy term
    zd = z.double() / tau
    lp = torch.log_softmax(zd, -1)
    p = lp.exp()
    ref_lp, ref_omp = confident_reference(z, tok, tau)
    mu = (p * (zd - zd.max(-1, keepdim=True).values)).sum(-1)
    ty = zd.gather(-1, tok[:, None])[:, 0] - zd.max(-1).values
    want = (coef.double() * ref_omp - ec.double() * torch.exp(ref_lp) * (ty - mu)) / tau
    got = c[3][torch.arange(R), tok].double()
    assert ((got / want - 1).abs() < 2e-5).all()
    # the entropy of a confident row is tiny and positive: relative accuracy too (fp64 reference from the other
    # classes: H = log1p(rest) − Σ_{v≠y} e_v t_v / (1 + rest), t_v = (z_v − z_y)/τ, e_v = exp(t_v))
    t = zd - zd.gather(-1, tok[:, None])
    e = t.exp().scatter(-1, tok[:, None], 0.0)
    rest = e.sum(-1)
    ref_h = torch.log1p(rest) - (e * t).sum(-1) / (1 + rest)
    assert ((b[2].double() / ref_h - 1).abs() < 2e-5).all()


# ----------------------------------------------------------------------------------------------------------
# Ordinary rows: the whole fwd_grad against fp64 eager math
# ----------------------------------------------------------------------------------------------------------
def reference(z, tok, coef, temperature, ent_coef=None):
    """fp64 ``(logp, lse, H, grad)``: ``grad = (coef (1[v=y] − p) − ent_coef p (z/τ − (lse − H)))/τ``."""
    zd = z.double() / temperature
    lse = torch.logsumexp(zd, -1)
    lsm = zd - lse[:, None]
    p = lsm.exp()
    H = -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1)
    onehot = torch.nn.functional.one_hot(tok, z.shape[-1]).double()
    g = coef.double()[:, None] * (onehot - p)
    if ent_coef is not None:
        t = torch.where(p > 0, zd - (lse - H)[:, None], torch.zeros_like(zd))
        g = g - ent_coef.double()[:, None] * p * t
    return lsm.gather(-1, tok[:, None])[:, 0], lse, H, g / temperature


def ordinary_rows(R, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(R, V, generator=g, dtype=torch.float64) * 3).to(dtype).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    tok = torch.randint(0, V, (R,), generator=g)
    z[0, : V // 3] = float("-inf")  # a masked vocabulary
    tok[0] = V - 1
    z[1, 1::2] = float("-inf")
    tok[1] = 0
    z[2] = z[2].round()  # many ties, the max among them
    if R > 3:
        z[3, :] = z[3, 0]  # a constant row: every element ties with the max
    return z, tok


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_ec", [False, True])
@pytest.mark.parametrize("dtype,vec", [(torch.float32, 4), (torch.bfloat16, 8), (torch.float64, 2),
                                       (torch.float32, 1)])
@pytest.mark.parametrize("V,head", [(67, 0), (67, 3), (3001, 1), (20000, 0)])
def test_fwd_grad_matches_fp64(lib, dtype, vec, V, head, with_ec, temperature):
    R = 6
    z, tok = ordinary_rows(R, V, dtype, seed=V * 7 + head)
    g_ = torch.Generator().manual_seed(V)
    coef = torch.randn(R, generator=g_, dtype=torch.float64)
    ec = torch.randn(R, generator=g_, dtype=torch.float64) if with_ec else None
    logp, lse, ent, g = run(lib, z, tok, coef, temperature, vec, head, True, ec)
    rl, rlse, rh, rg = reference(z, tok, coef.to(z.dtype), temperature, ec.to(z.dtype) if with_ec else None)
    if z.dtype == torch.float64:
        tol, gtol = dict(rtol=1e-12, atol=1e-12), dict(rtol=1e-11, atol=1e-13)
    else:
        tol, gtol = dict(rtol=2e-6, atol=2e-6), dict(rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(logp.double(), rl, **tol)
    torch.testing.assert_close(lse.double(), rlse, **tol)
    torch.testing.assert_close(ent.double(), rh, **tol)
    torch.testing.assert_close(g.double(), rg, **gtol)
    assert (g[0, : V // 3] == 0).all() and (g[1, 1::2] == 0).all()


def test_nan_and_all_minus_inf_rows(lib):
    """A NaN logit makes its row's outputs NaN (never a silently finite number); a row of -inf gives lse = -inf."""
    V = 300
    z = torch.randn(4, V)
    z[0, 123] = float("nan")
    z[1, 0] = float("nan")  # NaN in the first (head/vector) element
    z[2] = float("-inf")
    z[3, :] = float("nan")
    tok = torch.tensor([5, 7, 9, 11])
    logp, lse, ent, g = run(lib, z, tok, torch.ones(4), 1.0, 4, 0, True)
    for r in (0, 1, 3):
        assert torch.isnan(logp[r]) and torch.isnan(lse[r]) and torch.isnan(ent[r])
    assert lse[2] == float("-inf")


# ----------------------------------------------------------------------------------------------------------
# The two-pass backward (bwd_kernel): the gradient from the forward's lse and H
# ----------------------------------------------------------------------------------------------------------
def bwd_bound(z, tok, lse, temperature):
    """Relative error allowed for bwd's 1 − p_y = Σ_{v≠y} p_v of a confident row: 8 ulps (the tree of positive
    additions, the output) plus the rounding of each term's exponent argument weighted by the terms (an fp32 z_v/τ
    then − lse: |z_v/τ|·2⁻²⁴ + |t_v|·2⁻²⁴, t_v = z_v/τ − lse), plus the error of the fp32 lse the kernel is given
    (a factor e^−δ common to every term: inherent to the two-pass schedule, which saves lse in fp32)."""
    zd = z.double() / temperature
    lse_true = torch.logsumexp(zd, -1)
    t = zd - lse_true[:, None]
    w = t.exp().scatter(-1, tok[:, None], 0.0)
    arg = torch.where(w > 0, zd.abs() + t.abs(), torch.zeros_like(zd))
    return EPS32 * (8 + (w * arg).sum(-1) / w.sum(-1)) + (lse.double() - lse_true).abs()


def confident_entropy_term(z, tok, temperature):
    """fp64 ``log p_y + H = −Σ_{v≠y} e_v t_v / (1 + Σ_{v≠y} e_v)``, ``t_v = (z_v − z_y)/τ``, ``e_v = exp(t_v)``: the
    target's ``z_y/τ − (lse − H)`` computed from the other classes (it is tiny, and positive, for a confident one)."""
    zd = z.double()
    t = (zd - zd.gather(-1, tok[:, None])) / temperature
    e = t.exp().scatter(-1, tok[:, None], 0.0)
    et = torch.where(e > 0, e * t, torch.zeros_like(e))
    return -et.sum(-1) / (1 + e.sum(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype,vec", [(torch.float32, 4), (torch.bfloat16, 8)])
@pytest.mark.parametrize("V,head", [(4096, 0), (32000, 3), (1000, 5)])
def test_bwd_confident_targets_keep_fp32_relative_accuracy(lib, dtype, vec, temperature, V, head):
    """bwd's target entry at 1 − p_y from ~1e-7 down to ~1e-17: g·(1 − p_y)/τ with 1 − p_y = Σ_{v≠y} p_v, summed in
    the same pass from the forward's fp32 lse (the earlier −g·expm1(z_y/τ − lse)/τ gave 0, or one ulp of lse: every
    such row wrong); with g_H the entropy term's z_y/τ − (lse − H) = log1p(−Σ_{v≠y} p_v) + H (it cancelled too)."""
    R = 64
    z, tok = confident_rows(R, V, dtype, temperature, seed=V + head + 1)
    gl = torch.linspace(-2, 2, R)
    _, lse, ent, _ = run(lib, z, tok, gl, temperature, vec, head, with_entropy=True)
    g = run_bwd(lib, z, tok, gl, lse, ent, temperature, vec, head)
    _, ref_omp = confident_reference(z, tok, temperature)
    assert (ref_omp < 1e-6).all() and (ref_omp > 0).all()
    rows = torch.arange(R)
    bound = bwd_bound(z, tok, lse, temperature) + EPS32  # + the roundings of g·rest·it
    rel = (g[rows, tok].double() / (gl.double() * ref_omp / temperature) - 1).abs()
    assert (rel <= bound).all(), (rel / bound).max().item()
    # the formula it replaced: all of it lost
    old = (-gl * torch.expm1(z[rows, tok] / temperature - lse) / temperature).double()
    assert ((old / (gl.double() * ref_omp / temperature) - 1).abs() > 0.5).all()
    assert torch.allclose(g.double().sum(-1), torch.zeros(R, dtype=torch.float64), atol=1e-6)
    # with g_H: (g (1 − p_y) − g_H p_y (log p_y + H))/τ; the forward's H carries its own fp32 error into the term
    gh = torch.linspace(1, -1, R)
    g2 = run_bwd(lib, z, tok, gl, lse, ent, temperature, vec, head, gh=gh)
    want = (gl.double() * ref_omp - gh.double() * (1 - ref_omp) * confident_entropy_term(z, tok, temperature))
    rel2 = (g2[rows, tok].double() / (want / temperature) - 1).abs()
    assert (rel2 <= 1e-5).all(), rel2.max().item()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_gh", [False, True])
@pytest.mark.parametrize("dtype,vec", [(torch.float32, 4), (torch.bfloat16, 8), (torch.float64, 2),
                                       (torch.float32, 1)])
@pytest.mark.parametrize("V,head", [(67, 0), (67, 3), (3001, 1), (20000, 0)])
def test_bwd_matches_fp64(lib, dtype, vec, V, head, with_gh, temperature):
    """Ordinary rows (-inf entries, ties, a constant row): the whole bwd gradient row from the emulated forward's
    lse and H against fp64 eager math; written into the logits themselves, the same values."""
    R = 6
    z, tok = ordinary_rows(R, V, dtype, seed=V * 5 + head)
    g_ = torch.Generator().manual_seed(V + 1)
    gl = torch.randn(R, generator=g_, dtype=torch.float64)
    gh = torch.randn(R, generator=g_, dtype=torch.float64) if with_gh else None
    _, lse, ent, _ = run(lib, z, tok, gl, temperature, vec, head, True)
    g = run_bwd(lib, z, tok, gl, lse, ent, temperature, vec, head, gh=gh)
    assert torch.equal(g, run_bwd(lib, z, tok, gl, lse, ent, temperature, vec, head, gh=gh, inplace=True))
    *_, rg = reference(z, tok, gl.to(z.dtype), temperature, gh.to(z.dtype) if with_gh else None)
    # (atol: with g_H an entry's gl + gh (z_v/τ − (lse − H)) may nearly cancel, and z_v/τ − (lse − H) carries the
    # fp32 rounding of z_v/τ and lse: |z/τ|·2⁻²⁴ ≈ 1e-6 absolute, as in the CPU kernels and autograd in fp32)
    if z.dtype == torch.float64:
        gtol = dict(rtol=1e-11, atol=1e-13)
    else:
        gtol = dict(rtol=2e-5, atol=1e-6 if with_gh else 1e-7)
    torch.testing.assert_close(g.double(), rg, **gtol)
    assert (g[0, : V // 3] == 0).all() and (g[1, 1::2] == 0).all()


def test_bwd_nan_rows_and_minus_inf_target(lib):
    """A NaN logit (hence a NaN lse) makes its bwd row NaN; a target logit of -inf in a finite row gives a finite
    row (target entry ≈ g/τ: the g_H term is 0 there, not 0·-inf), in bwd and in fwd_grad with ent_coef."""
    V = 300
    z = torch.randn(3, V)
    z[0, 123] = float("nan")
    z[1, :] = float("nan")
    z[2, 9] = float("-inf")
    tok = torch.tensor([5, 7, 9])
    ones = torch.ones(3)
    _, lse, ent, _ = run(lib, z, tok, ones, 1.0, 4, 0, True)
    for gh in (None, ones):
        g = run_bwd(lib, z, tok, ones, lse, ent, 1.0, 4, 0, gh=gh)
        assert torch.isnan(g[0]).all() and torch.isnan(g[1]).all()
        assert torch.isfinite(g[2]).all() and abs(g[2, 9].item() - 1.0) < 1e-5  # 1 − p_y = Σ_{v≠y} p_v ≈ 1
    # fwd_grad with ent_coef, the same -inf target: p_y = 0 multiplies a floored t_y, not -inf
    lp, _, _, g1 = run(lib, z[2:], tok[2:], ones[2:], 1.0, 4, 0, True, ent_coef=ones[2:])
    assert lp[0] == float("-inf") and torch.isfinite(g1).all() and abs(g1[0, 9].item() - 1.0) < 1e-5
