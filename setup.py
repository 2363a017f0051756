"""Build script for grpo_kernels.

The pure-Python package always installs. The compiled extensions in ``csrc/`` are optional:

* ``GRPO_KERNELS_SKIP_CUDA_BUILD=1``  -- never build the CUDA extension.
* ``GRPO_KERNELS_FORCE_CUDA_BUILD=1`` -- build it even if the checks below say no.
* ``GRPO_KERNELS_SKIP_CPP_BUILD=1``   -- build no extension at all (they are then JIT-compiled on first use).
* ``MAX_JOBS`` (parallel compile jobs) and ``TORCH_CUDA_ARCH_LIST`` (target GPUs) are honoured.

Nothing here probes hardware: whether to build CUDA code depends only on the installed torch being a
CUDA build and on nvcc being present. Extensions are built only when torch is importable at build time,
i.e. with ``pip install --no-build-isolation``.
"""

import os
import re
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "grpo_kernels", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def read_readme():
    path = os.path.join(HERE, "README.md")
    return open(path, encoding="utf-8").read() if os.path.exists(path) else ""


def extensions_and_cmdclass():
    """(ext_modules, cmdclass) for the compiled kernels; empty when they cannot or should not be built."""
    if os.environ.get("GRPO_KERNELS_SKIP_CPP_BUILD", "0") == "1":
        return [], {}
    if HERE not in sys.path:  # PEP 517 builds do not put the project directory on sys.path
        sys.path.insert(0, HERE)
    try:
        import build_ext_config  # noqa: F401  (csrc build description, next to this file)
    except ImportError:
        return [], {}
    return build_ext_config.extensions_and_cmdclass(HERE)


ext_modules, cmdclass = extensions_and_cmdclass()

setup(
    name="grpo_kernels",
    version=read_version(),
    description="Fused GRPO loss kernels (Triton, CUDA C++, CPU C++) and a lean GRPO trainer",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["grpo_kernels", "grpo_kernels.*"]),
    package_data={"grpo_kernels": ["data/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.40",
        "numpy",
        "tqdm",
        "matplotlib",
        "ninja",
        "pyyaml",
        "safetensors",
    ],
    extras_require={
        "trl": ["trl>=1.16,<1.17"],
        "dev": ["pytest>=7", "pytest-benchmark>=4", "expecttest", "hypothesis", "trl>=1.16,<1.17"],
    },
    entry_points={"console_scripts": ["grpo-kernels=grpo_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
