"""The benchmark harness itself: byte-count model, statistics, memory measurement, report writer and CLI.

Benchmark numbers are never asserted here: the timing tests only check the bookkeeping (number of calls,
ordering of quantiles), and the CLI runs on tiny shapes with ``--quick``.
"""

import json
import math
import time

import pytest
import torch

import grpo_kernels
from grpo_kernels.bench import cases as C
from grpo_kernels.bench import harness as H
from grpo_kernels.bench import impls as I
from grpo_kernels.bench import report as R
from grpo_kernels.cli import main


# ----------------------------------------------------------------------------------------------------------
# Byte-count and FLOP model (hand-computed)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,mode,elt,kw,expected", [
    # N = 6 tokens, V = 10: logits pass = 6*10*elt; tokens 8*6 = 48; rewards 4*2 = 8
    ("grpo_loss", "fwd", 4, {}, 240 + 48 + 8),
    ("grpo_loss", "fwd_bwd", 4, {}, 2 * 240 + 48 + 8),
    ("grpo_loss", "fwd", 4, {"has_mask": True}, 240 + 48 + 6 + 8),
    # log-probs: + 4N written; fwd_bwd: 3 passes + 4N upstream gradient read
    ("token_logprobs", "fwd", 2, {}, 120 + 48 + 24),
    ("token_logprobs", "fwd_bwd", 2, {}, 3 * 120 + 48 + 24 + 24),
    # fused linear, H = 4, bf16: hidden 6*4*2 = 48, weight 10*4*2 = 80, tokens 48, rewards 8
    ("fused_linear", "fwd", 2, {"H": 4}, 48 + 80 + 48 + 8),
    ("fused_linear", "fwd_bwd", 2, {"H": 4}, 48 + 80 + 48 + 8 + 48 + 80),
    ("fused_linear", "fwd_bwd", 2, {"H": 4, "has_bias": True}, 48 + 100 + 48 + 8 + 48 + 100),
])
def test_ideal_bytes_hand_computed(op, mode, elt, kw, expected):
    assert H.ideal_bytes(op, mode, S=2, T=3, V=10, elt=elt, **kw) == expected


def test_ideal_bytes_issue3_floor():
    # issue 3: 8192 x 151,936 bf16 fwd+bwd, the 1-read + 1-write floor is 1.66 ms at 3 TB/s
    b = H.ideal_bytes("grpo_loss", "fwd_bwd", S=16, T=512, V=151936, elt=2)
    logits_part = b - 8 * 8192 - 4 * 16
    assert logits_part == 2 * 8192 * 151936 * 2
    assert round(logits_part / 3e12 * 1e3, 2) == 1.66


def test_ideal_flops_and_sizes():
    assert H.ideal_flops("fused_linear", "fwd", S=2, T=3, V=10, H=4) == 2 * 6 * 4 * 10
    assert H.ideal_flops("fused_linear", "fwd_bwd", S=2, T=3, V=10, H=4) == 6 * 6 * 4 * 10
    assert H.ideal_flops("grpo_loss", "fwd", S=2, T=3, V=10) is None
    assert H.logits_bytes(32, 512, 32000, 4) == 2_097_152_000  # issue 5's "2.1 GB"
    assert [H.dtype_size(d) for d in ("float32", "bfloat16", torch.float16, torch.float64)] == [4, 2, 2, 8]


@pytest.mark.parametrize("args,match", [
    (("softmax", "fwd"), "op must be one of"),
    (("grpo_loss", "bwd"), "mode must be one of"),
    (("fused_linear", "fwd"), "hidden size H"),
])
def test_ideal_bytes_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        H.ideal_bytes(*args, S=2, T=3, V=10, elt=4)


# ----------------------------------------------------------------------------------------------------------
# Statistics and timing bookkeeping
# ----------------------------------------------------------------------------------------------------------
def test_quantile_matches_linear_interpolation():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert H.quantile(xs, 0.5) == 2.5
    assert H.quantile(xs, 0.1) == pytest.approx(1.3)
    assert H.quantile(xs, 0.9) == pytest.approx(3.7)
    assert H.quantile(xs, 0.0) == 1.0 and H.quantile(xs, 1.0) == 4.0
    with pytest.raises(ValueError):
        H.quantile([], 0.5)
    with pytest.raises(ValueError):
        H.quantile(xs, 1.5)


