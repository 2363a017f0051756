"""Vocabulary-parallel log-probs, entropy, loss and gradients (grpo_kernels.vocab_parallel) on 2 and 3 CPU processes
(gloo) against the unsharded computation on the full logits.

One spawn per world size runs every case (a hard deadline, an explicit destroy_process_group); each case then shows
up as its own test. Oracles: grpo_kernels.reference (autograd on the full logits: fp64 to ≤ 1e-12, fp32 inputs
against the fp64 reference of the same values to ≤ 1e-6, both relative to the tensor's largest entry) and the
unsharded grpo_kernels.fused_linear_grpo_loss for the weight-shard variant."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLDS = (2, 3)
DEADLINE_S = 150
LOSS_TYPES = ("softmax", "grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
S, T, G = 4, 5, 2

CASES = {}


def case(fn):
    CASES[fn.__name__[5:]] = fn
    return fn


# ----------------------------------------------------------------------------------------------------------
# Helpers (run inside the workers)
# ----------------------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, rank, world):
        self.rank, self.world, self.group = rank, world, dist.group.WORLD

    def bounds(self, V):
        c = -(-V // self.world)
        return [(r * c, min(V, (r + 1) * c)) for r in range(self.world)]

    def mine(self, V):
        return self.bounds(V)[self.rank]


def vocab_sizes(world):
    return {2: (11, 12), 3: (13, 7, 12)}[world]


def make_inputs(ctx, seed, V, dtype=torch.float64, *, bounds=None, extreme=True, whole_shard_ninf=True):
    """Full logits (S, T, V) identical on every rank, tokens with a target on every shard, -100 ids, masked
    positions, a confident row, some -inf logits and (W ≥ 2) one row whose last shard is all -inf."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(S, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    tokens = torch.randint(0, V, (S, T), generator=g)
    bounds = bounds or ctx.bounds(V)
    for r, (a, b) in enumerate(bounds):  # a target on every shard (flat rows 0..W-1 are kept)
        tokens.view(-1)[r] = a + (7 * r) % (b - a)
    tokens[1, 2] = -100
    tokens[2, 4] = -100
    mask = torch.ones(S, T)
    mask[3, 3:] = 0
    if extreme:
        logits[0, T - 1, tokens[0, T - 1]] += 25 if dtype == torch.float64 else 15  # confident: p_y ≈ 1
        other = (tokens[1, 0] + 1) % V
        logits[1, 0, other] = float("-inf")  # a masked vocabulary entry
        a, b = bounds[-1]
        if whole_shard_ninf and not (a <= tokens[2, 1] < b):
            logits[2, 1, a:b] = float("-inf")  # a whole shard of -inf for one row
    rewards = torch.randn(S, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return logits, tokens, mask, rewards


def shard_of(ctx, full, V, bounds=None):
    a, b = (bounds or ctx.bounds(V))[ctx.rank]
    return full.detach()[..., a:b].clone().requires_grad_(True), a, b


def check(what, got, want, tol, *, where=None, floor=1e-2):
    """Largest difference relative to the largest |want| (≥ ``floor``), over positions where want is finite."""
    if got is None or want is None:
        assert got is None and want is None, f"{what}: got {got is None and 'None' or 'a tensor'}"
        return
    got = torch.as_tensor(got).detach().to(torch.float64)
    want = torch.as_tensor(want).detach().to(torch.float64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    if where is not None:
        got, want = got[where], want[where]
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), f"{what}: non-finite entries differ\n{got}\n{want}"
    if not fin.any():
        return
    scale = max(want[fin].abs().max().item(), floor)
    err = (got[fin] - want[fin]).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} x {scale:.3e}"


def tol_of(dtype, full=None, temperature=1.0):
    """fp64: 1e-12. fp32: 1e-6, times |lse|/8 beyond |lse| = 8: the cross-shard terms start from the kernels' fp32
    log-sum-exps, rounded to ulp(lse)/2 (1e-6 at |lse| ≈ 16), which the unsharded entropy never forms."""
    if dtype == torch.float64:
        return 1e-12
    if full is None:
        return 1e-6
    lse = torch.logsumexp(full.detach().double() / temperature, -1)
    L = lse[torch.isfinite(lse)].abs().max().item()
    return 1e-6 * max(1.0, L / 8)


