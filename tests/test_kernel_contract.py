"""The kernel contract (``grpo_kernels/kernels/__init__.py``), run against every backend available here.

One parametrized suite, so every backend answers the same questions with the same tolerances:

=============== ================================================================================================
``torch``       the eager kernel module (:mod:`grpo_kernels.kernels.eager`), always
``cpu``         the C++ CPU ops (:mod:`grpo_kernels.kernels.native`)
``triton``      the Triton kernels on CPU tensors under the interpreter (``triton_interpret`` fixture): kept to
                small shapes, the interpreter is slow
``cuda``        the CUDA C++ ops (marked ``gpu``: skipped without a CUDA device)
``triton-cuda`` the compiled Triton kernels on CUDA tensors (marked ``gpu``)
=============== ================================================================================================

Test ids read ``<backend>[-<dtype>][-<case>]``, e.g. ``cpu-bf16-confident``; ``-k "triton and not cuda"``
selects the interpreter runs, ``-m gpu`` the CUDA ones. What is specific to one backend (launch configuration,
the interpreter, SIMD variants, the JIT build, sizes only a GPU can run) stays in ``test_triton_kernels.py`` /
``test_cpp_kernels.py``.

The cases: the module exposes the contract; masked rows are never read; ``-inf`` logits; bf16/fp16 error at most
twice the same-dtype eager error against an fp64 truth; a confident target (p ≈ 1) in fp32; determinism;
``out=`` (the logits themselves, strided logits; a NaN-filled buffer in the masked-rows case); ``inplace_backward``
of the public loss;
``check_ids``; ``torch.library.opcheck`` of the gateway ops; a fullgraph ``torch.compile`` trace; the bad-input
table of the public loss.
"""

import dataclasses
import functools
import inspect
import itertools

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import kernels
from grpo_kernels import reference as ref
from grpo_kernels.kernels import ops

from kernel_cases import DTYPE_NAMES, G, S, T, V
from kernel_cases import acc_dtype as _acc
from kernel_cases import confident_rows_case
from kernel_cases import gtol as _gtol
from kernel_cases import keep_mask as _keep
from kernel_cases import make_inputs as _inputs
from kernel_cases import ref_logprobs as _ref_logprobs
from kernel_cases import strided_copy
from kernel_cases import tol as _tol


# ----------------------------------------------------------------------------------------------------------
# The backends and the parametrization
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Backend:
    id: str  # test-id prefix
    name: str  # the backend= value
    device: str  # where its tensors live
    interpreted: bool = False  # Triton under TRITON_INTERPRET=1: small shapes only

    @property
    def marks(self):
        return [pytest.mark.gpu] if self.device == "cuda" else []

    def module(self):
        return kernels.kernel_module(self.name)

    def shape(self, s, t, v):
        """``(s, t, v)``, or under the interpreter a small shape that still has the special rows of
        ``make_inputs`` (for the cases that no per-backend Triton test ran at a larger size before)."""
        return (4, 3, V) if self.interpreted else (s, t, v)


BACKENDS = [
    Backend("torch", "torch", "cpu"),
    Backend("cpu", "cpu", "cpu"),
    Backend("triton", "triton", "cpu", interpreted=True),
    Backend("cuda", "cuda", "cuda"),
    Backend("triton-cuda", "triton", "cuda"),
]


def dtypes(*names):
    by_name = {v: k for k, v in DTYPE_NAMES.items()}
    return [(n, by_name[n]) for n in names]


def cases(*axes, backends=BACKENDS, extra_marks=lambda b: []):
    """pytest params ``(backend, *values)``: every backend × the product of ``axes`` (lists of ``(id, value)``),
    with ids ``<backend>-<id>-...`` and the backend's marks (plus ``extra_marks(backend)``)."""
    out = []
    for b in backends:
        for combo in itertools.product(*axes):
            out.append(pytest.param(b, *[v for _, v in combo], id="-".join([b.id] + [i for i, _ in combo]),
                                    marks=b.marks + extra_marks(b)))
    return out