def test_summarize_hand_computed():
    s = H.summarize([1.0, 2.0, 3.0, 4.0, 10.0], warmup=2)
    assert (s.median_ms, s.min_ms, s.max_ms, s.mean_ms, s.rounds, s.warmup) == (3.0, 1.0, 10.0, 4.0, 5, 2)
    assert s.p10_ms == pytest.approx(1.4) and s.p90_ms == pytest.approx(7.6)


def test_time_cpu_counts_calls_and_orders_quantiles():
    calls, prepared = [], []
    stats = H.time_cpu(lambda: calls.append(1), warmup=3, min_rounds=7, max_rounds=7, min_time_s=10.0,
                       before_each=lambda: prepared.append(1))
    assert stats.rounds == 7 and stats.warmup == 3
    assert len(calls) == 10 and len(prepared) == 10  # before_each runs before every call, warm-up included
    assert 0 <= stats.min_ms <= stats.p10_ms <= stats.median_ms <= stats.p90_ms <= stats.max_ms
    assert all(math.isfinite(v) for v in stats.as_dict().values())


def test_time_cpu_stops_at_min_rounds_when_min_time_is_reached():
    calls = []
    stats = H.time_cpu(lambda: calls.append(1), warmup=0, min_rounds=4, max_rounds=100, min_time_s=0.0)
    assert stats.rounds == 4 and len(calls) == 4


def test_time_cpu_caps_rounds_of_slow_calls():
    # every call sleeps 20 ms: after 3 rounds (>= 60 ms) the 30 ms max_time_s stops it short of min_rounds
    stats = H.time_cpu(lambda: time.sleep(0.02), warmup=0, min_rounds=5, min_time_s=0.0, max_time_s=0.03)
    assert stats.rounds == 3 and stats.min_ms >= 20.0


@pytest.mark.parametrize("kw", [dict(warmup=-1), dict(min_rounds=0), dict(min_rounds=5, max_rounds=4),
                                dict(min_time_s=-1.0)])
def test_time_cpu_bad_arguments(kw):
    with pytest.raises(ValueError):
        H.time_cpu(lambda: None, **kw)


def test_copy_bandwidth_is_positive():
    bw = H.copy_bandwidth("cpu", nbytes=4 * 2 ** 20, quick=True)
    assert math.isfinite(bw) and bw > 0


