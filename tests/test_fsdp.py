"""FSDP2 in the trainer (``config.fsdp``, ``--fsdp``) on two CPU processes (gloo).

One spawn of two workers (``fsdp_runs``, a module fixture with a hard deadline) runs every distributed scenario, and
the tests compare what it saved with single-process runs:

* (a) 2 ranks with FSDP take the step 1 process takes with the same global batch, for 3 steps: on the logits path
  (grpo), and on the fused-linear path (the LM-head weight read after the forward) with a sharded frozen reference
  model (KL), old log-probs (num_iterations=2), gradient accumulation and dapo's global token normalizer.
  The gradients the optimizer receives are compared at every update (FSDP's reduce-scatter must average like DDP:
  AdamW is nearly scale-invariant, so comparing parameters alone would not catch a missing 1/W). The parameters are
  compared too, with ``adam_epsilon=1e-4``: AdamW's update ``lr·g/(|g|+eps)`` is then at most ``lr/eps = 100``
  times as sensitive to ``g`` as SGD, so fp32 rounding noise (~1e-9 in the gradients) moves the parameters by
  ~1e-7, not by up to ``lr`` as with ``eps=1e-8``, where noise in near-zero gradients flips ``sign(g)``.
* (b) an online run (generation under FSDP) stopped by an exception in step 3, after checkpoint-2, and resumed from
  ``latest`` gives the uninterrupted run's metrics and final weights exactly; the checkpoint is sharded
  (``torch.distributed.checkpoint``) and complete by its marker.
* (c) an FSDP checkpoint of 2 ranks refuses a 1-process resume, naming both world sizes; a run without FSDP refuses it
  too (the format).
* (d) ``fsdp`` in one process trains unsharded, with a note; ``--fsdp`` and YAML ``fsdp: true`` set the field.
"""

import gc
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from grpo_kernels.trainer import GRPOConfig, GRPODataset, GRPOTrainer
from grpo_kernels.trainer import checkpoint as ckpt
from grpo_kernels.trainer import fsdp
from grpo_kernels.trainer.demo import build_model, build_tokenizer, make_copy_rows

TINY = dict(hidden_size=32, num_layers=2, num_heads=2)  # two decoder layers: three FSDP units with the root
TIMING = ("step_time", "tokens_per_sec", "elapsed")
DEADLINE_S = 150
ROWS = [
    {"prompt": "12=", "responses": ["12", "1", "99", "123"], "rewards": [1.0, 0.5, 0.0, 0.7]},
    {"prompt": "3456=", "responses": ["3456", "3", "", "0000"], "rewards": [0.2, 0.9, 0.1, 0.0]},
    {"prompt": "7=", "responses": ["7", "77", "8", "0"], "rewards": [1.0, 0.5, 0.0, 0.0]},
    {"prompt": "55=", "responses": ["5", "55", "555", "1"], "rewards": [0.5, 1.0, 0.6, 0.0]},
]
# (a): the two paths through the model, each for 3 steps; the gradient norm measured (logits) and clipped (fused)
SCENARIOS = {
    "logits": dict(loss_type="grpo", max_grad_norm=None),
    "fused_kl": dict(loss_type="dapo", fused_linear=True, kl_coef=0.05, num_iterations=2,
                     gradient_accumulation_steps=2),
}
# (b): online (sampling, digit-copy rewards), a checkpoint every 2 steps, the final model saved
ONLINE = dict(reward_funcs=["digit_copy"], max_new_tokens=4, max_steps=4, save_steps=2, save_final=True,
              loss_type="grpo", shuffle=True, warmup_steps=1, lr_scheduler="cosine", learning_rate=3e-3,
              use_chat_template=False)


def _config(out, per_device, **kw):
    base = dict(output_dir=out, device="cpu", progress_bar=False, plot=False, save_final=False, shuffle=False,
                num_generations=4, per_device_batch_size=per_device, learning_rate=1e-2, lr_scheduler="constant",
                adam_epsilon=1e-4, max_grad_norm=1.0, max_steps=3)
    base.update(kw)
    return GRPOConfig(**base)


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _params(tr):
    if tr.fsdp:
        return fsdp.full_model_state_dict(tr.unwrapped)  # a collective; {} on rank 1
    return {k: v.detach().clone() for k, v in tr.unwrapped.state_dict().items()}


def _train_offline(out, per_device, **kw):
    """3 steps on ROWS; returns (history, [{param name: gradient the optimizer stepped with}] per update, params)."""
    tok = build_tokenizer()
    tr = GRPOTrainer(build_model(tok, seed=11, **TINY), GRPODataset(ROWS, tok, num_samples=4),
                     _config(out, per_device, **kw))
    grads = []
    tr.optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.append(
        {n: _full(p.grad) for n, p in tr.unwrapped.named_parameters() if p.grad is not None}))
    hist = tr.train()
    params = _params(tr)
    del tr
    gc.collect()
    return hist, grads, params


class _Stop(Exception):
    pass


