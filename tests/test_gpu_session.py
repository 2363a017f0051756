"""What can be checked of ``benchmarks/gpu_session.sh`` without a GPU: its syntax, that its stage limits fit the
7-minute session, that a failed build of the C++/CUDA ops is recorded once and that no later stage or process builds
again (a real failing build: ``CXX=false`` with ``GRPO_KERNELS_FORCE_JIT=1``), and that the sweep leaves out the
launch points that cannot be fast (16384 x 8 warps)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
HELPER = os.path.join(ROOT, "benchmarks", "gpu_session_helper.py")
STAGES = ("PREFLIGHT_S", "BUILD_S", "TESTS_GPU_S", "TESTS_NATIVE_S", "BENCH_S", "PEERS_S", "SWEEP_S")
LIMIT_VARS = STAGES + ("SESSION_S", "PER_TEST_S", "INSTALL_S")


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in LIMIT_VARS + ("OUT", "GRPO_KERNELS_BUILD_FAILED_FILE")}
    env.update(PYTHON=sys.executable, GPU_SESSION_CPU_OK="1", GPU_SESSION_NO_INSTALL="1",
               PYTHONPATH=ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    env.update(kw)
    return env


def _bash(*args, timeout=120, **env):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=_env(**env))


def test_syntax():
    res = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_stage_limits_fit_seven_minutes():
    text = open(SCRIPT, encoding="utf-8").read()
    defaults = {k: int(v) for k, v in re.findall(r'^([A-Z_]+_S)="\$\{\1:-(\d+)\}"', text, re.M)}
    assert set(STAGES) | {"SESSION_S"} <= set(defaults)
    assert defaults["SESSION_S"] == 420
    # the build's wait runs alongside the first test stage; everything else is one after the other
    total = (defaults["PREFLIGHT_S"] + max(defaults["BUILD_S"], defaults["TESTS_GPU_S"]) + defaults["TESTS_NATIVE_S"]
             + defaults["BENCH_S"] + defaults["PEERS_S"] + defaults["SWEEP_S"])
    assert total <= 420
    res = _bash("--budget")
    assert res.returncode == 0, res.stdout + res.stderr
    shown = dict(kv.split("=") for kv in res.stdout.split())
    assert int(shown["TOTAL"]) == total and all(int(shown[k]) == defaults[k] for k in STAGES)
    # limits that would not fit: refused before anything runs
    res = _bash("all", BENCH_S="300")
    assert res.returncode == 2 and "> SESSION_S=420" in res.stderr
    assert _bash("--budget", SWEEP_S="200").returncode == 1


_PROBE = r"""
import json, sys
from grpo_kernels.kernels import native
import grpo_kernels
calls = []
real = native._jit
native._jit = lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1]
ok, reason = native.is_available("cpu")
print(json.dumps({"ok": ok, "reason": reason, "jit_calls": calls,
                  "backends": grpo_kernels.available_backends("cpu")}))
