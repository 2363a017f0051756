"""What the entropy bonus (``entropy_coef``) costs on top of the same loss without it: paired, interleaved timing.

    python benchmarks/entropy_bonus_cost.py [--shape 16x256x32000] [--dtypes float32,bfloat16]
        [--loss-types grpo,softmax] [--backend cpu] [--rounds 15] [--output-dir benchmarks/results/<machine>/...]

``grpo-kernels bench`` times its rows one after another, so on a shared machine a load change between the row
without the bonus and the row with it moves their ratio by ±20% (seen: +entropy *faster* than without). Here the
two calls alternate, A B B A A B ..., and each pair gives one ratio; the table reports the median time of each
and the median [p10–p90] of the per-pair ratios, which a slow drift in the load cancels out of.

Two levels, both on-policy (one pass over the logits, docs/design.md §5):

* **loss** -- ``grpo_loss(...).backward()`` on fresh leaf logits, as a training step calls it (the gradient
  buffer is allocated each call, which costs the same with and without the bonus);
* **kernel** -- the backend's one-pass ``logprobs_fwd_grad`` into a preallocated gradient, without and with
  ``ent_coef`` (the part the bonus changes).

Both forms compute the same numbers as the reference (tests/test_loss_family.py); the script checks the loss with
the bonus against ``grpo_kernels.reference.grpo_loss`` once before timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import grpo_kernels as gk  # noqa: E402
from grpo_kernels import reference  # noqa: E402
from grpo_kernels.bench import cases, harness as h  # noqa: E402
from grpo_kernels.bench.report import run_metadata, write_script_results  # noqa: E402
from grpo_kernels.kernels import ops  # noqa: E402

ENTROPY_COEF = 0.01


def paired(fa: Callable[[], object], fb: Callable[[], object], rounds: int) -> Dict[str, float]:
    """Time ``fa`` and ``fb`` alternately (ABBA order, after one warm-up each); ms medians and the b/a ratios."""
    fa(), fb()
    ta: List[float] = []
    tb: List[float] = []
    for r in range(rounds):
        order = (fa, fb) if r % 2 == 0 else (fb, fa)
        for fn in order:
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) * 1e3
            (ta if fn is fa else tb).append(dt)
    ratios = [b / a for a, b in zip(ta, tb)]
    return dict(a_ms=h.quantile(ta, 0.5), b_ms=h.quantile(tb, 0.5), ratio=h.quantile(ratios, 0.5),
                ratio_p10=h.quantile(ratios, 0.1), ratio_p90=h.quantile(ratios, 0.9), rounds=rounds,
                ratios=ratios)


def plot(rows: List[dict], title: str, path: str) -> None:
    """Box plot of the per-pair cost (%) of each case, with the 10% target drawn in."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    labels = [f"{r['level']} {r['dtype']} {r['loss_type']}" for r in rows]
    ax.boxplot([[100 * (x - 1) for x in r["ratios"]] for r in rows], orientation="horizontal", showfliers=False)
    ax.set_yticks(range(1, len(rows) + 1), labels)
    ax.axvline(0, color="grey", lw=0.8)
    ax.axvline(10, color="red", ls="--", lw=1, label="10% target")
    ax.set_xlabel("time with the bonus / without, per ABBA pair, − 1 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="16x256x32000", help="SxTxV")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--loss-types", default="grpo,softmax")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=15, help="pairs per case (default 15)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args(argv)
    try:
        S, T, V = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape: expected SxTxV (three integers), got {args.shape!r}")
    if args.rounds < 1:
        ap.error(f"--rounds: expected a positive integer, got {args.rounds}")
    try:
        dtypes = [cases.DTYPES[cases.parse_dtype(d)] for d in args.dtypes.split(",")]
    except ValueError as e:
        ap.error(str(e))
    g = torch.Generator().manual_seed(args.seed)
    meta = run_metadata("cpu", copy_bw_gbps=None, cold_l2=False, quick=False,
                        argv=sys.argv[1:] if argv is None else argv)
    load0 = list(os.getloadavg())
    rows = []
    for dtype in dtypes:
        logits = (2 * torch.randn(S, T, V, generator=g)).to(dtype)
        tokens = torch.randint(0, V, (S, T), generator=g)
        mask = torch.ones(S, T, dtype=torch.bool)
        rewards = torch.rand(S, generator=g)
        for lt in args.loss_types.split(","):
            kw = dict(group_size=args.group_size, loss_type=lt)

            def step(coef: float, lt_kw=kw) -> None:
                x = logits.detach().requires_grad_(True)
                gk.grpo_loss(x, tokens, rewards, backend=args.backend, entropy_coef=coef, **lt_kw).backward()

            x = logits.detach().double().requires_grad_(True)
            ref = reference.grpo_loss(x, tokens, rewards, entropy_coef=ENTROPY_COEF, **kw)
            ref.backward()
            y = logits.detach().requires_grad_(True)
            ours = gk.grpo_loss(y, tokens, rewards, backend=args.backend, entropy_coef=ENTROPY_COEF, **kw)
            ours.backward()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(ours.double(), ref.detach(), rtol=tol, atol=tol)
            del x, y, ref, ours
            r = paired(lambda: step(0.0), lambda: step(ENTROPY_COEF), args.rounds)
            rows.append(dict(level="loss", dtype=str(dtype).replace("torch.", ""), loss_type=lt, **r))
        acc = reference.accumulation_dtype(dtype)
        coef = torch.full((S, T), -1.0 / (S * T), dtype=acc)
        ecoef = torch.full((S, T), -ENTROPY_COEF / (S * T), dtype=acc)
        out = torch.empty_like(logits)

        def kern(ent: bool) -> None:
            ops.kernel_fwd_grad(args.backend, logits, tokens, mask, coef, 1.0, False, out=out, check_ids=False,
                                ent_coef=ecoef if ent else None)

        r = paired(lambda: kern(False), lambda: kern(True), args.rounds)
        rows.append(dict(level="kernel", dtype=str(dtype).replace("torch.", ""), loss_type="(one-pass fwd_grad)", **r))
        del logits, out
    result = dict(meta=meta, cpus=os.cpu_count(), S=S, T=T, V=V, backend=args.backend, entropy_coef=ENTROPY_COEF,
                  load_average_start=load0, load_average_end=list(os.getloadavg()), rows=rows)
    lines = [f"# The entropy bonus's cost, paired timing ({meta['date']}, commit {str(meta['git_commit'])[:7]})", "",
             f"{meta['device_name']}, {result['cpus']} CPUs, {meta['torch_threads']} torch threads, torch {torch.__version__}; "
             f"S×T×V = {S}×{T}×{V}, group size {args.group_size}, backend `{args.backend}`, on-policy (one pass), "
             f"entropy_coef = {ENTROPY_COEF}; {args.rounds} ABBA pairs per case; load average "
             f"{load0[0]:.2f} at the start, {result['load_average_end'][0]:.2f} at the end.", "",
             "| level | dtype | loss type | without bonus, ms | with bonus, ms | cost: median ratio − 1 [p10–p90] |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['level']} | {r['dtype']} | {r['loss_type']} | {r['a_ms']:.1f} | {r['b_ms']:.1f} | "
                     f"{100 * (r['ratio'] - 1):+.1f}% [{100 * (r['ratio_p10'] - 1):+.1f}%, "
                     f"{100 * (r['ratio_p90'] - 1):+.1f}%] |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output_dir:
        write_script_results(args.output_dir, "paired", result, text + "\n![per-pair cost](paired.png)\n")
        plot(rows, f"entropy bonus cost, {S}x{T}x{V}, {meta['device_name']}, {meta['date']}",
             os.path.join(args.output_dir, "paired.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
