"""Kernel module of the ``"cpu"`` and ``"cuda"`` backends: the C++/CUDA ops of ``csrc/`` (library ``grpo_kernels_C``).

Implements the kernel contract of :mod:`grpo_kernels.kernels` (``is_available``, ``logprobs_fwd``,
``logprobs_bwd`` with ``out=``, the one-pass ``logprobs_fwd_grad`` with ``ent_coef=``); ``check_ids`` and
``ent_coef`` go to the C++ ops, which check them themselves. Shapes: logits ``(S, T, V)`` with a unit vocabulary
stride, ``tokens (S, T)`` int64, ``mask (S, T)`` bool, per-row tensors ``(S, T)`` in fp32
(fp64 for fp64 logits).

How the compiled code is found (lazily, on the first call -- importing this module builds nothing):

1. the prebuilt extensions ``grpo_kernels._C`` (CPU ops) and ``grpo_kernels._C_cuda`` (CUDA ops), built by
   ``pip install --no-build-isolation -e .`` through ``build_ext_config.py``;
2. otherwise a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja, cached in torch's
   extension directory, ``TORCH_EXTENSIONS_DIR`` overrides it). A message goes to stderr while it builds.
   ``GRPO_KERNELS_FORCE_JIT=1`` skips step 1 (handy while editing ``csrc/``).

The ops are registered in the ``torch.ops.grpo_kernels_C`` namespace with Python fake implementations here,
so ``torch.library.opcheck`` and ``torch.compile`` work with them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
from typing import Optional, Tuple

import torch

from ..reference import accumulation_dtype


Tensor = torch.Tensor

FWD_GRAD = True

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # grpo_kernels/
# csrc/ next to the package (a source checkout / editable install), else inside it (a wheel that ships it)
_CSRC = next((d for d in (os.path.join(os.path.dirname(_PKG_DIR), "csrc"), os.path.join(_PKG_DIR, "csrc"))
              if os.path.isfile(os.path.join(d, "ops.cpp"))), os.path.join(os.path.dirname(_PKG_DIR), "csrc"))
_CPU_SOURCES = ("ops.cpp", "cpu_ops.cpp", "cpu_kernels_default.cpp", "cpu_kernels_avx2.cpp",
                "cpu_kernels_avx512.cpp")
_CUDA_SOURCES = ("cuda_ops.cu",)

_lock = threading.RLock()
_state = {}  # "cpu"/"cuda" -> (ok: bool, reason: str)
_fakes_registered = False


def _cxx_flags():
    flags = ["-O3"]
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        flags.append("-fopenmp")  # at::parallel_for is inlined: without it the kernels run on one thread
    return flags


def _ld_flags():
    return ["-fopenmp"] if "-fopenmp" in _cxx_flags() else []


def _prebuilt(name: str) -> Optional[str]:
    if os.environ.get("GRPO_KERNELS_FORCE_JIT", "0") == "1":
        return None
    try:
        spec = importlib.util.find_spec(f"grpo_kernels.{name}")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    # An editable install whose csrc/ was edited after the build: the prebuilt library is stale, rebuild (JIT).
    try:
        built = os.path.getmtime(spec.origin)
        exts = (".h", ".cpp") if name == "_C" else (".h", ".cpp", ".cu", ".cuh")
        newest = max(os.path.getmtime(os.path.join(_CSRC, f)) for f in os.listdir(_CSRC) if f.endswith(exts))
    except (OSError, ValueError):
        return spec.origin
    if newest > built:
        print(f"grpo_kernels: {spec.origin} is older than the sources in {_CSRC}; using a fresh JIT build instead",
              file=sys.stderr)
        return None
    return spec.origin


def _check_sources(names) -> list:
    paths = [os.path.join(_CSRC, n) for n in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise ImportError(
            "grpo_kernels was installed without its compiled C++ extension, and the csrc/ sources needed to "
            f"build it on first use are not reachable (looked for {missing[0]}). Install from a source "
            "checkout with `pip install --no-build-isolation -e .` (builds the extension), or use "
            "backend='torch'.")
    return paths


def _check_compiler(cuda: bool) -> None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        raise RuntimeError(
            f"building the grpo_kernels C++ extension needs a C++ compiler, but none was found ({cxx!r}, g++, "
            "clang++ are not on PATH). Install one (e.g. `apt-get install g++`), set CXX, or use backend='torch'.")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            raise RuntimeError("building the grpo_kernels C++ extension needs ninja: `pip install ninja`")
    if cuda:
        from torch.utils.cpp_extension import CUDA_HOME
        if torch.version.cuda is None:
            raise RuntimeError("the CUDA ops need a CUDA build of PyTorch (this torch is CPU-only)")
        if CUDA_HOME is None:
            raise RuntimeError("building the grpo_kernels CUDA extension needs nvcc (set CUDA_HOME)")


def _jit(name: str, sources, cuda: bool) -> None:
    from torch.utils import cpp_extension

    _check_compiler(cuda)
    print(f"grpo_kernels: building (or loading the cached build of) the {'CUDA' if cuda else 'CPU'} extension "
          f"{name} from {_CSRC}; the first build takes a minute or two...", file=sys.stderr, flush=True)
    kw = dict(name=name, sources=list(sources), extra_cflags=_cxx_flags(), extra_ldflags=_ld_flags(),
              extra_include_paths=[_CSRC], is_python_module=False, verbose=False)
    if cuda:  # target GPUs: TORCH_CUDA_ARCH_LIST, else torch picks the GPUs present (first use, not install)
        kw["extra_cuda_cflags"] = ["-O3", "-lineinfo"]
    cpp_extension.load(**kw)
    print(f"grpo_kernels: {name} ready.", file=sys.stderr, flush=True)


def _load_cpu() -> None:
    path = _prebuilt("_C")
    if path is not None:
        torch.ops.load_library(path)
    else:
        _jit("grpo_kernels_C_cpu", _check_sources(_CPU_SOURCES), cuda=False)
    _register_fakes()


def _load_cuda() -> None:
    ensure_loaded("cpu")  # the op schemas live in the CPU library
    path = _prebuilt("_C_cuda")
    if path is not None:
        torch.ops.load_library(path)
        return
    if torch.version.cuda is None:
        raise RuntimeError("the CUDA ops were not built: this torch is CPU-only")
    if _prebuilt("_C") is not None and os.environ.get("GRPO_KERNELS_JIT_CUDA", "0") != "1":
        raise RuntimeError("the CUDA ops were not built (grpo_kernels._C_cuda is missing: the package was "
                           "installed without nvcc or with GRPO_KERNELS_SKIP_CUDA_BUILD=1). Reinstall where nvcc "
                           "exists, or set GRPO_KERNELS_JIT_CUDA=1 to compile them on first use")
    _jit("grpo_kernels_C_cuda", _check_sources(_CUDA_SOURCES), cuda=True)


#: A file of ``<kind>: <reason>`` lines: a build failure recorded by one process is not retried by the next ones
#: (benchmarks/gpu_session.sh sets it, so a failed CUDA build costs its time budget once per session).
FAILED_FILE_ENV = "GRPO_KERNELS_BUILD_FAILED_FILE"


def _recorded_failure(kind: str) -> Optional[str]:
    path = os.environ.get(FAILED_FILE_ENV)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                k, sep, reason = line.partition(":")
                if sep and k.strip() == kind:
                    return f"{reason.strip()} (recorded in {path}; not retried)"
    except OSError:
        pass
    return None


def _record_failure(kind: str, reason: str) -> None:
    path = os.environ.get(FAILED_FILE_ENV)
    if path and _recorded_failure(kind) is None:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{kind}: {' '.join(reason.split())}\n")
        except OSError:
            pass


def ensure_loaded(kind: str = "cpu") -> None:
    """Load (building if needed) the ``"cpu"`` or ``"cuda"`` ops once; re-raises the first failure (also one
    recorded by an earlier process in ``$GRPO_KERNELS_BUILD_FAILED_FILE``)."""
    with _lock:
        st = _state.get(kind)
        if st is None:
            recorded = _recorded_failure(kind)
            if recorded is not None:
                st = (False, recorded)
            else:
                try:
                    (_load_cpu if kind == "cpu" else _load_cuda)()
                    st = (True, "")
                except Exception as e:  # remembered: a failed build is not retried on every call
                    st = (False, f"{type(e).__name__}: {e}")
                    _record_failure(kind, st[1])
            _state[kind] = st
    if not st[0]:
        raise RuntimeError(f"grpo_kernels C++ {kind} ops are unavailable: {st[1]}")


def is_available(device) -> Tuple[bool, str]:
    """``(available, reason)``: the CPU ops for CPU tensors, the CUDA ops for CUDA tensors (loads them)."""
    device = torch.device(device)
    kind = "cuda" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
    if kind is None:
        return False, f"no C++ kernels for {device.type} tensors"
    try:
        ensure_loaded(kind)
    except RuntimeError as e:
        return False, str(e)
    if kind == "cpu":
        return True, f"C++ CPU kernels ({torch.ops.grpo_kernels_C.cpu_isa()}, {torch.get_num_threads()} threads)"
    return True, "CUDA C++ kernels"


def _kind(t: Tensor) -> str:
    return "cuda" if t.device.type == "cuda" else "cpu"


# --------------------------------------------------------------------------------------------------------------
# Kernel-module contract
# --------------------------------------------------------------------------------------------------------------
def logprobs_fwd(logits: Tensor, tokens: Tensor, mask: Tensor, temperature: float,
                 with_entropy: bool, check_ids: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp, lse, entropy)``, each ``(S, T)`` fp32 (fp64 for fp64 logits); see the module docstring."""
    ensure_loaded(_kind(logits))
    return torch.ops.grpo_kernels_C.logprobs_fwd(logits, tokens, mask, float(temperature), bool(with_entropy),
                                                 bool(check_ids))