def _online_trainer(out, tok, rows, **kw):
    return GRPOTrainer(build_model(tok, seed=5, **TINY), rows, _config(out, 2, **{**ONLINE, "fsdp": True, **kw}),
                       tokenizer=tok)


def _worker(rank, world, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        got = {}
        for name, kw in SCENARIOS.items():  # (a)
            got[name] = _train_offline(os.path.join(root, name), 2, fsdp=True, **kw)
        tok, rows = build_tokenizer(), make_copy_rows(32, 3, seed=0)
        tr = _online_trainer(os.path.join(root, "full"), tok, rows)  # (b) uninterrupted
        got["units"] = tr.unwrapped._grpo_fsdp_units
        got["full"] = tr.train()
        # gathered() (generation): forwards inside make no collective, so ranks may make different numbers of them
        ids = torch.tensor([[1, 5, 6, 7]])
        with fsdp.gathered(tr.unwrapped), torch.no_grad():
            got["gathered_types"] = {type(p).__name__ for p in tr.unwrapped.parameters()}
            for _ in range(1 + 2 * rank):
                got["gathered_logits"] = tr.unwrapped(input_ids=ids).logits
        torch.distributed.barrier()
        got["resharded_types"] = {type(p).__name__ for p in tr.unwrapped.parameters()}
        del tr
        tr = _online_trainer(os.path.join(root, "cut"), tok, rows)  # (b) stopped in step 3, after checkpoint-2
        step = tr.training_step

        def stop_in_step_3(batch):
            if tr.step == 2:
                raise _Stop
            return step(batch)

        tr.training_step = stop_in_step_3
        with pytest.raises(_Stop):
            tr.train()
        del tr, step, stop_in_step_3
        tr = _online_trainer(os.path.join(root, "cut"), tok, rows, resume_from_checkpoint="latest")
        got["resumed"] = tr.train()
        del tr
        # (c) a run without FSDP (DDP) refuses the sharded checkpoint: every rank raises
        tr = _online_trainer(os.path.join(root, "ddp"), tok, rows, fsdp=False)
        try:
            tr.load_checkpoint(os.path.join(root, "cut", "checkpoint-2"))
            got["ddp_refused"] = None
        except ValueError as e:
            got["ddp_refused"] = str(e)
        del tr
        gc.collect()
        if rank == 0:
            torch.save(got, os.path.join(root, "fsdp.pt"))
        torch.distributed.barrier()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """What the two FSDP workers saved (rank 0), and their root directory."""
    root = str(tmp_path_factory.mktemp("fsdp"))
    t0 = time.monotonic()
    ctx = mp.spawn(_worker, args=(2, _free_port(), root), nprocs=2, join=False)
    while not ctx.join(timeout=2):  # a worker that dies or a lost rendezvous must fail the tests, not hang CI
        if time.monotonic() - t0 > DEADLINE_S:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two FSDP workers did not finish within {DEADLINE_S} s")
    return torch.load(os.path.join(root, "fsdp.pt"), weights_only=False), root


def _strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


# --------------------------------------------------------------------------- (a) same step as one process
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fsdp_two_ranks_take_the_single_process_steps(fsdp_runs, tmp_path, scenario):
    got, _ = fsdp_runs
    hist2, grads2, params2 = got[scenario]
    hist1, grads1, params1 = _train_offline(str(tmp_path), 4, **SCENARIOS[scenario])
    updates = 3 * SCENARIOS[scenario].get("num_iterations", 1)
    assert len(grads1) == len(grads2) == updates
    for u, (g2, g1) in enumerate(zip(grads2, grads1)):
        assert g2.keys() == g1.keys() and len(g1) > 10
        assert any(g.abs().max() > 1e-3 for g in g1.values())  # a non-trivial gradient
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], atol=1e-6, rtol=1e-4, msg=f"update {u}: {k}")
    assert params2.keys() == params1.keys()
    for k in params1:
        torch.testing.assert_close(params2[k], params1[k], atol=1e-5, rtol=1e-5, msg=k)
    initial = build_model(build_tokenizer(), seed=11, **TINY).state_dict()
    moved = max(float((initial[k] - v).abs().max()) for k, v in params1.items())
    assert moved > 1e-2  # the 3 steps did move the weights, far beyond the tolerance
    # (token-mean metrics such as entropy and kl are means of the ranks' means, as under DDP: not compared)
    for r2, r1 in zip(hist2, hist1):
        for key in ("reward", "loss", "grad_norm", "learning_rate"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-6), key
    if scenario == "fused_kl":
        assert hist1[-1]["kl"] > 0 and hist2[-1]["kl"] > 0
        assert max(r["grad_norm"] for r in hist1) > 1.0  # max_grad_norm=1 did clip