@pytest.fixture(autouse=True)
def _backend_environment(request, monkeypatch):
    """Triton runs interpreted on CPU tensors (the ``triton_interpret`` fixture) and compiled on CUDA tensors
    (even if the environment asks for the interpreter); every backend must then be available here."""
    callspec = getattr(request.node, "callspec", None)
    b = callspec.params.get("b") if callspec is not None else None
    if b is None:
        return
    if b.name == "triton":
        pytest.importorskip("triton")
        if b.interpreted:
            request.getfixturevalue("triton_interpret")
        else:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = kernels.backend_status(b.name, torch.device(b.device))
    assert ok, f"backend {b.name!r} is not available for {b.device} tensors: {reason}"


def stress(b, fn, monkeypatch=None):
    """Backend-specific settings that push the small cases through the multi-chunk / multi-slice paths: Triton's
    ``block_v=16`` (five chunks of V = 67, a ragged tail) and 7 persistent one-pass programs for 30 rows; the
    eager module's row slices of 7 rows (``ROW_BLOCK``, when ``monkeypatch`` is given)."""
    if b.name == "triton" and b.interpreted:
        return dict(block_v=16, programs=7) if fn == "fwd_grad" else dict(block_v=16)
    if b.name == "torch" and monkeypatch is not None:
        from grpo_kernels.kernels import eager
        monkeypatch.setattr(eager, "ROW_BLOCK", 7)
    return {}


def _oracle_and_kernel(b, z, tok, m, r, kw, *, metrics=False, grad_output=1.0, inplace_backward=False,
                       non_leaf=False, runs=("oracle", "kernel")):
    """``{"oracle": ..., "kernel": ...}`` of ``(loss, logits grad, rewards grad, metrics)``: the autograd oracle
    :func:`grpo_kernels.reference.grpo_loss` and :func:`grpo_kernels.grpo_loss` with backend ``b``."""
    res = {}
    for which in runs:
        leaf = z.detach().clone().requires_grad_(True)
        rr = r.detach().clone().requires_grad_(True)
        logits = leaf * 1 if non_leaf and which == "kernel" else leaf  # non-leaf, as an LM head produces them
        if which == "oracle":
            out = ref.grpo_loss(logits, tok, rr, m, return_metrics=metrics, **kw)
        else:
            out = gk.grpo_loss(logits, tok, rr, m, return_metrics=metrics, backend=b.name,
                               inplace_backward=inplace_backward, **kw)
        loss, met = out if metrics else (out, None)
        (grad_output * loss).backward()
        res[which] = (loss.detach(), leaf.grad, rr.grad, met)
    return res


# ----------------------------------------------------------------------------------------------------------
# The module implements the contract
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", cases())
def test_module_implements_the_contract(b):
    mod = b.module()
    ok, reason = mod.is_available(torch.device(b.device))
    assert ok is True and isinstance(reason, str) and reason
    assert b.name in kernels.available_backends(b.device)
    assert mod.FWD_GRAD is True and ops.supports_one_pass(b.name)
    for fn, has_out in (("logprobs_fwd", False), ("logprobs_bwd", True), ("logprobs_fwd_grad", True)):
        params = inspect.signature(getattr(mod, fn)).parameters
        assert params["check_ids"].default is True, fn
        assert ("out" in params) == has_out and (not has_out or params["out"].default is None), fn


