"""Benchmark cases and their inputs, and :func:`measure`, which times one implementation on one case.

A :class:`Case` is one op (``grpo_loss``, ``token_logprobs`` or ``fused_linear``) in one mode (``fwd`` or
``fwd_bwd``) at one shape, dtype and loss type. What can run a case (backends, peers, floors) is
:func:`grpo_kernels.bench.impls.implementations`. :func:`measure` returns a result row (or the reason it was
skipped).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch

from ..options import LOSS_TYPES
from . import harness as _h

if TYPE_CHECKING:  # pragma: no cover
    from .impls import Impl

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


#: Loss variants a case may name besides the plain loss types: ``<loss_type>+entropy`` adds an entropy bonus
#: (``entropy_coef=0.01``, the kernels' one-pass entropy gradient on-policy).
LOSS_VARIANTS = {f"{lt}+entropy": {"loss_type": lt, "entropy_coef": 0.01} for lt in LOSS_TYPES}


def loss_options_of(name: str) -> Dict[str, object]:
    """The loss options of a case's ``loss_type`` name (a loss type or a :data:`LOSS_VARIANTS` key). ``luspo``
    takes its sequence-level ratio (it is defined only there)."""
    opts = dict(LOSS_VARIANTS.get(name, {"loss_type": name}))
    if opts["loss_type"] == "luspo":
        opts["importance_sampling_level"] = "sequence"
    return opts


def parse_loss_type(name: str) -> str:
    if name not in LOSS_TYPES and name not in LOSS_VARIANTS:
        raise ValueError(f"--loss-types: unknown loss type {name!r}; choose from {', '.join(LOSS_TYPES)} or "
                         "<loss_type>+entropy (with an entropy bonus)")
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
