"""Writing the results: ``results.json`` (every row stamped), ``results.md`` (tables) and PNG plots.

Rows are the dicts :func:`grpo_kernels.bench.cases.measure` returns. :func:`finalize_rows` stamps them with the
run's metadata and adds the derived columns: ``pct_copy_bw`` and the speed-ups against the case's eager
baseline (``speedup_vs_eager``) and against every peer that ran on the same case (``speedup_vs``: ``{peer: x}``,
where ``x > 1`` means this row is faster than that peer).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .cases import BASELINE, PEER_NAMES

STAMP_FIELDS = ("device", "device_name", "torch", "triton", "grpo_kernels", "git_commit", "date")
EXTRA_STAMP_FIELDS = ("torch_cuda", "git_dirty", "cold_l2", "torch_threads", "copy_bw_gbps")
ROW_FIELDS = ("op", "mode", "shape", "dtype", "loss_type", "impl", "kind", "status", "reason", "median_ms",
              "p10_ms", "p90_ms", "rounds", "ideal_bytes", "gbps", "pct_copy_bw", "tflops", "peak_extra_bytes",
              "peak_extra_x_logits", "speedup_vs_eager", "speedup_vs", "max_abs_diff", "max_rel_diff")


# ----------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------
def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def peer_versions() -> Dict[str, Optional[str]]:
    """Installed versions of the peers a run may compare against (None = not installed)."""
    from importlib import metadata

    out: Dict[str, Optional[str]] = {}
    for dist in ("liger-kernel", "trl"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_metadata(device, *, copy_bw_gbps: Optional[float], cold_l2: bool, quick: bool,
                 argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """The stamp every row carries, plus run-level facts (threads, load, copy bandwidth)."""
    from .. import __version__

    try:
        import triton  # noqa: F401 - only its version is read

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    # A copy of the tree without .git (e.g. on a lent GPU machine) takes the commit from the environment.
    commit = _git("rev-parse", "HEAD") or os.environ.get("GRPO_KERNELS_GIT_COMMIT")
    # kernel-relevant sources only (the trainer, docs and tests do not change a benchmark number)
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "csrc", ":(glob)grpo_kernels/*.py")
    modified = [line[3:] for line in (dirty or "").splitlines() if line.strip()]
    device = torch.device(device)
    meta = OrderedDict(device=str(device), device_name=device_name(device), torch=torch.__version__,
                       torch_cuda=torch.version.cuda, triton=triton_version, grpo_kernels=__version__, git_commit=commit or "unknown",
                       git_dirty=bool(modified) if dirty is not None else None, git_modified=modified, date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       torch_threads=torch.get_num_threads(), copy_bw_gbps=copy_bw_gbps, cold_l2=cold_l2, quick=quick,
                       python=platform.python_version(), peers=peer_versions(),
                       argv=list(argv) if argv is not None else None)
    if device.type == "cpu":
        try:
            meta["loadavg_at_start"] = [float(x) for x in open("/proc/loadavg").read().split()[:3]]
        except OSError:
            pass
    return meta


# ----------------------------------------------------------------------------------------------------------
# Derived columns
# ----------------------------------------------------------------------------------------------------------
def _case_key(r: dict):
    return (r["op"], r["mode"], r["shape"], r["dtype"], r["loss_type"])


def finalize_rows(rows: Iterable[dict], meta: Dict[str, object]) -> List[dict]:
    """Stamp rows with ``meta``'s fields and add ``pct_copy_bw``, ``speedup_vs_eager`` and ``speedup_vs``."""
    rows = [dict(r) for r in rows]
    by_case: Dict[tuple, Dict[str, dict]] = OrderedDict()
    for r in rows:
        by_case.setdefault(_case_key(r), {})[r["impl"]] = r
    bw = meta.get("copy_bw_gbps")
    for r in rows:
        for k in STAMP_FIELDS + EXTRA_STAMP_FIELDS:
            r[k] = meta.get(k)
        ok = r.get("status") == "ok"
        r["pct_copy_bw"] = 100.0 * r["gbps"] / bw if ok and bw else None
        same = by_case[_case_key(r)]
        base = same.get(BASELINE[r["op"]])
        r["speedup_vs_eager"] = (base["median_ms"] / r["median_ms"]
                                 if ok and base is not None and base.get("status") == "ok" else None)
        r["speedup_vs"] = ({p: same[p]["median_ms"] / r["median_ms"] for p in _peers_in(same) if p != r["impl"]}
                           if ok else {})
    return rows


def _peers_in(same: Dict[str, dict]) -> List[str]:
    return [name for name, r in same.items()
            if r.get("status") == "ok" and (name in PEER_NAMES or name == "unfused-auto")]


# ----------------------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------------------
def write_json(path: str, meta: Dict[str, object], rows: List[dict]) -> str:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
        f.write("\n")
    return path