def ref_loss(full, tokens, rewards, mask, dtype, **kw):
    """reference.grpo_loss on the full logits in fp64 (fp32 inputs upcast: the exact value of those inputs);
    returns (loss, metrics, grad of the full logits)."""
    from grpo_kernels import reference

    z = full.detach().to(torch.float64).requires_grad_(True)
    conv = {k: (v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in kw.items()}
    loss, metrics = reference.grpo_loss(z, tokens, rewards.to(torch.float64), mask, group_size=G,
                                        return_metrics=True, **conv)
    loss.backward()
    return loss, metrics, z.grad


def data_for(loss_type, logp_ref, mask, tokens, seed):
    """Per loss type: off-policy / KL / engine log-probs and knobs that make the coefficients non-trivial."""
    g = torch.Generator().manual_seed(seed)
    noise = lambda: torch.randn(S, T, generator=g, dtype=torch.float64) * 0.1  # noqa: E731
    lp = logp_ref.detach()
    d = {}
    if loss_type == "softmax":
        d.update(temperature=0.7, entropy_coef=0.1, kl_coef=0.05, ref_logprobs=lp + noise())
    elif loss_type == "grpo":
        d.update(temperature=1.3, old_logprobs=lp + noise(), kl_coef=0.1, ref_logprobs=lp + noise(), epsilon=0.05)
    elif loss_type == "bnpo":
        d.update(entropy_coef=0.05)  # on-policy
    elif loss_type == "dr_grpo":
        d.update(old_logprobs=lp + noise(), max_completion_length=8, temperature=0.9)
    elif loss_type == "dapo":
        d.update(old_logprobs=lp + noise(), num_items_in_batch=7, entropy_coef=0.02)
    elif loss_type == "luspo":
        d.update(old_logprobs=lp + noise(), importance_sampling_level="sequence")
    elif loss_type == "cispo":
        d.update(old_logprobs=lp + noise(), epsilon_high=0.1)
    elif loss_type == "sapo":
        d.update(old_logprobs=lp + noise(), top_entropy_quantile=0.5)
    elif loss_type == "vespo":
        d.update(old_logprobs=lp + noise(), sampling_logprobs=lp + noise(), entropy_coef=0.03,
                 vllm_importance_sampling_mode="token_truncate")
    return d


def logp_reference(full, tokens):
    from grpo_kernels import reference

    return reference.token_logprobs(full.detach().to(torch.float64), tokens)


# ----------------------------------------------------------------------------------------------------------
# Cases: log-probs and entropy
# ----------------------------------------------------------------------------------------------------------
def _logprobs_case(ctx, V, dtype, backend, temperature, with_entropy, seed):
    from grpo_kernels import reference
    from grpo_kernels.vocab_parallel import vocab_parallel_token_logprobs

    # Triton's forward gives lse = NaN (not -inf) for a row of -inf logits: no whole -inf shard row for it
    full, tokens, mask, _ = make_inputs(ctx, seed, V, dtype, whole_shard_ninf=backend != "triton")
    shard, a, b = shard_of(ctx, full, V)
    logp, ent = vocab_parallel_token_logprobs(shard, tokens, mask, temperature, with_entropy, group=ctx.group,
                                              backend=backend)
    keep = (tokens != -100) & (mask != 0)
    z = full.detach().to(torch.float64).requires_grad_(True)
    out = reference.token_logprobs(z, tokens, temperature, return_entropy=with_entropy)
    rl, rh = out if with_entropy else (out, None)
    tol = tol_of(dtype, full, temperature)
    check("logp", logp, rl, tol, where=keep)
    assert bool((logp[~keep] == 0).all())
    if with_entropy:
        check("entropy", ent, rh, tol, where=keep)
        assert bool((ent[~keep] == 0).all())
    else:
        assert ent is None
    g = torch.Generator().manual_seed(seed + 1)
    gl = torch.randn(S, T, generator=g, dtype=torch.float64) * keep
    gh = torch.randn(S, T, generator=g, dtype=torch.float64) * keep
    fin = torch.isfinite(rl)
    gl = torch.where(fin, gl, 0)  # the full -inf row of the reference would make NaN gradients
    obj = (gl * torch.where(fin, rl, 0)).sum() + ((gh * torch.where(torch.isfinite(rh), rh, 0)).sum()
                                                  if with_entropy else 0)
    obj.backward()
    mine = (gl.to(logp.dtype) * torch.where(fin, logp, 0)).sum()
    if with_entropy:
        mine = mine + (gh.to(ent.dtype) * ent).sum()
    mine.backward()
    check("grad", shard.grad, z.grad[..., a:b], tol)
    assert shard.grad.dtype == shard.dtype


@case
def case_logprobs_fp64_cpu(ctx):
    for i, V in enumerate(vocab_sizes(ctx.world)):
        _logprobs_case(ctx, V, torch.float64, "cpu", 1.0, True, 10 + i)
        _logprobs_case(ctx, V, torch.float64, "cpu", 0.7, False, 20 + i)


@case
def case_logprobs_fp64_torch(ctx):
    for i, V in enumerate(vocab_sizes(ctx.world)):
        _logprobs_case(ctx, V, torch.float64, "torch", 1.6, True, 30 + i)
        _logprobs_case(ctx, V, torch.float64, "torch", 1.0, False, 40 + i)


@case
def case_logprobs_fp32_cpu_and_torch(ctx):
    for i, V in enumerate(vocab_sizes(ctx.world)):
        for backend in ("cpu", "torch"):
            _logprobs_case(ctx, V, torch.float32, backend, 0.8, True, 50 + i)


@case
def case_logprobs_triton_interpreter(ctx):
    """Triton derives the target's 1 − p_y from the shard's own row; the local-id rewrite corrects it."""
    V = vocab_sizes(ctx.world)[0]
    _logprobs_case(ctx, V, torch.float64, "triton", 0.9, True, 60)
    _logprobs_case(ctx, V, torch.float32, "triton", 1.0, False, 61)


@case
def case_confident_token_precision(ctx):
    """p_y ≈ 1 − 1e-7 in fp32: ℓ and the target's gradient g·(1 − p_y)/τ to a relative 1e-5 of their own (tiny)
    values -- the owner's local log-prob and log1p of the other shards' relative mass, never z_y/τ − lse."""
    from grpo_kernels import reference
    from grpo_kernels.vocab_parallel import vocab_parallel_token_logprobs

    V = vocab_sizes(ctx.world)[0]
    full, tokens, _, _ = make_inputs(ctx, 65, V, torch.float32, extreme=False)
    full = full * 0.5
    full.scatter_add_(-1, tokens.clamp(min=0).unsqueeze(-1), torch.full((S, T, 1), 18.0))
    keep = tokens != -100
    for backend, tau in (("cpu", 1.0), ("cpu", 1.1), ("triton", 1.0)):
        shard, a, b = shard_of(ctx, full, V)
        logp, _ = vocab_parallel_token_logprobs(shard, tokens, None, tau, False, group=ctx.group, backend=backend)
        z = full.detach().double().requires_grad_(True)
        rl = reference.token_logprobs(z, tokens, tau)
        assert bool((rl[keep] > -1e-4).all()) and bool((rl[keep] < -1e-9).all())  # 1 − p_y in [1e-9, 1e-4]
        rel = ((logp.double() - rl) / rl)[keep].abs().max().item()
        assert rel < 1e-5, f"{backend} tau={tau}: relative error of a confident log-prob {rel:.2e}"
        torch.where(keep, rl, 0).sum().backward()
        logp.sum().backward()
        mine = keep & (tokens >= a) & (tokens < b)
        y = (tokens - a).clamp(0, b - a - 1)
        gy = shard.grad.gather(-1, y.unsqueeze(-1)).squeeze(-1).double()[mine]
        ry = z.grad[..., a:b].gather(-1, y.unsqueeze(-1)).squeeze(-1)[mine]
        if mine.any():
            rel = ((gy - ry) / ry).abs().max().item()
            assert rel < 1e-5, f"{backend} tau={tau}: relative error of the target's 1 − p_y gradient {rel:.2e}"


@case
def case_logprobs_2d_and_strided_shard(ctx):
    """(N, V_r) logits, and a shard that is a strided view of a larger leaf (rows not contiguous)."""
    from grpo_kernels import reference
    from grpo_kernels.vocab_parallel import vocab_parallel_token_logprobs

    V = vocab_sizes(ctx.world)[0]
    full, tokens, mask, _ = make_inputs(ctx, 70, V, extreme=False)
    a, b = ctx.mine(V)
    leaf = full.detach().clone().requires_grad_(True)
    view = leaf[..., a:b]  # unit vocabulary stride, row stride V
    logp, ent = vocab_parallel_token_logprobs(view, tokens, None, 1.0, True, group=ctx.group, backend="cpu")
    (logp.sum() + 0.5 * ent.sum()).backward()
    z = full.detach().clone().requires_grad_(True)
    rl, rh = reference.token_logprobs(z, tokens, 1.0, return_entropy=True)
    (rl.sum() + 0.5 * rh.sum()).backward()
    check("grad (strided)", leaf.grad[..., a:b], z.grad[..., a:b], 1e-12)
    assert bool((leaf.grad[..., :a] == 0).all()) and bool((leaf.grad[..., b:] == 0).all())
    flat = full.detach()[..., a:b].reshape(S * T, b - a).clone()
    lp2, _ = vocab_parallel_token_logprobs(flat, tokens.reshape(-1), group=ctx.group, backend="torch")
    check("logp (2-d)", lp2, rl.reshape(-1), 1e-12, where=tokens.reshape(-1) != -100)


@case
def case_inplace_backward(ctx):
    from grpo_kernels import reference
    from grpo_kernels.vocab_parallel import vocab_parallel_token_logprobs

    V = vocab_sizes(ctx.world)[0]
    full, tokens, mask, _ = make_inputs(ctx, 80, V)
    z = full.detach().clone().requires_grad_(True)
    rl, rh = reference.token_logprobs(z, tokens, 1.2, return_entropy=True)
    keep = (tokens != -100) & (mask != 0) & torch.isfinite(rl)
    (torch.where(keep, rl, 0).sum() - torch.where(keep, rh, 0).sum() * 0.3).backward()
    for backend in ("cpu", "torch"):
        a, b = ctx.mine(V)
        leaf = full.detach()[..., a:b].clone().requires_grad_(True)
        x = leaf * 1.0  # non-leaf logits (as from an LM head), overwritten by the backward
        logp, ent = vocab_parallel_token_logprobs(x, tokens, mask, 1.2, True, group=ctx.group, backend=backend,
                                                  inplace_backward=True)
        v0 = x._version
        (torch.where(keep, logp, 0).sum() - torch.where(keep, ent, 0).sum() * 0.3).backward()
        assert x._version > v0, "the in-place backward must move the version counter"
        check(f"grad in place ({backend})", leaf.grad, z.grad[..., a:b], 1e-12)
        check(f"storage holds the gradient ({backend})", x.detach(), z.grad[..., a:b], 1e-12)


@case
def case_identical_on_every_rank_and_deterministic(ctx):
    from grpo_kernels.vocab_parallel import vocab_parallel_grpo_loss

    V = vocab_sizes(ctx.world)[0]
    full, tokens, mask, rewards = make_inputs(ctx, 90, V, torch.float32)
    outs = []
    for _ in range(2):
        shard, a, b = shard_of(ctx, full, V)
        loss, met = vocab_parallel_grpo_loss(shard, tokens, rewards, mask, group=ctx.group, group_size=G,
                                             loss_type="dapo", entropy_coef=0.1, return_metrics=True, backend="cpu")
        loss.backward()
        outs.append((loss.detach(), met["entropy"], met["logprob"], shard.grad))
    for x, y in zip(*outs):
        assert torch.equal(x, y), "two identical calls must give the same bits"
    vec = torch.stack([outs[0][0].double(), outs[0][1].double(), outs[0][2].double()])
    every = [torch.empty_like(vec) for _ in range(ctx.world)]
    dist.all_gather(every, vec)
    assert all(torch.equal(e, every[0]) for e in every), f"loss/metrics differ between ranks: {every}"


# ----------------------------------------------------------------------------------------------------------
# Cases: the loss family
# ----------------------------------------------------------------------------------------------------------
def _loss_case(ctx, loss_type, V, dtype, backend, seed, bounds=None, starts=False):
    from grpo_kernels.vocab_parallel import vocab_parallel_grpo_loss

    full, tokens, mask, rewards = make_inputs(ctx, seed, V, dtype, bounds=bounds)
    opts = data_for(loss_type, logp_reference(full, tokens), mask, tokens, seed)
    data = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    ref, ref_m, ref_g = ref_loss(full, tokens, rewards, mask, dtype, loss_type=loss_type, **data)
    shard, a, b = shard_of(ctx, full, V, bounds)
    kw = dict(vocab_start_index=a) if starts else {}
    loss, met = vocab_parallel_grpo_loss(shard, tokens, rewards, mask, group=ctx.group, group_size=G,
                                         loss_type=loss_type, return_metrics=True, backend=backend, **kw, **data)
    loss.backward()
    tol = tol_of(dtype, full, data.get("temperature", 1.0))
    tag = f"{loss_type}/{dtype}/{backend}/V={V}"
    # fp32 scalars: the eager fp32 loss rounds on its own (the unsharded fp32 loss alike): relative to max(|x|, 1)
    floor = 1e-2 if dtype == torch.float64 else 1.0
    check(f"{tag} loss", loss, ref, tol, floor=floor)
    assert met.keys() == ref_m.keys(), f"{tag}: metrics {sorted(met)} vs {sorted(ref_m)}"
    for k in ref_m:
        check(f"{tag} metric {k}", met[k], ref_m[k], max(tol, 1e-12), floor=floor)
    check(f"{tag} grad", shard.grad, ref_g[..., a:b], tol)


@case
def case_every_loss_type_fp64_cpu(ctx):
    for i, lt in enumerate(LOSS_TYPES):
        V = vocab_sizes(ctx.world)[i % len(vocab_sizes(ctx.world))]
        _loss_case(ctx, lt, V, torch.float64, "cpu", 100 + i)


@case
def case_every_loss_type_fp64_torch(ctx):
    for i, lt in enumerate(LOSS_TYPES):
        V = vocab_sizes(ctx.world)[(i + 1) % len(vocab_sizes(ctx.world))]
        _loss_case(ctx, lt, V, torch.float64, "torch", 200 + i)


@case
def case_loss_fp32(ctx):
    for i, lt in enumerate(("softmax", "grpo", "dapo", "vespo")):
        for backend in ("cpu", "torch"):
            _loss_case(ctx, lt, vocab_sizes(ctx.world)[0], torch.float32, backend, 300 + i)


@case
def case_loss_composed_from_token_logprobs(ctx):
    """vocab_parallel_token_logprobs, then reference.loss_from_logprobs with LossOptions (the one eager copy)."""
    from grpo_kernels import reference
    from grpo_kernels.options import LossOptions
    from grpo_kernels.vocab_parallel import vocab_parallel_token_logprobs

    V = vocab_sizes(ctx.world)[-1]
    full, tokens, mask, rewards = make_inputs(ctx, 400, V)
    for i, lt in enumerate(LOSS_TYPES):
        o = {k: v for k, v in data_for(lt, logp_reference(full, tokens), mask, tokens, 400 + i).items()}
        data = {k: o.pop(k) for k in list(o) if k in ("old_logprobs", "ref_logprobs", "sampling_logprobs",
                                                      "num_items_in_batch")}
        opts = LossOptions(loss_type=lt, **o)
        ref, _, ref_g = ref_loss(full, tokens, rewards, mask, torch.float64, loss_type=lt, **o, **data)
        shard, a, b = shard_of(ctx, full, V)
        logp, ent = vocab_parallel_token_logprobs(shard, tokens, mask, opts.temperature, True, group=ctx.group,
                                                  backend="cpu")
        m = reference.effective_mask(tokens, mask, torch.float64)
        loss = reference.loss_from_logprobs(logp, m, rewards, opts, group_size=G, entropy=ent, **data)
        loss.backward()
        check(f"{lt} loss", loss, ref, 1e-12)
        check(f"{lt} grad", shard.grad, ref_g[..., a:b], 1e-12)


@case
def case_explicit_vocab_start_index(ctx):
    """Uneven shards in a permuted order (rank 0 holds the top of the vocabulary)."""
    from grpo_kernels.vocab_parallel import shard_bounds

    V = 13
    sizes = {2: [8, 5], 3: [3, 6, 4]}[ctx.world]
    order = list(reversed(range(ctx.world)))  # rank order of the spans from the bottom of the vocabulary
    bounds, pos = [None] * ctx.world, 0
    for r in order:
        bounds[r] = (pos, pos + sizes[r])
        pos += sizes[r]
    a, b = bounds[ctx.rank]
    assert tuple(shard_bounds(ctx.group, b - a, a)) == (a, b, V)
    for i, lt in enumerate(("grpo", "softmax")):
        _loss_case(ctx, lt, V, torch.float64, "cpu", 500 + i, bounds=bounds, starts=True)


# ----------------------------------------------------------------------------------------------------------
# Cases: the fused-linear variant (weight shards) against the unsharded fused_linear_grpo_loss
# ----------------------------------------------------------------------------------------------------------
def _fused_case(ctx, loss_type, V, dtype, backend, seed, *, bias=True, chunk_size=7, extra=None):
    import grpo_kernels
    from grpo_kernels.vocab_parallel import vocab_parallel_fused_linear_grpo_loss

    Hd = 8
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, Hd, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, Hd, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    b_full = (torch.randn(V, generator=g, dtype=torch.float64) * 0.3).to(dtype) if bias else None
    _, tokens, mask, rewards = make_inputs(ctx, seed, V, dtype, extreme=False)
    logits = hidden.double() @ weight.double().t() + (0 if b_full is None else b_full.double())
    data = data_for(loss_type, logp_reference(logits, tokens), mask, tokens, seed)
    data = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
    data.update(extra or {})

    def leaves(*ts):
        return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]

    h0, w0, b0 = leaves(hidden, weight, b_full)
    ref, ref_m = grpo_kernels.fused_linear_grpo_loss(h0, w0, tokens, rewards, mask, group_size=G, bias=b0,
                                                     loss_type=loss_type, return_metrics=True, backend=backend,
                                                     chunk_size=chunk_size, **data)
    ref.backward()
    a, b = ctx.mine(V)
    h1, w1, b1 = leaves(hidden, weight[a:b], None if b_full is None else b_full[a:b])
    loss, met = vocab_parallel_fused_linear_grpo_loss(h1, w1, tokens, rewards, mask, group=ctx.group, group_size=G,
                                                      bias_shard=b1, loss_type=loss_type, return_metrics=True,
                                                      backend=backend, chunk_size=chunk_size, **data)
    loss.backward()
    tol = tol_of(dtype, logits, data.get("temperature", 1.0))
    tag = f"fused {loss_type}/{dtype}/{backend}/V={V}"
    check(f"{tag} loss", loss, ref, tol)
    for k in ref_m:
        check(f"{tag} metric {k}", met[k], ref_m[k], max(tol, 1e-12))
    check(f"{tag} grad_hidden", h1.grad, h0.grad, tol)
    check(f"{tag} grad_weight", w1.grad, w0.grad[a:b], tol)
    if bias:
        check(f"{tag} grad_bias", b1.grad, b0.grad[a:b], tol)