# ----------------------------------------------------------------------------------------------------------
# Peak memory (CPU: VmHWM reset through /proc/self/clear_refs)
# ----------------------------------------------------------------------------------------------------------
def test_cpu_peak_extra_sees_a_fresh_allocation():
    ok, why = H.cpu_hwm_supported()
    if not ok:
        pytest.skip(f"Linux-only measurement: {why}")
    n = 64 * 2 ** 20
    slack = 2 ** 20  # a few pages of the new buffer may already be resident (freed heap the allocator reuses)
    extra = H.cpu_peak_extra(lambda: torch.ones(n // 4))  # the returned tensor stays alive until the reading
    assert n - slack <= extra < n + 32 * 2 ** 20
    # a temporary that is freed inside the call still counts at its peak
    extra_tmp = H.cpu_peak_extra(lambda: float(torch.ones(n // 4).sum()))
    assert extra_tmp >= n - slack


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------
def test_curated_cpu_cases_cover_the_issue_targets():
    cases = C.curated_cases("cpu")
    keys = {c.key for c in cases}
    assert ("grpo_loss", "fwd_bwd", "16x256x32000", "float32", "softmax") in keys  # issue 4 target
    assert ("grpo_loss", "fwd_bwd", "16x256x32000", "bfloat16", "softmax") in keys
    assert any(c.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo") for c in cases)
    assert ("fused_linear", "fwd_bwd", "32x512x256x32000", "float32", "softmax") in keys  # issue 5 target


def test_curated_cuda_cases_use_real_shapes():
    cases = C.curated_cases("cuda")
    assert {c.tokens for c in cases} == {8192}
    assert {c.V for c in cases if c.op == "grpo_loss"} == {32000, 151936, 262144}
    assert {c.dtype for c in cases} == {"bfloat16"}
    assert {c.H for c in cases if c.op == "fused_linear"} == {4096}


def test_select_cases_product_and_retyping():
    cs = C.select_cases("cpu", shapes=[(4, 8, 64), (4, 8, 16, 64)], dtypes=["bfloat16"], loss_types=["grpo"],
                        modes=["fwd"])
    assert [(c.op, c.shape, c.dtype, c.loss_type) for c in cs] == [
        ("grpo_loss", "4x8x64", "bfloat16", "grpo"), ("token_logprobs", "4x8x64", "bfloat16", C.NO_LOSS),
        ("fused_linear", "4x8x16x64", "bfloat16", "grpo")]
    quick = C.select_cases("cpu", quick=True, dtypes=["float64"], ops=["grpo_loss"])
    assert quick and all(c.op == "grpo_loss" and c.dtype == "float64" for c in quick)
    with pytest.raises(ValueError, match="multiple of --group-size"):
        C.select_cases("cpu", shapes=[(6, 8, 64)], group_size=4)


@pytest.mark.parametrize("fn,text,match", [
    (C.parse_shape, "16x256", "3 .*or 4"),
    (C.parse_shape, "16xabcx3", "cannot parse"),
    (C.parse_shape, "0x2x3", "positive"),
    (C.parse_dtype, "float7", "unknown dtype"),
    (C.parse_loss_type, "ppo", "unknown loss type"),
])
def test_parsers_reject_bad_values(fn, text, match):
    with pytest.raises(ValueError, match=match):
        fn(text)


def test_parsers_accept_aliases():
    assert C.parse_dtype("bf16") == "bfloat16" and C.parse_dtype("fp32") == "float32"
    assert C.parse_shape("16x256x32000") == (16, 256, 32000)
    assert C.parse_shape("32x512x256x32000") == (32, 512, 256, 32000)


def test_implementations_list_baseline_first_and_explain_skips():
    case = C.Case("grpo_loss", "fwd", 4, 8, 64)
    impls = I.implementations(case, "cpu")
    names = [i.name for i in impls]
    assert names[0] == "torch" and impls[0].kind == "baseline" and impls[0].skip_reason is None
    assert set(C.PEER_NAMES) <= set(names)
    avail = grpo_kernels.available_backends("cpu")
    for i in impls:
        if i.name in C.BACKEND_NAMES:
            assert (i.skip_reason is None) == (i.name in avail)
        assert i.skip_reason is None or i.skip_reason.strip()  # every skip says why
    liger = next(i for i in impls if i.name == "liger")
    assert liger.skip_reason  # softmax loss, or not installed: never silently absent


@pytest.mark.parametrize("op, mode, loss_type", [("grpo_loss", "fwd_bwd", "softmax"), ("grpo_loss", "fwd", "grpo"),
                                                 ("token_logprobs", "fwd", C.NO_LOSS)])
def test_every_implementation_that_runs_here_matches_the_baseline(op, mode, loss_type):
    """Each backend and installed peer (TRL is in the [dev] extras) runs the case without error and gives the
    eager baseline's output (the correctness guard of the report)."""
    case = C.Case(op, mode, 4, 8, 64, loss_type=loss_type)
    inputs = C.build_inputs(case, "cpu")
    impls = [i for i in I.implementations(case, "cpu") if i.skip_reason is None and i.name != "torch.compile"]
    assert "trl" in [i.name for i in impls]
    base_row, base = C.measure(case, impls[0], "cpu", inputs, quick=True, memory=False)
    assert base_row["status"] == "ok" and base is not None
    for impl in impls[1:]:
        row, _ = C.measure(case, impl, "cpu", inputs, quick=True, memory=False, baseline_out=base)
        assert row["status"] == "ok", (impl.name, row.get("error"))
        assert row["max_rel_diff"] is not None and row["max_rel_diff"] < 1e-5, (impl.name, row["max_rel_diff"])


def test_max_diff_is_relative_to_at_least_one():
    base = torch.tensor([1e-9, 4.0], dtype=torch.float64)
    assert C._max_diff(base + torch.tensor([0.0, 0.5], dtype=torch.float64), base) == (0.5, 0.125)
    tiny = torch.tensor([1e-9], dtype=torch.float64)  # a loss that is ~0 (clipped loss, ratio 1): absolute
    assert C._max_diff(tiny * 3, tiny) == (pytest.approx(2e-9), pytest.approx(2e-9))
    assert C._max_diff(None, base) == (None, None)


def test_measure_reports_errors_and_skips_as_rows():
    case = C.Case("grpo_loss", "fwd", 4, 8, 64)
    inputs = C.build_inputs(case, "cpu")

    def broken(_inputs):
        def run():
            raise RuntimeError("kernel exploded")
        return run
    row, out = C.measure(case, I.Impl("x", "backend", broken), "cpu", inputs, quick=True)
    assert row["status"] == "error" and "kernel exploded" in row["reason"] and out is None
    row, _ = C.measure(case, I.Impl("y", "peer", skip_reason="not installed"), "cpu", inputs)
    assert row["status"] == "skipped" and row["reason"] == "not installed"


def test_measure_call_budget_reports_the_slow_call():
    case = C.Case("grpo_loss", "fwd", 4, 8, 64)
    calls = []

    def slow(_inputs):
        def run():
            calls.append(1)
            time.sleep(0.2)
            return torch.zeros(())
        return run
    row, _ = C.measure(case, I.Impl("slow", "backend", slow), "cpu", C.build_inputs(case, "cpu"), quick=True,
                       call_budget_s=0.1)
    assert row["status"] == "skipped" and "per-call budget" in row["reason"]
    assert row["single_call_ms"] >= 200 and len(calls) == 1  # not called again


def test_measure_torch_row_matches_reference_and_model():
    case = C.Case("grpo_loss", "fwd_bwd", 4, 8, 64)
    inputs = C.build_inputs(case, "cpu")
    impl = I.implementations(case, "cpu", include=["torch"])[0]
    row, fp = C.measure(case, impl, "cpu", inputs, quick=True)
    assert row["status"] == "ok", row
    # the fingerprint: loss, then each gradient row's norm, then the gradient at the target class
    logits = inputs["logits"].detach().clone().requires_grad_()
    loss = grpo_kernels.reference.grpo_loss(logits, inputs["tokens"], inputs["rewards"], group_size=4)
    loss.backward()
    g = logits.grad.reshape(32, 64)
    expect = torch.cat([loss.detach().reshape(1), g.norm(dim=-1), g.gather(-1, inputs["tokens"].reshape(32, 1))[:, 0]])
    torch.testing.assert_close(fp, expect.double())
    assert row["ideal_bytes"] == 2 * 32 * 64 * 4 + 8 * 32 + 4 * 4
    assert row["gbps"] == pytest.approx(row["ideal_bytes"] / (row["median_ms"] * 1e-3) / 1e9)
    assert inputs["logits"].grad is None  # gradients dropped after the row


# ----------------------------------------------------------------------------------------------------------
# Report writer
# ----------------------------------------------------------------------------------------------------------
def _row(impl, kind, ms):
    base = dict(op="grpo_loss", mode="fwd_bwd", shape="16x256x32000", S=16, T=256, V=32000, H=None,
                dtype="float32", loss_type="softmax", impl=impl, kind=kind, ideal_bytes=int(0.5e9))
    if ms is None:
        return dict(base, status="skipped", reason="Liger-Kernel is not installed")
    return dict(base, status="ok", reason="", median_ms=ms, p10_ms=ms * 0.9, p90_ms=ms * 1.2, rounds=5,
                gbps=500.0 / ms, tflops=None, peak_extra_bytes=int(0.5e9), peak_extra_x_logits=0.5 / 2.097,
                max_abs_diff=0.0, max_rel_diff=0.0)


def test_report_writer_outputs_are_parseable(tmp_path):
    meta = R.run_metadata("cpu", copy_bw_gbps=100.0, cold_l2=False, quick=True, argv=["bench"])
    rows = [_row("torch", "baseline", 10.0), _row("cpu", "backend", 2.0), _row("torch.compile", "peer", 4.0),
            _row("liger", "peer", None)]
    rows = R.finalize_rows(rows, meta)
    cpu = rows[1]
    assert cpu["speedup_vs_eager"] == pytest.approx(5.0)
    assert cpu["speedup_vs"] == {"torch.compile": pytest.approx(2.0)}
    assert cpu["pct_copy_bw"] == pytest.approx(250.0)  # 250 GB/s of a 100 GB/s copy
    assert rows[2]["speedup_vs"] == {}  # a peer is not compared with itself
    assert rows[3]["speedup_vs_eager"] is None and rows[3]["pct_copy_bw"] is None

    paths = R.write_all(str(tmp_path), meta, rows)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["rows"]) == 4
    for r in data["rows"]:
        for field in R.STAMP_FIELDS + ("shape", "dtype", "loss_type", "impl", "op", "mode"):
            assert field in r
    md = (tmp_path / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| case"))
    for col in ("ms median [p10–p90]", "GB/s", "% copy BW", "peak extra", "× eager", "× torch.compile"):
        assert col in header
    cpu_line = next(line for line in md.splitlines() if "`cpu`" in line)
    assert "5.00×" in cpu_line and "2.00×" in cpu_line and "2.00 [1.80–2.40]" in cpu_line
    assert "Liger-Kernel is not installed" in md
    assert paths["plots"] and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in paths["plots"])


# ----------------------------------------------------------------------------------------------------------
# CLI end to end (tiny shapes, --quick) and its errors
# ----------------------------------------------------------------------------------------------------------
def test_cli_end_to_end_quick(tmp_path, capsys):
    rc = main(["bench", "--device", "cpu", "--quick", "--shapes", "4x8x64,4x8x16x64", "--ops", "grpo_loss,fused_linear",
               "--impls", "torch,unfused-eager", "--output-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["meta"]["peers"]) == {"liger-kernel", "trl"}  # versions, or None when not installed
    rows = data["rows"]
    torch_rows = [r for r in rows if r["impl"] == "torch" and r["op"] == "grpo_loss"]
    assert {r["mode"] for r in torch_rows} == {"fwd", "fwd_bwd"}
    for r in torch_rows:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["speedup_vs_eager"] == pytest.approx(1.0)
        for field in R.STAMP_FIELDS:
            assert r[field], field
        assert (r["shape"], r["dtype"], r["loss_type"]) == ("4x8x64", "float32", "softmax")
    fl = [r for r in rows if r["op"] == "fused_linear"]
    assert {r["impl"] for r in fl} == {"torch", "unfused-eager"}
    if getattr(grpo_kernels, "fused_linear_grpo_loss", None) is None:
        assert all(r["status"] == "skipped" and "fused_linear_grpo_loss" in r["reason"] for r in fl)
    else:
        assert all(r["status"] == "ok" for r in fl)
    assert "## grpo_loss — fwd_bwd" in (tmp_path / "results.md").read_text()
    assert list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("argv,match", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--dtypes", "float7"], "--dtypes"),
    (["--shapes", "16x256"], "--shapes"),
    (["--loss-types", "ppo"], "--loss-types"),
    (["--impls", "nope"], "--impls"),
    (["--device", "tpu"], "--device"),
])
def test_cli_rejects_bad_options(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_group_size_mismatch(tmp_path, capsys):
    rc = main(["bench", "--device", "cpu", "--shapes", "6x8x64", "--group-size", "4", "--output-dir", str(tmp_path)])
    assert rc == 2 and "multiple of --group-size" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_cuda_without_a_gpu(tmp_path, capsys):
    rc = main(["bench", "--device", "cuda", "--output-dir", str(tmp_path)])
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# grpo-kernels sweep (Triton launch parameters): runs under the interpreter on tiny shapes
# ----------------------------------------------------------------------------------------------------------
def test_sweep_quick_under_interpreter(tmp_path, triton_interpret, capsys):
    pytest.importorskip("triton")
    out = tmp_path / "sweep.json"
    rc = main(["sweep", "--device", "cpu", "--quick", "--kernels", "fwd,fwd_grad", "--block-v", "auto,64",
               "--programs", "auto,2", "--output", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    # fwd: 2 block_v; fwd_grad: 2 block_v x 2 programs; programs are multiples of the SM count (1 on CPU)
    got = sorted((r["kernel"], r["block_v"] or 0, r["programs"] or 0) for r in rows)  # 0 = auto
    assert got == [("fwd", 0, 0), ("fwd", 64, 0), ("fwd_grad", 0, 0), ("fwd_grad", 0, 2), ("fwd_grad", 64, 0),
                   ("fwd_grad", 64, 2)]
    for r in rows:
        assert r["match"] is True and r["ms"] > 0 and r["V"] == 300 and r["N"] == 8
        assert r["gbps"] == pytest.approx({"fwd": 1, "fwd_grad": 2}[r["kernel"]] * 8 * 300 * 2 / (r["ms"] * 1e-3) / 1e9)
    assert sum(r["default"] for r in rows) == 2 and "partial" not in data["meta"]
    md = (tmp_path / "sweep.md").read_text()
    assert "## fwd_grad, V=300, N=8, bfloat16" in md and "triton (default)" in md
    assert md.strip() in capsys.readouterr().out


def test_sweep_reports_a_configuration_with_wrong_outputs(triton_interpret, monkeypatch):
    pytest.importorskip("triton")
    from grpo_kernels.kernels import triton_impl as tk
    from grpo_kernels.bench import sweep as SW

    real = tk.logprobs_fwd

    def broken(*a, block_v=None, **kw):
        logp, lse, ent = real(*a, block_v=block_v, **kw)
        return (logp + 1.0 if block_v == 64 else logp), lse, ent

    monkeypatch.setattr(tk, "logprobs_fwd", broken)
    res = SW.sweep(device="cpu", vocab_sizes=[100], tokens=4, dtype=torch.float32, kernels=["fwd"],
                   block_vs=[None, 64], warps=[None], programs=[None], quick=True, progress=False)
    good, bad = sorted(res["rows"], key=lambda r: r["block_v"] or 0)
    assert good["match"] and good["ms"] > 0
    assert bad["match"] is False and "ms" not in bad
    assert "outputs differ from the default configuration's" in SW.markdown(res)


@pytest.mark.parametrize("argv, env, match", [
    (["--device", "cpu", "--quick"], "0", "only under TRITON_INTERPRET=1"),
    (["--device", "cpu", "--quick", "--kernels", "fwd,nope"], "1", "--kernels must name some of"),
    (["--device", "cpu", "--quick", "--tokens", "0"], "1", "must be positive integers"),
])
def test_sweep_rejects_bad_options(argv, env, match, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", env)
    assert main(["sweep", *argv]) == 2
    assert match in capsys.readouterr().err


def test_cli_replot_rewrites_markdown_and_plots(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--quick", "--shapes", "4x8x64", "--ops", "grpo_loss", "--modes", "fwd",
                 "--impls", "torch", "--output-dir", str(tmp_path), "--no-progress", "--no-plots"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert "partial" not in data["meta"]  # the final write replaces the per-case partial one
    (tmp_path / "results.md").unlink()
    assert not list(tmp_path.glob("*.png"))
    assert main(["bench", "--replot", str(tmp_path)]) == 0
    assert "## grpo_loss — fwd" in (tmp_path / "results.md").read_text()
    assert list(tmp_path.glob("*.png"))
    assert main(["bench", "--replot", str(tmp_path / "nowhere")]) == 2
    assert "cannot read a results.json" in capsys.readouterr().err


def test_cli_keeps_finished_cases_when_stopped(tmp_path, monkeypatch):
    """results.json is rewritten after each case: a run interrupted in its second case keeps the first."""
    from grpo_kernels.bench import cases as C

    real, calls = C.measure, []

    def measure(case, *a, **kw):
        calls.append(case.mode)
        if case.mode == "fwd_bwd":
            raise KeyboardInterrupt
        return real(case, *a, **kw)

    monkeypatch.setattr(C, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--device", "cpu", "--quick", "--shapes", "4x8x64", "--ops", "grpo_loss", "--impls", "torch",
              "--output-dir", str(tmp_path), "--no-progress", "--no-memory"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["partial"] is True
    assert [(r["mode"], r["impl"], r["status"]) for r in data["rows"]] == [("fwd", "torch", "ok")]


def test_run_metadata_without_git_takes_the_commit_from_the_environment(monkeypatch):
    monkeypatch.setattr(R, "_git", lambda *a: None)
    monkeypatch.setenv("GRPO_KERNELS_GIT_COMMIT", "abc123")
    meta = R.run_metadata("cpu", copy_bw_gbps=1.0, cold_l2=False, quick=True, argv=[])
    assert meta["git_commit"] == "abc123" and meta["git_dirty"] is None
    assert "working-tree state unknown" in R.markdown(meta, [])
    monkeypatch.delenv("GRPO_KERNELS_GIT_COMMIT")
    assert R.run_metadata("cpu", copy_bw_gbps=1.0, cold_l2=False, quick=True, argv=[])["git_commit"] == "unknown"
