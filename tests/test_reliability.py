"""Nothing lost, nothing silently wrong (issue 15, the trainer's side): atomic checkpoints and a `latest` that skips
torn ones (truncated files, a crash inside a save, `kill -9` of a real run), the output-directory guard (lock,
refusal of another run's directory, config match on resume), config files checked by type, and bad inputs that
reach the CLI user as one line with exit code 2."""

import gc
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from grpo_kernels.cli import main
from grpo_kernels.trainer import GRPOConfig, GRPODataset, GRPOTrainer
from grpo_kernels.trainer import checkpoint as ckpt
from grpo_kernels.trainer import outdir
from grpo_kernels.trainer.demo import build_model, build_tokenizer, make_copy_rows

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)
TIMING = ("step_time", "tokens_per_sec", "elapsed")
OFFLINE = [
    {"prompt": "12=", "responses": ["12", "1", "99", "123"], "rewards": [1.0, 0.5, 0.0, 0.7]},
    {"prompt": "3456=", "responses": ["3456", "3", "", "0000"], "rewards": [0.2, 0.9, 0.1, 0.0]},
    {"prompt": "7=", "responses": ["7", "77", "8", "0"], "rewards": [1.0, 0.5, 0.0, 0.0]},
    {"prompt": "55=", "responses": ["5", "55", "555", "1"], "rewards": [0.5, 1.0, 0.6, 0.0]},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return make_copy_rows(32, 3, seed=0)


def cfg(out, **kw):
    base = dict(output_dir=str(out), device="cpu", progress_bar=False, plot=False, save_final=False, num_generations=4,
                per_device_batch_size=2, max_new_tokens=4, learning_rate=3e-3, warmup_steps=1, lr_scheduler="cosine",
                reward_funcs=["digit_copy"], use_chat_template=False, shuffle=True, max_steps=3, save_steps=1)
    base.update(kw)
    return GRPOConfig(**base)


def trainer(tok, rows, out, model_seed=0, **kw):
    return GRPOTrainer(build_model(tok, seed=model_seed, **TINY), rows, cfg(out, **kw), tokenizer=tok)


def strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_run(hist, params, ref_hist, ref_params):
    assert strip(hist) == strip(ref_hist)
    assert params.keys() == ref_params.keys()
    for k in ref_params:
        assert torch.equal(params[k], ref_params[k]), k


@pytest.fixture(scope="module")
def reference(tok, rows, tmp_path_factory):
    """An uninterrupted 3-step run (checkpoint every step): (output_dir, history, final weights)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    tr = trainer(tok, rows, out)
    hist = tr.train()
    return out, hist, weights(tr.unwrapped)


# --------------------------------------------------------------------------- 1. atomic checkpoints
def test_checkpoints_are_published_complete(reference):
    out, _, _ = reference
    names = sorted(os.listdir(out))
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "config.json", "metrics.jsonl"]  # no .lock, .tmp-*
    for step in (1, 2, 3):
        d = out / f"checkpoint-{step}"
        info = json.load(open(d / ckpt.COMPLETE_FILE))
        assert info["step"] == step and info["world_size"] == 1
        assert {"model.safetensors", "trainer_state.pt", "rng_state_0.pt", "tokenizer.json"} <= set(info["files"])
        assert set(info["files"]) == set(os.listdir(d)) - {ckpt.COMPLETE_FILE}
        assert ckpt.checkpoint_problem(str(d)) is None


def test_each_truncated_or_missing_file_falls_back_to_the_previous_checkpoint(tok, rows, reference, tmp_path):
    """Truncate (then delete) each file of the newest checkpoint in turn: `latest` names it and what is wrong,
    resumes from checkpoint-2, and the resumed run ends exactly where the uninterrupted one did."""
    ref_out, ref_hist, ref_params = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    files = sorted(os.listdir(out / "checkpoint-3"))
    assert len(files) >= 6
    cases = [(f, "truncate") for f in files] + [("rng_state_0.pt", "delete"), ("trainer_state.pt", "delete")]
    for name, how in cases:
        p = out / "checkpoint-3" / name
        if how == "delete":
            p.unlink()
        else:
            size = p.stat().st_size
            with open(p, "r+b") as f:
                f.truncate(size // 2)
        tr = trainer(tok, rows, out, model_seed=99, resume_from_checkpoint="latest")
        with pytest.warns(UserWarning, match=r"skipping incomplete checkpoint .*checkpoint-3: .*" + re.escape(name)):
            assert tr.latest_checkpoint() == str(out / "checkpoint-2")
        with pytest.raises(ValueError, match=rf"checkpoint-3' is incomplete: .*{re.escape(name)}"):  # asked for by name
            trainer(tok, rows, out, resume_from_checkpoint=str(out / "checkpoint-3")).load_checkpoint(
                str(out / "checkpoint-3"))
        with pytest.warns(UserWarning, match="checkpoint-3"):
            hist = tr.train()  # resumes from checkpoint-2 and writes a complete checkpoint-3 again
        assert_same_run(hist, weights(tr.unwrapped), ref_hist, ref_params)
        assert ckpt.checkpoint_problem(str(out / "checkpoint-3")) is None, (name, how)
        assert [json.loads(s)["step"] for s in open(out / "metrics.jsonl")] == [1, 2, 3]


def test_crash_inside_a_save_leaves_the_previous_checkpoint(tok, rows, reference, tmp_path, monkeypatch):
    """An exception while trainer_state.pt of step 2 is written: no checkpoint-2 appears (only a .tmp- directory
    that nothing reads), the lock is released, and a resume from checkpoint-1 ends as the uninterrupted run."""
    _, ref_hist, ref_params = reference
    out = tmp_path / "out"
    real = ckpt._torch_save

    def crash(obj, path):
        if path.endswith(os.path.join(".tmp-checkpoint-2", ckpt.STATE_FILE)):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 torn")
            raise OSError("disk gone")
        real(obj, path)

    monkeypatch.setattr(ckpt, "_torch_save", crash)
    with pytest.raises(OSError, match="disk gone"):
        trainer(tok, rows, out).train()
    assert sorted(os.listdir(out)) == [".tmp-checkpoint-2", "checkpoint-1", "config.json", "metrics.jsonl"]
    monkeypatch.setattr(ckpt, "_torch_save", real)
    tr = trainer(tok, rows, out, model_seed=5, resume_from_checkpoint="latest")
    assert tr.latest_checkpoint() == str(out / "checkpoint-1")
    hist = tr.train()
    assert_same_run(hist, weights(tr.unwrapped), ref_hist, ref_params)
    assert not any(n.startswith(".tmp-") for n in os.listdir(out))  # the leftover was cleaned up


def test_checkpoint_without_marker_is_skipped_by_latest_but_loads_by_name(tok, rows, reference, tmp_path):
    """A checkpoint of an older version (no completion marker) is not trusted by `latest`; named explicitly it
    loads, with a warning."""
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    (out / "checkpoint-3" / ckpt.COMPLETE_FILE).unlink()
    tr = trainer(tok, rows, out, resume_from_checkpoint="latest")
    with pytest.warns(UserWarning, match="checkpoint-3: no checkpoint_complete.json"):
        assert tr.latest_checkpoint().endswith("checkpoint-2")
    with pytest.warns(UserWarning, match="loading it anyway"):
        assert tr.load_checkpoint(str(out / "checkpoint-3")).endswith("checkpoint-3") and tr.step == 3


def test_damaged_checkpoint_contents_are_one_clear_error(tok, rows, reference, tmp_path):
    """Same size, garbage inside (the marker cannot see it): the error names the checkpoint and the file."""
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    p = out / "checkpoint-3" / ckpt.STATE_FILE
    p.write_bytes(b"\0" * p.stat().st_size)
    tr = trainer(tok, rows, out, resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint-3.*cannot read trainer_state.pt"):
        tr.load_checkpoint("latest")


# --------------------------------------------------------------------------- 2. the output directory
def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_lock_of_a_live_process_refuses_and_a_dead_ones_is_taken_over(tok, rows, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    other = _sleeper()
    try:
        (out / ".lock").write_text(f"{other.pid}\n")
        with pytest.raises(ValueError, match=rf"in use by another run: process {other.pid} holds .*\.lock"):
            trainer(tok, rows, out, max_steps=1).train()
        assert (out / ".lock").read_text() == f"{other.pid}\n" and sorted(os.listdir(out)) == [".lock"]
    finally:
        other.kill()
        other.wait()
    capfd.readouterr()
    trainer(tok, rows, out, max_steps=1).train()  # the holder is gone: a stale lock
    assert f"taking over the stale lock {out / '.lock'} of process {other.pid}" in capfd.readouterr().err
    assert not (out / ".lock").exists()  # released at the end


def test_lock_from_another_host_or_a_concurrent_trainer_refuses(tok, rows, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("4242\nsome-other-host\n")
    with pytest.raises(ValueError, match="locked by process 4242 on host 'some-other-host'"):
        trainer(tok, rows, out, max_steps=1).train()
    (out / ".lock").unlink()
    with outdir.OutputDirLock(str(out)):  # another trainer of this process holds it
        with pytest.raises(ValueError, match="this process"):
            trainer(tok, rows, out, max_steps=1).train()
    (out / ".lock").write_text(f"{os.getpid()}\n{socket.gethostname()}\n")  # our pid, not held: a reused pid
    trainer(tok, rows, out, max_steps=1).train()
    assert not (out / ".lock").exists()


def test_two_runs_at_once_do_not_mix(tok, rows, tmp_path):
    """The second run, started while the first one trains, is refused; the first one's metrics are intact."""
    out = tmp_path / "out"
    first = trainer(tok, rows, out, max_steps=2, save_steps=0)
    second = trainer(tok, rows, out, max_steps=2, save_steps=0, overwrite_output_dir=True)
    seen = []
    real = first.training_step

    def step(batch):
        if not seen:
            with pytest.raises(ValueError, match="is in use by another run: this process"):
                second.train()
            seen.append(1)
        return real(batch)

    first.training_step = step
    first.train()
    assert seen and [json.loads(s)["step"] for s in open(out / "metrics.jsonl")] == [1, 2]


def test_used_directory_is_refused_unless_resume_or_overwrite(tok, rows, tmp_path, capfd):
    out = tmp_path / "out"
    trainer(tok, rows, out, max_steps=2).train()
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint-1, checkpoint-2, config.json, "
                                         r"metrics.jsonl\).*--resume.*--overwrite-output-dir"):
        trainer(tok, rows, out, max_steps=3).train()
    assert (out / "metrics.jsonl").read_text() == before and not (out / ".lock").exists()
    (out / "notes.txt").write_text("mine")
    capfd.readouterr()
    trainer(tok, rows, out, max_steps=1, model_seed=1, overwrite_output_dir=True).train()
    assert "removed the previous run's files" in capfd.readouterr().err
    assert sorted(os.listdir(out)) == ["checkpoint-1", "config.json", "metrics.jsonl", "notes.txt"]
    assert len(open(out / "metrics.jsonl").readlines()) == 1
    with pytest.raises(ValueError, match="exclude each other"):
        cfg(out, overwrite_output_dir=True, resume_from_checkpoint="latest")
    again = trainer(tok, rows, out, max_steps=1, save_steps=0, overwrite_output_dir=False)
    shutil.rmtree(out)
    again.train()
    again.config.max_steps = 2
    assert [r["step"] for r in again.train()] == [1, 2]  # train() again on the same trainer: the same run
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.jsonl").write_text("{}\n")  # files that are not a run's do not count
    trainer(tok, rows, other, max_steps=1, save_steps=0).train()