@case
def case_public_api_vocab_parallel_group(ctx):
    """The same through the public entry points: grpo_loss / token_logprobs / fused_linear_grpo_loss and the
    modules with ``vocab_parallel_group=`` (and ``vocab_start_index=``)."""
    import grpo_kernels as gk
    from grpo_kernels import vocab_parallel as vp

    V = vocab_sizes(ctx.world)[0]
    full, tokens, mask, rewards = make_inputs(ctx, 700, V)
    ref, ref_m, ref_g = ref_loss(full, tokens, rewards, mask, torch.float64, loss_type="grpo", entropy_coef=0.05)
    for kw in ({}, {"vocab_start_index": ctx.mine(V)[0]}):
        shard, a, b = shard_of(ctx, full, V)
        loss, met = gk.grpo_loss(shard, tokens, rewards, mask, group_size=G, loss_type="grpo", entropy_coef=0.05,
                                 return_metrics=True, vocab_parallel_group=ctx.group, **kw)
        loss.backward()
        check("grpo_loss loss", loss, ref, 1e-12)
        check("grpo_loss grad", shard.grad, ref_g[..., a:b], 1e-12)
        for k in ref_m:
            check(f"grpo_loss metric {k}", met[k], ref_m[k], 1e-12)
    shard, a, b = shard_of(ctx, full, V)
    crit = gk.GRPOLoss(group_size=G, loss_type="dapo")
    got = crit(shard, tokens, rewards, mask, vocab_parallel_group=ctx.group)
    want, _, _ = ref_loss(full, tokens, rewards, mask, torch.float64, loss_type="dapo")
    check("GRPOLoss", got, want, 1e-12)
    lp, ent = gk.token_logprobs(shard.detach(), tokens, 0.8, True, mask=mask, vocab_parallel_group=ctx.group)
    want_lp, want_ent = vp.vocab_parallel_token_logprobs(shard.detach(), tokens, mask, 0.8, True, group=ctx.group)
    assert torch.equal(lp, want_lp) and torch.equal(ent, want_ent)
    Hd = 6
    g = torch.Generator().manual_seed(701)
    hidden = torch.randn(S, T, Hd, generator=g, dtype=torch.float64)
    weight = torch.randn(V, Hd, generator=g, dtype=torch.float64)
    h0, w0 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    want = gk.fused_linear_grpo_loss(h0, w0, tokens, rewards, mask, group_size=G, loss_type="grpo", chunk_size=5)
    want.backward()
    h1, w1 = hidden.clone().requires_grad_(True), weight[a:b].clone().requires_grad_(True)
    got = gk.fused_linear_grpo_loss(h1, w1, tokens, rewards, mask, group_size=G, loss_type="grpo", chunk_size=5,
                                    vocab_parallel_group=ctx.group)
    got.backward()
    check("fused loss", got, want, 1e-12)
    check("fused grad_hidden", h1.grad, h0.grad, 1e-12)
    check("fused grad_weight", w1.grad, w0.grad[a:b], 1e-12)


