"""How setup.py builds the compiled kernels of ``csrc/`` (imported by setup.py when present).

* ``grpo_kernels._C`` -- the CPU ops (always, when torch is importable at build time, i.e. with
  ``pip install --no-build-isolation``). ``-O3`` and OpenMP (torch's ``at::parallel_for`` is inlined into the
  extension); no ``-march``: the AVX2/AVX-512 kernel variants are compiled per translation unit and picked at
  run time from the running CPU (see csrc/cpu_ops.cpp), so the build host is never probed.
* ``grpo_kernels._C_cuda`` -- the CUDA ops, only when ``GRPO_KERNELS_SKIP_CUDA_BUILD != 1`` and either
  ``GRPO_KERNELS_FORCE_CUDA_BUILD=1`` or (torch is a CUDA build and nvcc is found). Target GPUs come from
  ``TORCH_CUDA_ARCH_LIST``; when it is unset the default is ``8.0;9.0`` (torch would otherwise query the
  GPUs of the build machine).

Both build with ninja through :class:`torch.utils.cpp_extension.BuildExtension`; ``MAX_JOBS`` sets the number of
parallel compile jobs. Editable installs (``pip install -e``) place the ``.so`` files inside ``grpo_kernels/``
where :mod:`grpo_kernels.cpp_ext` finds them.
"""

import os
import shutil
import sys

CPU_SOURCES = ["csrc/ops.cpp", "csrc/cpu_ops.cpp", "csrc/cpu_kernels_default.cpp", "csrc/cpu_kernels_avx2.cpp",
               "csrc/cpu_kernels_avx512.cpp"]
CUDA_SOURCES = ["csrc/cuda_ops.cu"]
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def want_cuda(torch_cuda_version, nvcc_path) -> bool:
    """Whether to build the CUDA extension (no hardware is queried: only the torch build and nvcc)."""
    if _flag("GRPO_KERNELS_SKIP_CUDA_BUILD"):
        return False
    if _flag("GRPO_KERNELS_FORCE_CUDA_BUILD"):
        return True
    return torch_cuda_version is not None and nvcc_path is not None


def _nvcc_path():
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is not None:
        cand = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.exists(cand):
            return cand
    return shutil.which("nvcc")


def extensions_and_cmdclass(here):
    """``(ext_modules, cmdclass)`` for setup(); empty when torch is not importable at build time."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.stderr.write("grpo_kernels: torch is not importable at build time; the C++ kernels will be compiled on "
                         "first use instead (install with --no-build-isolation to prebuild them)\n")
        return [], {}

    csrc = os.path.join(here, "csrc")
    cxx = ["-O3"]
    ldflags = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")
    ext_modules = [CppExtension("grpo_kernels._C", CPU_SOURCES, include_dirs=[csrc],
                                extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)]

    if want_cuda(torch.version.cuda, _nvcc_path()):
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        ext_modules.append(CUDAExtension("grpo_kernels._C_cuda", CUDA_SOURCES, include_dirs=[csrc],
                                         extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]}))

    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return ext_modules, cmdclass