def test_resume_checks_the_config(tok, rows, reference, tmp_path):
    """seed / batch / G / loss fields must match the checkpoint's (all differences listed in one error); others
    only warn; max_steps and the logging / saving fields may change silently."""
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    ck = str(out / "checkpoint-2")
    with pytest.raises(ValueError, match=r"different config \(seed: 0 -> 1; per_device_batch_size: 2 -> 4; "
                                         r"num_generations: 4 -> 2; loss_type: 'softmax' -> 'dapo'"):
        trainer(tok, rows, out, seed=1, per_device_batch_size=4, num_generations=2, loss_type="dapo",
                resume_from_checkpoint=ck).load_checkpoint(ck)
    with pytest.raises(ValueError, match=r"epsilon: 0.2 -> 0.3"):
        trainer(tok, rows, out, epsilon=0.3, resume_from_checkpoint=ck).load_checkpoint(ck)
    with pytest.warns(UserWarning, match=r"learning_rate: 0.003 -> 0.01; weight_decay: 0.0 -> 0.1") as w:
        trainer(tok, rows, out, learning_rate=0.01, weight_decay=0.1, max_steps=9, save_steps=3, progress_bar=True,
                resume_from_checkpoint=ck).load_checkpoint(ck)
    assert not any("max_steps" in str(x.message) or "save_steps" in str(x.message) for x in w)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer(tok, rows, out, max_steps=5, save_steps=2, resume_from_checkpoint=ck).load_checkpoint(ck)