@case
def case_fused_linear_fp64(ctx):
    for i, lt in enumerate(("grpo", "softmax", "dapo", "vespo", "bnpo")):
        V = vocab_sizes(ctx.world)[i % len(vocab_sizes(ctx.world))]
        _fused_case(ctx, lt, V, torch.float64, "cpu", 600 + i, bias=i % 2 == 0)
    _fused_case(ctx, "grpo", vocab_sizes(ctx.world)[0], torch.float64, "torch", 610, chunk_size=None)


@case
def case_fused_linear_fp32(ctx):
    for i, lt in enumerate(("sapo", "softmax")):
        _fused_case(ctx, lt, vocab_sizes(ctx.world)[-1], torch.float32, "cpu", 700 + i)


@case
def case_fused_linear_no_grad_and_no_rows(ctx):
    import grpo_kernels
    from grpo_kernels.vocab_parallel import vocab_parallel_fused_linear_grpo_loss

    V = vocab_sizes(ctx.world)[0]
    g = torch.Generator().manual_seed(800)
    hidden = torch.randn(S, T, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(V, 8, generator=g, dtype=torch.float64)
    _, tokens, mask, rewards = make_inputs(ctx, 800, V, extreme=False)
    a, b = ctx.mine(V)
    with torch.no_grad():
        loss = vocab_parallel_fused_linear_grpo_loss(hidden, weight[a:b], tokens, rewards, mask, group=ctx.group,
                                                     group_size=G, loss_type="grpo", backend="cpu")
        ref = grpo_kernels.fused_linear_grpo_loss(hidden, weight, tokens, rewards, mask, group_size=G,
                                                  loss_type="grpo", backend="cpu")
    check("no-grad loss", loss, ref, 1e-12)
    h = hidden.clone().requires_grad_(True)
    none = torch.full_like(tokens, -100)
    loss = vocab_parallel_fused_linear_grpo_loss(h, weight[a:b], none, rewards, None, group=ctx.group,
                                                 group_size=G, loss_type="grpo", backend="cpu")
    loss.backward()
    assert float(loss) == 0.0 and bool((h.grad == 0).all())


@case
def case_bf16_error_like_unsharded(ctx):
    """bf16 shard: the log-probs and gradient are as close to the fp64 truth as the unsharded kernel's."""
    import grpo_kernels
    from grpo_kernels.vocab_parallel import vocab_parallel_grpo_loss

    V = vocab_sizes(ctx.world)[0]
    full, tokens, mask, rewards = make_inputs(ctx, 900, V, torch.bfloat16, extreme=False)
    ref, _, ref_g = ref_loss(full, tokens, rewards, mask, torch.bfloat16, loss_type="grpo", entropy_coef=0.1)
    z = full.detach().clone().requires_grad_(True)
    un = grpo_kernels.grpo_loss(z, tokens, rewards, mask, group_size=G, loss_type="grpo", entropy_coef=0.1,
                                backend="cpu")
    un.backward()
    shard, a, b = shard_of(ctx, full, V)
    loss = vocab_parallel_grpo_loss(shard, tokens, rewards, mask, group=ctx.group, group_size=G, loss_type="grpo",
                                    entropy_coef=0.1, backend="cpu")
    loss.backward()
    e_un = (z.grad[..., a:b].double() - ref_g[..., a:b]).abs().max().item()
    e_vp = (shard.grad.double() - ref_g[..., a:b]).abs().max().item()
    assert e_vp <= 1.5 * e_un + 1e-6, f"bf16 grad error {e_vp:.3e} vs unsharded {e_un:.3e}"
    assert abs(float(loss) - float(ref)) <= 2 * abs(float(un) - float(ref)) + 1e-6


# ----------------------------------------------------------------------------------------------------------
# Cases: bad input -> a clear ValueError on every rank (never a hang)
# ----------------------------------------------------------------------------------------------------------
LENGTHS = (5, 3, 1, 4)  # a packed batch of S = 4 sequences (T = 5 = the longest), N = 13 tokens


def _packed(full, tokens, mask):
    """The packed forms ``(N, ...)`` of padded ``(S, T, ...)`` tensors (the first ``LENGTHS[s]`` positions of each
    sequence) and ``cu_seqlens``; the padded mask with the padding masked out."""
    keep = torch.zeros(S, T, dtype=torch.bool)
    for s, n in enumerate(LENGTHS):
        keep[s, :n] = True
    cu = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), dtype=torch.int32)
    return (lambda x: x[keep]), cu, mask * keep


