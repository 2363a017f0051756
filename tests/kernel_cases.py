"""Inputs and tolerances shared by the kernel test files (``test_kernel_contract.py``, which runs the kernel
contract against every backend, and the backend-specific ``test_triton_kernels.py``, ``test_cpp_kernels.py``,
which run the same parity matrix against each fused backend).

Small ragged shapes: S=6, G=3, T=5, V=67 (V is not a power of two nor a multiple of any vector width, so
every row has a scalar tail).
"""

import torch

from grpo_kernels import reference as ref

S, T, V, G = 6, 5, 67, 3
LOSS_TYPES = ["softmax", "grpo", "bnpo", "dr_grpo", "dapo"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def acc_dtype(dtype):
    """The kernels' accumulation dtype for ``dtype`` logits (and the dtype of every per-row tensor)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(dtype=torch.float32, device="cpu", *, s=S, t=T, v=V):
    """``(logits, tokens, mask, rewards)``: logits drawn in ``dtype`` on ``device`` (no full-size fp32/fp64
    temporary at real vocabulary sizes) with ``-inf`` entries in two rows (a masked vocabulary), tokens with a
    ``-100``, a mask with a fully masked sequence and a ragged tail (the special entries need s >= 4, t >= 3),
    and rewards in the accumulation dtype."""
    z = torch.randn(s, t, v, dtype=dtype, device=device) * 2
    tok = torch.randint(0, v, (s, t), device=device)
    m = torch.ones(s, t, device=device)
    if s >= 4 and t >= 3:
        z[0, 0, : v // 3] = float("-inf")
        tok[0, 0] = v - 1
        z[1, 2, 1::2] = float("-inf")
        tok[1, 2] = 0
        tok[0, 1] = -100
        m[2] = 0  # a fully masked sequence
        m[3, t // 2 + 1:] = 0
    r = torch.randn(s, dtype=acc_dtype(dtype), device=device)
    return z, tok, m, r


def keep_mask(tok, m):
    """The rows a kernel reads: token not ``-100`` and mask non-zero (bool, contiguous)."""
    return ((tok != -100) & (m != 0)).contiguous()


def ref_logprobs(z, tok, keep, temperature, entropy=True):
    """Reference ``(logp, entropy)`` with masked positions 0, differentiable w.r.t. ``z``."""
    return ref.token_logprobs(z, torch.where(keep, tok, torch.full_like(tok, -100)), temperature,
                              return_entropy=entropy)


def tol(dtype):
    """Log-probs/entropy: fp32 and bf16 rows accumulate in fp32 (the reference too), fp64 in fp64."""
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=3e-6)


def gtol(dtype):
    """Logit gradients: one rounding to the logits' dtype either side."""
    if dtype == torch.float64:
        return dict(rtol=1e-11, atol=1e-13)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=1.6e-2, atol=1e-6)


DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def strided_copy(z, fill=7.0):
    """The values of ``z (S, T, V)`` in a view with unit vocabulary stride but S and T strides that are not the
    contiguous ones (T outer, every other T row, two padding columns either side), inside a base tensor filled
    with ``fill`` (``view._base``: the padding a kernel writing into the view must leave alone)."""
    s, t, v = z.shape
    base = torch.full((2 * t, s, v + 5), fill, dtype=z.dtype, device=z.device)
    view = base.transpose(0, 1)[:, ::2, 2:v + 2]
    view.copy_(z)
    assert view.stride(-1) == 1 and not view.is_contiguous() and view._base is base
    return view


def confident_rows_case(device="cpu", dtype=torch.bfloat16):
    """``(logits, tokens, mask, rewards)`` of shape (4, 8, 1000) in ``dtype`` where every target of sequence 0 has
    p ≈ 1 (1 − p_y ≈ 5e-5: p_y rounded to bf16 would be exactly 1, and a bf16 ``p_y − 1`` would be lost)."""
    s, t, v = 4, 8, 1000
    z64 = torch.randn(s, t, v, dtype=torch.float64) * 2
    tok = torch.randint(0, v, (s, t))
    z64[0] *= 0.25
    z64[0, torch.arange(t), tok[0]] += 17
    z = z64.to(dtype).to(device)
    return z, tok.to(device), torch.ones(s, t, device=device), torch.randn(s, device=device)