# --------------------------------------------------------------------------- 7. config files
def test_config_file_values_are_coerced_by_type(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learning_rate: 1e-3\nsave_final: 'false'\nshuffle: 'no'\nmax_steps: 1e2\nepsilon: '0.1'\n"
                 "reward_weights: ['1', 2]\nreward_funcs: digit_copy,format\nbf16: 0\n")
    c = GRPOConfig.from_file(str(p))
    assert (c.learning_rate, c.save_final, c.shuffle, c.max_steps, c.epsilon) == (0.001, False, False, 100, 0.1)
    assert c.reward_weights == [1.0, 2.0] and c.reward_funcs == ["digit_copy", "format"] and c.bf16 is False
    assert type(c.max_steps) is int and type(c.learning_rate) is float
    assert GRPOConfig(learning_rate="2e-3", plot="true").learning_rate == 0.002  # any source


@pytest.mark.parametrize("body, key", [("learning_rate: 1e-3x\n", "learning_rate"),
                                       ("save_final: maybe\n", "save_final"), ("max_steps: 2.5\n", "max_steps"),
                                       ("max_steps: true\n", "max_steps"), ("loss_type: 3\n", "loss_type"),
                                       ("reward_weights: [1, x]\n", "reward_weights"), ("seed: null\n", "seed"),
                                       ("bf16: 2\n", "bf16")])