def write_script_results(out_dir: str, stem: str, result: Dict[str, object], text: str) -> List[str]:
    """A stand-alone benchmark script's outputs (``benchmarks/*.py``): ``<stem>.json`` holding ``result`` and
    ``<stem>.md`` holding ``text``, in ``out_dir`` (created if missing). Returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    with open(paths[1], "w") as f:
        f.write(text)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------
def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 100:
        return f"{x:.0f}"
    if mag >= 10:
        return f"{x:.1f}"
    if mag >= 1:
        return f"{x:.2f}"
    return f"{x:.{digits}g}"


def _fmt_mem(r: dict) -> str:
    b = r.get("peak_extra_bytes")
    if b is None:
        return "–"
    gb = b / 1e9
    s = f"{gb:.3f} GB" if gb < 1 else f"{gb:.2f} GB"
    x = r.get("peak_extra_x_logits")
    return s if x is None else f"{s} ({x:.2f}× logits)"


def _fmt_speedup(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _case_label(r: dict) -> str:
    lt = "" if r["op"] == "token_logprobs" else f" {r['loss_type']}"
    return f"{r['shape']} {r['dtype']}{lt}"


def markdown(meta: Dict[str, object], rows: List[dict]) -> str:
    """The results as Markdown: a header with the stamp, one table per (op, mode), then skipped rows."""
    bw = meta.get("copy_bw_gbps")
    lines = [f"# grpo_kernels benchmark: {meta.get('device_name')}", ""]
    lines.append(f"- date {meta.get('date')}, commit `{str(meta.get('git_commit'))[:12]}`"
                 f"{' (kernel sources modified)' if meta.get('git_dirty') else ''}"
                 f"{' (no git here: working-tree state unknown)' if meta.get('git_dirty') is None else ''}, grpo_kernels {meta.get('grpo_kernels')}, "
                 f"torch {meta.get('torch')}, triton {meta.get('triton')}, {meta.get('torch_threads')} torch threads")
    lines.append(f"- device copy bandwidth measured in this run: **{_fmt(bw)} GB/s** (read + write of a large tensor)"
                 f"{'; L2-cold timing' if meta.get('cold_l2') else ''}{'; --quick' if meta.get('quick') else ''}")
    peers = {k: v for k, v in (meta.get("peers") or {}).items() if v}
    if peers:
        lines.append("- peers installed: " + ", ".join(f"{k} {v}" for k, v in peers.items()))
    if "loadavg_at_start" in meta:
        lines.append(f"- load average at start: {meta['loadavg_at_start']} (CPU timings are sensitive to other load)")
    lines.append("- ms: median [p10–p90]; GB/s: the ideal byte count of the case (same for every row of a case; "
                 "see `grpo_kernels/bench/harness.py`) / median time; peak extra: memory beyond the inputs at the "
                 "call's peak, and as a multiple of the logits' size; × eager / × peer: that row's time / this "
                 "row's time; rel. Δ vs eager: largest difference from the eager baseline over the output (loss or "
                 "log-probs) and, after a backward, each gradient row's norm and the target-class gradient, divided "
                 "by max(1, largest baseline magnitude)")
    lines.append("")
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    groups: Dict[tuple, List[dict]] = OrderedDict()
    for r in ok_rows:
        groups.setdefault((r["op"], r["mode"]), []).append(r)
    for (op, mode), grp in groups.items():
        peers = [p for p in PEER_NAMES + ("unfused-auto",) if any(p in (r.get("speedup_vs") or {}) for r in grp)]
        flops = any(r.get("tflops") is not None for r in grp)
        head = ["case", "impl", "ms median [p10–p90]", "GB/s", "% copy BW"] + (["TFLOP/s"] if flops else [])
        head += ["peak extra", "× eager"] + [f"× {p}" for p in peers] + ["rel. Δ vs eager"]
        lines += [f"## {op} — {mode}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in grp:
            cells = [_case_label(r), f"`{r['impl']}`",
                     f"{_fmt(r['median_ms'])} [{_fmt(r['p10_ms'])}–{_fmt(r['p90_ms'])}]",
                     _fmt(r.get("gbps")), _fmt(r.get("pct_copy_bw"))]
            if flops:
                cells.append(_fmt(r.get("tflops")))
            cells += [_fmt_mem(r), _fmt_speedup(r.get("speedup_vs_eager"))]
            cells += [_fmt_speedup((r.get("speedup_vs") or {}).get(p)) for p in peers]
            d = r.get("max_rel_diff")
            cells.append("–" if d is None else f"{d:.1e}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    other = [r for r in rows if r.get("status") != "ok"]
    if other:
        n_cases = len({_case_key(r) for r in rows})
        reasons: Dict[tuple, List[str]] = OrderedDict()
        for r in other:
            label = f"{r['op']} {r['mode']} {_case_label(r)}"
            reasons.setdefault((r["impl"], r["status"], str(r.get("reason", ""))), []).append(label)
        lines += ["## Not run", "", "| impl | status | reason | cases |", "|---|---|---|---|"]
        for (impl, status, reason), labels in reasons.items():
            where = f"all {n_cases} cases" if len(labels) == n_cases and n_cases > 1 else "; ".join(labels)
            lines.append(f"| `{impl}` | {status} | {reason.replace('|', '/')} | {where} |")
        lines.append("")
    return "\n".join(lines)


def write_markdown(path: str, meta: Dict[str, object], rows: List[dict]) -> str:
    with open(path, "w") as f:
        f.write(markdown(meta, rows))
    return path


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------
_MARKERS = {"float32": "o", "bfloat16": "s", "float16": "^", "float64": "D"}


def write_plots(out_dir: str, meta: Dict[str, object], rows: List[dict]) -> List[str]:
    """One PNG per (op, mode): time and peak extra memory against V, one line per (impl, dtype, loss, tokens);
    horizontal bars per implementation when all the (op, mode)'s cases share one V."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ok_rows = [r for r in rows if r.get("status") == "ok"]
    groups: Dict[tuple, List[dict]] = OrderedDict()
    for r in ok_rows:
        groups.setdefault((r["op"], r["mode"]), []).append(r)
    paths = []
    for (op, mode), grp in groups.items():
        series: Dict[str, List[dict]] = OrderedDict()
        for r in grp:
            hid = f" H={r['H']}" if r.get("H") else ""
            lt = "" if op == "token_logprobs" else f" {r['loss_type']}"
            label = f"{r['impl']} {r['dtype']}{lt} N={r['S'] * r['T']}{hid}"
            series.setdefault(label, []).append(r)
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        impls = list(OrderedDict.fromkeys(r["impl"] for r in grp))
        if len({r["V"] for r in grp}) == 1:  # one vocabulary: bars per implementation instead of lines
            paths.append(_bar_plot(plt, out_dir, op, mode, meta, series, palette, impls))
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(15, 4.5))
        for label, pts in series.items():
            pts = sorted(pts, key=lambda r: r["V"])
            r0 = pts[0]
            # colour = implementation, marker = dtype, line style = loss family
            style = dict(color=palette[impls.index(r0["impl"]) % len(palette)],
                         marker=_MARKERS.get(r0["dtype"], "o"),
                         linestyle="-" if r0["loss_type"] in ("softmax", "-") else "--", label=label)
            ax_t.plot([r["V"] for r in pts], [r["median_ms"] for r in pts], **style)
            mem = [(r["V"], r["peak_extra_bytes"] / 2 ** 30) for r in pts if r.get("peak_extra_bytes") is not None]
            if mem:
                ax_m.plot([v for v, _ in mem], [m for _, m in mem], **style)
        for ax, title, unit in ((ax_t, "time (median)", "ms"), (ax_m, "peak extra memory", "GiB")):
            ax.set_xlabel("vocabulary V")
            ax.set_ylabel(unit)
            ax.set_title(f"{op} {mode}: {title}")
            ax.set_xscale("log")
            ax.grid(True, alpha=0.3)
        ax_t.set_yscale("log")
        ax_m.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(f"{meta.get('device_name')} — {meta.get('date')}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}-{mode}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _bar_plot(plt, out_dir: str, op: str, mode: str, meta, series, palette, impls) -> str:
    labels = list(series)
    rows = [series[k][0] for k in labels]
    colors = [palette[impls.index(r["impl"]) % len(palette)] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 0.45 * len(labels) + 2))
    ax_t.barh(labels, [r["median_ms"] for r in rows], color=colors)
    ax_t.set_xlabel("ms (median)")
    ax_m.barh(labels, [(r.get("peak_extra_bytes") or 0) / 2 ** 30 for r in rows], color=colors)
    ax_m.set_xlabel("peak extra memory (GiB)")
    ax_m.set_yticklabels([])
    for ax in (ax_t, ax_m):
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    ax_t.set_title(f"{op} {mode}, V={rows[0]['V']}: time")
    ax_m.set_title("peak extra memory")
    fig.suptitle(f"{meta.get('device_name')} — {meta.get('date')}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{op}-{mode}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(out_dir: str, meta: Dict[str, object], rows: List[dict], *, plots: bool = True) -> Dict[str, object]:
    """Write ``results.json``, ``results.md`` and (optionally) the PNGs into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    out = {"json": write_json(os.path.join(out_dir, "results.json"), meta, rows),
           "markdown": write_markdown(os.path.join(out_dir, "results.md"), meta, rows), "plots": []}
    if plots:
        out["plots"] = write_plots(out_dir, meta, rows)
    return out