def confident_target_rows(device, dtype, temperature, R=48, V=4099, seed=0):
    """fp32 values of ``dtype`` logits whose targets sit 20–40 logits (×τ) above every other class (1 − p_y from
    ~1e-7 down to ~1e-17), -inf entries in one row, one target in the scalar tail; and the fp64 references
    ``log p_y = −log1p(rest)`` and ``1 − p_y = rest/(1 + rest)``, ``rest = Σ_{v≠y} exp((z_v − z_y)/τ)``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, R, V, generator=g, dtype=torch.float64) * 2
    tok = torch.randint(0, V, (1, R), generator=g)
    tok[0, 1] = V - 1
    z[0, 0, : V // 2] = float("-inf")
    tok[0, 0] = V - 3
    gap = 20 + 20 * torch.rand(R, generator=g, dtype=torch.float64)
    z[0, torch.arange(R), tok[0]] = z[0].max(-1).values + gap * temperature
    z = z.to(dtype)
    zd = z.double()
    d = (zd - zd.gather(-1, tok[..., None])) / temperature
    others = d.scatter(-1, tok[..., None], float("-inf"))
    rest = others.exp().sum(-1)
    # allowed relative error: 8 ulps plus the rounding of the exponent argument of the closest class, in log2
    # units |u|·2⁻²⁴ (an fp32 exp(t) of |t| ≈ 20–40 carries it; see tests/test_cuda_rowmath.py)
    bound = 2.0 ** -24 * (8 + others.max(-1).values.abs() * 1.4426950408889634)
    return z.to(device), tok.to(device), -torch.log1p(rest), rest / (1 + rest), bound


def confident_entropy_reference(z, tok, temperature):
    """fp64 ``(H, t_y − mu)`` of rows whose target is the max (as in :func:`confident_target_rows`), summed from
    non-negative parts relative to the target: ``H = log1p(rest) − Σ_{v≠y} e_v t_v / (1 + rest)`` and
    ``t_y − mu = log p_y + H = −Σ_{v≠y} e_v t_v / (1 + rest)``, ``t_v = (z_v − z_y)/τ``, ``e_v = exp(t_v)``
    (``-inf`` entries contribute 0) -- exact where p_y ≈ 1, unlike ``lse − Σ p_v z_v/τ``."""
    zd = z.double().cpu()
    ti = tok.cpu()[..., None]
    t = (zd - zd.gather(-1, ti)) / temperature
    e = t.exp().scatter(-1, ti, 0.0)
    et = torch.where(e > 0, e * t, torch.zeros_like(e))
    rest = e.sum(-1)
    ty_mu = -et.sum(-1) / (1 + rest)
    return torch.log1p(rest) + ty_mu, ty_mu


# ----------------------------------------------------------------------------------------------------------
# Adapters: the reference's loss functions called with the old flat keyword dicts
# ----------------------------------------------------------------------------------------------------------
def split_loss_kwargs(kw):
    """A flat keyword dict of ``grpo_loss`` (loss options mixed with the per-batch arguments) as
    ``(LossOptions, data)``, the two things :func:`grpo_kernels.reference.loss_from_logprobs`,
    :func:`~grpo_kernels.reference.logprob_coefficients` and
    :func:`~grpo_kernels.reference.coefficients_are_constant` take."""
    from grpo_kernels.options import LossOptions

    names = set(LossOptions.names())
    return (LossOptions(**{k: v for k, v in kw.items() if k in names}),
            {k: v for k, v in kw.items() if k not in names})


def loss_from_logprobs(logp, mask, rewards, **kw):
    """:func:`grpo_kernels.reference.loss_from_logprobs` called with a flat keyword dict."""
    call = {k: kw.pop(k) for k in ("return_metrics", "entropy") if k in kw}
    opts, data = split_loss_kwargs(kw)
    return ref.loss_from_logprobs(logp, mask, rewards, opts, **data, **call)


def coefficients_are_constant(**kw):
    opts, data = split_loss_kwargs(kw)
    return ref.coefficients_are_constant(opts, old_logprobs=data.get("old_logprobs"),
                                         ref_logprobs=data.get("ref_logprobs"))


def logprob_coefficients(mask, rewards, at=None, **kw):
    opts, data = split_loss_kwargs(kw)
    return ref.logprob_coefficients(mask, rewards, opts, at=at, **data)
