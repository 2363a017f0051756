"""Vocabulary-parallel log-probs / loss (``grpo_kernels.vocab_parallel``) on W CPU processes (gloo) vs unsharded.

What it measures, at ``N = S·T`` rows (default 2048 = 8×256), V (default 32,000), fp32, W = 2 processes of one
torch thread each (the two cores of the reference machine):

* ``sharded``: the vocab-parallel call on each rank's ``V/W`` columns (max over the ranks of each round's time);
* ``local only``: the same rank-local kernel work without any collective or bookkeeping (the shard's
  ``logprobs_fwd`` [+ ``logprobs_bwd``]), timed the same way (the slowest rank of each round): ``sharded − local
  only`` is the cost of going vocab-parallel;
* ``collectives``: the layout all-gather of one call (``shard_bounds``) and the combine (the two all-reduces of
  ``combine_shard_stats`` on N rows, with the small elementwise math around them), alone;
* ``unsharded``: the ordinary single-process call on the full V, with 1 thread (one rank's share of the
  machine) and with W threads (the whole machine).

Ops: ``token_logprobs fwd`` (with entropy), ``token_logprobs fwd+bwd`` (``ℓ.sum() + H.sum()``), ``grpo_loss fwd+bwd``
(loss_type="grpo", on-policy: unsharded this is the one-pass schedule, sharded always two passes) and, with
``--hidden``, ``fused_linear fwd+bwd`` (H hidden units; the sharded variant is always two-phase and all-reduces
``grad_hidden``). Bytes communicated per row come from ``vocab_parallel.COMM_FLOATS_PER_ROW`` (payload of the two
all-reduces; a ring all-reduce sends ``2(W−1)/W`` of it per rank). Writes ``results.json`` and ``results.md``.

    python benchmarks/vocab_parallel_bench.py --output-dir benchmarks/results/cpu-amd-epyc-2vcpu/vocab_parallel
    python benchmarks/vocab_parallel_bench.py --quick     # tiny shapes, seconds (a smoke run)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

G = 8


def _median_ms(ts):
    return 1e3 * statistics.median(ts)


def _time_group(fn, rounds, warmup=1):
    """Median over rounds of the slowest rank's time (a barrier before each round, outside the timing)."""
    for _ in range(warmup):
        dist.barrier()
        fn()
    ts = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    t = torch.tensor(ts, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return _median_ms(t.tolist()), [1e3 * x for x in t.tolist()]


def _time_pair(fn_a, fn_b, rounds, warmup=1):
    """:func:`_time_group` of two functions with their rounds interleaved (a, b, a, b, ...), so that a slow spell of
    the machine hits both; also returns the median of the per-round differences ``a − b``."""
    for _ in range(warmup):
        for fn in (fn_a, fn_b):
            dist.barrier()
            fn()
    ts = [[], []]
    for _ in range(rounds):
        for i, fn in enumerate((fn_a, fn_b)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t0)
    t = torch.tensor(ts, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    a, b = (1e3 * t[0]).tolist(), (1e3 * t[1]).tolist()
    return (statistics.median(a), a), (statistics.median(b), b), statistics.median(x - y for x, y in zip(a, b))


def _time_local(fn, rounds, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return _median_ms(ts), [1e3 * x for x in ts]


def _inputs(S, T, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (S, T), generator=g)
    mask = torch.ones(S, T)
    mask[:, -T // 8:] = 0  # some padding
    rewards = torch.randn(S, generator=g)
    return tokens, mask, rewards


def _worker(rank, world, port, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        from grpo_kernels import kernels as K
        from grpo_kernels import vocab_parallel as vp
        from grpo_kernels.kernels import ops

        dtype = getattr(torch, args.dtype)
        S, T, V = args.rows // args.seq, args.seq, args.vocab
        c = -(-V // world)
        a, b = rank * c, min(V, (rank + 1) * c)
        tokens, mask, rewards = _inputs(S, T, V, dtype)
        g = torch.Generator().manual_seed(100 + rank)
        shard = torch.randn(S, T, b - a, generator=g, dtype=torch.float32).mul_(2).to(dtype)
        group = dist.group.WORLD
        impl = K.resolve_backend(args.backend, shard.device)
        rows = []

        def add(op, what, ms, times, **extra):
            rows.append(dict(op=op, what=what, ms=ms, times_ms=times, **extra))

        def pair(op, sharded, local, label):
            (ms_a, ta), (ms_b, tb), diff = _time_pair(sharded, local, args.rounds)
            add(op, "sharded", ms_a, ta, overhead_ms_median_of_round_differences=diff)
            add(op, label, ms_b, tb)

        # --- collectives alone
        add("layout all-gather (shard_bounds)", "collectives",
            *_time_group(lambda: vp.shard_bounds(group, b - a), args.rounds * 4))
        keep = vp._keep(tokens, mask)
        y_local, own = vp._local_targets(tokens, keep, vp.VocabShard(a, b, V))
        lp_r, lse_r, ent_r = K.kernel_module(impl).logprobs_fwd(shard, y_local, keep, 1.0, True, check_ids=False)
        add("combine, with entropy (2 all-reduces)", "collectives",
            *_time_group(lambda: vp.combine_shard_stats(group, lp_r, lse_r, ent_r, own, keep), args.rounds * 4))
        add("combine, without entropy (2 all-reduces)", "collectives",
            *_time_group(lambda: vp.combine_shard_stats(group, lp_r, lse_r, None, own, keep), args.rounds * 4))

        # --- token_logprobs fwd
        def sharded_fwd():
            with torch.no_grad():
                vp.vocab_parallel_token_logprobs(shard, tokens, mask, 1.0, True, group=group, backend=impl)

        def local_fwd():
            ops.kernel_fwd(impl, shard, y_local, keep, 1.0, True, check_ids=False)

        pair("token_logprobs fwd", sharded_fwd, local_fwd, "local only")

        # --- token_logprobs fwd+bwd
        x = shard.clone().requires_grad_(True)

        def sharded_fwd_bwd():
            x.grad = None
            lp, ent = vp.vocab_parallel_token_logprobs(x, tokens, mask, 1.0, True, group=group, backend=impl)
            (lp.sum() + ent.sum()).backward()

        ones = torch.ones(S, T, dtype=lse_r.dtype) * keep

        def local_fwd_bwd():
            _, ls, en = ops.kernel_fwd(impl, shard, y_local, keep, 1.0, True, check_ids=False)
            K.kernel_module(impl).logprobs_bwd(ones, ones, shard, y_local, keep, ls, en, 1.0, check_ids=False)

        pair("token_logprobs fwd+bwd", sharded_fwd_bwd, local_fwd_bwd, "local only")

        # --- grpo_loss fwd+bwd
        def sharded_loss():
            x.grad = None
            loss = vp.vocab_parallel_grpo_loss(x, tokens, rewards, mask, group=group, group_size=G, loss_type="grpo",
                                               backend=impl)
            loss.backward()

        def local_loss():
            _, ls, en = ops.kernel_fwd(impl, shard, y_local, keep, 1.0, False, check_ids=False)
            K.kernel_module(impl).logprobs_bwd(ones, None, shard, y_local, keep, ls, en, 1.0, check_ids=False)

        pair("grpo_loss fwd+bwd", sharded_loss, local_loss, "local only (two-pass kernels)")
        del x

        # --- fused linear fwd+bwd
        if args.hidden:
            Hd = args.hidden
            gh = torch.Generator().manual_seed(7)
            hidden = (torch.randn(S, T, Hd, generator=gh) * 0.5).to(dtype).requires_grad_(True)
            w_full = torch.randn(V, Hd, generator=gh).mul_(Hd ** -0.5).to(dtype)
            w = w_full[a:b].clone().requires_grad_(True)
            del w_full

            def sharded_fused():
                hidden.grad = None
                w.grad = None
                loss = vp.vocab_parallel_fused_linear_grpo_loss(hidden, w, tokens, rewards, mask, group=group,
                                                                group_size=G, loss_type="grpo", backend=impl)
                loss.backward()

            add("fused_linear fwd+bwd", "sharded", *_time_group(sharded_fused, max(2, args.rounds // 2)))
            grad_h = torch.zeros(S * T, Hd, dtype=torch.float32)
            add("fused_linear grad_hidden all-reduce", "collectives",
                *_time_group(lambda: dist.all_reduce(grad_h, group=group), args.rounds * 2))
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(dict(rows=rows, backend=impl), f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _unsharded(args, threads):
    import grpo_kernels

    torch.set_num_threads(threads)
    dtype = getattr(torch, args.dtype)
    S, T, V = args.rows // args.seq, args.seq, args.vocab
    tokens, mask, rewards = _inputs(S, T, V, dtype)
    g = torch.Generator().manual_seed(100)
    full = torch.randn(S, T, V, generator=g, dtype=torch.float32).mul_(2).to(dtype)
    rows = []
    tag = f"unsharded, {threads} thread{'s' if threads > 1 else ''}"

    x = full.requires_grad_(True)
    del full

    def fwd():
        with torch.no_grad():
            grpo_kernels.token_logprobs(x, tokens, 1.0, True, mask=mask, backend=args.backend)

    def fwd_bwd():
        x.grad = None
        lp, ent = grpo_kernels.token_logprobs(x, tokens, 1.0, True, mask=mask, backend=args.backend)
        (lp.sum() + ent.sum()).backward()

    def loss():
        x.grad = None
        out = grpo_kernels.grpo_loss(x, tokens, rewards, mask, group_size=G, loss_type="grpo", backend=args.backend)
        out.backward()

    for op, fn in (("token_logprobs fwd", fwd), ("token_logprobs fwd+bwd", fwd_bwd), ("grpo_loss fwd+bwd", loss)):
        ms, times = _time_local(fn, args.rounds)
        rows.append(dict(op=op, what=tag, ms=ms, times_ms=times))
    del x
    if args.hidden:
        gh = torch.Generator().manual_seed(7)
        hidden = (torch.randn(S, T, args.hidden, generator=gh) * 0.5).to(dtype).requires_grad_(True)
        w = torch.randn(V, args.hidden, generator=gh).mul_(args.hidden ** -0.5).to(dtype).requires_grad_(True)

        def fused():
            hidden.grad = None
            w.grad = None
            grpo_kernels.fused_linear_grpo_loss(hidden, w, tokens, rewards, mask, group_size=G, loss_type="grpo",
                                                backend=args.backend).backward()

        ms, times = _time_local(fused, max(2, args.rounds // 2))
        rows.append(dict(op="fused_linear fwd+bwd", what=tag, ms=ms, times_ms=times))
    return rows


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _markdown(meta, rows):
    from grpo_kernels.vocab_parallel import COMM_FLOATS_PER_ROW

    W, N, V, e = meta["world_size"], meta["rows"], meta["vocab"], meta["comm_bytes_per_float"]
    out = [f"# vocab-parallel log-probs / loss: {W} CPU processes (gloo) vs unsharded", "",
           f"- {meta['device_name']}; date {meta['date']}, commit `{str(meta['git_commit'])[:12]}`"
           f"{' (dirty: ' + ', '.join(meta['git_modified']) + ')' if meta.get('git_dirty') else ''}, "
           f"torch {meta['torch']}, backend `{meta['backend']}`",
           f"- shape: N = S·T = {N} rows ({meta['S']}×{meta['T']}), V = {V} ({meta['vocab_local']} per rank), "
           f"{meta['dtype']}; sharded: {W} processes × 1 torch thread; fused-linear H = {meta['hidden'] or '–'}",
           f"- load average at start: {meta.get('loadavg_at_start')}, at the end: {meta.get('loadavg_at_end')} (CPU "
           "timings are sensitive to other load); ms = median over rounds (sharded: the slowest rank of each round)",
           ""]
    mx, sm_e = COMM_FLOATS_PER_ROW[True]
    _, sm_n = COMM_FLOATS_PER_ROW[False]
    ring = 2 * (W - 1) / W
    out += ["## Communication per call", "",
            "| what | collective | payload | per row | ring traffic per rank |", "|---|---|---|---|---|",
            f"| layout + consistency check | all-gather of 8 int64 per rank | {8 * 8 * W} B | – "
            f"| {8 * 8 * (W - 1)} B |",
            f"| log-prob statistics | MAX all-reduce ({mx} floats/row) | {mx * e * N / 1024:.0f} KiB | {mx * e} B | "
            f"{ring * mx * e * N / 1024:.0f} KiB |",
            f"| with entropy | SUM all-reduce ({sm_e} floats/row) | {sm_e * e * N / 1024:.0f} KiB | {sm_e * e} B | "
            f"{ring * sm_e * e * N / 1024:.0f} KiB |",
            f"| without entropy | SUM all-reduce ({sm_n} floats/row) | {sm_n * e * N / 1024:.0f} KiB | {sm_n * e} B | "
            f"{ring * sm_n * e * N / 1024:.0f} KiB |"]
    if meta["hidden"]:
        Hd = meta["hidden"]
        out.append(f"| fused-linear grad_hidden | SUM all-reduce ({Hd} floats/row) | {Hd * e * N / 2 ** 20:.1f} MiB | "
                   f"{Hd * e} B | {ring * Hd * e * N / 2 ** 20:.1f} MiB |")
    out += ["", f"For comparison, one rank reads {meta['vocab_local'] * meta['elt']} B of logits per row per pass.", "",
            "## Time per call", "", "| op | what | ms median [p10–p90] | rounds |", "|---|---|---|---|"]
    for r in rows:
        ts = sorted(r["times_ms"])
        q = lambda f: ts[min(len(ts) - 1, int(f * (len(ts) - 1) + 0.5))]  # noqa: E731
        out.append(f"| {r['op']} | {r['what']} | {r['ms']:.2f} [{q(0.1):.2f}–{q(0.9):.2f}] | {len(ts)} |")
    out += ["", "## Overhead of going vocab-parallel", "",
            "Overhead: the median over rounds of (sharded − local only), the two timed alternately in the same rounds.",
            "",
            "| op | sharded ms | local-only ms | overhead ms (% of sharded) | unsharded 1 thr ms | unsharded "
            f"{W} thr ms | speed-up vs the faster unsharded |", "|---|---|---|---|---|---|---|"]
    by = {(r["op"], r["what"].split(" (")[0]): r["ms"] for r in rows}
    diffs = {r["op"]: r["overhead_ms_median_of_round_differences"] for r in rows
             if "overhead_ms_median_of_round_differences" in r}
    for op in ("token_logprobs fwd", "token_logprobs fwd+bwd", "grpo_loss fwd+bwd", "fused_linear fwd+bwd"):
        sh = by.get((op, "sharded"))
        if sh is None:
            continue
        lo = by.get((op, "local only"))
        u1 = by.get((op, "unsharded, 1 thread"))
        uw = by.get((op, f"unsharded, {W} threads"))
        f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        d = diffs.get(op)
        ov = "–" if d is None else f"{d:.2f} ({100 * d / sh:.0f}%)"
        best = min([u for u in (u1, uw) if u is not None], default=None)
        sp = "–" if best is None else f"{best / sh:.2f}×"
        out.append(f"| {op} | {sh:.2f} | {f(lo)} | {ov} | {f(u1)} | {f(uw)} | {sp} |")
    out += ["", "Notes: `local only` is the shard's kernel work with no collective and no bookkeeping (fingerprint, "
            "local-id rewrite, autograd); unsharded `grpo_loss` on-policy is the one-pass schedule (one read of the "
            "logits), the vocab-parallel loss is always two-pass (the gradient needs the global statistics, known only "
            "after the forward's all-reduces), so its local-only reference is the two-pass kernels.", ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256, help="fused-linear H (0 = skip)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output-dir", default=os.path.join(ROOT, "benchmarks", "results", "cpu-amd-epyc-2vcpu",
                                                         "vocab_parallel"))
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.seq, args.vocab, args.hidden, args.rounds = 128, 16, 1000, 32, 3
    from grpo_kernels.bench.report import run_metadata

    meta = run_metadata("cpu", copy_bw_gbps=None, cold_l2=False, quick=args.quick, argv=sys.argv[1:] if argv is None
                        else argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank0.json")
        mp.spawn(_worker, args=(args.world, _free_port(), args, path), nprocs=args.world, join=True)
        with open(path) as f:
            got = json.load(f)
    rows = got["rows"]
    for threads in sorted({1, args.world}):
        rows += _unsharded(args, threads)
    elt = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    acc = 8 if args.dtype == "float64" else 4
    meta.update(world_size=args.world, rows=args.rows, S=args.rows // args.seq, T=args.seq, vocab=args.vocab,
                vocab_local=-(-args.vocab // args.world), dtype=args.dtype, elt=elt, hidden=args.hidden,
                backend=got["backend"], comm_bytes_per_float=acc, threads_per_rank=1)
    from grpo_kernels.vocab_parallel import COMM_FLOATS_PER_ROW

    meta["comm_bytes_per_row"] = {"with_entropy": sum(COMM_FLOATS_PER_ROW[True]) * acc,
                                  "without_entropy": sum(COMM_FLOATS_PER_ROW[False]) * acc,
                                  "fused_linear_grad_hidden": args.hidden * acc}
    try:
        meta["loadavg_at_end"] = [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        pass
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    md = _markdown(meta, rows)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