"""


def _probe(env):
    res = subprocess.run([sys.executable, HELPER, "run", "-c", _PROBE], capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 0, res.stderr
    import json

    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture
def failing_build(tmp_path):
    """An environment in which the C++ build really fails (the compiler is ``false``), fast."""
    return dict(GRPO_KERNELS_FORCE_JIT="1", CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))


def test_a_failed_build_is_recorded_once_and_never_retried(tmp_path, failing_build):
    out = tmp_path / "out"
    marker = out / "native_build_failed.txt"
    res = _bash("build", OUT=str(out), GPU_SESSION_WORK=str(tmp_path / "w1"), **failing_build)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = marker.read_text().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["cpu", "cuda"]  # once each: the CUDA ops need the CPU library
    assert "build FAILED, recorded once" in (out / "session.log").read_text()
    # a later stage of a later run in the same $OUT: no build is started (no build log), the stage runs on
    res = _bash("bench", OUT=str(out), GPU_SESSION_WORK=str(tmp_path / "w2"), **failing_build)
    assert res.returncode == 0, res.stdout + res.stderr
    log = (out / "session.log").read_text()
    assert "build: not retried, a failure is recorded" in log and "bench: rc=" in log
    assert not (tmp_path / "w2" / "build.log").exists()
    assert marker.read_text().splitlines() == lines  # nothing appended
    # a later process: the loader reports the recorded failure and never starts the build...
    env = _env(GRPO_KERNELS_BUILD_FAILED_FILE=str(marker), **failing_build)
    got = _probe(env)
    assert not got["ok"] and got["jit_calls"] == [] and "cpu" not in got["backends"]
    assert "not retried" in got["reason"] and lines[0].split(": ", 1)[1] in got["reason"]
    # ... where, without the marker, it would build again (and fail again)
    got = _probe(dict(env, GRPO_KERNELS_BUILD_FAILED_FILE=str(tmp_path / "none.txt")))
    assert not got["ok"] and got["jit_calls"] == ["grpo_kernels_C_cpu"]
    # while the build runs, the first tests load nothing at all
    got = _probe(dict(env, GRPO_KERNELS_BUILD_FAILED_FILE=str(tmp_path / "none.txt"), GPU_SESSION_NATIVE="withheld"))
    assert not got["ok"] and got["jit_calls"] == [] and "in the background" in got["reason"]


def test_the_sweep_leaves_out_the_points_that_cannot_be_fast():
    pytest.importorskip("triton")  # the launch heuristic lives in the Triton module
    res = _bash("--sweep-plan")
    assert res.returncode == 0, res.stderr
    points = [dict([kv.split("=") for kv in line.split()[2:]], kernel=line.split()[1])
              for line in res.stdout.splitlines() if line.startswith("V=151936 ")]
    pts = {(p["kernel"], p["block_v"], p["num_warps"]) for p in points}
    assert ("fwd", "16384", "8") not in pts and ("fwd_grad", "16384", "8") not in pts  # 228 registers
    assert ("fwd_grad", "auto", "8") not in pts  # auto is 16384 for the one-pass bf16 kernel: the same point
    assert {("fwd", "16384", "16"), ("fwd_grad", "16384", "16"), ("fwd", "auto", "8"), ("fwd", "8192", "8"),
            ("fwd_grad", "auto", "auto")} <= pts
    assert all(float(p["values_per_thread"]) <= 32 for p in points)
    assert len([p for p in points if p["kernel"] == "fwd_grad"]) == 4 * len({k for k in pts if k[0] == "fwd_grad"})


@pytest.mark.skipif(not shutil.which("ninja") or not shutil.which("c++"),
                    reason="needs ninja and a C++ compiler (a build that really starts)")
def test_a_build_past_its_limit_is_stopped_and_recorded(tmp_path):
    """A real build (no prebuilt library) that cannot finish in BUILD_S=6 s: stopped with its compilers, its lock
    removed, and the failure recorded once for every later process."""
    out, ext = tmp_path / "out", tmp_path / "ext"
    res = _bash("build", OUT=str(out), GPU_SESSION_WORK=str(tmp_path / "w"), BUILD_S="6", GRPO_KERNELS_FORCE_JIT="1",
                TORCH_EXTENSIONS_DIR=str(ext))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "native_build_failed.txt").read_text().splitlines() == [
        f"{k}: the build did not finish within BUILD_S=6 s (stopped)" for k in ("cpu", "cuda")]
    assert "build=124" in (out / "session.log").read_text()
    assert not list(ext.rglob("lock"))


def test_the_two_test_stages_split_the_gpu_tests():
    """Every test goes to exactly one stage: the C++/CUDA files and the rows of the ``cuda`` backend after the
    build, everything else (Triton, ``triton-cuda`` rows, trainer, new files) while it runs."""
    from types import SimpleNamespace as NS

    sys.path.insert(0, os.path.dirname(HELPER))
    try:
        import gpu_session_helper as h
    finally:
        sys.path.remove(os.path.dirname(HELPER))

    def item(path, param=None):
        return NS(fspath=os.path.join(ROOT, "tests", path), callspec=None if param is None else NS(id=param))

    after = [item("test_cpp_kernels.py", "cuda-fp32"), item("test_fused_linear.py"),
             item("test_kernel_contract.py", "cuda"), item("test_kernel_contract.py", "cuda-bf16-ragged")]
    during = [item("test_triton_kernels.py", "151936"), item("test_kernel_contract.py", "triton-cuda-bf16"),
              item("test_trainer.py", "True"), item("test_triton_launch.py"), item("test_new.py", "cudagraph")]
    assert all(h.needs_native(i) for i in after) and not any(h.needs_native(i) for i in during)
    config = NS(hook=NS(pytest_deselected=lambda items: None))
    kept = {}
    for phase in ("without-native", "with-native"):
        items = after + during
        h.PhasePlugin(phase).pytest_collection_modifyitems(config, items)
        kept[phase] = items
    assert kept["with-native"] == after and kept["without-native"] == during


def test_the_loader_honours_a_recorded_build_failure(tmp_path, monkeypatch):
    """native.ensure_loaded reads $GRPO_KERNELS_BUILD_FAILED_FILE itself: a recorded failure is reported without a
    build attempt, and a new failure is recorded for the next process."""
    from grpo_kernels.kernels import native

    marker = tmp_path / "failed.txt"
    marker.write_text("cuda: nvcc exploded\n")
    monkeypatch.setenv(native.FAILED_FILE_ENV, str(marker))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_load_cuda", lambda: (_ for _ in ()).throw(AssertionError("rebuilt")))
    with pytest.raises(RuntimeError, match="nvcc exploded .*not retried"):
        native.ensure_loaded("cuda")

    def broken():
        raise OSError("no compiler")

    monkeypatch.setattr(native, "_load_cpu", broken)
    with pytest.raises(RuntimeError, match="no compiler"):
        native.ensure_loaded("cpu")
    assert "cpu: OSError: no compiler" in marker.read_text()
