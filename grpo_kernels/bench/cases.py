"""Benchmark cases, their inputs, and one callable per implementation (backends, peers, floors).

A :class:`Case` is one op (``grpo_loss``, ``token_logprobs`` or ``fused_linear``) in one mode (``fwd`` or
``fwd_bwd``) at one shape, dtype and loss type. :func:`implementations` lists what can run it here:

* every backend that ``grpo_kernels.available_backends(device)`` reports (``torch`` is the eager reference
  and the baseline of the logits ops);
* peers, each only when importable (never installed by the harness): ``torch.compile`` of the eager reference,
  Liger-Kernel (``triton_grpo_loss`` / ``fused_selective_log_softmax`` / ``LigerFusedLinearGRPOLoss``) and TRL's
  eager ``selective_log_softmax``;
* for ``fused_linear``: ``unfused-eager`` (``F.linear`` + the eager reference loss: the baseline),
  ``unfused-<auto backend>`` (``F.linear`` + the fastest logits kernel) and ``gemm-floor`` (the bare matmuls
  of the same shapes: one for ``fwd``, three for ``fwd_bwd``; a floor, not a loss).

Whatever cannot run comes back with a ``skip_reason`` so the report can say why a row is missing.
:func:`measure` times one implementation on one case and returns a result row.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import reference as _ref
from .. import validation as _v
from ..options import CLIPPED_LOSS_TYPES, LOSS_TYPES
from . import harness as _h

Tensor = torch.Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64", "half": "float16",
                 "float": "float32", "double": "float64"}
LOGITS_OPS = ("grpo_loss", "token_logprobs")
BASELINE = {"grpo_loss": "torch", "token_logprobs": "torch", "fused_linear": "unfused-eager"}
BACKEND_NAMES = ("torch", "cpu", "triton", "cuda")
PEER_NAMES = ("torch.compile", "liger", "trl")
OTHER_NAMES = ("unfused-eager", "unfused-auto", "gemm-floor")
IMPL_NAMES = BACKEND_NAMES + PEER_NAMES + OTHER_NAMES
NO_LOSS = "-"  # loss_type of token_logprobs cases


@dataclass(frozen=True)
class Case:
    """One benchmark case. ``H`` is set for ``fused_linear`` only; ``S`` must be a multiple of ``group_size``.
    ``with_peers=False`` runs the package's own backends only (and the baseline)."""

    op: str
    mode: str
    S: int
    T: int
    V: int
    dtype: str = "float32"
    loss_type: str = "softmax"
    H: Optional[int] = None
    group_size: int = 4
    with_peers: bool = True  # False: backends only (the curated V sweep, to keep the run short)

    @property
    def shape(self) -> str:
        dims = (self.S, self.T, self.H, self.V) if self.op == "fused_linear" else (self.S, self.T, self.V)
        return "x".join(str(d) for d in dims)

    @property
    def tokens(self) -> int:
        return self.S * self.T

    @property
    def elt(self) -> int:
        return _h.dtype_size(self.dtype)

    @property
    def key(self) -> Tuple[str, str, str, str, str]:
        return (self.op, self.mode, self.shape, self.dtype, self.loss_type)

    @property
    def label(self) -> str:
        loss = "" if self.op == "token_logprobs" else f" {self.loss_type}"
        return f"{self.op} {self.mode} {self.shape} {self.dtype}{loss}"

    def ideal_bytes(self) -> int:
        return _h.ideal_bytes(self.op, self.mode, S=self.S, T=self.T, V=self.V, elt=self.elt, H=self.H)

    def ideal_flops(self) -> Optional[int]:
        return _h.ideal_flops(self.op, self.mode, S=self.S, T=self.T, V=self.V, H=self.H)

    def logits_bytes(self) -> int:
        return _h.logits_bytes(self.S, self.T, self.V, self.elt)