# ----------------------------------------------------------------------------------------------------------
# Masked rows are never read; -inf logits
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,dtype", cases(dtypes("fp32", "bf16")))
def test_masked_rows_are_never_read(b, dtype):
    """NaN in every masked row must not leak anywhere: those rows are skipped, their outputs are 0 and their
    gradient exactly +0 (also when written into a NaN-filled ``out``)."""
    mod = b.module()
    s, t, v = b.shape(S, T, V) if dtype == torch.bfloat16 else (S, T, V)  # (fp32: as the Triton test it replaces)
    z, tok, m, _ = _inputs(dtype, b.device, s=s, t=t, v=v)
    keep = _keep(tok, m)
    zn = z.clone()
    zn[~keep] = float("nan")
    coef = torch.randn(s, t, device=b.device)

    fwd = mod.logprobs_fwd(zn, tok, keep, 1.0, True)
    fwd0 = mod.logprobs_fwd(z, tok, keep, 1.0, True)
    for x, x0 in zip(fwd, fwd0):
        assert x.shape == (s, t) and x.dtype == _acc(dtype) and x.is_contiguous()
        assert torch.equal(x, x0) and torch.isfinite(x).all() and (x[~keep] == 0).all()
    _, lse, ent = fwd

    def check(gr):
        assert gr.shape == z.shape and gr.dtype == dtype
        assert torch.isfinite(gr).all()
        assert (gr[~keep] == 0).all() and not torch.signbit(gr[~keep]).any()  # exactly +0
        assert (gr[keep].abs().sum(-1) > 0).all()

    check(mod.logprobs_bwd(coef, coef, zn, tok, keep, lse, ent, 1.0))
    out = torch.full_like(z, float("nan"))
    logp, lse2, ent2, g = mod.logprobs_fwd_grad(zn, tok, keep, coef, 1.0, True, out=out)
    assert g is out
    check(g)
    for x, x0 in zip((logp, lse2, ent2), fwd0):
        assert torch.equal(x, x0)


