"""Launch-parameter sweep of the Triton kernels (and the CUDA C++ kernels' fixed launch, for comparison).

``grpo-kernels sweep`` times ``logprobs_fwd``, ``logprobs_bwd`` and the one-pass ``logprobs_fwd_grad`` of
:mod:`grpo_kernels.kernels.triton_impl` over a grid of ``block_v`` × ``num_warps`` (× ``programs``, the persistent
grid of the one-pass kernel, in multiples of the SM count) at a given vocabulary and token count, and reports
each configuration's median time and effective bandwidth against the ideal traffic:

===========  ===================================================================================
kernel       ideal bytes (``N`` rows, ``V`` vocabulary, ``e`` bytes per logit)
===========  ===================================================================================
fwd          ``N·V·e`` (one read)
bwd          ``2·N·V·e`` (one read of the logits, one write of the gradient)
fwd_grad     ``2·N·V·e`` (one read + one write: the second read of each row should hit L2)
===========  ===================================================================================

Every configuration's outputs are checked against the default configuration's (``allclose``): a launch
setting that produced wrong numbers is reported as ``mismatch``, not timed as if it were fine.

This is a measuring tool for GPU sessions (the defaults of :func:`grpo_kernels.kernels.triton_impl._launch_config`
and ``_programs`` are heuristics until a sweep says otherwise). On CPU it runs under ``TRITON_INTERPRET=1``,
which only checks that it works (``--quick``).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import harness
from .report import device_name

KERNELS = ("fwd", "bwd", "fwd_grad")
_IDEAL_FACTOR = {"fwd": 1, "bwd": 2, "fwd_grad": 2}


def _csv_nums(parse, what: str):
    def convert(text: str) -> list:
        out: list = []
        for part in text.split(","):
            part = part.strip()
            if part in ("", "auto", "default"):
                out.append(None)
                continue
            try:
                value = parse(part)
            except ValueError:
                value = None
            if value is None or value <= 0:
                raise argparse.ArgumentTypeError(f"expected comma-separated positive {what} or 'auto', got {part!r}")
            out.append(value)
        return out
    return convert


_csv_ints = _csv_nums(int, "integers")


def _inputs(N: int, V: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(1, N, V, generator=g) * 3).to(dtype=dtype, device=device)
    tokens = torch.randint(0, V, (1, N), generator=g).to(device)
    mask = torch.ones(1, N, dtype=torch.bool, device=device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = (torch.randn(1, N, generator=g, dtype=torch.float64) / N).to(acc).to(device)
    # the backward's saved statistics, computed in fp32/fp64 by torch (same for every configuration)
    lse = torch.logsumexp(logits.to(acc), dim=-1)
    return logits, tokens, mask, coef, lse, torch.zeros_like(lse)


def _configs(kernel: str, block_vs, warps, programs, sms: int):
    progs = [None] if kernel != "fwd_grad" else programs
    for bv, nw, p in itertools.product(block_vs, warps, progs):
        yield {"block_v": bv, "num_warps": nw, "programs": None if p is None else max(1, round(p * sms))}


def _call(tk, kernel: str, inp, cfg: dict):
    logits, tokens, mask, coef, lse, ent = inp
    kw = {"block_v": cfg["block_v"], "num_warps": cfg["num_warps"]}
    if kernel == "fwd":
        return lambda: tk.logprobs_fwd(logits, tokens, mask, 1.0, False, **kw)
    if kernel == "bwd":
        return lambda: tk.logprobs_bwd(coef, None, logits, tokens, mask, lse, ent, 1.0, **kw)
    return lambda: tk.logprobs_fwd_grad(logits, tokens, mask, coef, 1.0, False, programs=cfg["programs"], **kw)


def _cuda_call(kernel: str, inp):
    from ..kernels import native
    logits, tokens, mask, coef, lse, ent = inp
    if kernel == "fwd":
        return lambda: native.logprobs_fwd(logits, tokens, mask, 1.0, False)
    if kernel == "bwd":
        return lambda: native.logprobs_bwd(coef, None, logits, tokens, mask, lse, ent, 1.0)
    return lambda: native.logprobs_fwd_grad(logits, tokens, mask, coef, 1.0, False)


def _main_output(kernel: str, out):
    """The tensor compared across configurations: log-probs (fwd), the gradient (bwd / fwd_grad)."""
    if kernel == "fwd":
        return out[0]
    if kernel == "bwd":
        return out
    return out[3]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 2e-2
    return bool(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol))


def sweep(*, device, vocab_sizes: Sequence[int], tokens: int, dtype: torch.dtype, kernels: Sequence[str],
          block_vs: Sequence[Optional[int]], warps: Sequence[Optional[int]], programs: Sequence[Optional[int]],
          quick: bool = False, cold_l2: bool = False, with_cuda: bool = True, progress: bool = True,
          on_row: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Run the sweep; returns ``{"meta": ..., "rows": [...]}`` (see the module docstring). ``on_row`` gets the
    result so far (``meta.partial`` true) after every row."""
    from ..kernels import triton_impl as tk

    device = torch.device(device)
    ok, why = tk.is_available(device)
    if not ok:
        raise RuntimeError(f"the Triton kernels cannot run on {device}: {why}")
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    copy_bw = harness.copy_bandwidth(device, quick=quick)
    cuda_ok = with_cuda and device.type == "cuda"
    if cuda_ok:
        from ..kernels import native
        cuda_ok = native.is_available(device)[0]
    elt = torch.empty((), dtype=dtype).element_size()
    meta = {"device": device_name(device), "sms": sms, "copy_bw_gbps": copy_bw, "cold_l2": cold_l2, "quick": quick,
            "torch": torch.__version__, "triton": _triton_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    # many configurations: 0.1 s of calls each on CUDA (>= 10 rounds) is enough for ~1 ms kernels
    timing = {} if quick or device.type != "cuda" else {"min_time_s": 0.1}
    rows: List[dict] = []

    def done(row):
        rows.append(row)
        if on_row is not None:
            on_row({"meta": {**meta, "partial": True}, "rows": rows})
    plan = [(V, k, cfg) for V in vocab_sizes for k in kernels for cfg in _configs(k, block_vs, warps, programs, sms)]
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(plan), desc="sweep", file=sys.stderr)
        except ImportError:
            bar = None
    inputs = {}
    reference = {}
    for V, kernel, cfg in plan:
        if V not in inputs:
            inputs.clear()
            harness.release_memory(device)
            inputs[V] = _inputs(tokens, V, dtype, device)
        inp = inputs[V]
        ideal = _IDEAL_FACTOR[kernel] * tokens * V * elt
        row = {"kernel": kernel, "impl": "triton", "V": V, "N": tokens, "dtype": str(dtype).replace("torch.", ""),
               **cfg, "default": all(v is None for v in cfg.values())}
        fn = _call(tk, kernel, inp, cfg)
        try:
            out = _main_output(kernel, fn())
            key = (V, kernel)
            if key not in reference:
                reference[key] = _main_output(kernel, _call(tk, kernel, inp, {k: None for k in cfg})()).clone()
            row["match"] = _close(out, reference[key])
            if row["match"]:
                st = harness.time_callable(fn, device, quick=quick, cold_l2=cold_l2, **timing)
                row.update(ms=st.median_ms, p10_ms=st.p10_ms, p90_ms=st.p90_ms,
                           gbps=ideal / (st.median_ms * 1e-3) / 1e9)
                row["pct_copy_bw"] = 100 * row["gbps"] / copy_bw if copy_bw else None
        except Exception as e:  # a launch setting the kernel cannot take (e.g. out of shared memory)
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        done(row)
        if bar is not None:
            bar.update(1)
    if cuda_ok:
        for V in vocab_sizes:
            inp = _inputs(tokens, V, dtype, device)
            for kernel in kernels:
                fn = _cuda_call(kernel, inp)
                st = harness.time_callable(fn, device, quick=quick, cold_l2=cold_l2, **timing)
                gbps = _IDEAL_FACTOR[kernel] * tokens * V * elt / (st.median_ms * 1e-3) / 1e9
                done({"kernel": kernel, "impl": "cuda", "V": V, "N": tokens,
                             "dtype": str(dtype).replace("torch.", ""), "block_v": None, "num_warps": None,
                             "programs": None, "default": True, "match": True, "ms": st.median_ms,
                             "p10_ms": st.p10_ms, "p90_ms": st.p90_ms, "gbps": gbps,
                             "pct_copy_bw": 100 * gbps / copy_bw if copy_bw else None})
            del inp
    if bar is not None:
        bar.close()
    return {"meta": meta, "rows": rows}