@case
def case_packed_cu_seqlens(ctx):
    """Packed batches (``cu_seqlens``) with a vocabulary-parallel head: ``grpo_loss`` (logits shards ``(N, V_r)``)
    and ``fused_linear_grpo_loss`` (weight shards, hidden ``(N, H)``) against the reference / the unsharded call on
    the padded form, with per-token old/ref log-probs, KL, the entropy bonus and metrics; cu_seqlens that differ
    between the ranks (same N, S and T) raise on every rank."""
    import grpo_kernels as gk
    from grpo_kernels import vocab_parallel as vp

    V = vocab_sizes(ctx.world)[0]
    full, tokens, mask, rewards = make_inputs(ctx, 1300, V)
    pack, cu, mask_p = _packed(full, tokens, mask)
    lp_ref = logp_reference(full, tokens).detach()
    old = lp_ref + 0.1 * torch.randn(S, T, generator=torch.Generator().manual_seed(1301), dtype=torch.float64)
    kw = dict(loss_type="grpo", kl_coef=0.05, entropy_coef=0.02)
    ref, ref_m, ref_g = ref_loss(full, torch.where(mask_p > 0, tokens, -100), rewards, mask_p, torch.float64,
                                 old_logprobs=old, ref_logprobs=lp_ref, **kw)
    a, b = ctx.mine(V)
    shard = pack(full.detach()[..., a:b]).clone().requires_grad_(True)
    call = dict(group_size=G, cu_seqlens=cu, return_metrics=True, old_logprobs=pack(old), ref_logprobs=pack(lp_ref),
                **kw)
    for public in (True, False):  # grpo_loss(vocab_parallel_group=) and vocab_parallel_grpo_loss(group=)
        shard.grad = None
        if public:
            loss, met = gk.grpo_loss(shard, pack(tokens), rewards, pack(mask), vocab_parallel_group=ctx.group, **call)
        else:
            loss, met = vp.vocab_parallel_grpo_loss(shard, pack(tokens), rewards, pack(mask), group=ctx.group, **call)
        loss.backward()
        check("packed grpo_loss loss", loss, ref, 1e-12)
        check("packed grpo_loss grad", shard.grad, pack(ref_g[..., a:b]), 1e-12)
        for k in ref_m:
            check(f"packed grpo_loss metric {k}", met[k], ref_m[k], 1e-12)
    # the fused-linear loss from weight shards, packed, against the unsharded packed call
    Hd = 6
    g = torch.Generator().manual_seed(1302)
    hidden = torch.randn(S, T, Hd, generator=g, dtype=torch.float64)
    weight = torch.randn(V, Hd, generator=g, dtype=torch.float64)
    for lt in ("dapo", "sapo"):
        h0, w0 = pack(hidden).clone().requires_grad_(True), weight.clone().requires_grad_(True)
        want, want_m = gk.fused_linear_grpo_loss(h0, w0, pack(tokens), rewards, pack(mask), group_size=G,
                                                 loss_type=lt, chunk_size=4, cu_seqlens=cu, entropy_coef=0.01,
                                                 return_metrics=True)
        want.backward()
        h1, w1 = pack(hidden).clone().requires_grad_(True), weight[a:b].clone().requires_grad_(True)
        got, got_m = gk.fused_linear_grpo_loss(h1, w1, pack(tokens), rewards, pack(mask), group_size=G,
                                               loss_type=lt, chunk_size=4, cu_seqlens=cu, entropy_coef=0.01,
                                               return_metrics=True, vocab_parallel_group=ctx.group)
        got.backward()
        check(f"packed fused {lt} loss", got, want, 1e-12)
        check(f"packed fused {lt} grad_hidden", h1.grad, h0.grad, 1e-12)
        check(f"packed fused {lt} grad_weight", w1.grad, w0.grad[a:b], 1e-12)
        for k in want_m:
            check(f"packed fused {lt} metric {k}", got_m[k], want_m[k], 1e-12)
    # the packing differs between the ranks (same N, S, T): every rank raises
    cu2 = cu.clone()
    if ctx.rank == 1:
        cu2[2] -= 1
    raises(ValueError, "cu_seqlens", lambda: gk.grpo_loss(shard.detach(), pack(tokens), rewards, pack(mask),
                                                          group_size=G, cu_seqlens=cu2,
                                                          vocab_parallel_group=ctx.group))
    # a bad cu_seqlens on one rank: the error there, "rejected" elsewhere
    bad = cu.clone()
    if ctx.rank == 0:
        bad[-1] += 1
        raises(ValueError, "cu_seqlens must end", lambda: gk.grpo_loss(shard.detach(), pack(tokens), rewards,
                                                                       group_size=G, cu_seqlens=bad,
                                                                       vocab_parallel_group=ctx.group))
    else:
        raises(ValueError, "rejected", lambda: gk.grpo_loss(shard.detach(), pack(tokens), rewards, group_size=G,
                                                            cu_seqlens=bad, vocab_parallel_group=ctx.group))