@pytest.mark.parametrize("b,dtype", cases(dtypes("fp32", "bf16")))
def test_minus_inf_logits(b, dtype):
    """Rows with ``-inf`` logits (a masked vocabulary: a third of row (0, 0), every other entry of row (1, 2)) give
    finite outputs, a finite gradient and exactly 0 at the ``-inf`` entries, in both paths."""
    mod = b.module()
    s, t, v = b.shape(S, T, V)
    z, tok, m, _ = _inputs(dtype, b.device, s=s, t=t, v=v)
    keep = _keep(tok, m)
    coef = torch.ones(s, t, device=b.device)
    logp, lse, ent, g = mod.logprobs_fwd_grad(z, tok, keep, coef, 0.5, True)
    g2 = mod.logprobs_bwd(coef, coef, z, tok, keep, lse, ent, 0.5)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(lse).all()
    rlp, rent = _ref_logprobs(z, tok, keep, 0.5)
    torch.testing.assert_close(logp, rlp, **_tol(dtype))
    torch.testing.assert_close(ent, rent, **_tol(dtype))
    for gr in (g, g2):
        assert torch.isfinite(gr).all()
        assert (gr[0, 0, : V // 3] == 0).all() and (gr[1, 2, 1::2] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# Accuracy: low precision against an fp64 truth, a confident target in fp32
# ----------------------------------------------------------------------------------------------------------
def _ragged_confident(dtype, device):
    """The ragged inputs, with a row whose target has p_y ≈ 1 − 4e-4 (below bf16's resolution at 1); the relative
    accuracy asked of that target's gradient."""
    z, tok, m, r = _inputs(dtype, device)
    z[4, 1] = z[4, 1].clamp(max=1.0)
    z[4, 1, tok[4, 1]] = 12.0
    return z, tok, m, r, G, [(4, 1)], 2 ** -7


def _confident_rows(dtype, device):
    """V = 1000, a sequence of targets with 1 − p_y ≈ 5e-5; the relative accuracy asked of their gradients."""
    z, tok, m, r = confident_rows_case(device, dtype)
    return z, tok, m, r, 2, [(0, t) for t in range(tok.shape[1])], 2e-2


LOW_PRECISION_INPUTS = [("ragged", _ragged_confident), ("confident", _confident_rows)]


@pytest.mark.parametrize("b,dtype,make", cases(dtypes("bf16"), LOW_PRECISION_INPUTS)
                         + cases(dtypes("fp16"), LOW_PRECISION_INPUTS[:1]))
def test_low_precision_error_at_most_twice_eager(b, dtype, make):
    """Against an fp64 truth on the same bf16/fp16 values, the backend's error is at most 2x the error of the eager
    reference run on the same low-precision tensors: the public loss and its logits gradient, the kernels'
    log-probs and one-pass gradient -- including targets with p_y ≈ 1, where rounding p_y to the logits' dtype
    before forming 1 − p_y would destroy the target's gradient."""
    mod = b.module()
    z, tok, m, r, group, confident, rel_tol = make(dtype, b.device)
    kw = dict(group_size=group, loss_type="softmax")
    res = {}
    for name, logits in (("truth", z.double()), ("eager", z), ("kernel", z)):
        zz = logits.detach().clone().requires_grad_(True)
        if name == "kernel":
            loss = gk.grpo_loss(zz, tok, r, m, backend=b.name, **kw)
        else:  # the autograd oracle, in fp64 (truth) and on the same low-precision values (eager)
            loss = ref.grpo_loss(zz, tok, r, m, **kw)
        loss.backward()
        res[name] = (loss.double(), zz.grad.double())
    lt, gt = res["truth"]
    # the loss is an fp32 number: both paths end in the same fp32 reduction of the log-probs, so a few fp32 ulps
    # of the loss itself are allowed on top of 2x eager's error
    slack = (4 * torch.finfo(torch.float32).eps * lt.abs().item(), 0.0)
    for i in (0, 1):
        err_eager = (res["eager"][i] - res["truth"][i]).abs().max()
        err_kernel = (res["kernel"][i] - res["truth"][i]).abs().max()
        assert err_kernel <= 2 * err_eager + slack[i], (i, err_kernel.item(), err_eager.item())
    # the confident targets carry their tiny gradient (a low-precision p_y would round to 1 and give 0): to
    # ``rel_tol`` for the fused kernels in bf16; the eager module (the oracle's own math, whose error there reaches
    # 2.5%) and fp16 (whose gradient there may underflow) at most 2x the oracle's error at each such entry
    for s, t in confident:
        y = tok[s, t]
        truth = gt[s, t, y]
        assert truth.abs() > 0
        err_kernel = (res["kernel"][1][s, t, y] - truth).abs()
        if b.name != "torch" and dtype == torch.bfloat16:
            assert err_kernel / truth.abs() < rel_tol, (s, t, (err_kernel / truth.abs()).item())
        else:
            assert err_kernel <= 2 * (res["eager"][1][s, t, y] - truth).abs(), (s, t)

    keep = _keep(tok, m)
    # per-token log-probs: at most 2x eager's error, no slack
    lp = mod.logprobs_fwd(z, tok, keep, 1.0, False)[0]
    lp_truth = _ref_logprobs(z.double(), tok, keep, 1.0, entropy=False)
    lp_eager = _ref_logprobs(z, tok, keep, 1.0, entropy=False)
    assert (lp - lp_truth).abs().max() <= 2 * (lp_eager - lp_truth).abs().max()
    # the one-pass gradient of Σ coef·ℓ at τ = 0.8
    coef = torch.randn(tok.shape, device=b.device)
    g = mod.logprobs_fwd_grad(z, tok, keep, coef, 0.8, False)[3]
    z64 = z.double().requires_grad_(True)
    (coef.double() * _ref_logprobs(z64, tok, keep, 0.8, entropy=False)).sum().backward()
    zl = z.clone().requires_grad_(True)
    (coef * _ref_logprobs(zl, tok, keep, 0.8, entropy=False)).sum().backward()
    assert (g.double() - z64.grad).abs().max() <= 2 * (zl.grad.double() - z64.grad).abs().max()


@functools.lru_cache(maxsize=None)
def _confident_fp32(b):
    """fp32 logits where the target of row (4, 1) has p_y = 1 − O(1e-9); the backend's log-probs (one- and
    two-pass) and gradients (one- and two-pass), and the fp64 truth. Cached: two tests read it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        z, tok, m, _ = _inputs(torch.float32)
        coef = torch.randn(S, T)
    z[4, 1] = z[4, 1].clamp(-3, 3)
    z[4, 1, tok[4, 1]] = 25.0
    keep = _keep(tok, m)
    z64 = z.double().requires_grad_(True)
    lp64 = _ref_logprobs(z64, tok, keep, 1.0, entropy=False)
    (coef.double() * lp64).sum().backward()
    d = b.device
    zd, tokd, keepd, coefd = z.to(d), tok.to(d), keep.to(d), coef.to(d)
    mod = b.module()
    lp, _, _, grad = mod.logprobs_fwd_grad(zd, tokd, keepd, coefd, 1.0, False, **stress(b, "fwd_grad"))
    lp_f, lse, ent = mod.logprobs_fwd(zd, tokd, keepd, 1.0, False, **stress(b, "fwd"))
    grad2 = mod.logprobs_bwd(coefd, None, zd, tokd, keepd, lse, ent, 1.0, **stress(b, "bwd"))  # two-pass path
    return (tok[4, 1], lp64.detach(), z64.grad, [lp.cpu(), lp_f.cpu()], [grad.cpu(), grad2.cpu()])


@pytest.mark.parametrize("b", cases())
def test_confident_target_fp32(b):
    """p_y = 1 − O(1e-9) in fp32: log-probs and gradients (one- and two-pass) close to the fp64 truth."""
    y, lp64, g64, lps, grads = _confident_fp32(b)
    assert -1e-7 < lp64[4, 1].item() < 0
    for lp in lps:
        torch.testing.assert_close(lp.double(), lp64, rtol=1e-5, atol=3e-6)
    for g in grads:
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("b", cases())
def test_confident_target_keeps_relative_accuracy_in_fp32(b):
    """log p_y and the target gradient c·(1 − p_y) at p_y = 1 − O(1e-9) keep full relative accuracy, in the forward,
    the one-pass gradient and the two-pass backward alike: computed from the sum over the other classes, never as
    z_y/τ − lse or 1 − exp(ℓ) (both lose every digit of such a 1 − p_y in fp32)."""
    y, lp64, g64, lps, grads = _confident_fp32(b)
    for lp in lps:
        assert abs(lp[4, 1].double() / lp64[4, 1] - 1) < 1e-5
    for g in grads:
        assert abs(g[4, 1, y].double() / g64[4, 1, y] - 1) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", cases())
def test_deterministic(b):
    """Two runs are bit-identical: the kernels (S·T = 128 rows of V = 3001; small under the interpreter) and the
    public loss's two-pass path in bf16."""
    mod = b.module()
    s, t, v = b.shape(8, 16, 3001)
    z, tok, m, _ = _inputs(torch.float32, b.device, s=s, t=t, v=v)
    keep = _keep(tok, m)
    coef = torch.randn(s, t, device=b.device)
    a = mod.logprobs_fwd_grad(z, tok, keep, coef, 0.7, True)
    a2 = mod.logprobs_fwd_grad(z, tok, keep, coef, 0.7, True)
    assert all(torch.equal(x, y) for x, y in zip(a, a2))
    f1 = mod.logprobs_fwd(z, tok, keep, 0.7, True)
    f2 = mod.logprobs_fwd(z, tok, keep, 0.7, True)
    assert all(torch.equal(x, y) for x, y in zip(f1, f2))
    g1 = mod.logprobs_bwd(coef, coef, z, tok, keep, f1[1], f1[2], 0.7)
    g2 = mod.logprobs_bwd(coef, coef, z, tok, keep, f2[1], f2[2], 0.7)
    assert torch.equal(g1, g2)

    z, tok, m, r = _inputs(torch.bfloat16, b.device)
    kw = dict(group_size=G, loss_type="grpo", old_logprobs=-torch.rand(S, T, device=b.device))
    runs = [_oracle_and_kernel(b, z, tok, m, r, kw, runs=("kernel",))["kernel"] for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(runs[0][:3], runs[1][:3]))


# ----------------------------------------------------------------------------------------------------------
# out=: the logits themselves, strided logits; the public inplace_backward
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,dtype", cases(dtypes("fp32", "bf16")))
def test_out_may_be_the_logits_themselves(b, dtype, monkeypatch):
    """``logprobs_bwd`` and ``logprobs_fwd_grad`` write into ``out``: the logits themselves (each row is read
    before it is overwritten) and strided logits (only the ``(S, T, V)`` view changes, the padding around it does
    not); always the same values as into a new buffer. (A separate NaN-filled ``out``: the masked-rows case.)"""
    mod = b.module()
    z, tok, m, _ = _inputs(dtype, b.device)
    keep = _keep(tok, m)
    coef = torch.randn(S, T, device=b.device)
    _, lse, ent = mod.logprobs_fwd(z, tok, keep, 0.9, True)
    knobs = {fn: stress(b, fn, monkeypatch) for fn in ("bwd", "fwd_grad")}
    zr = z.detach().double().requires_grad_(True)
    rlp = _ref_logprobs(zr, tok, keep, 0.9, entropy=False)
    (want_grad,) = torch.autograd.grad((coef.double() * rlp).sum(), zr)  # of both: d/dz Σ coef·ℓ

    def bwd(logits, out):
        return [mod.logprobs_bwd(coef, None, logits, tok, keep, lse, ent, 0.9, out=out, **knobs["bwd"])]

    def fwd_grad(logits, out):
        return list(mod.logprobs_fwd_grad(logits, tok, keep, coef, 0.9, False, out=out, **knobs["fwd_grad"]))

    # bit-exact across layouts only where the reduction order ignores the rows' addresses: on CUDA the vector width
    # of a load may follow the alignment of strided rows, and Triton splits each row at its 16-byte boundary
    exact = b.device == "cpu" and b.name != "triton"
    for run in (bwd, fwd_grad):
        *rows, expected = run(z, None)
        assert expected.shape == z.shape and expected.dtype == dtype and expected.is_contiguous()
        assert (expected[~keep] == 0).all()
        torch.testing.assert_close(expected.double(), want_grad, **_gtol(dtype))
        if rows:
            torch.testing.assert_close(rows[0], rlp.detach().to(rows[0].dtype), **_tol(dtype))
        buf = z.clone()
        *rows_inplace, got = run(buf, buf)
        assert got is buf and torch.equal(buf, expected)
        assert all(torch.equal(x, y) for x, y in zip(rows_inplace, rows))  # each row was read before written
        # strided logits overwritten in place
        zs = strided_copy(z)
        base = zs._base
        *rows_strided, got = run(zs, zs)
        assert got is zs
        for x, y in zip(rows_strided, rows):
            torch.testing.assert_close(x, y, **(dict(rtol=0, atol=0) if exact else _tol(dtype)))
        if exact:
            assert torch.equal(zs, expected)
        else:
            want = run(strided_copy(z), None)[-1]  # the same strided layout, into a new buffer
            assert torch.equal(zs, want)
            torch.testing.assert_close(want.double(), expected.double(), **_gtol(dtype))
        untouched = torch.ones_like(base, dtype=torch.bool)
        untouched.transpose(0, 1)[:, ::2, 2:V + 2] = False
        assert (base[untouched] == 7.0).all()


@pytest.mark.parametrize("b,dtype,old", cases(dtypes("fp32", "bf16"), [("onpolicy", False), ("old", True)]))
def test_inplace_backward_of_the_public_loss(b, dtype, old):
    """``grpo_loss(inplace_backward=True)`` (the gradient is written into the logits' storage: on-policy by the
    one-pass kernel, off-policy by the backward) matches the autograd oracle: loss, metrics, the logits' gradient
    (leaf and non-leaf logits) and the rewards'."""
    # the interpreter runs the case the per-backend Triton test ran (fp32, off-policy) at full size, the others small
    full = not b.interpreted or (old and dtype == torch.float32)
    s, t, v = (S, T, V) if full else b.shape(S, T, V)
    z, tok, m, r = _inputs(dtype, b.device, s=s, t=t, v=v)
    kw = dict(group_size=G if full else 2, loss_type="grpo", temperature=0.9)
    if old:
        kw["old_logprobs"] = torch.randn(s, t, device=b.device) * 0.1 - 4
    # non-leaf logits (as an LM head produces them) everywhere; a leaf too in one case
    for non_leaf in ((True, False) if old and dtype == torch.float32 else (True,)):
        res = _oracle_and_kernel(b, z, tok, m, r, kw, metrics=True, grad_output=3.0, inplace_backward=True,
                                 non_leaf=non_leaf)
        (lo, go, gro, mo), (lk, gk_, grk, mk) = res["oracle"], res["kernel"]
        torch.testing.assert_close(lk, lo, **_tol(dtype))
        torch.testing.assert_close(gk_.double(), go.double(), **_gtol(dtype))
        torch.testing.assert_close(grk, gro, **_tol(dtype))
        assert set(mk) == set(mo)
        for k in mk:
            torch.testing.assert_close(mk[k], mo[k], **_tol(dtype))


# ----------------------------------------------------------------------------------------------------------
# check_ids
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", cases())
def test_check_ids(b):
    """``check_ids=True`` (the default): a ValueError naming the bad id for an id outside [0, V) on an unmasked row,
    from every contract function (the gateway ops: a device-side RuntimeError), before any kernel runs; ids on masked rows are not
    checked (those rows are not read). ``check_ids=False`` with valid ids gives the same results."""
    mod = b.module()
    s, t, v = 4, 3, 7
    z, tok, m, r = _inputs(torch.float32, b.device, s=s, t=t, v=v)
    keep = _keep(tok, m)
    assert (tok[~keep] == -100).any()  # a -100 on a masked row is a valid input
    coef = torch.randn(s, t, device=b.device)
    fwd = mod.logprobs_fwd(z, tok, keep, 0.9, True)
    bwd = mod.logprobs_bwd(coef, coef, z, tok, keep, fwd[1], fwd[2], 0.9)
    fwd_grad = mod.logprobs_fwd_grad(z, tok, keep, coef, 0.9, True)

    # check_ids=False with valid ids: the same results
    same = [(mod.logprobs_fwd(z, tok, keep, 0.9, True, check_ids=False), fwd),
            ((mod.logprobs_bwd(coef, coef, z, tok, keep, fwd[1], fwd[2], 0.9, check_ids=False),), (bwd,)),
            (mod.logprobs_fwd_grad(z, tok, keep, coef, 0.9, True, check_ids=False), fwd_grad),
            (torch.ops.grpo_kernels.logprobs_fwd(z, tok, keep, 0.9, True, b.name, False, False), fwd)]
    for got, want in same:
        assert all(torch.equal(x, y) for x, y in zip(got, want))

    # out-of-range ids on masked rows: accepted with check_ids=True, and not read
    tok_masked = torch.where(keep, tok, torch.full_like(tok, v + 5))
    assert all(torch.equal(x, y) for x, y in zip(mod.logprobs_fwd_grad(z, tok_masked, keep, coef, 0.9, True),
                                                 fwd_grad))
    assert torch.equal(mod.logprobs_bwd(coef, coef, z, tok_masked, keep, fwd[1], fwd[2], 0.9), bwd)

    for bad in (v, v + 1000, -1, -100):
        tb = tok.clone()
        tb[1, 1] = bad
        assert keep[1, 1]
        match = rf"tokens must hold ids in \[0, {v}\).*found {bad}\b"
        calls = [lambda: mod.logprobs_fwd(z, tb, keep, 0.9, True),
                 lambda: mod.logprobs_bwd(coef, coef, z, tb, keep, fwd[1], fwd[2], 0.9),
                 lambda: mod.logprobs_fwd_grad(z, tb, keep, coef, 0.9, True)]
        for call in calls:
            with pytest.raises(ValueError, match=match):
                call()
        # the gateway ops check on the device, without a host sync (torch.compile, CUDA graphs): RuntimeError
        for call in (lambda: torch.ops.grpo_kernels.logprobs_fwd(z, tb, keep, 1.0, False, b.name),
                     lambda: torch.ops.grpo_kernels.logprobs_fwd_grad(z, tb, keep, coef, 1.0, False, b.name)):
            with pytest.raises(RuntimeError, match=rf"tokens must hold ids in \[0, {v}\)"):
                call()
                if b.device != "cpu":
                    torch.cuda.synchronize()
    # the public loss validates the ids itself
    tb = tok.clone()
    tb[1, 1] = v
    with pytest.raises(ValueError, match="tokens must hold ids"):
        gk.grpo_loss(z, tb, r, m, group_size=2, backend=b.name)
    with pytest.raises(ValueError, match="group_size"):
        gk.grpo_loss(z, tok, r, m, group_size=3, backend=b.name)


# ----------------------------------------------------------------------------------------------------------
# torch.library: opcheck of the gateway ops, a fullgraph torch.compile trace
# ----------------------------------------------------------------------------------------------------------
def _opcheck_shapes(b):
    if b.interpreted:
        return [(torch.float32, 2, 2, 7)]
    if b.device == "cuda":
        return [(torch.float32, 4, 4, 19), (torch.bfloat16, 4, 9, 3000)]
    return [(torch.float32, 4, 4, 19)]


@pytest.mark.parametrize("b", cases())
def test_opcheck_gateway_ops(b):
    for dtype, s, t, v in _opcheck_shapes(b):
        z, tok, m, _ = _inputs(dtype, b.device, s=s, t=t, v=v)
        keep = _keep(tok, m)
        torch.library.opcheck(torch.ops.grpo_kernels.logprobs_fwd.default,
                              (z.clone().requires_grad_(True), tok, keep, 0.9, True, b.name))
        torch.library.opcheck(torch.ops.grpo_kernels.logprobs_fwd_grad.default,
                              (z, tok, keep, torch.randn(s, t, device=b.device), 0.9, False, b.name))


@pytest.mark.parametrize("b", cases())
def test_torch_compile_fullgraph(b):
    """``torch.compile(fullgraph=True)`` traces the public loss through the custom ops (two-pass path, metrics):
    on CPU with ``aot_eager`` (no C++ compiler needed), on CUDA with inductor at a larger bf16 size."""
    if b.device == "cuda":
        dtype, (s, t, v), group, compile_backend = torch.bfloat16, (8, 33, 5000), 4, "inductor"
        ltol, gtol, rtol_ = dict(rtol=1e-5, atol=1e-6), _gtol(torch.bfloat16), dict(rtol=1e-5, atol=1e-7)
    else:
        dtype, (s, t, v), group, compile_backend = torch.float32, (S, T, V), G, "aot_eager"
        ltol, gtol, rtol_ = _tol(torch.float32), _gtol(torch.float32), _tol(torch.float32)
    z, tok, m, r = _inputs(dtype, b.device, s=s, t=t, v=v)
    old = -torch.rand(s, t, device=b.device)

    def step(zz, rr):
        loss, met = gk.grpo_loss(zz, tok, rr, m, group_size=group, loss_type="grpo", old_logprobs=old,
                                 temperature=0.7, return_metrics=True, backend=b.name)
        return loss, met["entropy"]

    torch._dynamo.reset()
    zz, rr = z.clone().requires_grad_(True), r.clone().requires_grad_(True)
    loss, ent = torch.compile(step, fullgraph=True, backend=compile_backend)(zz, rr)
    loss.backward()
    z2, r2 = z.clone().requires_grad_(True), r.clone().requires_grad_(True)
    loss2, ent2 = step(z2, r2)
    loss2.backward()
    torch.testing.assert_close(loss, loss2, **ltol)
    torch.testing.assert_close(ent, ent2, **ltol)
    torch.testing.assert_close(zz.grad.double(), z2.grad.double(), **gtol)
    torch.testing.assert_close(rr.grad, r2.grad, **rtol_)


# ----------------------------------------------------------------------------------------------------------
# Bad input to the public loss: the project's table (tests/test_validation.py), with each backend
# ----------------------------------------------------------------------------------------------------------
def _bad_input_table():
    from test_validation import BAD
    return [(name, (over, exc, text)) for name, over, exc, text in BAD if "backend" not in over]


def _call_on(b, over):
    """test_validation's ``_call`` with backend ``b``, its tensors on ``b``'s device (the meta ones stay)."""
    import test_validation as tv

    def dev(x):
        return x.to(b.device) if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x

    a = {k: dev(x) for k, x in tv._args().items()}
    kw = dict(group_size=tv.G, backend=b.name)
    for k, x in over.items():
        (a if k in a else kw)[k] = dev(x)
    return gk.grpo_loss(a["logits"], a["tokens"], a["rewards"], a["mask"], **kw)


@pytest.mark.parametrize("b,row", cases(_bad_input_table()))
def test_bad_input_table(b, row):
    over, exc, text = row
    with pytest.raises(exc, match=text):
        _call_on(b, over)
