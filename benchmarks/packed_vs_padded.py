"""Packed (``cu_seqlens``) vs padded batches: time and peak memory of ``grpo_loss`` fwd+bwd, and of the LM-head
logits each form needs, at a realistic completion-length spread.

    python benchmarks/packed_vs_padded.py [--sequences 16] [--min-len 16] [--max-len 512] [--vocab 32000]
        [--dtype float32] [--backend auto] [--output-dir benchmarks/results/<machine>/packed]

Both forms compute the same loss (tests/test_packed.py). The padded form's kernels skip the padding rows too (they
are masked), so the difference is the logits tensor itself: ``S·T_max·V`` values for the padded form against
``N·V`` packed -- what the model's LM head must produce and what the loss's gradient buffer holds.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import grpo_kernels as gk  # noqa: E402
from grpo_kernels.bench import harness as h  # noqa: E402
from grpo_kernels.bench.report import run_metadata, write_script_results  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    S, V = args.sequences, args.vocab
    dtype = getattr(torch, args.dtype)
    lens = torch.randint(args.min_len, args.max_len + 1, (S,), generator=g)
    N, T = int(lens.sum()), int(lens.max())
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    tokens = torch.randint(0, V, (N,), generator=g)
    rewards = torch.rand(S, generator=g)
    flat = torch.randn(N, V, generator=g).to(dtype)
    padded = torch.zeros(S, T, V, dtype=dtype)
    tok_p = torch.full((S, T), -100, dtype=torch.int64)
    i = 0
    for s, n in enumerate(lens.tolist()):
        padded[s, :n] = flat[i:i + n]
        tok_p[s, :n] = tokens[i:i + n]
        i += n
    kw = dict(group_size=args.group_size, loss_type=args.loss_type, backend=args.backend)

    def packed_step():
        x = flat.detach().requires_grad_(True)
        gk.grpo_loss(x, tokens, rewards, cu_seqlens=cu, **kw).backward()
        return x.grad

    def padded_step():
        x = padded.detach().requires_grad_(True)
        gk.grpo_loss(x, tok_p, rewards, **kw).backward()
        return x.grad

    torch.testing.assert_close(packed_step().float(), torch.cat([padded_step()[s, :n]
                                                                 for s, n in enumerate(lens.tolist())]).float(),
                               rtol=1e-4, atol=1e-6)
    rows = []
    for name, fn, logits in (("packed", packed_step, flat), ("padded", padded_step, padded)):
        t = h.time_cpu(fn, warmup=1, min_rounds=5, min_time_s=1.0)
        peak, how = h.peak_extra(fn, torch.device("cpu"))
        rows.append(dict(form=name, rows=int(logits.numel() // V), logits_GB=logits.numel() * logits.element_size() / 1e9,
                         ms_median=t.median_ms, ms_p10=t.p10_ms, ms_p90=t.p90_ms,
                         peak_extra_GB=None if peak is None else peak / 1e9, peak_method=how))
    meta = run_metadata("cpu", copy_bw_gbps=None, cold_l2=False, quick=False,
                        argv=sys.argv[1:] if argv is None else argv)
    result = dict(meta=meta, device=meta["device_name"], cpus=os.cpu_count(), torch=torch.__version__,
                  date=meta["date"], commit=meta["git_commit"], S=S, N=N, T_max=T, V=V,
                  dtype=args.dtype, loss_type=args.loss_type, backend=args.backend,
                  lengths=f"uniform [{args.min_len}, {args.max_len}]", rows=rows)
    lines = [f"# packed vs padded grpo_loss fwd+bwd ({result['date']}, commit {result['commit']})", "",
             f"{S} sequences, lengths {result['lengths']} (N = {N} tokens, T_max = {T}), V = {V}, {args.dtype}, "
             f"loss_type={args.loss_type}, backend={args.backend}, {result['cpus']} CPUs, torch {torch.__version__}", "",
             "| form | logits rows | logits GB | ms median [p10–p90] | peak extra GB (the gradient buffer) |",
             "|---|---|---|---|---|"]
    for r in rows:
        pe = "–" if r["peak_extra_GB"] is None else f"{r['peak_extra_GB']:.3f}"
        lines.append(f"| {r['form']} | {r['rows']} | {r['logits_GB']:.3f} | {r['ms_median']:.1f} "
                     f"[{r['ms_p10']:.1f}–{r['ms_p90']:.1f}] | {pe} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output_dir:
        write_script_results(args.output_dir, "results", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