def logprobs_bwd(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, tokens: Tensor, mask: Tensor,
                 lse: Tensor, entropy: Tensor, temperature: float, out: Optional[Tensor] = None,
                 check_ids: bool = True) -> Tensor:
    """Gradient w.r.t. the logits ``(S, T, V)`` in their dtype (written into ``out`` when given)."""
    ensure_loaded(_kind(logits))
    ops = torch.ops.grpo_kernels_C
    if out is None:
        return ops.logprobs_bwd(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, float(temperature),
                                bool(check_ids))
    ops.logprobs_bwd_out(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, float(temperature), out,
                         bool(check_ids))
    return out


def logprobs_fwd_grad(logits: Tensor, tokens: Tensor, mask: Tensor, coef: Tensor, temperature: float,
                      with_entropy: bool, out: Optional[Tensor] = None, check_ids: bool = True,
                      ent_coef: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass: ``(logp, lse, entropy, grad)`` with ``grad[s,t,v] = coef[s,t] (1[v=y] - p_v) / τ``.

    ``coef (S, T)`` fp32 (fp64 for fp64 logits). ``ent_coef (S, T)`` (contiguous, same dtype; optional) adds the
    entropy term ``- ent_coef[s,t] p_v (z_v/τ - (lse - H)) / τ`` (the two-pass backward's formula with
    ``g_ℓ = coef``, ``g_H = ent_coef``); the entropy is then computed and returned whatever ``with_entropy`` says.
    ``grad`` is a new contiguous tensor in the logits' dtype, or ``out`` (which may be the logits themselves: each
    row is read before it is overwritten).
    """
    ensure_loaded(_kind(logits))
    ops = torch.ops.grpo_kernels_C
    if out is None:
        return ops.logprobs_fwd_grad(logits, tokens, mask, coef, float(temperature), bool(with_entropy),
                                     bool(check_ids), ent_coef)
    logp, lse, ent = ops.logprobs_fwd_grad_out(logits, tokens, mask, coef, float(temperature), bool(with_entropy),
                                               out, bool(check_ids), ent_coef)
    return logp, lse, ent, out


# --------------------------------------------------------------------------------------------------------------
# Fake (meta) implementations, registered once the library exists
# --------------------------------------------------------------------------------------------------------------
def _rows(logits: Tensor):
    S, T, _ = logits.shape
    return logits.new_empty((S, T), dtype=accumulation_dtype(logits.dtype))


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    lib = "grpo_kernels_C::"

    @torch.library.register_fake(lib + "logprobs_fwd")
    def _fwd_fake(logits, tokens, mask, temperature, with_entropy, check_ids=True):
        return _rows(logits), _rows(logits), _rows(logits)

    @torch.library.register_fake(lib + "logprobs_bwd")
    def _bwd_fake(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, check_ids=True):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake(lib + "logprobs_bwd_out")
    def _bwd_out_fake(grad_logp, grad_entropy, logits, tokens, mask, lse, entropy, temperature, out, check_ids=True):
        return None

    @torch.library.register_fake(lib + "logprobs_fwd_grad")
    def _fwd_grad_fake(logits, tokens, mask, coef, temperature, with_entropy, check_ids=True, ent_coef=None):
        return _rows(logits), _rows(logits), _rows(logits), logits.new_empty(logits.shape)

    @torch.library.register_fake(lib + "logprobs_fwd_grad_out")
    def _fwd_grad_out_fake(logits, tokens, mask, coef, temperature, with_entropy, out, check_ids=True,
                           ent_coef=None):
        return _rows(logits), _rows(logits), _rows(logits)

    _fakes_registered = True