# ----------------------------------------------------------------------------------------------------------
# Parsing and the curated sets
# ----------------------------------------------------------------------------------------------------------
def parse_dtype(name: str) -> str:
    """Canonical dtype name (``"bf16"`` -> ``"bfloat16"``); ValueError naming ``--dtypes`` otherwise."""
    n = DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if n not in DTYPES:
        raise ValueError(f"--dtypes: unknown dtype {name!r}; choose from {', '.join(DTYPES)} "
                         f"(or {', '.join(DTYPE_ALIASES)})")
    return n


def parse_shape(text: str) -> Tuple[int, ...]:
    """``"SxTxV"`` (logits ops) or ``"SxTxHxV"`` (fused linear) -> a tuple of positive ints."""
    parts = text.lower().replace(",", "x").replace(":", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--shapes: cannot parse {text!r}; use SxTxV (e.g. 16x256x32000) or SxTxHxV for "
                         "fused_linear (e.g. 32x512x256x32000)") from None
    if len(dims) not in (3, 4) or min(dims) < 1:
        raise ValueError(f"--shapes: {text!r} must be 3 (SxTxV) or 4 (SxTxHxV) positive integers")
    return dims


def parse_loss_type(name: str) -> str:
    if name not in LOSS_TYPES:
        raise ValueError(f"--loss-types: unknown loss type {name!r}; choose from {', '.join(LOSS_TYPES)}")
    return name


def default_dtype(device: torch.device) -> str:
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def curated_cases(device, quick: bool = False) -> List[Case]:
    """The default case list of ``grpo-kernels bench`` for ``device`` (``quick``: tiny shapes, seconds)."""
    C = Case
    if quick:
        dt = default_dtype(device)
        return [C("grpo_loss", "fwd", 8, 64, 4000, dt), C("grpo_loss", "fwd_bwd", 8, 64, 4000, dt),
                C("grpo_loss", "fwd_bwd", 8, 64, 4000, dt, "grpo"), C("token_logprobs", "fwd", 8, 64, 4000, dt, NO_LOSS),
                C("fused_linear", "fwd_bwd", 8, 64, 4000, dt, H=64)]
    if torch.device(device).type == "cuda":
        out = []
        for V in (32000, 151936, 262144):  # 8,192 tokens
            out += [C("grpo_loss", "fwd", 16, 512, V, "bfloat16"), C("grpo_loss", "fwd_bwd", 16, 512, V, "bfloat16"),
                    C("grpo_loss", "fwd_bwd", 16, 512, V, "bfloat16", "grpo"),
                    C("token_logprobs", "fwd", 16, 512, V, "bfloat16", NO_LOSS)]
        for V in (32000, 151936, 262144):
            out += [C("fused_linear", "fwd_bwd", 16, 512, V, "bfloat16", "grpo", H=4096)]
        out += [C("fused_linear", "fwd_bwd", 16, 512, 151936, "bfloat16", "softmax", H=4096),
                C("fused_linear", "fwd", 16, 512, 151936, "bfloat16", "grpo", H=4096)]
        return out
    # CPU: the issue-4 target shape (S=16, T=256, V=32,000 fp32 softmax fwd+bwd), bf16, a clipped loss type,
    # two more vocabularies for the time-vs-V plot (backends only), log-probs alone, and the issue-5
    # fused-linear shape.
    return [C("grpo_loss", "fwd_bwd", 16, 256, 32000, "float32"),
            C("grpo_loss", "fwd", 16, 256, 32000, "float32"),
            C("grpo_loss", "fwd_bwd", 16, 256, 32000, "bfloat16"),
            C("grpo_loss", "fwd_bwd", 16, 256, 32000, "float32", "grpo"),
            C("grpo_loss", "fwd_bwd", 16, 256, 8000, "float32", with_peers=False),
            C("grpo_loss", "fwd_bwd", 16, 256, 16000, "float32", with_peers=False),
            C("token_logprobs", "fwd", 16, 256, 32000, "float32", NO_LOSS),
            C("token_logprobs", "fwd_bwd", 16, 256, 32000, "float32", NO_LOSS),
            C("fused_linear", "fwd_bwd", 32, 512, 32000, "float32", "softmax", H=256)]