def test_config_file_type_errors_name_the_key_and_the_file(tmp_path, body, key):
    p = tmp_path / "c.yaml"
    p.write_text(body)
    with pytest.raises(ValueError, match=rf"config file '{re.escape(str(p))}': key '{key}' must be "):
        GRPOConfig.from_file(str(p))


def test_config_file_syntax_and_range_errors_name_the_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("max_steps: [1\nseed: 2\n")
    with pytest.raises(ValueError, match=rf"config file '{re.escape(str(y))}' is not valid YAML: .* at line \d+"):
        GRPOConfig.from_file(str(y))
    j = tmp_path / "bad.json"
    j.write_text('{"max_steps": 3,}')
    with pytest.raises(ValueError, match=rf"'{re.escape(str(j))}' is not valid JSON: .* line 1, column 17"):
        GRPOConfig.from_file(str(j))
    r = tmp_path / "range.yaml"
    r.write_text("max_steps: 0\n")
    with pytest.raises(ValueError, match=rf"config file '{re.escape(str(r))}': max_steps must be an integer >= 1"):
        GRPOConfig.from_file(str(r))
    with pytest.raises(ValueError, match=r"^max_steps must be"):  # the bad value came from the override
        GRPOConfig.from_file(str(r), max_steps=-1)
    (tmp_path / "u.yaml").write_text("lr: 1\n")
    with pytest.raises(ValueError, match=r"unknown GRPOConfig keys: \['lr'\] in config file"):
        GRPOConfig.from_file(str(tmp_path / "u.yaml"))