def raises(exc, match, fn):
    try:
        fn()
    except exc as e:
        assert match in str(e), f"expected {match!r} in the message, got: {e}"
        return
    raise AssertionError(f"expected {exc.__name__} ({match!r})")


@case
def case_bad_layout(ctx):
    from grpo_kernels.vocab_parallel import shard_bounds, vocab_parallel_token_logprobs

    # valid Megatron layouts, last shard shorter
    for V in vocab_sizes(ctx.world):
        a, b = ctx.mine(V)
        assert tuple(shard_bounds(ctx.group, b - a)) == (a, b, V)
    # not Megatron's layout (the short shard first) and no start index
    V = 13 if ctx.world == 3 else 11
    sizes = list(reversed([b - a for a, b in ctx.bounds(V)]))
    raises(ValueError, "Megatron", lambda: shard_bounds(ctx.group, sizes[ctx.rank]))
    logits = torch.randn(S, T, sizes[ctx.rank], dtype=torch.float64)
    tokens = torch.randint(0, V, (S, T))
    raises(ValueError, "vocab_start_index", lambda: vocab_parallel_token_logprobs(logits, tokens, group=ctx.group))
    # start index on some ranks only
    raises(ValueError, "every rank", lambda: shard_bounds(ctx.group, 4, 0 if ctx.rank == 0 else None))
    # overlapping spans
    raises(ValueError, "tile", lambda: shard_bounds(ctx.group, 4, 0 if ctx.rank < 2 else 4))
    # spans with a gap (nothing starts at 0)
    raises(ValueError, "tile", lambda: shard_bounds(ctx.group, 2, ctx.rank * 2 + 100))
    # an empty shard, or a bad size, on one rank: the error there, a ValueError naming that rank elsewhere
    if ctx.rank == ctx.world - 1:
        raises(ValueError, "V_local", lambda: shard_bounds(ctx.group, 0))
    else:
        raises(ValueError, "rejected", lambda: shard_bounds(ctx.group, 3))


