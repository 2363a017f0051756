"""The Python side of ``benchmarks/gpu_session.sh`` (run with the session's python; imports only torch and the
package, and only what a subcommand needs).

``build``
    The session's one build of the C++/CUDA ops (``native.ensure_loaded("cpu")``, then ``"cuda"``). A failure is
    recorded once, as a line ``<kind>: <reason>`` in the marker file ``$GRPO_KERNELS_BUILD_FAILED_FILE`` (a CPU failure
    records ``cuda`` too: the CUDA library needs the CPU one). Nothing else ever writes it.
``run (-m MODULE | -c CODE | SCRIPT) ARGS...``
    Run a later stage's Python (pytest, ``grpo-kernels bench``) with the marker applied first: every kind it names is
    entered into ``native``'s own record of failed loads, so no later process starts the build again, it reports the
    recorded reason instead. ``GPU_SESSION_NATIVE=withheld`` (the tests that run while the build is still going)
    declares both kinds unavailable without loading anything, so no test waits on the build's lock or starts a
    second build. (Once ``native.py`` reads ``GRPO_KERNELS_BUILD_FAILED_FILE`` itself, ``run`` is only a launcher.)
    ``-m pytest`` with ``GPU_SESSION_PHASE=without-native`` / ``with-native`` keeps only the collected tests that do
    not / do need the C++/CUDA ops (:func:`needs_native`): the two test stages split every test, new files included,
    between them, each test into exactly one.
``sweep-plan ARGS`` / ``sweep ARGS``
    ``grpo-kernels sweep ARGS`` without the launch points that cannot be fast: more than
    :data:`MAX_VALUES_PER_THREAD` logits per thread per chunk (``block_v / (32·num_warps)``, ``auto`` resolved as the
    kernels resolve it). 16384 × 8 warps is 64 per thread and compiles to 228 registers per thread on sm_90 (ptxas),
    a quarter of the SM's threads at most; the heuristic's 16 per thread stays <= 64 registers. ``sweep-plan``
    prints the points that remain (no GPU needed); ``sweep`` runs them (through ``run``'s marker handling).
``merge-junit OUT IN...``
    Merge pytest JUnit files into ``OUT`` (written to a temporary, then renamed).
"""

from __future__ import annotations

import os
import runpy
import sys

MARKER_ENV = "GRPO_KERNELS_BUILD_FAILED_FILE"
KINDS = ("cpu", "cuda")
MAX_VALUES_PER_THREAD = 32


# --------------------------------------------------------------------------- the build and its marker
def recorded_failures(path=None):
    """``{kind: reason}`` from the marker file (empty when there is none)."""
    path = path or os.environ.get(MARKER_ENV)
    out = {}
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                kind, sep, reason = line.partition(":")
                if sep and kind.strip() in KINDS:
                    out.setdefault(kind.strip(), reason.strip())
    return out


def _record(path, kind, reason):
    """Append ``kind: reason`` (one line) unless the marker names ``kind`` already."""
    if not path or kind in recorded_failures(path):
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{kind}: {' '.join(str(reason).split())}\n")
        f.flush()
        os.fsync(f.fileno())


def apply_marker():
    """Enter the marker's failures (or, with ``GPU_SESSION_NATIVE=withheld``, both kinds) into ``native._state``,
    the loader's record of failed loads, before anything asks for the ops."""
    policy = os.environ.get("GPU_SESSION_NATIVE", "marker")
    path = os.environ.get(MARKER_ENV)
    if policy == "withheld":
        failed = {k: "not loaded in this stage: the session builds the C++/CUDA ops in the background (the tests "
                     "that need them run after the build)" for k in KINDS}
    else:
        failed = {k: f"{r} (the session's build failed, recorded in {path}; not retried)"
                  for k, r in recorded_failures(path).items()}
    if not failed:
        return
    from grpo_kernels.kernels import native

    with native._lock:  # noqa: SLF001 - the loader's own memo of failed loads, filled as it would fill it
        for kind, reason in failed.items():
            native._state.setdefault(kind, (False, reason))  # noqa: SLF001