# --------------------------------------------------------------------------- 9. errors reach the CLI user as one line
def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [s for s in err.splitlines() if s.startswith("grpo-kernels train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_cli_input_errors_are_one_line_and_exit_2(tok, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in make_copy_rows(4, 2)) + "\n")
    assert main(["train", "--model", str(empty), "--dataset", str(data)]) == 2
    _one_line_error(capsys, f"--model {str(empty)!r} is an empty directory")
    (empty / "weights.bin").write_bytes(b"x")
    assert main(["train", "--model", str(empty), "--dataset", str(data)]) == 2
    _one_line_error(capsys, f"--model {str(empty)!r} has no config.json")
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [3\n")
    assert main(["train", "--config", str(bad), "--model", str(empty), "--dataset", str(data)]) == 2
    _one_line_error(capsys, f"config file {str(bad)!r} is not valid YAML")

    model_dir = tmp_path / "model"
    build_model(tok, seed=0, **TINY).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    base = ["train", "--model", str(model_dir), "--per-device-batch-size", "2", "--num-generations", "4",
            "--max-new-tokens", "3", "--reward-funcs", "digit_copy", "--progress-bar", "false", "--plot", "false",
            "--output-dir", str(tmp_path / "run")]
    assert main(base + ["--dataset", str(tmp_path / "missing.jsonl")]) == 2
    _one_line_error(capsys, "missing.jsonl", "does not exist")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "1=", "answer": "1"}\n{"prompt": \n')
    assert main(base + ["--dataset", str(broken)]) == 2
    _one_line_error(capsys, f"{broken}: line 2: invalid JSON")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"prompt": "1=", "answer": "1"}\n\xff\xfe\x00\n')
    assert main(base + ["--dataset", str(binary)]) == 2
    _one_line_error(capsys, f"{binary}: line 2: not UTF-8 text")
    assert main(base + ["--dataset", str(tmp_path)]) == 2
    _one_line_error(capsys, f"dataset {str(tmp_path)!r} is a directory")
    assert main(base + ["--dataset", str(data), "--resume"]) == 2
    _one_line_error(capsys, "has no complete checkpoint")
    assert main(base + ["--dataset", str(data), "--resume", str(tmp_path / "nope")]) == 2
    _one_line_error(capsys, "is not a checkpoint")
    assert main(base + ["--dataset", str(data), "--resume", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "has no complete checkpoint" in err


def test_cli_guarded_output_dir(tmp_path, capsys):
    """The demo twice into one directory: refused (exit 2, one line) unless --resume or --overwrite-output-dir."""
    out = str(tmp_path / "demo")
    argv = ["train", "--max-steps", "2", "--per-device-batch-size", "4", "--num-generations", "4", "--output-dir", out,
            "--progress-bar", "false", "--plot", "false", "--save-final", "false", "--save-steps", "1"]
    assert main(argv) == 0
    first = open(os.path.join(out, "metrics.jsonl")).read()
    assert main(argv) == 2
    _one_line_error(capsys, f"output_dir {out!r} already holds a run", "--resume", "--overwrite-output-dir")
    assert open(os.path.join(out, "metrics.jsonl")).read() == first
    assert main(argv[:2] + ["3"] + argv[3:] + ["--resume"]) == 0
    assert f"resumed from {os.path.join(out, 'checkpoint-2')} at step 2" in capsys.readouterr().out
    assert main(argv + ["--overwrite-output-dir"]) == 0  # a bare boolean flag means true
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 2
    assert main(argv + ["--overwrite-output-dir", "--resume"]) == 2
    _one_line_error(capsys, "exclude each other")
    assert main(argv + ["--seed", "1", "--resume"]) == 2
    _one_line_error(capsys, "different config (seed: 0 -> 1")


def test_custom_reward_function_errors_name_the_function(tok, tmp_path):
    def gives_none(prompts, completions, **_):
        return None

    def gives_generator(prompts, completions, **_):
        return (0.0 for _ in completions)

    def gives_string(prompts, completions, **_):
        return "1.0"

    def gives_nested(prompts, completions, **_):
        return [[1.0] for _ in completions]

    rows = [{"prompt": "12=", "responses": ["12", "1", "99", "123"], "answer": "12"}]
    for fn, what in [(gives_none, "it returned None"), (gives_generator, "it returned a generator"),
                     (gives_string, "it returned a str '1.0'"), (gives_nested, "score 0 is a list [1.0]")]:
        tr = GRPOTrainer(build_model(tok, seed=0, **TINY), rows, cfg(tmp_path, per_device_batch_size=1),
                         reward_funcs=["digit_copy", fn], tokenizer=tok)
        with pytest.raises(ValueError, match=rf"reward function '{fn.__name__}' \(defined at .*test_reliability.py:"
                                             rf"\d+\) must return a list of 4 scores.*; {re.escape(what)}"):
            tr.training_step(rows)


# --------------------------------------------------------------------------- 1. kill -9 of a real run
DEMO_ARGS = ["train", "--max-steps", "12", "--save-steps", "1", "--per-device-batch-size", "4", "--num-generations",
             "4", "--progress-bar", "false", "--plot", "false"]
# The `grpo-kernels` entry point (grpo_kernels.cli:main) in a fresh interpreter that imports torch/transformers first
# and then waits for a line on stdin: the next run's ~7 s of imports overlap the current one.
LAUNCH = ("import sys, transformers, grpo_kernels.cli, grpo_kernels.trainer.trainer; "
          "from transformers import LlamaForCausalLM; sys.stdin.readline(); "
          "sys.exit(grpo_kernels.cli.main(sys.argv[1:]))")


class _Run:
    def __init__(self, out, *extra, log):
        self.log = log
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # the same for every run (same numerics)
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, *DEMO_ARGS, "--output-dir", str(out), *extra],
                                         stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT, env=env)

    def go(self):
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()
        return self

    def text(self):
        return open(self.log).read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _checkpoints(out):
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return set(), False
    steps = {int(m.group(1)) for n in names for m in [re.fullmatch(r"checkpoint-(\d+)", n)] if m}
    return steps, any(n.startswith(".tmp-checkpoint-") for n in names)


def _wait(cond, proc, timeout):
    t = time.monotonic() + timeout
    while time.monotonic() < t and proc.poll() is None:
        if cond():
            return True
        time.sleep(0.001)
    return False


@pytest.mark.slow
def test_kill_9_while_saving_then_resume_equals_uninterrupted_run(tmp_path, capsys):
    """A real `grpo-kernels train` saving every step is killed with SIGKILL at random moments of its saves (the
    first kill right after a save began) and resumed with --resume, three times; each resume continues from the
    newest complete checkpoint, and the run ends with the metrics and final weights of an uninterrupted run."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    out, ref_out = tmp_path / "run", tmp_path / "ref"
    t0 = time.monotonic()
    pool = [_Run(out, *(["--resume"] if i else []), log=tmp_path / f"run{i}.log") for i in range(4)]  # importing
    runs = list(pool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs (OMP_NUM_THREADS=1): the same numerics
    try:
        assert main(DEMO_ARGS + ["--output-dir", str(ref_out)]) == 0  # the uninterrupted run, in this process
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    kills, hit_inside = [], 0
    try:
        for attempt in range(5):
            if attempt >= 3 and hit_inside:
                break
            before, _ = _checkpoints(out)
            p = pool.pop(0).go()
            if not pool:
                pool.append(_Run(out, "--resume", log=tmp_path / f"run{len(runs)}.log"))
                runs.append(pool[-1])
            # saving has begun when a new checkpoint appears; let 0-1 more saves finish, then wait for one to start
            _wait(lambda: _checkpoints(out)[0] - before, p.proc, 120)
            for _ in range(rng.randint(0, 1)):
                n = len(_checkpoints(out)[0])
                _wait(lambda: len(_checkpoints(out)[0]) > n, p.proc, 30)
            _wait(lambda: _checkpoints(out)[1], p.proc, 30)
            delay = rng.uniform(0, 0.03) if attempt in (1, 2) else 0.0  # the first (and any extra) kill: at once
            time.sleep(delay)
            finished = p.proc.poll() is not None
            p.proc.send_signal(signal.SIGKILL)
            p.proc.wait()
            if before:
                last = max(before)
                assert f"resumed from {out / f'checkpoint-{last}'} at step {last}" in p.text(), (seed, kills, p.text())
            steps, torn = _checkpoints(out)
            hit_inside += torn
            kills.append((attempt, round(delay, 4), max(steps, default=None), "inside a save" if torn else "between"))
            if finished:
                break
        assert hit_inside, f"no kill landed inside a save (seed {seed}): {kills}"
        last = max(_checkpoints(out)[0])
        final = pool.pop(0).go()
        assert final.proc.wait(timeout=180) == 0, final.text()
        assert f"resumed from {out / f'checkpoint-{last}'} at step {last}" in final.text()
    finally:
        for r in runs:
            r.stop()
    got = [json.loads(s) for s in open(out / "metrics.jsonl")]
    want = [json.loads(s) for s in open(ref_out / "metrics.jsonl")]
    assert [r["step"] for r in got] == list(range(1, 13)), (seed, kills)
    assert strip(got) == strip(want), (seed, kills)
    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(ref_out / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (seed, kills)
    assert not any(n.startswith(".tmp-") or n == ".lock" for n in os.listdir(out))
    with capsys.disabled():
        print(f"\nkills (seed {seed}): {kills}; {time.monotonic() - t0:.1f} s")


# --------------------------------------------------------------------------- 1+2 under DDP
def _ddp_worker(rank, world, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tok = build_tokenizer()

    def run(out, **kw):
        c = dict(output_dir=os.path.join(root, out), device="cpu", progress_bar=False, plot=False, save_final=False,
                 shuffle=False, num_generations=4, per_device_batch_size=1, learning_rate=1e-2, max_steps=3,
                 save_steps=1, loss_type="grpo", lr_scheduler="constant")  # max_steps changes on resume
        c.update(kw)
        tr = GRPOTrainer(build_model(tok, seed=11, **TINY), GRPODataset(OFFLINE, tok, num_samples=4), GRPOConfig(**c))
        try:
            hist = tr.train()
            return hist, {k: v.clone() for k, v in tr.unwrapped.state_dict().items()}, None
        except ValueError as e:
            return None, None, str(e)
        finally:
            del tr
            gc.collect()

    try:
        full = run("a")
        run("b", max_steps=2)
        resumed = run("b", resume_from_checkpoint="latest")
        refused = run("a")  # every rank gets the refusal (none is left waiting at a collective)
        torch.save({"full": full, "resumed": resumed, "refused": refused[2]}, os.path.join(root, f"rank{rank}.pt"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_checkpoints_hold_every_rank_and_resume_exactly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two DDP workers did not finish within 180 s")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        (h_full, p_full, e1), (h_res, p_res, e2) = got["full"], got["resumed"]
        assert e1 is None and e2 is None, (e1, e2)
        assert_same_run(h_res, p_res, h_full, p_full)
        assert "already holds a run" in got["refused"]
    for d in ("a", "b"):
        info = json.load(open(tmp_path / d / "checkpoint-3" / ckpt.COMPLETE_FILE))
        assert info["world_size"] == 2 and {"rng_state_0.pt", "rng_state_1.pt"} <= set(info["files"])
        assert sorted(os.listdir(tmp_path / d)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "config.json",
                                                    "metrics.jsonl"]
