"""The ``grpo-kernels`` command line: help, version and ``info``."""

import json
import subprocess
import sys

import pytest

from grpo_kernels import __version__
from grpo_kernels.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in ("info", "train", "bench"):
        assert sub in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: grpo-kernels" in capsys.readouterr().out


def test_info_json_reports_versions_and_backends(capsys):
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["grpo_kernels"] == __version__
    assert d["backends"]["cpu/torch"] == "available"
    assert "cpu" in d["devices"]


def test_console_script_module_entry():
    out = subprocess.run([sys.executable, "-m", "grpo_kernels.cli", "info"], capture_output=True, text=True, check=True)
    assert "backends:" in out.stdout and "torch:" in out.stdout


def test_import_has_no_heavy_side_effects():
    # importing the package must not import triton or build/load a compiled extension
    code = ("import sys, grpo_kernels; "
            "print(any(m == 'triton' or m.startswith('triton.') for m in sys.modules), "
            "any(m.startswith('grpo_kernels._C') or m == 'grpo_kernels.kernels.native' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_long_options_are_not_abbreviated(capsys):
    """No argparse prefix matching: `--lr` is not `--lr-scheduler` (nor `--learning-rate`), it is an error."""
    for argv in (["train", "--lr", "1e-3"], ["train", "--lr-sched", "linear"], ["train", "--learning", "1"],
                 ["--vers"]):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--print-config"])
        assert e.value.code == 2
        assert f"unrecognized arguments: {argv[-2] if argv[0] == 'train' else argv[0]}" in capsys.readouterr().err
    assert main(["train", "--lr-scheduler", "linear", "--learning-rate", "1e-3", "--bf16", "--plot", "no",
                 "--max-steps", "1e2", "--print-config"]) == 0
    d = json.loads(capsys.readouterr().out)
    got = (d["lr_scheduler"], d["learning_rate"], d["bf16"], d["plot"], d["max_steps"])
    assert got == ("linear", 1e-3, True, False, 100)
    with pytest.raises(SystemExit):
        main(["train", "--max-steps", "2.5", "--print-config"])
    assert "argument --max-steps: expected an integer, got '2.5'" in capsys.readouterr().err
