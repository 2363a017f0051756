"""What is specific to the Triton backend (``grpo_kernels/kernels/triton_impl.py``): availability and the
interpreter, launch configuration (``block_v``, ``num_warps``, persistent ``programs``), parity with the eager
reference and autograd through those knobs and at GPU sizes, vocabularies and row starts at any alignment (the
head / aligned body / tail split of every row), and the one-pass kernel's ``ent_coef``. The persistent grid's
occupancy arithmetic is in ``test_triton_launch.py``. The kernel contract itself (masked rows, ``-inf``,
bf16/fp16 error, p ≈ 1, determinism, ``out=``, ``check_ids``, opcheck, torch.compile, bad input) is checked for
every backend, Triton included, by ``test_kernel_contract.py``.

CPU tests run the kernels under the Triton interpreter (the ``triton_interpret`` fixture sets
``TRITON_INTERPRET=1``), on small ragged shapes (S=6, G=3, T=5, V=67: V is not a power of two, and
``block_v=16`` forces the multi-chunk online reduction). Tests marked ``gpu`` run the compiled kernels at
real sizes (S·T = 8192 with V = 151,936, 151,935 and 262,144; one sequence of 65,536+ tokens) and compare with
the reference in row chunks so that the reference's fp32 temporaries stay small.
"""

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import kernels as backends
from grpo_kernels import reference as ref

from grpo_kernels.kernels import triton_impl as tk

import kernel_cases as KC
from kernel_cases import DTYPES, G, LOSS_TYPES, S, T, V  # noqa: F401 - shared parity matrix
from kernel_cases import acc_dtype as _acc
from kernel_cases import gtol as _gtol
from kernel_cases import keep_mask as _keep
from kernel_cases import make_inputs as _inputs
from kernel_cases import ref_logprobs as _ref_logprobs
from kernel_cases import strided_copy
from kernel_cases import tol as _tol


