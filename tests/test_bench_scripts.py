"""The stand-alone benchmark scripts run end to end at a tiny shape (structure only: tests never time things)."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_entropy_bonus_cost_writes_paired_results(tmp_path):
    mod = _load("entropy_bonus_cost")
    assert mod.main(["--shape", "4x8x64", "--dtypes", "fp32,bf16", "--loss-types", "grpo,softmax", "--rounds", "3",
                     "--output-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "paired.json").read_text())
    assert (res["S"], res["T"], res["V"]) == (4, 8, 64)
    assert [(r["level"], r["dtype"], r["loss_type"]) for r in res["rows"]] == [
        ("loss", "float32", "grpo"), ("loss", "float32", "softmax"), ("kernel", "float32", "(one-pass fwd_grad)"),
        ("loss", "bfloat16", "grpo"), ("loss", "bfloat16", "softmax"), ("kernel", "bfloat16", "(one-pass fwd_grad)")]
    for r in res["rows"]:
        assert len(r["ratios"]) == 3 and all(x > 0 for x in r["ratios"])
        assert r["ratio_p10"] <= r["ratio"] <= r["ratio_p90"]
    md = (tmp_path / "paired.md").read_text()
    assert md.count("\n| loss |") == 4 and "paired.png" in md
    assert (tmp_path / "paired.png").stat().st_size > 0


@pytest.mark.parametrize("argv, match", [(["--shape", "2x8"], "--shape"), (["--rounds", "0"], "--rounds"),
                                         (["--dtypes", "int8"], "int8")])
def test_entropy_bonus_cost_rejects_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):
        _load("entropy_bonus_cost").main(argv)
    assert match in capsys.readouterr().err


def test_packed_vs_padded_writes_both_forms(tmp_path):
    mod = _load("packed_vs_padded")
    assert mod.main(["--sequences", "4", "--max-len", "24", "--vocab", "300", "--output-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    packed, padded = res["rows"]
    assert (packed["form"], padded["form"]) == ("packed", "padded")
    assert packed["rows"] == res["N"] and padded["rows"] == res["S"] * res["T_max"] and res["N"] <= padded["rows"]
    assert res["meta"]["git_commit"] and "| packed |" in (tmp_path / "results.md").read_text()