# --------------------------------------------------------------------------- (b) stop, resume: the same run
def test_fsdp_stopped_and_resumed_run_equals_the_uninterrupted_one(fsdp_runs):
    got, root = fsdp_runs
    assert got["units"] == TINY["num_layers"] + 1
    full, resumed = got["full"], got["resumed"]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert _strip(resumed) == _strip(full)
    assert len({r["reward"] for r in full}) > 1  # sampled rollouts, not a constant
    a = load_file(os.path.join(root, "cut", "final", "model.safetensors"))  # full weights, gathered on rank 0
    b = load_file(os.path.join(root, "full", "final", "model.safetensors"))
    assert a.keys() == b.keys() == set(build_model(build_tokenizer(), **TINY).state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the final weights are the ones generation ran on, gathered (and resharded afterwards)
    assert got["gathered_types"] == {"Parameter"} and got["resharded_types"] == {"DTensor"}
    model = build_model(build_tokenizer(), **TINY)
    model.load_state_dict(b)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    torch.testing.assert_close(got["gathered_logits"], want, atol=1e-5, rtol=1e-5)
    rows = [json.loads(s) for s in open(os.path.join(root, "cut", "metrics.jsonl"))]
    assert _strip(rows) == _strip(full)
    for run in ("full", "cut"):
        d = os.path.join(root, run, "checkpoint-2")
        info = json.load(open(os.path.join(d, ckpt.COMPLETE_FILE)))
        assert info["format"] == "fsdp" and info["world_size"] == 2 and ckpt.checkpoint_problem(d) is None
        files = set(info["files"])
        assert {"sharded/.metadata", "trainer_state.pt", "rng_state_0.pt", "rng_state_1.pt", "config.json"} <= files
        assert len([f for f in files if f.startswith("sharded/") and f.endswith(".distcp")]) == 2  # one per rank
        assert ckpt.MODEL_FILE not in files
    # a missing shard file makes the checkpoint incomplete by its marker
    d = os.path.join(root, "full", "checkpoint-2")
    shard = next(f for f in os.listdir(os.path.join(d, "sharded")) if f.endswith(".distcp"))
    os.rename(os.path.join(d, "sharded", shard), os.path.join(d, "sharded", shard + ".x"))
    try:
        assert shard in (ckpt.checkpoint_problem(d) or "")
    finally:
        os.rename(os.path.join(d, "sharded", shard + ".x"), os.path.join(d, "sharded", shard))


# --------------------------------------------------------------------------- (c) another world size / format
def test_fsdp_checkpoint_refuses_another_world_size(fsdp_runs, tmp_path):
    _, root = fsdp_runs
    path = os.path.join(root, "cut", "checkpoint-2")
    tok = build_tokenizer()
    tr = GRPOTrainer(build_model(tok, seed=5, **TINY), make_copy_rows(8, 3),
                     _config(str(tmp_path / "one"), 2, fsdp=True, **dict(ONLINE, resume_from_checkpoint=path)),
                     tokenizer=tok)
    before = {k: v.clone() for k, v in tr.unwrapped.state_dict().items()}
    with pytest.raises(ValueError, match=r"world_size=2 \(FSDP-sharded.*this run has world_size=1.*"
                                         r"--nproc_per_node 2"):
        tr.load_checkpoint(path)
    assert tr.step == 0 and all(torch.equal(v, before[k]) for k, v in tr.unwrapped.state_dict().items())


def test_fsdp_checkpoint_refuses_a_run_without_fsdp(fsdp_runs):
    got, _ = fsdp_runs
    assert "is FSDP-sharded (fsdp=True) but this run is not sharded" in (got["ddp_refused"] or "")


# --------------------------------------------------------------------------- (d) one process, config, CLI
def test_fsdp_in_one_process_trains_unsharded(tmp_path, capsys):
    """Without torchrun there is nothing to shard: the same run as without fsdp, and a note saying so."""
    hists = {}
    for flag in (True, False):
        tok = build_tokenizer()
        tr = GRPOTrainer(build_model(tok, seed=11, **TINY), GRPODataset(ROWS, tok, num_samples=4),
                         _config(str(tmp_path / str(flag)), 4, fsdp=flag, max_steps=1, save_steps=1))
        assert tr.fsdp is False and not fsdp.is_sharded(tr.unwrapped)
        hists[flag] = tr.train()
        info = json.load(open(tmp_path / str(flag) / "checkpoint-1" / ckpt.COMPLETE_FILE))
        assert info["format"] == "full"
    assert _strip(hists[True]) == _strip(hists[False])
    assert "fsdp: a single process has nothing to shard; training unsharded" in capsys.readouterr().out


def test_fsdp_flag_and_yaml(tmp_path, capsys):
    from grpo_kernels.cli import main

    assert GRPOConfig().fsdp is False
    p = tmp_path / "c.yaml"
    p.write_text("fsdp: true\nmax_steps: 2\n")
    assert GRPOConfig.from_file(str(p)).fsdp is True
    assert GRPOConfig.from_file(str(p), fsdp=False).fsdp is False
    for argv, want in ((["--fsdp"], True), (["--fsdp", "false"], False), ([], False)):
        assert main(["train", "--print-config", *argv]) == 0
        assert json.loads(capsys.readouterr().out)["fsdp"] is want