# ----------------------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------------------
def test_availability_follows_the_interpreter_flag(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = tk.is_available(torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET=1" in reason
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        backends.resolve_backend("triton", "cpu")
    assert tk.is_available(torch.device("meta"))[0] is False
    assert tk.is_available(torch.device("cuda"))[0] == torch.cuda.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, reason = tk.is_available(torch.device("cpu"))
    assert ok and "interpreter" in reason
    assert backends.resolve_backend("triton", "cpu") == "triton"


def test_kernels_are_built_per_interpreter_flag(monkeypatch):
    """triton.jit decides compile-vs-interpret when it decorates; the module decorates lazily, per flag, so
    setting TRITON_INTERPRET after the import works (and the compiled kernels stay available)."""
    from triton.runtime.interpreter import InterpretedFunction
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not any(isinstance(k, InterpretedFunction) for k in tk._kernels())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert all(isinstance(k, InterpretedFunction) for k in tk._kernels())


def test_kernel_loops_avoid_range_with_runtime_bounds():
    """The interpreter of Triton <= 3.6 calls ``int()`` on ``range``'s runtime bounds (1-element arrays), which
    NumPy >= 2.4 rejects (triton-lang/triton#9171): the kernels loop with ``while`` instead. Guards the fix
    on newer Triton too, where the interpreter tests pass either way."""
    import ast
    import inspect
    import textwrap
    kernels = (tk._fwd_kernel, tk._bwd_kernel, tk._fwd_grad_kernel)
    assert kernels == tuple(fn for fn, _ in tk._KERNEL_FNS)
    for fn in kernels + tk._HELPERS:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
        assert not loops, f"{fn.__name__} has a for loop at line {loops[0].lineno}; use while (see module doc)"
        assert fn not in kernels or any(isinstance(n, ast.While) for n in ast.walk(tree))


def test_kernels_call_only_helpers_jitted_with_them(monkeypatch):
    """The kernels call device helpers by name; each kernel set binds those names to the helpers jitted for the
    same interpreter flag, in a namespace of its own (the module's globals keep the plain functions)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    for interpret, kind in ((False, JITFunction), (True, InterpretedFunction)):
        if interpret:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        else:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        for k in tk._kernels():
            namespace = k.fn.__globals__
            assert namespace is not vars(tk)
            assert all(isinstance(namespace[h.__name__], kind) for h in tk._HELPERS)
    assert all(not isinstance(h, (JITFunction, InterpretedFunction)) for h in tk._HELPERS)


# ----------------------------------------------------------------------------------------------------------
# The kernel-module functions, directly
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("block_v", [None, 16])
def test_fwd_and_bwd_match_reference_autograd(triton_interpret, dtype, temperature, block_v):
    z, tok, m, _ = _inputs(dtype)
    keep = _keep(tok, m)
    zs = strided_copy(z) if block_v == 16 else z  # strided S/T dims on half the cases
    lp, lse, ent = tk.logprobs_fwd(zs, tok, keep, temperature, True, block_v=block_v)

    zz = z.clone().requires_grad_(True)
    rlp, rent = _ref_logprobs(zz, tok, keep, temperature)
    torch.testing.assert_close(lp, rlp.detach(), **_tol(dtype))
    torch.testing.assert_close(ent, rent.detach(), **_tol(dtype))
    rlse = torch.logsumexp(z.to(_acc(dtype)) / temperature, -1)
    torch.testing.assert_close(lse[keep], rlse[keep], **_tol(dtype))
    assert (lp[~keep] == 0).all() and (lse[~keep] == 0).all() and (ent[~keep] == 0).all()
    assert lp.dtype == _acc(dtype) and lp.is_contiguous()

    g = torch.randn(S, T, dtype=_acc(dtype))
    gh = torch.randn(S, T, dtype=_acc(dtype))
    ((rlp * g).sum() + (rent * gh).sum()).backward()
    grad = tk.logprobs_bwd(g, gh, zs, tok, keep, lse, ent, temperature, block_v=block_v)
    assert grad.dtype == dtype and grad.is_contiguous()
    torch.testing.assert_close(grad.double(), zz.grad.double(), **_gtol(dtype))
    assert (grad[~keep] == 0).all()
    assert torch.isfinite(grad).all()

    # without an entropy gradient
    zz.grad = None
    rlp, _ = _ref_logprobs(zz, tok, keep, temperature)
    (rlp * g).sum().backward()
    grad = tk.logprobs_bwd(g, None, zs, tok, keep, lse, ent, temperature, block_v=block_v)
    torch.testing.assert_close(grad.double(), zz.grad.double(), **_gtol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fwd_without_entropy_and_fwd_grad(triton_interpret, dtype):
    z, tok, m, _ = _inputs(dtype)
    keep = _keep(tok, m)
    lp, lse, ent = tk.logprobs_fwd(z, tok, keep, 0.8, False)
    assert (ent == 0).all()
    coef = torch.randn(S, T, dtype=_acc(dtype))
    # 4 persistent programs for 30 rows: each program walks several rows, masked and unmasked
    lp2, lse2, ent2, grad = tk.logprobs_fwd_grad(z, tok, keep, coef, 0.8, True, block_v=16, programs=4)
    torch.testing.assert_close(lp2, lp, **_tol(dtype))
    torch.testing.assert_close(lse2, lse, **_tol(dtype))
    zz = z.clone().requires_grad_(True)
    rlp, rent = _ref_logprobs(zz, tok, keep, 0.8)
    torch.testing.assert_close(ent2, rent.detach(), **_tol(dtype))
    (coef * rlp).sum().backward()
    assert grad.dtype == dtype and grad.shape == z.shape and grad.is_contiguous()
    torch.testing.assert_close(grad.double(), zz.grad.double(), **_gtol(dtype))
    assert (grad[~keep] == 0).all()


def test_degenerate_shapes(triton_interpret):
    """Empty batches launch nothing; V = 1 gives log p = 0 and a zero gradient."""
    for shape in ((0, 3, 5), (2, 0, 5)):
        z = torch.randn(shape)
        tok = torch.zeros(shape[:2], dtype=torch.long)
        keep = torch.ones(shape[:2], dtype=torch.bool)
        lp, lse, ent = tk.logprobs_fwd(z, tok, keep, 1.0, True)
        assert lp.shape == shape[:2]
        _, _, _, g = tk.logprobs_fwd_grad(z, tok, keep, torch.ones(shape[:2]), 1.0, True)
        assert g.shape == shape
    z = torch.randn(2, 3, 1)
    tok = torch.zeros(2, 3, dtype=torch.long)
    keep = torch.ones(2, 3, dtype=torch.bool)
    lp, lse, ent = tk.logprobs_fwd(z, tok, keep, 0.5, True)
    assert (lp == 0).all() and (ent == 0).all()
    torch.testing.assert_close(lse, z[..., 0] / 0.5)
    assert (tk.logprobs_fwd_grad(z, tok, keep, torch.ones(2, 3), 0.5, True)[3] == 0).all()
    assert (tk.logprobs_bwd(torch.ones(2, 3), torch.ones(2, 3), z, tok, keep, lse, ent, 0.5) == 0).all()


def test_contract_argument_checks(triton_interpret):
    z, tok, m, _ = _inputs()
    keep = _keep(tok, m)
    with pytest.raises(ValueError, match="unit vocabulary stride"):
        tk.logprobs_fwd(z.transpose(1, 2).contiguous().transpose(1, 2), tok, keep, 1.0, False)
    with pytest.raises(ValueError, match="block_v"):
        tk.logprobs_fwd(z, tok, keep, 1.0, False, block_v=24)
    with pytest.raises(ValueError, match="out"):
        tk.logprobs_fwd_grad(z, tok, keep, torch.ones(S, T), 1.0, False, out=torch.empty(S, T, V + 1))
    with pytest.raises(ValueError, match="coef"):
        tk.logprobs_fwd_grad(z, tok, keep, torch.ones(S), 1.0, False)
    with pytest.raises(ValueError, match="temperature"):
        tk.logprobs_fwd(z, tok, keep, 0.0, False)
    with pytest.raises(ValueError, match="num_warps"):
        tk.logprobs_fwd(z, tok, keep, 1.0, False, num_warps=3)
    with pytest.raises(ValueError, match="programs"):
        tk.logprobs_fwd_grad(z, tok, keep, torch.ones(S, T), 1.0, False, programs=0)
    with pytest.raises(ValueError, match="ent_coef"):
        tk.logprobs_fwd_grad(z, tok, keep, torch.ones(S, T), 1.0, False, ent_coef=torch.ones(S))
    with pytest.raises(ValueError, match="ent_coef"):
        tk.logprobs_fwd_grad(z, tok, keep, torch.ones(S, T), 1.0, False, ent_coef=torch.ones(S, T).double())


# ----------------------------------------------------------------------------------------------------------
# Unaligned vocabularies and row starts: every row is split into a head up to the first 16-byte boundary, an
# aligned body (vector accesses) and a tail. The split follows each row's address: a layout changes the results
# only by rounding (the chunking moves), and the same layout gives the same bits whatever ``out`` is.
# ----------------------------------------------------------------------------------------------------------
def _check_three_kernels(z, tok, keep, temperature, g, gh, block_v=None, out=None):
    """fwd, bwd (with the entropy gradient ``gh``) and fwd_grad (coefficient ``g``) on ``z`` (any view with a unit
    vocabulary stride) against the reference autograd; ``out`` (a factory) gives the gradients' ``out=``.
    Returns the one-pass gradient. For fp32 logits the reference runs in fp64: with an entropy gradient the fp32
    reference's own error (~3e-6 at |grad| ~ 0.6) exceeds the fp32 tolerance on some draws, the kernels' does not."""
    dtype = z.dtype
    lp, lse, ent = tk.logprobs_fwd(z, tok, keep, temperature, True, block_v=block_v)
    zz = z.detach().to(torch.float64 if dtype == torch.float32 else dtype).requires_grad_(True)
    rlp, rent = _ref_logprobs(zz, tok, keep, temperature)
    torch.testing.assert_close(lp.to(rlp.dtype), rlp.detach(), **_tol(dtype))
    torch.testing.assert_close(ent.to(rlp.dtype), rent.detach(), **_tol(dtype))
    g, gh = g.to(rlp.dtype), gh.to(rlp.dtype)
    ((rlp * g).sum() + (rent * gh).sum()).backward()
    grad = tk.logprobs_bwd(g.to(lp.dtype), gh.to(lp.dtype), z, tok, keep, lse, ent, temperature,
                           out=None if out is None else out(z), block_v=block_v)
    torch.testing.assert_close(grad.double(), zz.grad.double(), **_gtol(dtype))
    zz.grad = None
    rlp, _ = _ref_logprobs(zz, tok, keep, temperature)
    (rlp * g).sum().backward()
    lp2, _, _, grad = tk.logprobs_fwd_grad(z, tok, keep, g.to(lp.dtype), temperature, False, block_v=block_v,
                                           out=None if out is None else out(z))
    torch.testing.assert_close(lp2, lp, **_tol(dtype))
    torch.testing.assert_close(grad.double(), zz.grad.double(), **_gtol(dtype))
    assert (grad[~keep] == 0).all() and torch.isfinite(grad).all()
    return grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,block_v", [(1, None), (7, None), (17, 16), (1000, None), (1003, 64)])
def test_odd_vocabularies(triton_interpret, dtype, vocab, block_v):
    """V not a multiple of any vector width (and V = 1, 7: shorter than a vector): heads, bodies and tails of every
    length, one chunk or many, against the reference."""
    s, t = (4, 3) if vocab >= 1000 else (S, T)
    z, tok, m, _ = _inputs(dtype, s=s, t=t, v=vocab)
    g, gh = torch.randn(2, s, t, dtype=_acc(dtype))
    _check_three_kernels(z, tok, _keep(tok, m), 0.8, g, gh, block_v=block_v)


def _untouched(view, fill):
    """Whether the elements of ``view._base`` (contiguous) outside ``view`` still hold ``fill``."""
    base = view._base
    inside = torch.as_strided(torch.arange(base.numel()), view.shape, view.stride(),
                              view.storage_offset() - base.storage_offset())
    outside = torch.ones(base.numel(), dtype=torch.bool)
    outside[inside.reshape(-1)] = False
    return bool((base.reshape(-1)[outside] == fill).all())


def _odd_views(z, fill=7.0):
    """``z``'s values in two views whose rows start at odd offsets, inside bases filled with ``fill``: rows of a
    wider buffer starting one element in (row (s, t) at (s·T + t)·(V + 3) + 1), and a contiguous view one element
    into its storage (its data pointer is not 16-byte aligned)."""
    s, t, v = z.shape
    wide = torch.full((s, t, v + 3), fill, dtype=z.dtype)[..., 1:v + 1]
    shifted = torch.full((s * t * v + 1,), fill, dtype=z.dtype)[1:].view(s, t, v)
    for view in (wide, shifted):
        view.copy_(z)
    return wide, shifted


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_row_starts(triton_interpret, dtype):
    """Logits whose rows start at odd offsets, with gradients into a fresh tensor (rows aligned differently from
    the logits', so ``OUT_ALIGNED`` is off), into a strided view with yet another alignment (its padding
    untouched), and in place into the odd view itself (the same numbers as into a fresh tensor)."""
    v = 61
    z, tok, m, _ = _inputs(dtype, v=v)
    keep = _keep(tok, m)
    g, gh = torch.randn(2, S, T, dtype=_acc(dtype))
    for i, logits in enumerate(_odd_views(z)):
        assert not tk._rows_aligned_alike(torch.empty_like(z), logits)
        expected = _check_three_kernels(logits, tok, keep, 0.7, g, gh, block_v=16)
        outs = []
        got = _check_three_kernels(logits, tok, keep, 0.7, g, gh, block_v=16,
                                   out=lambda zz: outs.append(strided_copy(torch.zeros_like(zz), fill=3.0)) or outs[-1])
        assert torch.equal(got, expected) and all(_untouched(o, 3.0) for o in outs)
        _, lse, ent = tk.logprobs_fwd(logits, tok, keep, 0.7, True, block_v=16)
        expected_bwd = tk.logprobs_bwd(g, gh, logits, tok, keep, lse, ent, 0.7, block_v=16)
        for kernel in ("bwd", "fwd_grad"):
            view = _odd_views(z)[i]  # a fresh copy with the same layout
            if kernel == "bwd":
                res = tk.logprobs_bwd(g, gh, view, tok, keep, lse, ent, 0.7, out=view, block_v=16)
                want = expected_bwd
            else:
                res = tk.logprobs_fwd_grad(view, tok, keep, g, 0.7, False, out=view, block_v=16)[3]
                want = expected
            assert res is view and torch.equal(view, want) and _untouched(view, 7.0)


# ----------------------------------------------------------------------------------------------------------
# The one-pass kernel with an entropy coefficient (``ent_coef``)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fwd_grad_with_ent_coef(triton_interpret, dtype, temperature):
    """``logprobs_fwd_grad(..., ent_coef=g_H)`` writes ``(coef·(1[v=y] − p) − g_H·p·(z/τ − (lse − H)))/τ``: the same
    as this module's two-pass ``logprobs_bwd(coef, g_H)`` and as autograd of ``Σ coef·ℓ + Σ g_H·H`` through the
    reference; H is returned although ``with_entropy`` is False; masked rows are zero, ``-inf`` logits get 0."""
    z, tok, m, _ = _inputs(dtype)
    keep = _keep(tok, m)
    acc = _acc(dtype)
    coef = torch.randn(S, T, dtype=acc)
    ent_coef = torch.randn(S, T, dtype=acc)
    lp, lse, ent = tk.logprobs_fwd(z, tok, keep, temperature, True)
    two_pass = tk.logprobs_bwd(coef, ent_coef, z, tok, keep, lse, ent, temperature)
    zz = z.clone().requires_grad_(True)
    rlp, rent = _ref_logprobs(zz, tok, keep, temperature)
    ((coef * rlp).sum() + (ent_coef * rent).sum()).backward()
    grads = []
    for kw in (dict(), dict(block_v=16, programs=4)):  # one chunk per row; many chunks, persistent programs
        lp2, lse2, ent2, grad = tk.logprobs_fwd_grad(z, tok, keep, coef, temperature, False, ent_coef=ent_coef, **kw)
        torch.testing.assert_close(lp2, lp, **_tol(dtype))
        torch.testing.assert_close(lse2, lse, **_tol(dtype))
        torch.testing.assert_close(ent2, rent.detach(), **_tol(dtype))
        torch.testing.assert_close(grad.double(), two_pass.double(), **_gtol(dtype))
        torch.testing.assert_close(grad.double(), zz.grad.double(), **_gtol(dtype))
        assert (grad[~keep] == 0).all() and torch.isfinite(grad).all()
        assert (grad[0, 0, :V // 3] == 0).all() and (grad[1, 2, 1::2] == 0).all()  # the -inf logits
        grads.append(grad)
    # out= a strided view (its padding untouched), and the logits themselves: the same numbers
    out = strided_copy(torch.zeros_like(z), fill=5.0)
    res = tk.logprobs_fwd_grad(z, tok, keep, coef, temperature, False, out=out, ent_coef=ent_coef)
    assert res[3] is out and torch.equal(out, grads[0]) and _untouched(out, 5.0)
    zc = z.clone()
    res = tk.logprobs_fwd_grad(zc, tok, keep, coef, temperature, False, out=zc, ent_coef=ent_coef, block_v=16)
    assert res[3] is zc and torch.equal(zc, grads[1])
    # ent_coef = 0 is exactly the kernel without the entropy term
    _, _, ent3, g0 = tk.logprobs_fwd_grad(z, tok, keep, coef, temperature, True, ent_coef=torch.zeros_like(coef))
    _, _, ent4, g1 = tk.logprobs_fwd_grad(z, tok, keep, coef, temperature, True)
    assert torch.equal(g0, g1) and torch.equal(ent3, ent4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_confident_targets_keep_entropy_accuracy(triton_interpret, dtype, temperature):
    """Targets with p_y = 1 − (1e-7 … 1e-17) (the target the max): the entropy (tiny, ~(1 − p_y)·|t|) and the
    entropy term of the target's gradient entry, ``−g_H·p_y·(log p_y + H)/τ``, keep their relative accuracy in the
    forward, the one-pass kernel with ``ent_coef`` and the two-pass backward with ``grad_entropy``: H is summed
    relative to the target's logit (``lse − Σ p z`` kept only ~|lse|·6e-8 absolute: all of H was lost here)."""
    z, tok, ref_lp, ref_omp, bound = KC.confident_target_rows("cpu", dtype, temperature, R=24, V=1031)
    R = tok.shape[1]
    keep = torch.ones_like(tok, dtype=torch.bool)
    ref_h, ty_mu = KC.confident_entropy_reference(z, tok, temperature)
    coef = torch.linspace(-2, 2, R)[None]
    ec = torch.linspace(1, -1, R)[None]
    lp, lse, ent = tk.logprobs_fwd(z, tok, keep, temperature, True, block_v=256)
    assert ((lp.double() / ref_lp - 1).abs() <= bound).all()
    assert ((ent.double() / ref_h - 1).abs() <= 4 * bound).all(), ((ent.double() / ref_h - 1).abs() / bound).max()
    # the target entry (coef (1 − p_y) − ent_coef p_y (log p_y + H))/τ, log p_y + H = t_y − mu
    want = (coef.double() * ref_omp - ec.double() * (1 - ref_omp) * ty_mu) / temperature
    tol = 4 * bound + (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24)  # + the rounding to the gradient
    _, _, ent2, g = tk.logprobs_fwd_grad(z, tok, keep, coef, temperature, False, ent_coef=ec, block_v=256)
    assert torch.equal(ent2, ent)
    gy = g.gather(-1, tok[..., None])[..., 0].double()
    assert ((gy / want - 1).abs() <= tol).all(), ((gy / want - 1).abs() / tol).max()
    # two-pass, from the saved fp32 lse and H: log p_y = log1p(−Σ_{v≠y} p_v); each p_v carries the error of the
    # fp32 lse (a factor common to the terms) and of its exponent argument z_v/τ − lse
    zt = z.double() / temperature
    lse_true = torch.logsumexp(zt, -1)
    w = (zt - lse_true[..., None]).exp().scatter(-1, tok[..., None], 0.0)
    arg = torch.where(w > 0, zt.abs() + (zt - lse_true[..., None]).abs(), torch.zeros_like(zt))
    bwd_tol = 2.0 ** -24 * (8 + (w * arg).sum(-1) / w.sum(-1)) + (lse.double() - lse_true).abs() + tol
    g2 = tk.logprobs_bwd(coef, ec, z, tok, keep, lse, ent, temperature, block_v=256)
    gy2 = g2.gather(-1, tok[..., None])[..., 0].double()
    assert ((gy2 / want - 1).abs() <= bwd_tol).all(), ((gy2 / want - 1).abs() / bwd_tol).max()


# ----------------------------------------------------------------------------------------------------------
# The public API with backend="triton" (one-pass and two-pass paths, through the custom ops)
# ----------------------------------------------------------------------------------------------------------
def _loss_and_grads(backend, z, tok, m, r, kw, metrics, grad_output=3.0):
    zz = z.detach().clone().requires_grad_(True)
    rr = r.detach().clone().requires_grad_(True)
    if backend == "torch":  # the autograd oracle
        out = ref.grpo_loss(zz, tok, rr, m, return_metrics=metrics, **kw)
    else:
        out = gk.grpo_loss(zz, tok, rr, m, return_metrics=metrics, backend=backend, **kw)
    loss, met = out if metrics else (out, None)
    (grad_output * loss).backward()  # grad_output != 1: e.g. gradient accumulation
    return loss.detach(), zz.grad, rr.grad, met


# (old/ref log-probs, kl_coef, importance-sampling level): the first and last rows take the one-pass path
# (coefficients constant), the others the two-pass forward + backward kernels.
POLICY_CASES = [
    pytest.param(False, False, 0.0, "token", id="on-policy"),
    pytest.param(True, True, 0.05, "token", id="old+ref-kl"),
    pytest.param(True, False, 0.0, "sequence", id="old-gspo"),
    pytest.param(False, True, 0.0, "sequence", id="ref-nokl-gspo"),
]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("old,refl,kl_coef,level", POLICY_CASES)
def test_grpo_loss_matches_reference(triton_interpret, loss_type, dtype, old, refl, kl_coef, level):
    z, tok, m, r = _inputs(dtype)
    acc = _acc(dtype)
    temperature = 0.7 if dtype == torch.float32 else 1.0
    kw = dict(group_size=G, loss_type=loss_type, temperature=temperature, kl_coef=kl_coef,
              importance_sampling_level=level, epsilon=0.1, epsilon_high=0.3, delta=1.5 if old else None)
    if old:
        kw["old_logprobs"] = (-torch.rand(S, T, dtype=acc) * 3).to(acc)
    if refl:
        kw["ref_logprobs"] = (-torch.rand(S, T, dtype=acc) * 3).to(acc)
    metrics = loss_type != "dapo"
    exp = _loss_and_grads("torch", z, tok, m, r, kw, metrics)
    got = _loss_and_grads("triton", z, tok, m, r, kw, metrics)
    tol = _tol(dtype)
    torch.testing.assert_close(got[0], exp[0], **tol)
    torch.testing.assert_close(got[1].double(), exp[1].double(), **_gtol(dtype))
    torch.testing.assert_close(got[2], exp[2], **tol)
    keep = _keep(tok, m)
    assert (got[1][~keep] == 0).all()
    if metrics:
        assert set(got[3]) == set(exp[3])
        for k in got[3]:
            torch.testing.assert_close(got[3][k], exp[3][k], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_matches_reference(triton_interpret, dtype):
    z, tok, m, _ = _inputs(dtype)
    zz = z.clone().requires_grad_(True)
    lp, ent = gk.token_logprobs(zz, tok, 0.7, True, mask=m, backend="triton")
    w = torch.randn(S, T)
    ((lp * w).sum() + (ent * w.flip(1)).sum()).backward()
    z2 = z.clone().requires_grad_(True)
    rlp, rent = _ref_logprobs(z2, tok, _keep(tok, m), 0.7)
    ((rlp * w).sum() + (rent * w.flip(1)).sum()).backward()
    torch.testing.assert_close(lp, rlp, **_tol(dtype))
    torch.testing.assert_close(ent, rent, **_tol(dtype))
    torch.testing.assert_close(zz.grad.double(), z2.grad.double(), **_gtol(dtype))
    # 2-D input (N, V) with -100 tokens and no mask
    flat = z.reshape(-1, V)
    out = gk.token_logprobs(flat, tok.reshape(-1), backend="triton")
    torch.testing.assert_close(out, ref.token_logprobs(flat, tok.reshape(-1)), **_tol(dtype))


@pytest.mark.parametrize("loss_type,old", [("softmax", False), ("grpo", True)])
def test_fused_linear_with_triton_kernels(triton_interpret, loss_type, old):
    """fused_linear_grpo_loss runs the kernels on (1, chunk, V) slices, in place in the chunk buffer."""
    h = torch.randn(S, T, 8)
    w = torch.randn(V, 8)
    _, tok, m, r = _inputs()
    kw = dict(group_size=G, loss_type=loss_type, chunk_size=7)
    if old:
        kw["old_logprobs"] = -torch.rand(S, T)
    out = {}
    for backend in ("torch", "triton"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = gk.fused_linear_grpo_loss(hh, ww, tok, r, m, backend=backend, **kw)
        loss.backward()
        out[backend] = (loss.detach(), hh.grad, ww.grad)
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradcheck_fp64(triton_interpret):
    """fp64 gradcheck of the two-pass path (off-policy clipped loss with KL: coefficients depend on ℓ),
    w.r.t. logits and rewards, and of token_logprobs through the entropy gradient."""
    s, t, v = 2, 2, 5
    z, tok, m, r = _inputs(torch.float64, s=s, t=t, v=v)
    m[1, 1] = 0
    old = -torch.rand(s, t, dtype=torch.float64)
    refl = -torch.rand(s, t, dtype=torch.float64)

    def loss(zz, rr):
        return gk.grpo_loss(zz, tok, rr, m, group_size=2, loss_type="bnpo", old_logprobs=old, ref_logprobs=refl,
                            kl_coef=0.1, temperature=0.9, epsilon=10.0, backend="triton")

    assert torch.autograd.gradcheck(loss, (z.clone().requires_grad_(True), r.clone().requires_grad_(True)))

    def logprobs(zz):
        return gk.token_logprobs(zz, tok, 1.3, True, mask=m, backend="triton")

    assert torch.autograd.gradcheck(logprobs, (z.clone().requires_grad_(True),))


# ----------------------------------------------------------------------------------------------------------
# GPU: compiled kernels at real sizes
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def compiled(monkeypatch):
    """GPU tests run the compiled kernels even if the environment asks for the interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield


def _chunked_reference(z, tok, keep, temperature, coef, g_ent=None, rows=512):
    """Reference ``(logp, entropy)`` and ``d/dz of Σ coef·ℓ (+ Σ g_ent·H)`` computed ``rows`` rows at a time in
    fp32 (the reference's full-size fp32 temporaries would not fit next to the logits); gradient in z's dtype."""
    s, t, v = z.shape
    zf, tf, kf, cf = z.reshape(-1, v), tok.reshape(-1), keep.reshape(-1), coef.reshape(-1)
    gef = None if g_ent is None else g_ent.reshape(-1)
    lps, ents, grads = [], [], []
    for i in range(0, s * t, rows):
        zc = zf[i:i + rows].detach().clone().requires_grad_(True)
        lp, ent = _ref_logprobs(zc, tf[i:i + rows], kf[i:i + rows], temperature)
        obj = (cf[i:i + rows] * lp).sum()
        if gef is not None:
            obj = obj + (gef[i:i + rows] * ent).sum()
        obj.backward()
        lps.append(lp.detach())
        ents.append(ent.detach())
        grads.append(zc.grad)
    return torch.cat(lps).view(s, t), torch.cat(ents).view(s, t), torch.cat(grads).view(s, t, v)


def _assert_grad_close_chunked(got, exp, rows=512, **tol):
    gf, ef = got.reshape(-1, got.shape[-1]), exp.reshape(-1, exp.shape[-1])
    for i in range(0, gf.shape[0], rows):
        torch.testing.assert_close(gf[i:i + rows].float(), ef[i:i + rows].float(), **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [151_936, 151_935, 262_144])
def test_gpu_parity_at_scale(compiled, vocab):
    """S·T = 8192 rows of bf16 logits (S·T·V > 2^31 for V = 262,144: int64 offsets; V = 151,935: rows at every
    alignment, the row split's vector path on hardware), forward, backward with entropy gradient, and the
    one-pass kernel, against the chunked reference."""
    s, t = 8, 1024
    z, tok, m, _ = _inputs(torch.bfloat16, device="cuda", s=s, t=t, v=vocab)
    keep = _keep(tok, m)
    coef = torch.randn(s, t, device="cuda")
    g_ent = torch.randn(s, t, device="cuda")
    temperature = 0.9
    lp_ref, ent_ref, grad_ref = _chunked_reference(z, tok, keep, temperature, coef, g_ent)
    lp, lse, ent = tk.logprobs_fwd(z, tok, keep, temperature, True)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=2e-4)
    grad = tk.logprobs_bwd(coef, g_ent, z, tok, keep, lse, ent, temperature)
    _assert_grad_close_chunked(grad, grad_ref, rtol=1.6e-2, atol=1e-9)
    del grad, grad_ref
    _, _, grad_ref = _chunked_reference(z, tok, keep, temperature, coef)
    lp2, _, _, grad = tk.logprobs_fwd_grad(z, tok, keep, coef, temperature, False)
    torch.testing.assert_close(lp2, lp, rtol=1e-6, atol=1e-6)  # other chunking: other rounding
    _assert_grad_close_chunked(grad, grad_ref, rtol=1.6e-2, atol=1e-9)
    assert (grad[~keep] == 0).all()
    # in place into the logits
    _, _, _, grad2 = tk.logprobs_fwd_grad(z, tok, keep, coef, temperature, False, out=z)
    assert grad2.data_ptr() == z.data_ptr() and torch.equal(z, grad)


@pytest.mark.gpu
def test_gpu_grpo_loss_at_scale(compiled):
    """The public loss (one-pass and two-pass) at S·T = 8192, V = 151,936 in bf16 against the reference loss
    on chunk-computed log-probs and the chain-rule gradient ``c · (1[v=y] − p)/τ``."""
    s, t, vocab = 16, 512, 151_936
    z, tok, m, r = _inputs(torch.bfloat16, device="cuda", s=s, t=t, v=vocab)
    keep = _keep(tok, m)
    mm = ref.effective_mask(tok, m, torch.float32)
    for kw in (dict(loss_type="softmax"), dict(loss_type="grpo", old_logprobs=-torch.rand(s, t, device="cuda"))):
        lp_ref, _, _ = _chunked_reference(z, tok, keep, 0.8, torch.zeros(s, t, device="cuda"))
        lpr = lp_ref.clone().requires_grad_(True)
        rr_ref = r.clone().requires_grad_(True)
        loss_ref = KC.loss_from_logprobs(lpr, mm, rr_ref, group_size=4, **kw)
        loss_ref.backward()
        _, _, grad_ref = _chunked_reference(z, tok, keep, 0.8, lpr.grad)

        zz = z.clone().requires_grad_(True)
        rr = r.clone().requires_grad_(True)
        loss = gk.grpo_loss(zz, tok, rr, m, group_size=4, temperature=0.8, backend="triton", **kw)
        loss.backward()
        torch.testing.assert_close(loss.detach(), loss_ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rr.grad, rr_ref.grad, rtol=1e-4, atol=1e-6)
        _assert_grad_close_chunked(zz.grad, grad_ref, rtol=1.6e-2, atol=1e-9)
        del zz


@pytest.mark.gpu
def test_gpu_one_long_sequence(compiled):
    """Sequences of 65,543 tokens (T beyond CUDA's 65,535 grid-axis-1 limit), two- and one-pass."""
    t, vocab = 65_543, 257
    z, tok, m, r = _inputs(torch.float32, device="cuda", s=2, t=t, v=vocab)
    m[1, -1000:] = 0
    tok[0, 5] = -100
    for kw in (dict(loss_type="softmax"), dict(loss_type="grpo", old_logprobs=-torch.rand(2, t, device="cuda"))):
        exp = _loss_and_grads("torch", z, tok, m, r, dict(group_size=2, **kw), True)
        got = _loss_and_grads("triton", z, tok, m, r, dict(group_size=2, **kw), True)
        torch.testing.assert_close(got[0], exp[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], exp[1], rtol=1e-5, atol=1e-7)
        for k in exp[3]:
            torch.testing.assert_close(got[3][k], exp[3][k], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_gpu_small_parity_and_determinism(compiled, dtype):
    z, tok, m, r = _inputs(dtype, device="cuda", s=12, t=37, v=1000)
    kw = dict(group_size=4, loss_type="dapo", old_logprobs=-torch.rand(12, 37, device="cuda"),
              ref_logprobs=-torch.rand(12, 37, device="cuda"), kl_coef=0.1, temperature=0.6)
    exp = _loss_and_grads("torch", z, tok, m, r, kw, True)
    a = _loss_and_grads("triton", z, tok, m, r, kw, True)
    b = _loss_and_grads("triton", z, tok, m, r, kw, True)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    gtol = _gtol(dtype) if dtype != torch.float16 else dict(rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(a[0], exp[0], **_tol(dtype))
    torch.testing.assert_close(a[1].double(), exp[1].double(), **gtol)
    torch.testing.assert_close(a[2], exp[2], **_tol(dtype))


@pytest.mark.gpu
def test_gpu_no_recompilation_for_new_sizes_or_temperature(compiled, monkeypatch):
    import triton
    compiles = []
    v = 1024
    z, tok, m, _ = _inputs(torch.bfloat16, device="cuda", s=4, t=64, v=v)
    keep = _keep(tok, m)
    tk.logprobs_fwd(z, tok, keep, 1.0, False)  # warm
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", lambda *a, **k: compiles.append(1))
    for s, t, tau in ((3, 50, 0.7), (1, 7, 1.3), (5, 129, 0.9)):
        z, tok, m, _ = _inputs(torch.bfloat16, device="cuda", s=s, t=t, v=v)
        lp, _, _ = tk.logprobs_fwd(z, tok, _keep(tok, m), tau, False)
        torch.testing.assert_close(lp, _ref_logprobs(z, tok, _keep(tok, m), tau, entropy=False), rtol=1e-5, atol=1e-5)
    assert compiles == []


@pytest.mark.gpu
def test_gpu_backend_auto_picks_triton(compiled, monkeypatch):
    monkeypatch.delenv("GRPO_KERNELS_BACKEND", raising=False)
    assert backends.resolve_backend("auto", "cuda") == "triton"