def build() -> int:
    import time

    path = os.environ.get(MARKER_ENV)
    known = recorded_failures(path)
    if known:
        print(f"build: not retried, a failure is recorded in {path}: {known}", flush=True)
        return 1
    from grpo_kernels.kernels import native

    for kind in KINDS:
        t0 = time.monotonic()
        try:
            native.ensure_loaded(kind)
        except Exception as e:  # noqa: BLE001 - native re-raises every failure as RuntimeError with its reason
            reason = str(e)
            _record(path, kind, reason)
            if kind == "cpu":
                _record(path, "cuda", "the CPU library (the op schemas) failed to build: " + reason)
            print(f"build: {kind} FAILED after {time.monotonic() - t0:.0f} s: {reason}", flush=True)
            return 1
        print(f"build: {kind} ops ready in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


NATIVE_TEST_FILES = ("test_cpp_kernels.py", "test_fused_linear.py")


def needs_native(item) -> bool:
    """Whether a collected test needs the C++/CUDA ops: every test of :data:`NATIVE_TEST_FILES`, and the rows of
    the other files whose parameter id names the ``cuda`` backend (``cuda-bf16``; not ``triton-cuda-bf16``)."""
    if os.path.basename(str(item.fspath)) in NATIVE_TEST_FILES:
        return True
    callspec = getattr(item, "callspec", None)
    parts = callspec.id.split("-") if callspec is not None else []
    return "cuda" in parts and "triton" not in parts


class PhasePlugin:
    """Keeps the tests of one phase (``without-native`` / ``with-native``), deselects the others."""

    def __init__(self, phase: str):
        if phase not in ("without-native", "with-native"):
            raise SystemExit(f"GPU_SESSION_PHASE must be without-native or with-native, got {phase!r}")
        self.want = phase == "with-native"

    def pytest_collection_modifyitems(self, config, items):
        keep = [it for it in items if needs_native(it) == self.want]
        drop = [it for it in items if needs_native(it) != self.want]
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep


def run(argv) -> int:
    """``run -m MOD ARGS`` / ``run -c CODE ARGS`` / ``run SCRIPT ARGS`` after :func:`apply_marker`."""
    apply_marker()
    if not argv:
        raise SystemExit("gpu_session_helper run: expected -m MODULE, -c CODE or a script")
    if argv[:2] == ["-m", "pytest"] and os.environ.get("GPU_SESSION_PHASE"):
        import pytest

        return int(pytest.main(argv[2:], plugins=[PhasePlugin(os.environ["GPU_SESSION_PHASE"])]))
    if argv[0] == "-m":
        sys.argv = [argv[1]] + argv[2:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c"] + argv[2:]
        exec(compile(argv[1], "<gpu_session -c>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")
    return 0


# --------------------------------------------------------------------------- the sweep without the slow points
def values_per_thread(block_v, num_warps, V, one_pass, dtype="bfloat16"):
    """Logits per thread per chunk of a launch point, ``None`` values resolved as the Triton kernels resolve them."""
    import torch

    try:
        from grpo_kernels.kernels.triton_impl import _launch_config

        bv, nw = _launch_config(V, getattr(torch, dtype), block_v, num_warps, one_pass=one_pass)
    except ImportError:  # no triton here (a CPU check of the plan): the same heuristic
        itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        bv = block_v or min(1 << max(4, (V - 1).bit_length()), (32768 if one_pass else 16384) // itemsize)
        nw = num_warps or max(1, min(32, bv // 512))
    return bv / (32 * nw)


def _filtered_sweep_module(V_of_args):
    from grpo_kernels.bench import sweep as sw

    original = sw._configs  # noqa: SLF001

    def configs(kernel, block_vs, warps, programs, sms):
        for cfg in original(kernel, block_vs, warps, programs, sms):
            vpt = values_per_thread(cfg["block_v"], cfg["num_warps"], V_of_args, kernel == "fwd_grad")
            if vpt <= MAX_VALUES_PER_THREAD:
                yield cfg

    sw._configs = configs  # noqa: SLF001
    return sw, original


def _sweep_args(argv):
    from grpo_kernels.bench import sweep as sw
    import argparse

    p = argparse.ArgumentParser(prog="gpu_session_helper sweep")
    sw.add_arguments(p)
    return p.parse_args(argv)


def sweep_plan(argv) -> int:
    """Print ``kernel block_v num_warps programs values/thread`` of every point ``sweep`` would run."""
    args = _sweep_args(argv)
    vocab = args.vocab or [151936]
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    sms = 132
    for V in vocab:
        sw, original = _filtered_sweep_module(V)
        for kernel in kernels:
            for cfg in sw._configs(kernel, args.block_v or [None], args.num_warps or [None],  # noqa: SLF001
                                   args.programs or [None], sms):
                vpt = values_per_thread(cfg["block_v"], cfg["num_warps"], V, kernel == "fwd_grad")
                print(f"V={V} {kernel} block_v={cfg['block_v'] or 'auto'} num_warps={cfg['num_warps'] or 'auto'} "
                      f"programs={cfg['programs'] or 'auto'} values_per_thread={vpt:g}")
        sw._configs = original  # noqa: SLF001
    return 0


def sweep(argv) -> int:
    apply_marker()
    args = _sweep_args(argv)
    vocab = args.vocab or [151936]
    if len(vocab) != 1:
        raise SystemExit("gpu_session_helper sweep: one --vocab at a time")
    sw, _ = _filtered_sweep_module(vocab[0])
    return sw.run(args)


# --------------------------------------------------------------------------- junit
def merge_junit(out, inputs) -> int:
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites")
    for p in inputs:
        if not os.path.isfile(p):
            continue
        try:
            r = ET.parse(p).getroot()
        except ET.ParseError as e:
            print(f"merge-junit: {p} is not complete XML ({e}); left out", file=sys.stderr)
            continue
        root.extend(r.findall("testsuite") if r.tag == "testsuites" else [r])
    tmp = out + ".part"
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, out)
    return 0


def main(argv) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "build":
        return build()
    if cmd == "run":
        return run(rest)
    if cmd == "sweep-plan":
        return sweep_plan(rest)
    if cmd == "sweep":
        return sweep(rest)
    if cmd == "merge-junit":
        return merge_junit(rest[0], rest[1:])
    print(f"gpu_session_helper: unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
