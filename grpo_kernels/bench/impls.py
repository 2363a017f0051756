"""One callable per implementation of a benchmark case: the package's backends, the peers, the floors.

:func:`implementations` lists what can run a :class:`~grpo_kernels.bench.cases.Case` here:

* every backend that ``grpo_kernels.available_backends(device)`` reports (the ``torch`` row of the logits ops
  is the eager reference differentiated by autograd, the baseline);
* peers, each only when importable (never installed by the harness): ``torch.compile`` of the eager reference,
  Liger-Kernel (``triton_grpo_loss`` / ``fused_selective_log_softmax`` / ``LigerFusedLinearGRPOLoss``) and TRL's
  eager ``selective_log_softmax``;
* for ``fused_linear``: ``unfused-eager`` (``F.linear`` + the eager reference loss: the baseline),
  ``unfused-<auto backend>`` (``F.linear`` + the fastest logits kernel) and ``gemm-floor`` (the bare matmuls
  of the same shapes: one for ``fwd``, three for ``fwd_bwd``; a floor, not a loss).

Whatever cannot run comes back with a ``skip_reason`` so the report can say why a row is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import reference as _ref
from ..options import LossOptions
from .cases import BACKEND_NAMES, LOGITS_OPS, PEER_NAMES, Case, loss_options_of

Tensor = torch.Tensor

# ----------------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------------
Maker = Callable[[Dict[str, Tensor]], Callable[[], Optional[Tensor]]]


@dataclass
class Impl:
    """One way to run a case: ``make(inputs)`` returns a zero-argument callable doing one call (forward, or
    forward + backward) and returning the detached output (loss or log-probs), or None for floors."""

    name: str
    kind: str  # "backend" | "peer" | "baseline" | "floor"
    make: Optional[Maker] = None
    skip_reason: Optional[str] = None
    note: str = ""
    materializes_logits: bool = True  # for the CPU memory guard
    compiles: bool = False  # the first call compiles (its time says nothing about the call budget)


def _loss_kwargs(case: Case) -> dict:
    return dict(group_size=case.group_size, **loss_options_of(case.loss_type))


def _wrap(case: Case, forward: Callable[[Dict[str, Tensor]], Tensor]) -> Maker:
    """Turn ``forward(inputs) -> loss or logp`` into a maker of fwd / fwd+bwd callables."""
    def make(inputs):
        if case.mode == "fwd":
            def run():
                with torch.no_grad():
                    return forward(inputs)
            return run
        upstream = inputs.get("grad_logp")

        def run_bwd():
            out = forward(inputs)
            out.backward(upstream if upstream is not None and out.dim() > 0 else None)
            return out.detach()
        return run_bwd
    return make


def _backend_impl(case: Case, backend: str) -> Impl:
    import grpo_kernels as gk

    # the baseline row "torch" of the logits ops is the eager reference differentiated by autograd (what a user
    # writes by hand); the fused-linear "torch" row is the chunked path with the eager kernel (backend="torch")
    kind = "baseline" if (backend == "torch" and case.op in LOGITS_OPS) else "backend"
    if case.op == "grpo_loss" and kind == "baseline":
        fwd = lambda i: _ref.grpo_loss(i["logits"], i["tokens"], i["rewards"], **_loss_kwargs(case))  # noqa: E731
    elif case.op == "grpo_loss":
        fwd = lambda i: gk.grpo_loss(i["logits"], i["tokens"], i["rewards"], backend=backend, **_loss_kwargs(case))  # noqa: E731
    elif case.op == "token_logprobs" and kind == "baseline":
        fwd = lambda i: _ref.token_logprobs(i["logits"], i["tokens"])  # noqa: E731
    elif case.op == "token_logprobs":
        fwd = lambda i: gk.token_logprobs(i["logits"], i["tokens"], backend=backend)  # noqa: E731
    else:
        fwd = lambda i: gk.fused_linear_grpo_loss(i["hidden"], i["weight"], i["tokens"], i["rewards"],  # noqa: E731
                                                  backend=backend, **_loss_kwargs(case))
    return Impl(backend, kind, _wrap(case, fwd), materializes_logits=(backend == "torch" and case.op in LOGITS_OPS))


def _compile_impl(case: Case, device: torch.device) -> Impl:
    name = "torch.compile"
    if case.op == "fused_linear":
        return Impl(name, "peer", skip_reason="not run for fused_linear (compiling the unfused path materializes "
                                             "the logits like the eager baseline)")
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return Impl(name, "peer", skip_reason="torch.compile on CPU needs a C++ compiler; none found")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return Impl(name, "peer", skip_reason="torch.compile on CUDA needs triton; not installed")
    if case.op == "grpo_loss":
        kw = _loss_kwargs(case)

        def f(logits, tokens, rewards):
            return _ref.grpo_loss(logits, tokens, rewards, **kw)
    else:
        def f(logits, tokens, rewards):
            return _ref.token_logprobs(logits, tokens)

    def fwd_factory():
        torch._dynamo.reset()  # fresh caches per case: never hit the recompile limit and fall back to eager
        compiled = torch.compile(f)
        return lambda i: compiled(i["logits"], i["tokens"], i["rewards"])

    def make(inputs):
        return _wrap(case, fwd_factory())(inputs)
    return Impl(name, "peer", make, note="torch.compile(reference), default mode; compile time excluded (warm-up)",
                compiles=True)


def _liger_impl(case: Case, device: torch.device) -> Impl:
    name = "liger"
    if importlib.util.find_spec("liger_kernel") is None:
        return Impl(name, "peer", skip_reason="Liger-Kernel is not installed")
    if case.op != "token_logprobs" and case.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
        return Impl(name, "peer", skip_reason=f"no Liger adapter for {case.loss_type!r} here (grpo, bnpo, dr_grpo, "
                                              "dapo only)")
    kw = _loss_kwargs(case)
    if case.op == "fused_linear":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except Exception as e:  # noqa: BLE001
            return Impl(name, "peer", skip_reason=f"cannot import LigerFusedLinearGRPOLoss: {e}")
        mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type=kw["loss_type"],
                                       compiled=device.type == "cuda")

        def fwd(i):
            adv = _ref.group_advantages(i["rewards"], kw["group_size"])
            ones = torch.ones_like(i["tokens"])
            out = mod(_input=i["hidden"], lin_weight=i["weight"], selected_token_ids=i["tokens"],
                      attention_mask=ones, advantages=adv)
            return out[0] if isinstance(out, tuple) else out
        return Impl(name, "peer", _wrap(case, fwd), note="LigerFusedLinearGRPOLoss", materializes_logits=False,
                    compiles=device.type == "cuda")
    if device.type != "cuda":
        return Impl(name, "peer", skip_reason="Liger's triton kernels run on CUDA only")
    # Liger's kernels take logits of shape (B, L+1, V) (the last position is ignored): give them their own copy.
    if case.op == "token_logprobs":
        if case.mode != "fwd":
            return Impl(name, "peer", skip_reason="Liger's fused_selective_log_softmax has no backward")
        try:
            from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
        except Exception as e:  # noqa: BLE001
            return Impl(name, "peer", skip_reason=f"cannot import fused_selective_log_softmax: {e}")

        def make(inputs):
            padded = _padded_logits(inputs)

            def run():
                with torch.no_grad():
                    return fused_selective_log_softmax(padded, inputs["tokens"], 1.0)
            return run
        return Impl(name, "peer", make, note="fused_selective_log_softmax on (S, T+1, V) logits", materializes_logits=False)
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as e:  # noqa: BLE001
        return Impl(name, "peer", skip_reason=f"cannot import triton_grpo_loss: {e}")

    def make(inputs):
        padded = _padded_logits(inputs)
        adv = _ref.group_advantages(inputs["rewards"], kw["group_size"])
        tok = inputs["tokens"]

        def fwd(_i):
            out = triton_grpo_loss(padded, None, None, tok, adv, None, temperature=1.0, beta=0.0, eps_low=0.2,
                                   eps_high=0.2, inplace=False)
            per_tok = out[0] if isinstance(out, tuple) else out
            return per_tok.mean(-1).mean() if per_tok.dim() > 0 else per_tok  # grpo aggregation, all tokens valid
        inner = _wrap(case, fwd)({"logits": padded, "tokens": tok})
        return inner
    return Impl(name, "peer", make, note="triton_grpo_loss on (S, T+1, V) logits, inplace=False",
                materializes_logits=False)


def _padded_logits(inputs: Dict[str, Tensor]) -> Tensor:
    """An ``(S, T+1, V)`` copy of the logits, kept in ``inputs`` (key ``_padded``) so that its ``.grad`` is
    cleared between calls and the copy is dropped after the row."""
    lg = inputs["logits"]
    S, T, V = lg.shape
    padded = torch.zeros(S, T + 1, V, dtype=lg.dtype, device=lg.device)
    padded[:, :T].copy_(lg.detach())
    inputs["_padded"] = padded.requires_grad_(lg.requires_grad)
    return inputs["_padded"]


def _trl_impl(case: Case) -> Impl:
    name = "trl"
    if case.op == "fused_linear":
        return Impl(name, "peer", skip_reason="TRL has no fused-linear path")
    if importlib.util.find_spec("trl") is None:
        return Impl(name, "peer", skip_reason="TRL is not installed")
    try:
        from trl.trainer.utils import selective_log_softmax
    except Exception as e:  # noqa: BLE001
        return Impl(name, "peer", skip_reason=f"cannot import trl.trainer.utils.selective_log_softmax: {e}")
    if case.op == "token_logprobs":
        fwd = lambda i: selective_log_softmax(i["logits"], i["tokens"])  # noqa: E731
    else:
        opts = LossOptions(**loss_options_of(case.loss_type))
        from trl.trainer.utils import entropy_from_logits

        def fwd(i):
            logp = selective_log_softmax(i["logits"], i["tokens"]).float()
            ent = entropy_from_logits(i["logits"]).float() if opts.needs_entropy else None  # TRL's second pass
            m = _ref.effective_mask(i["tokens"], None, logp.dtype)
            return _ref.loss_from_logprobs(logp, m, i["rewards"], opts, group_size=case.group_size, entropy=ent)
    return Impl(name, "peer", _wrap(case, fwd), note="TRL selective_log_softmax + reference loss_from_logprobs")


def _fused_linear_others(case: Case, device: torch.device, auto: str) -> List[Impl]:
    kw = _loss_kwargs(case)
    import grpo_kernels as gk

    def unfused(backend):
        def fwd(i):
            logits = F.linear(i["hidden"], i["weight"])
            if backend == "torch":
                return _ref.grpo_loss(logits, i["tokens"], i["rewards"], **kw)
            return gk.grpo_loss(logits, i["tokens"], i["rewards"], backend=backend, **kw)
        return _wrap(case, fwd)

    out = [Impl("unfused-eager", "baseline", unfused("torch"), note="F.linear + reference.grpo_loss")]
    if auto != "torch":
        out.append(Impl("unfused-auto", "peer", unfused(auto), note=f"F.linear + grpo_loss(backend={auto!r})"))
    else:
        out.append(Impl("unfused-auto", "peer", skip_reason="no fused logits backend here (auto = torch)"))

    def floor(inputs):
        h, w = inputs["hidden"].detach(), inputs["weight"].detach()
        h2 = h.reshape(-1, h.shape[-1])
        buf = torch.empty(h2.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
        gh, gw = torch.empty_like(h2), torch.empty_like(w)

        def run():
            torch.matmul(h2, w.t(), out=buf)
            if case.mode == "fwd_bwd":
                torch.matmul(buf, w, out=gh)
                torch.matmul(buf.t(), h2, out=gw)
            return None
        return run
    out.append(Impl("gemm-floor", "floor", floor, note="bare matmuls of the same shapes into preallocated outputs "
                                                     "(1 fwd, 3 fwd_bwd); a floor, not a loss"))
    return out


def implementations(case: Case, device, *, include: Optional[Sequence[str]] = None) -> List[Impl]:
    """Everything that could run ``case`` on ``device``, baseline first; ``include`` restricts the names."""
    import grpo_kernels as gk

    device = torch.device(device)
    avail = gk.available_backends(device)
    impls: List[Impl] = []
    if case.op == "fused_linear":
        auto = next((b for b in avail if b != "torch"), "torch")
        impls += _fused_linear_others(case, device, auto)
    for b in ("torch",) + tuple(b for b in BACKEND_NAMES if b != "torch"):
        if b in avail:
            impls.append(_backend_impl(case, b))
        else:
            ok, why = _backend_status(b, device)
            impls.append(Impl(b, "backend", skip_reason=f"backend unavailable: {why}"))
    if case.with_peers:
        impls += [_compile_impl(case, device), _liger_impl(case, device), _trl_impl(case)]
    else:
        impls += [Impl(p, "peer", skip_reason="peers run on the main cases only (this case is part of the V sweep)")
                  for p in PEER_NAMES]
    if include:
        impls = [i for i in impls if i.name in include]
    return impls


def _backend_status(name: str, device: torch.device) -> Tuple[bool, str]:
    from ..kernels import backend_status

    return backend_status(name, device)