@case
def case_bad_token_ids(ctx):
    from grpo_kernels.vocab_parallel import vocab_parallel_grpo_loss, vocab_parallel_token_logprobs

    V = vocab_sizes(ctx.world)[0]
    full, tokens, mask, rewards = make_inputs(ctx, 1000, V, extreme=False)
    shard, a, b = shard_of(ctx, full, V)
    bad = tokens.clone()
    bad[0, 0] = V  # in no shard
    raises(ValueError, f"[0, {V})", lambda: vocab_parallel_token_logprobs(shard, bad, group=ctx.group))
    raises(ValueError, f"[0, {V})", lambda: vocab_parallel_grpo_loss(shard, bad, rewards, group=ctx.group,
                                                                     group_size=G))
    bad[0, 0] = -5
    raises(ValueError, "-100", lambda: vocab_parallel_token_logprobs(shard, bad, group=ctx.group))
    # an id of another shard (≥ this rank's V_local) is valid
    ok = tokens.clone()
    ok[0, 0] = V - 1
    vocab_parallel_token_logprobs(shard, ok, group=ctx.group)


@case
def case_mismatched_group(ctx):
    from grpo_kernels.vocab_parallel import (shard_bounds, vocab_parallel_grpo_loss,
                                             vocab_parallel_token_logprobs)

    V = vocab_sizes(ctx.world)[0]
    full, tokens, mask, rewards = make_inputs(ctx, 1100, V, extreme=False)
    shard, a, b = shard_of(ctx, full, V)
    other = tokens.clone()
    if ctx.rank == 1:
        other[0, 0] = (other[0, 0] + 1) % V
    raises(ValueError, "tokens (or the mask) differ", lambda: vocab_parallel_token_logprobs(shard, other,
                                                                                            group=ctx.group))
    m2 = mask.clone()
    if ctx.rank == 0:
        m2[0, 0] = 0
    raises(ValueError, "differ", lambda: vocab_parallel_token_logprobs(shard, tokens, m2, group=ctx.group))
    raises(ValueError, "temperature differs",
           lambda: vocab_parallel_token_logprobs(shard, tokens, mask, 1.0 + ctx.rank, group=ctx.group))
    short = slice(0, S - 2 if ctx.rank == 0 else S)
    raises(ValueError, "differs between the ranks",
           lambda: vocab_parallel_token_logprobs(shard[short], tokens[short], group=ctx.group))
    # a local argument error on one rank: TypeError there, ValueError (not a hang) elsewhere
    if ctx.rank == 1:
        raises(TypeError, "integer", lambda: vocab_parallel_token_logprobs(shard, tokens.double(), group=ctx.group))
    else:
        raises(ValueError, "rank(s) [1]", lambda: vocab_parallel_token_logprobs(shard, tokens, group=ctx.group))
    # different functions on the ranks
    if ctx.rank == 0:
        raises(ValueError, "different functions", lambda: vocab_parallel_token_logprobs(shard, tokens,
                                                                                        group=ctx.group))
    else:
        raises(ValueError, "different functions", lambda: vocab_parallel_grpo_loss(shard, tokens, rewards,
                                                                                   group=ctx.group, group_size=G))
    # a group this process is not in
    sub = dist.new_group(list(range(ctx.world - 1)))
    if ctx.rank == ctx.world - 1:
        raises(ValueError, "not a member", lambda: shard_bounds(sub, 3))
        raises(ValueError, "not a member", lambda: vocab_parallel_token_logprobs(shard, tokens, group=sub))
    dist.barrier()
    dist.destroy_process_group(sub)


