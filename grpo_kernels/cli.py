"""The ``grpo-kernels`` command line: ``info``, ``train`` and ``bench``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; they
are imported only when that subcommand runs, so ``grpo-kernels --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import List, Optional

_SUBCOMMANDS = {
    "info": ("grpo_kernels.cli", "versions, available backends and devices"),
    "train": ("grpo_kernels.trainer.cli", "train a policy with GRPO (no arguments: the built-in CPU demo)"),
    "bench": ("grpo_kernels.bench.cli", "benchmark every backend and the peers; write tables and plots"),
    "sweep": ("grpo_kernels.bench.sweep", "sweep the Triton kernels' launch parameters (block_v, num_warps, "
                                          "programs) on a GPU"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:  # for "info"
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def info_dict() -> dict:
    import torch

    from . import __version__
    from .kernels import backend_status

    out = {"grpo_kernels": __version__, "python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for mod in ("triton", "transformers", "numpy"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception as e:  # noqa: BLE001 - report, do not fail
            out[mod] = f"not available ({type(e).__name__})"
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    out["devices"] = devices
    backends = {}
    for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        for b in ("torch", "cpu", "cuda", "triton"):
            ok, why = backend_status(b, torch.device(dev))
            backends[f"{dev}/{b}"] = "available" if ok else f"unavailable: {why}"
    out["backends"] = backends
    return out


def run(args) -> int:  # for "info"
    d = info_dict()
    if getattr(args, "json", False):
        import json

        print(json.dumps(d, indent=2))
        return 0
    for k, v in d.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk:<14} {vv}")
        elif isinstance(v, list):
            print(f"{k}: {', '.join(v)}")
        else:
            print(f"{k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    # allow_abbrev=False everywhere: no prefix matching of long options (``train --lr 1e-3`` must not be taken as
    # ``--lr-scheduler 1e-3``); an unknown option is an error naming it
    parser = argparse.ArgumentParser(prog="grpo-kernels", allow_abbrev=False,
                                     description="Fused GRPO loss kernels and a lean GRPO trainer.")
    parser.add_argument("--version", action="version", version=f"grpo-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # a subcommand whose dependencies are missing still shows up in --help
            p.set_defaults(_unavailable=f"'{name}' is unavailable: {e}")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_unavailable", None):
        print(args._unavailable, file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
