"""``grpo-kernels bench``: run the curated benchmark set and write ``results.json``, ``results.md`` and plots.

Examples::

    grpo-kernels bench                                  # curated CPU set (a few minutes on 2 cores)
    grpo-kernels bench --quick --output-dir /tmp/b      # tiny shapes, well under a minute
    grpo-kernels bench --device cuda --cold-l2          # 8,192 tokens x V in {32k, 152k, 262k}, bf16
    grpo-kernels bench --shapes 16x256x32000 --dtypes bf16 --loss-types grpo --modes fwd_bwd
    grpo-kernels bench --shapes 32x512x256x32000 --ops fused_linear     # SxTxHxV for fused_linear
    grpo-kernels bench --replot benchmarks/results/h100                 # redo results.md + PNGs from its JSON

Every backend that ``grpo_kernels.available_backends(device)`` reports runs, and every peer that is
installed (``torch.compile``, Liger-Kernel, TRL); what cannot run is listed with its reason.
``results.json`` is rewritten after every case (``meta.partial`` is true until the run completes), so a run
that is stopped part-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List

import torch

from . import cases as _c
from . import impls as _impls
from . import harness as _h
from . import report as _r
from ..options import LOSS_TYPES


def _csv(parse):
    def convert(text: str) -> List:
        items = [t for t in (s.strip() for s in text.split(",")) if t]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [parse(t) for t in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def _choice(name: str, choices):
    def parse(t: str) -> str:
        if t not in choices:
            raise ValueError(f"{name}: unknown value {t!r}; choose from {', '.join(choices)}")
        return t
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to benchmark (default: cuda when available, else cpu)")
    parser.add_argument("--shapes", type=_csv(_c.parse_shape), default=None, metavar="SxTxV[,SxTxHxV...]",
                        help="replace the curated shapes: SxTxV for grpo_loss/token_logprobs, SxTxHxV for fused_linear")
    parser.add_argument("--dtypes", type=_csv(_c.parse_dtype), default=None, metavar="DT[,DT...]",
                        help="float32, bfloat16, float16, float64 (or fp32, bf16, ...)")
    parser.add_argument("--loss-types", type=_csv(_c.parse_loss_type), default=None, metavar="LT[,LT...]",
                        help=", ".join(LOSS_TYPES) + ", or LT+entropy (with an entropy bonus)")
    parser.add_argument("--ops", type=_csv(_choice("--ops", _h.OPS)), default=None, metavar="OP[,OP...]",
                        help="grpo_loss, token_logprobs, fused_linear (default: all)")
    parser.add_argument("--modes", type=_csv(_choice("--modes", _h.MODES)), default=None, metavar="MODE[,MODE...]",
                        help="fwd, fwd_bwd (default: the curated set's; both with --shapes)")
    parser.add_argument("--impls", type=_csv(_choice("--impls", _c.IMPL_NAMES)), default=None,
                        metavar="NAME[,NAME...]", help="only these implementations: " + ", ".join(_c.IMPL_NAMES))
    parser.add_argument("--group-size", type=int, default=4, help="responses per prompt G (default 4)")
    parser.add_argument("--output-dir", default="bench-results", help="where to write results.json/.md and PNGs")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and few rounds (seconds); torch.compile is left out unless --impls names it")
    parser.add_argument("--cold-l2", action="store_true",
                        help="overwrite a 256 MB buffer between repetitions (cache-cold timing)")
    parser.add_argument("--call-budget", type=float, default=None, metavar="SECONDS",
                        help="an implementation (other than the eager baseline) whose single call takes longer is "
                             "reported, not timed further (default: 20 on CPU, 30 on CUDA, 5 with --quick; 0 = no limit)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--replot", default=None, metavar="DIR",
                        help="measure nothing: rewrite DIR/results.md and DIR's PNGs from DIR/results.json")


def _replot(out_dir: str, plots: bool) -> int:
    path = os.path.join(out_dir, "results.json")
    try:
        with open(path) as f:
            data = json.load(f)
        meta, rows = data["meta"], data["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: --replot: cannot read a results.json written by grpo-kernels bench at {path}: {e}",
              file=sys.stderr)
        return 2
    md = _r.write_markdown(os.path.join(out_dir, "results.md"), meta, rows)
    pngs = _r.write_plots(out_dir, meta, rows) if plots else []
    print(f"rewrote {md}" + (f" and {len(pngs)} plot(s)" if pngs else ""), file=sys.stderr)
    return 0


def run(args) -> int:
    if args.replot is not None:
        return _replot(args.replot, plots=not args.no_plots)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available to this torch "
              f"({torch.__version__}); use --device cpu", file=sys.stderr)
        return 2
    if args.group_size < 1:
        print(f"error: --group-size must be >= 1, got {args.group_size}", file=sys.stderr)
        return 2
    if args.call_budget is not None and args.call_budget < 0:
        print(f"error: --call-budget must be >= 0 seconds, got {args.call_budget}", file=sys.stderr)
        return 2
    budget = args.call_budget
    if budget is None:
        budget = 5.0 if args.quick else (30.0 if device == "cuda" else 20.0)
    dev = torch.device(device)
    try:
        cases = _c.select_cases(dev, quick=args.quick, shapes=args.shapes, dtypes=args.dtypes,
                                loss_types=args.loss_types, ops=args.ops, modes=args.modes,
                                group_size=args.group_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cases:
        print("error: no benchmark case matches the given --ops/--modes/--shapes", file=sys.stderr)
        return 2
    include = args.impls
    if include is None and args.quick:
        include = [n for n in _c.IMPL_NAMES if n != "torch.compile"]

    plan = [(case, _impls.implementations(case, dev, include=include)) for case in cases]
    total = sum(len(impls) for _, impls in plan)
    print(f"grpo-kernels bench: {len(cases)} cases, {total} rows on {_r.device_name(dev)}; "
          f"backends here: {', '.join(__import__('grpo_kernels').available_backends(dev))}", file=sys.stderr)
    copy_bw = _h.copy_bandwidth(dev, quick=args.quick)
    meta = _r.run_metadata(dev, copy_bw_gbps=copy_bw, cold_l2=args.cold_l2, quick=args.quick,
                           argv=sys.argv[1:] if sys.argv else None)
    meta["call_budget_s"] = budget

    try:
        from tqdm import tqdm
        bar = tqdm(total=total, disable=args.no_progress, unit="row", file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency of transformers
        bar = None
    rows = []
    os.makedirs(args.output_dir, exist_ok=True)
    partial_json = os.path.join(args.output_dir, "results.json")
    for case, impls in plan:
        inputs = None
        base_out = None
        for impl in impls:
            if bar is not None:
                bar.set_description(f"{case.label} [{impl.name}]")
            if inputs is None and impl.skip_reason is None:
                inputs = _c.build_inputs(case, dev)
            row, out = _c.measure(case, impl, dev, inputs if inputs is not None else {}, quick=args.quick,
                                  cold_l2=args.cold_l2, memory=not args.no_memory, baseline_out=base_out,
                                  call_budget_s=budget or None)
            if impl.kind == "baseline" and out is not None:
                base_out = out
            rows.append(row)
            if bar is not None:
                bar.update(1)
        del inputs
        _h.release_memory(dev)
        _r.write_json(partial_json, {**meta, "partial": True}, _r.finalize_rows(rows, meta))
    if bar is not None:
        bar.close()

    rows = _r.finalize_rows(rows, meta)
    paths = _r.write_all(args.output_dir, meta, rows, plots=not args.no_plots)
    print(_r.markdown(meta, rows))
    n_ok = sum(r["status"] == "ok" for r in rows)
    print(f"{n_ok}/{len(rows)} rows ran; wrote {paths['json']}, {paths['markdown']}"
          + (f" and {len(paths['plots'])} plot(s)" if paths["plots"] else ""), file=sys.stderr)
    return 0 if n_ok else 1


def main(argv=None) -> int:  # ``python -m grpo_kernels.bench.cli``
    parser = argparse.ArgumentParser(prog="grpo-kernels bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