@case
def case_not_initialized_message(ctx):
    """(Checked in the parent process too: test_needs_initialized_group.)"""
    from grpo_kernels.vocab_parallel import COMM_FLOATS_PER_ROW

    assert COMM_FLOATS_PER_ROW[True] == (2, 3) and COMM_FLOATS_PER_ROW[False] == (2, 2)


CASE_NAMES = list(CASES)


# ----------------------------------------------------------------------------------------------------------
# The spawn
# ----------------------------------------------------------------------------------------------------------
def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      TRITON_INTERPRET="1")
    torch.set_num_threads(1)
    results = {}
    path = os.path.join(out_dir, f"rank{rank}.json")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        ctx = Ctx(rank, world)
        for name in CASE_NAMES:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            try:
                CASES[name](ctx)
                status = "ok"
            except Exception as e:  # noqa: BLE001 - reported by the test of that case
                status = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            results[name] = [status, time.perf_counter() - t0]
            with open(path, "w") as f:
                json.dump(results, f)
            dist.barrier()
    finally:
        with open(path, "w") as f:
            json.dump(results, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULTS = {}


def _run_world(world, tmp_dir):
    if world in _RESULTS:
        return _RESULTS[world]
    out = os.path.join(tmp_dir, f"w{world}")
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    ctx = mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=False)
    deadline = t0 + DEADLINE_S
    error = None
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                error = f"the {world} workers did not finish within {DEADLINE_S} s"
                break
    except Exception as e:  # noqa: BLE001 - a worker died: its results so far still count
        error = f"a worker failed: {e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    per_rank = []
    for r in range(world):
        try:
            with open(os.path.join(out, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
        except (OSError, ValueError):
            per_rank.append({})
    _RESULTS[world] = (per_rank, error, time.monotonic() - t0)
    return _RESULTS[world]


@pytest.fixture(scope="module")
def spawn_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vocab_parallel"))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_vocab_parallel(spawn_dir, world, name):
    per_rank, error, _ = _run_world(world, spawn_dir)
    for r, res in enumerate(per_rank):
        if name not in res:
            pytest.fail(f"rank {r} of {world} did not run {name!r} ({error or 'no result'})")
        status, _ = res[name]
        assert status == "ok", f"rank {r} of {world}: {status}"


def test_needs_initialized_group():
    from grpo_kernels.vocab_parallel import shard_bounds

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(ValueError, match="initialized torch.distributed"):
        shard_bounds(None, 10)


def test_vocab_start_index_needs_a_group():
    import grpo_kernels as gk

    z, tok, r = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)), torch.rand(2)
    for call in (lambda: gk.grpo_loss(z, tok, r, group_size=2, vocab_start_index=0),
                 lambda: gk.token_logprobs(z, tok, vocab_start_index=0),
                 lambda: gk.fused_linear_grpo_loss(torch.randn(2, 3, 4), torch.randn(5, 4), tok, r, group_size=2,
                                                   vocab_start_index=0)):
        with pytest.raises(ValueError, match="vocab_start_index is only used with vocab_parallel_group"):
            call()