def select_cases(device, *, quick: bool = False, shapes: Optional[Sequence[Tuple[int, ...]]] = None,
                 dtypes: Optional[Sequence[str]] = None, loss_types: Optional[Sequence[str]] = None,
                 ops: Optional[Sequence[str]] = None, modes: Optional[Sequence[str]] = None,
                 group_size: int = 4) -> List[Case]:
    """The cases to run: the curated set, or the product of ``shapes`` with the other choices.

    With ``shapes``, every 3-int shape runs the logits ops and every 4-int shape ``fused_linear``, in each of
    ``modes`` (default both), ``dtypes`` (default the device's) and ``loss_types`` (default softmax). Without,
    the curated cases are filtered by ``ops``/``modes`` and re-typed by ``dtypes``/``loss_types`` when given.
    """
    if shapes:
        cases = []
        for dims in shapes:
            cand_ops = ("fused_linear",) if len(dims) == 4 else LOGITS_OPS
            for op in cand_ops:
                if ops and op not in ops:
                    continue
                for mode in modes or _h.MODES:
                    for dt in dtypes or (default_dtype(device),):
                        for lt in (loss_types or ("softmax",)) if op != "token_logprobs" else (NO_LOSS,):
                            if len(dims) == 4:
                                S, T, H, V = dims
                                cases.append(Case(op, mode, S, T, V, dt, lt, H=H, group_size=group_size))
                            else:
                                S, T, V = dims
                                cases.append(Case(op, mode, S, T, V, dt, lt, group_size=group_size))
    else:
        cases = []
        for c in curated_cases(device, quick):
            if (ops and c.op not in ops) or (modes and c.mode not in modes):
                continue
            for dt in dtypes or (c.dtype,):
                for lt in (loss_types or (c.loss_type,)) if c.op != "token_logprobs" else (NO_LOSS,):
                    cases.append(replace(c, dtype=dt, loss_type=lt, group_size=group_size))
    for c in cases:
        if c.S % c.group_size:
            raise ValueError(f"--shapes: S={c.S} is not a multiple of --group-size {c.group_size}")
    seen, out = set(), []
    for c in cases:  # dedupe, keep order
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------
def build_inputs(case: Case, device, seed: int = 0) -> Dict[str, Tensor]:
    """Random inputs of ``case`` on ``device`` (all tokens valid, no mask). Leaves that need a gradient in
    ``fwd_bwd`` mode have ``requires_grad=True``."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)  # generated where they live: no host round trip
    dt = DTYPES[case.dtype]
    grad = case.mode == "fwd_bwd"
    S, T, V = case.S, case.T, case.V
    kw = dict(generator=g, device=device)
    out = {"tokens": torch.randint(0, V, (S, T), **kw), "rewards": torch.rand(S, **kw)}
    if case.op == "fused_linear":
        H = case.H
        out["hidden"] = torch.randn(S, T, H, **kw).to(dt).requires_grad_(grad)
        out["weight"] = (torch.randn(V, H, **kw) * H ** -0.5).to(dt).requires_grad_(grad)
    else:
        logits = torch.empty(S, T, V, dtype=dt, device=device)
        for s in range(S):  # row by row: no fp32 temporary of the whole tensor
            logits[s] = 2.0 * torch.randn(T, V, **kw)
        out["logits"] = logits.requires_grad_(grad)
        if case.op == "token_logprobs" and grad:
            out["grad_logp"] = torch.randn(S, T, **kw)
    return out


def clear_grads(inputs: Dict[str, Tensor]) -> None:
    for t in inputs.values():
        if isinstance(t, Tensor) and t.requires_grad:
            t.grad = None


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
    return dict(group_size=case.group_size, loss_type=case.loss_type)


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
    if case.op != "token_logprobs" and case.loss_type not in CLIPPED_LOSS_TYPES:
        return Impl(name, "peer", skip_reason=f"Liger has no {case.loss_type!r} loss (clipped family only)")
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
        kw = _loss_kwargs(case)

        def fwd(i):
            logp = selective_log_softmax(i["logits"], i["tokens"]).float()
            m = _ref.effective_mask(i["tokens"], None, logp.dtype)
            return _ref.loss_from_logprobs(logp, m, i["rewards"], **kw)
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


# ----------------------------------------------------------------------------------------------------------
# Measuring one (case, implementation)
# ----------------------------------------------------------------------------------------------------------
def _memory_guard(case: Case, impl: Impl, device: torch.device) -> Optional[str]:
    """On CPU, a reason to skip when the implementation would likely exhaust RAM (an OOM kill loses the run)."""
    if device.type != "cpu":
        return None
    avail = _h.mem_available_bytes()
    if avail is None:
        return None
    fp32_logits = case.tokens * case.V * 4
    need = (5 if case.mode == "fwd_bwd" else 3) * fp32_logits if impl.materializes_logits else 2 * case.logits_bytes()
    if need > 0.8 * avail:
        return f"would need ~{need / 1e9:.1f} GB; only {avail / 1e9:.1f} GB available"
    return None


def fingerprint(case: Case, out: Optional[Tensor], inputs: Dict[str, Tensor]) -> Optional[Tensor]:
    """A small fp64 vector that two correct implementations of ``case`` must agree on: the output (loss or
    log-probs) and, after a backward, each gradient row's L2 norm plus, for the logits ops, the gradient at
    the target class (the entry where bf16 rounding of ``p_y ≈ 1`` hurts). None when there is nothing."""
    parts = [] if out is None else [out.detach().double().reshape(-1)]
    if case.mode == "fwd_bwd":
        if case.op == "fused_linear":
            grads = [inputs["hidden"].grad, inputs["weight"].grad]
        elif "_padded" in inputs:  # Liger's (S, T+1, V) copy of the logits
            g = inputs["_padded"].grad
            grads = [None if g is None else g[:, :-1]]
        else:
            grads = [inputs["logits"].grad]
        for g in grads:
            if g is None:
                continue
            g2 = g.reshape(-1, g.shape[-1])
            norms = torch.cat([g2[a:a + 1024].float().norm(dim=-1) for a in range(0, g2.shape[0], 1024)])
            parts.append(norms.double())
            if case.op in LOGITS_OPS:
                parts.append(g.gather(-1, inputs["tokens"].unsqueeze(-1)).double().reshape(-1))
    return torch.cat(parts) if parts else None


def _max_diff(a: Optional[Tensor], b: Optional[Tensor]) -> Tuple[Optional[float], Optional[float]]:
    """``(max |a - b|, max |a - b| / max(1, max |b|))``; Nones when there is nothing to compare."""
    if a is None or b is None or a.shape != b.shape:
        return None, None
    if not a.numel():
        return 0.0, 0.0
    diff = float((a - b).abs().max())
    return diff, diff / max(1.0, float(b.abs().max()))


def measure(case: Case, impl: Impl, device, inputs: Dict[str, Tensor], *, quick: bool = False,
            cold_l2: bool = False, memory: bool = True, baseline_out: Optional[Tensor] = None,
            call_budget_s: Optional[float] = None, timing_overrides: Optional[dict] = None
            ) -> Tuple[dict, Optional[Tensor]]:
    """Time (and measure the peak memory of) ``impl`` on ``case``; returns ``(row, fingerprint)``.

    Order of calls: one call whose output is kept for the correctness guard against ``baseline_out`` (it pays
    lazy initialization: loading an extension, compiling; implementations that compile get one more untimed
    call), one call under the peak-memory measurement (steady state; it is also the warm-up), then the timed
    calls. With ``call_budget_s``, an implementation whose call takes longer than that (the first call; for
    those that compile, the memory call) is not timed further: its row is ``skipped`` with the time that one
    call took (the baseline is always timed: speed-ups need it).

    The row holds status (``ok``/``skipped``/``error``), the timing statistics, the byte/FLOP model, GB/s,
    TFLOP/s, the peak extra memory (bytes and as a multiple of the logits' size), and ``max_abs_diff`` /
    ``max_rel_diff`` of this implementation's :func:`fingerprint` (output and gradients of the first call)
    against ``baseline_out`` (the baseline's fingerprint); the relative one divides by ``max(1, max |base|)``.
    The second element of the result is the fingerprint.
    """
    device = torch.device(device)
    row = dict(op=case.op, mode=case.mode, shape=case.shape, S=case.S, T=case.T, V=case.V, H=case.H,
               dtype=case.dtype, loss_type=case.loss_type, group_size=case.group_size, impl=impl.name,
               kind=impl.kind, note=impl.note, ideal_bytes=case.ideal_bytes(), ideal_flops=case.ideal_flops(),
               logits_bytes=case.logits_bytes())
    reason = impl.skip_reason or _memory_guard(case, impl, device)
    if reason:
        row.update(status="skipped", reason=reason)
        return row, None
    first = None

    def over_budget(seconds: float) -> bool:
        if call_budget_s and seconds > call_budget_s and impl.kind != "baseline":
            row.update(status="skipped", single_call_ms=seconds * 1e3,
                       reason=f"one call took {seconds:.1f} s, over the per-call budget of {call_budget_s:g} s "
                              "(--call-budget); not timed further")
            return True
        return False

    try:
        fn = impl.make(inputs)

        def call_once(measure_memory: bool):
            """One call (with the peak-memory measurement if asked); returns (output, seconds)."""
            clear_grads(inputs)
            held = []
            t0 = time.perf_counter()
            if measure_memory:
                peak, method = _h.peak_extra(lambda: held.append(fn()) or held[-1], device)
                row.update(peak_extra_bytes=peak, memory_method=method,
                           peak_extra_x_logits=None if peak is None else peak / case.logits_bytes())
            else:
                held.append(_sync(fn(), device))
            return held[0], time.perf_counter() - t0

        # First call: output for the correctness guard; pays lazy initialization (extension loading, compiling).
        out, seconds = call_once(False)
        first = fingerprint(case, out, inputs)
        del out
        if not impl.compiles and over_budget(seconds):
            return row, first
        if impl.compiles:  # one more untimed call: compilation may go on past the first call
            call_once(False)
        # Then the peak-memory call (steady state; it is also the warm-up of the timing).
        _, seconds = call_once(memory)
        if impl.compiles and over_budget(seconds):
            return row, first
        overrides = dict(timing_overrides or {})
        if device.type == "cpu":
            overrides.setdefault("warmup", 0)  # the calls above were the warm-up
        stats = _h.time_callable(fn, device, quick=quick, cold_l2=cold_l2, before_each=lambda: clear_grads(inputs),
                                 **overrides)
        row.update(status="ok", reason="", **stats.as_dict())
        row["warmup"] = stats.warmup + (3 if impl.compiles else 2)  # untimed calls, the ones above included
        row["gbps"] = row["ideal_bytes"] / (stats.median_ms * 1e-3) / 1e9
        row["tflops"] = None if row["ideal_flops"] is None else row["ideal_flops"] / (stats.median_ms * 1e-3) / 1e12
        row["max_abs_diff"], row["max_rel_diff"] = _max_diff(first, baseline_out)
        del fn
    except Exception as e:  # noqa: BLE001 - a failing implementation is a row, not a crashed run
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row.update(status="error", reason=f"{type(e).__name__}: {msg}"[:300])
    finally:
        clear_grads(inputs)
        for k in [k for k in inputs if k.startswith("_")]:  # an implementation's private copies
            del inputs[k]
        _h.release_memory(device)
    return row, first


def _sync(out, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out