def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _fmt(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def markdown(result: Dict) -> str:
    """Per (V, kernel): the default configuration, then every configuration fastest first."""
    meta, rows = result["meta"], result["rows"]
    lines = [f"# Kernel launch sweep — {meta['device']}", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, {meta['sms']} SMs, copy bandwidth "
             f"{_fmt(meta['copy_bw_gbps'], '{:.0f}')} GB/s{', L2-cold' if meta['cold_l2'] else ''}"
             f"{', --quick (not a measurement)' if meta['quick'] else ''}.", ""]
    for (V, kernel) in sorted({(r["V"], r["kernel"]) for r in rows}, key=lambda k: (k[0], KERNELS.index(k[1]))):
        sel = [r for r in rows if r["V"] == V and r["kernel"] == kernel]
        timed = sorted([r for r in sel if "ms" in r], key=lambda r: r["ms"])
        default = next((r for r in sel if r["impl"] == "triton" and r["default"] and "ms" in r), None)
        lines += [f"## {kernel}, V={V}, N={sel[0]['N']}, {sel[0]['dtype']}", "",
                  "| impl | block_v | num_warps | programs | ms | GB/s | % copy BW | vs default |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in timed:
            vs = f"{default['ms'] / r['ms']:.2f}x" if default else "-"
            tag = " (default)" if r["impl"] == "triton" and r["default"] else ""
            lines.append(f"| {r['impl']}{tag} | {r['block_v'] or 'auto'} | {r['num_warps'] or 'auto'} | "
                         f"{r['programs'] or 'auto'} | {r['ms']:.3f} | {r['gbps']:.0f} | "
                         f"{_fmt(r.get('pct_copy_bw'), '{:.0f}')} | {vs} |")
        for r in sel:
            if "ms" not in r:
                why = r.get("error") or "outputs differ from the default configuration's"
                lines.append(f"| {r['impl']} | {r['block_v'] or 'auto'} | {r['num_warps'] or 'auto'} | "
                             f"{r['programs'] or 'auto'} | not timed: {why} | | | |")
        lines.append("")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (interpreter; use --quick)")
    p.add_argument("--vocab", type=_csv_ints, default=None, help="vocabulary sizes (default 151936,262144)")
    p.add_argument("--tokens", type=int, default=None, help="rows N = S·T (default 8192)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of fwd,bwd,fwd_grad")
    p.add_argument("--block-v", type=_csv_ints, default=None, help="BLOCK_V values ('auto' = heuristic)")
    p.add_argument("--num-warps", type=_csv_ints, default=None, help="num_warps values ('auto' = heuristic)")
    p.add_argument("--programs", type=_csv_nums(float, "numbers"), default=None,
                   help="one-pass grid sizes in multiples of the SM count, e.g. auto,0.5,1,2 ('auto' = heuristic)")
    p.add_argument("--cold-l2", action="store_true", help="overwrite a 256 MB buffer between repetitions")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few rounds: checks that it runs")
    p.add_argument("--no-cuda", action="store_true", help="leave out the CUDA C++ kernels' rows")
    p.add_argument("--output", default=None, help="write the JSON here and the markdown next to it (.md)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("grpo-kernels sweep: on CPU the Triton kernels run only under TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    bad = [k for k in kernels if k not in KERNELS]
    if bad or not kernels:
        print(f"grpo-kernels sweep: --kernels must name some of {', '.join(KERNELS)}, got {args.kernels!r}",
              file=sys.stderr)
        return 2
    if args.quick:
        vocab, tokens = args.vocab or [300], 8 if args.tokens is None else args.tokens
        block_vs, warps, programs = args.block_v or [None, 64], args.num_warps or [None], args.programs or [None, 2]
    else:
        vocab, tokens = args.vocab or [151936, 262144], 8192 if args.tokens is None else args.tokens
        block_vs = args.block_v or [None, 4096, 8192, 16384]
        warps = args.num_warps or [None, 4, 8, 16]
        programs = args.programs or [None, 0.5, 1, 2, 4]
    if any(v is None or v < 1 for v in vocab) or tokens < 1:
        print("grpo-kernels sweep: --vocab and --tokens must be positive integers", file=sys.stderr)
        return 2
    def save(result):
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)

    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    result = sweep(device=device, vocab_sizes=vocab, tokens=tokens, dtype=getattr(torch, args.dtype),
                   kernels=kernels, block_vs=block_vs, warps=warps, programs=programs, quick=args.quick,
                   cold_l2=args.cold_l2, with_cuda=not args.no_cuda, progress=not args.no_progress,
                   on_row=save if args.output else None)
    md = markdown(result)
    if args.output:
        save(result)
        with open(os.path.splitext(args.output)[0] + ".md", "w") as f:
            f.write(md + "\n")
    print(md)
    return 0


def main(argv=None) -> int:  # ``python -m grpo_kernels.bench.sweep``
    p = argparse.ArgumentParser(prog="grpo-kernels sweep", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
