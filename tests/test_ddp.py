"""Two CPU processes (gloo) under DDP take the same step as one process with the same global batch.

The gradients are compared as the optimizer receives them (after DDP's all-reduce and clipping): AdamW's first step
is ~lr·sign(g), which turns rounding noise in near-zero gradient entries into visible parameter differences."""

import gc
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from grpo_kernels.trainer.demo import build_model, build_tokenizer
from grpo_kernels.trainer import GRPOConfig, GRPODataset, GRPOTrainer

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)
ROWS = [
    {"prompt": "12=", "responses": ["12", "1", "99", "123"], "rewards": [1.0, 0.5, 0.0, 0.7]},
    {"prompt": "3456=", "responses": ["3456", "3", "", "0000"], "rewards": [0.2, 0.9, 0.1, 0.0]},
    {"prompt": "7=", "responses": ["7", "77", "8", "0"], "rewards": [1.0, 0.5, 0.0, 0.0]},
    {"prompt": "55=", "responses": ["5", "55", "555", "1"], "rewards": [0.5, 1.0, 0.6, 0.0]},
]


def _config(out, per_device, loss_type):
    loss_type, _, scale = loss_type.partition("+")  # "grpo+batch": scale_rewards="batch"
    return GRPOConfig(output_dir=out, device="cpu", progress_bar=False, plot=False, save_final=False, shuffle=False,
                      num_generations=4, per_device_batch_size=per_device, learning_rate=1e-2, lr_scheduler="constant",
                      loss_type=loss_type, scale_rewards=scale or "group", max_grad_norm=1.0, max_steps=1)


def _run(out, per_device, loss_type):
    """One training step; returns (trainer, metrics, {parameter name: the gradient the optimizer stepped with})."""
    tok = build_tokenizer()
    model = build_model(tok, seed=11, **TINY)
    tr = GRPOTrainer(model, GRPODataset(ROWS, tok, num_samples=4), _config(out, per_device, loss_type))
    grads = {}
    tr.optimizer.register_step_pre_hook(lambda opt, args, kw: grads.update(
        {n: p.grad.clone() for n, p in tr.unwrapped.named_parameters() if p.grad is not None}))
    metrics = tr.training_step(tr.get_batch(0))
    return tr, metrics, grads


def _worker(rank, world, port, out, loss_type):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        tr, metrics, grads = _run(out, 2, loss_type)
        assert tr.world_size == world and tr.batch_indices(0) == [2 * rank, 2 * rank + 1]
        if rank == 0:
            torch.save({"params": tr.unwrapped.state_dict(), "grads": grads, "metrics": metrics},
                       os.path.join(out, "ddp.pt"))
        torch.distributed.barrier()
        # The DDP wrapper (its reducer holds the process group) goes before the group does: destroyed the other
        # way round, at the function's return, its destructor can block on the torn-down group.
        del tr
        gc.collect()
    finally:  # (a failed rendezvous leaves no group: its own error must show, not destroy's)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "grpo+batch"])
def test_two_process_ddp_step_equals_single_process(tmp_path, loss_type):
    """Including dapo's global token normalizer and batch-scaled advantages (all-reduced / all-gathered)."""
    out = str(tmp_path)
    ctx = mp.spawn(_worker, args=(2, _free_port(), out, loss_type), nprocs=2, join=False)
    deadline = time.monotonic() + 180  # a worker that dies or a lost rendezvous must fail the test, not hang CI
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two DDP workers did not finish within 180 s")
    got = torch.load(os.path.join(out, "ddp.pt"))
    _, m1, g1 = _run(out, 4, loss_type)
    assert got["grads"].keys() == g1.keys() and len(g1) > 5
    assert any(g.abs().max() > 1e-3 for g in g1.values())  # a non-trivial gradient
    for k, g in g1.items():
        torch.testing.assert_close(got["grads"][k], g, atol=1e-7, rtol=1e-5, msg=k)
    assert got["metrics"]["reward"] == pytest.approx(m1["reward"], rel=1e-6)
    assert got["metrics"]["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-6)
    initial = build_model(build_tokenizer(), seed=11, **TINY).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in got["params"].items())  # the step did move the weights
