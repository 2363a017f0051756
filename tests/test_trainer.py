"""GRPOTrainer: log-prob shift, one step on offline data, μ > 1 with clipping, accumulation, KL, resume, demo, CLI."""

import copy
import json
import os

import pytest
import torch

import grpo_kernels
from grpo_kernels import reference as ref
from grpo_kernels.trainer.demo import build_model, build_tokenizer, make_copy_rows
from grpo_kernels.trainer import GRPOConfig, GRPODataset, GRPOTrainer

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), device="cpu", progress_bar=False, plot=False, save_final=False,
                num_generations=4, per_device_batch_size=2, max_new_tokens=4, learning_rate=1e-2, warmup_steps=0,
                lr_scheduler="constant", reward_funcs=["digit_copy"], use_chat_template=False, shuffle=False)
    base.update(kw)
    return GRPOConfig(**base)


OFFLINE = [
    {"prompt": "12=", "responses": ["12", "1", "99", "123"], "rewards": [1.0, 0.5, 0.0, 0.7]},
    {"prompt": "3456=", "responses": ["3456", "3", "", "0000"], "rewards": [0.2, 0.9, 0.1, 0.0]},
]


def seq_logprobs(trainer, rows):
    r = trainer._offline_rollout(trainer._prepare(rows))
    return (trainer._policy_logprobs(trainer.unwrapped, r) * r.completion_mask).sum(1)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_logprobs_shift_and_left_padding_match_manual(tok, tmp_path):
    """Completion log-probs: logits at position P-1+t of the unpadded sequence predict completion token t."""
    model = build_model(tok, seed=1, **TINY)
    tr = GRPOTrainer(model, GRPODataset(OFFLINE, tok, num_samples=4), cfg(tmp_path), tokenizer=tok)
    rollout = tr._offline_rollout(tr._prepare(OFFLINE))
    got = tr._policy_logprobs(model, rollout)
    ds = GRPODataset(OFFLINE, tok, num_samples=4)
    i = 0
    for row in ds:
        for resp in row["response_ids"]:
            full = torch.tensor([row["prompt_ids"] + resp])
            with torch.no_grad():
                lp = torch.log_softmax(model(full).logits[0].float(), -1)
            P = len(row["prompt_ids"])
            want = torch.stack([lp[P - 1 + t, y] for t, y in enumerate(resp)])
            torch.testing.assert_close(got[i, :len(resp)], want, atol=2e-5, rtol=1e-5)
            assert (got[i, len(resp):] == 0).all()
            i += 1


def test_generation_logprobs_match_training_forward(tok, tmp_path):
    """generate_responses' log-probs (from the sampling logits) equal the training forward's on the same tokens,
    with prompts of different lengths (left padding) and early <eos>."""
    model = build_model(tok, seed=2, **TINY)
    rows = [{"prompt": "1=", "answer": "1"}, {"prompt": "98765=", "answer": "98765"}]
    tr = GRPOTrainer(model, rows, cfg(tmp_path, max_new_tokens=6, temperature=0.7), tokenizer=tok)
    ds = tr.train_dataset
    rollout = tr.generate_responses([r["prompt_ids"] for r in ds], num_samples=4)
    responses, logprobs = rollout
    assert len(responses) == 8 and logprobs.shape == rollout.completion_ids.shape
    cm = rollout.completion_mask
    assert cm[:, 0].all() and (cm.sum(1) <= 6).all()
    again = tr._policy_logprobs(model, rollout)
    torch.testing.assert_close(logprobs, again, atol=1e-4, rtol=1e-4)
    tr.max_score_values = 0  # large-vocabulary path: log-probs from a chunked forward pass, same numbers
    torch.manual_seed(5)
    r1 = tr.generate_responses([r["prompt_ids"] for r in ds], num_samples=4)
    tr.max_score_values = 2 ** 27
    torch.manual_seed(5)
    r2 = tr.generate_responses([r["prompt_ids"] for r in ds], num_samples=4)
    assert torch.equal(r1.completion_ids, r2.completion_ids)
    torch.testing.assert_close(r1.logprobs, r2.logprobs, atol=1e-4, rtol=1e-4)
    assert tr.generate_responses([r["prompt_ids"] for r in ds], num_samples=2, return_logprobs=False).logprobs is None
    for text, ids, m in zip(responses, rollout.completion_ids, cm):
        assert text == tok.decode(ids[:int(m.sum())], skip_special_tokens=True)


def test_one_step_raises_best_response_logprob(tok, tmp_path):
    model = build_model(tok, seed=3, **TINY)
    tr = GRPOTrainer(model, GRPODataset(OFFLINE, tok, num_samples=4), cfg(tmp_path), tokenizer=None)
    before = seq_logprobs(tr, OFFLINE)
    m = tr.training_step(OFFLINE)
    after = seq_logprobs(tr, OFFLINE)
    assert after[0] > before[0] + 0.05  # best of group 0 (reward 1.0)
    assert after[5] > before[5] + 0.05  # best of group 1 (reward 0.9)
    w = ref.group_weights(torch.tensor([x for r in OFFLINE for x in r["rewards"]]), 4, beta=0.1)
    assert (w * after).sum() > (w * before).sum() + 0.1  # the objective of the softmax loss went up
    assert m["reward"] == pytest.approx(sum(OFFLINE[0]["rewards"] + OFFLINE[1]["rewards"]) / 8)
    assert m["kl"] == 0.0 and m["clip_ratio"] == 0.0


def test_training_step_equals_hand_written_loop(tok, tmp_path):
    """μ = 2 updates on one batch with old log-probs and clipping: same parameters as a loop written by hand
    with grpo_loss; and the second update does clip."""
    model = build_model(tok, seed=4, **TINY)
    twin = copy.deepcopy(model)
    c = cfg(tmp_path, loss_type="grpo", num_iterations=2, epsilon=0.02, max_grad_norm=1.0, learning_rate=3e-2)
    tr = GRPOTrainer(model, GRPODataset(OFFLINE, tok, num_samples=4), c, tokenizer=tok)
    m = tr.training_step(OFFLINE)
    assert m["clip_ratio"] > 0  # the 2nd update sees ratios outside [1-ε, 1+ε]

    r = tr._offline_rollout(tr._prepare(OFFLINE))
    tokens = r.completion_ids.masked_fill(~r.completion_mask, -100)
    full = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask], 1).long()
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    P = r.prompt_ids.shape[1]
    rewards = torch.tensor([x for row in OFFLINE for x in row["rewards"]])
    opt = torch.optim.AdamW(twin.parameters(), lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)

    def logits():
        return twin(input_ids=full, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1]

    with torch.no_grad():
        old = ref.token_logprobs(logits(), tokens)
    for _ in range(2):
        loss = grpo_kernels.grpo_loss(logits(), tokens, rewards, r.completion_mask, group_size=4, loss_type="grpo",
                                      old_logprobs=old, epsilon=0.02, backend="torch", max_completion_length=4)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("loss_type, scale", [("softmax", "group"), ("grpo", "group"), ("dapo", "group"),
                                               ("grpo", "batch"), ("dr_grpo", "batch")])
def test_gradient_accumulation_matches_one_batch(tok, tmp_path, loss_type, scale):
    """dapo's token normalizer and scale_rewards="batch" are taken over the whole step batch, so two micro-batches
    give the optimizer the same gradient as one batch (the two prompts have completions of different lengths).
    Gradients are compared as the optimizer receives them: AdamW's first step is ~lr·sign(g), which turns
    rounding noise in near-zero gradient entries into visible parameter differences."""
    seen = []
    for ga in (1, 2):
        tr = GRPOTrainer(build_model(tok, seed=5, **TINY), GRPODataset(OFFLINE, tok, num_samples=4),
                         cfg(tmp_path, loss_type=loss_type, scale_rewards=scale, gradient_accumulation_steps=ga))
        grads = {}
        tr.optimizer.register_step_pre_hook(lambda opt, args, kw, tr=tr, grads=grads: grads.update(
            {n: p.grad.clone() for n, p in tr.unwrapped.named_parameters() if p.grad is not None}))
        tr.training_step(OFFLINE)
        seen.append(grads)
    one, two = seen
    assert one.keys() == two.keys() and len(one) > 5
    assert any(g.abs().max() > 1e-3 for g in one.values())
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-7, rtol=1e-5, msg=k)


def test_batch_terms_follow_the_whole_batch(tok, tmp_path):
    """The global quantities by hand: dapo's num_items_in_batch = completion tokens / accumulation steps, and
    batch-scaled advantages over all 8 rewards."""
    tr = GRPOTrainer(build_model(tok, seed=5, **TINY), GRPODataset(OFFLINE, tok, num_samples=4),
                     cfg(tmp_path, loss_type="dapo", scale_rewards="batch", gradient_accumulation_steps=2))
    rollout = tr._offline_rollout(tr._prepare(OFFLINE))
    rewards = torch.tensor([x for r in OFFLINE for x in r["rewards"]])
    terms = tr._global_batch_terms(rollout, rewards)
    assert terms["num_items_in_batch"] == pytest.approx(float(rollout.completion_mask.sum()) / 2)
    r = rewards.view(2, 4)
    expected = ((r - r.mean(1, keepdim=True)) / (rewards.std() + 1e-4)).view(-1)
    torch.testing.assert_close(terms["advantages"], expected)


def test_gradient_checkpointing_same_step(tok, tmp_path):
    a, b = build_model(tok, seed=9, **TINY), build_model(tok, seed=9, **TINY)
    ds = GRPODataset(OFFLINE, tok, num_samples=4)
    GRPOTrainer(a, ds, cfg(tmp_path)).training_step(OFFLINE)
    GRPOTrainer(b, ds, cfg(tmp_path, gradient_checkpointing=True)).training_step(OFFLINE)
    assert getattr(b, "is_activation_checkpointing", None) or b.is_gradient_checkpointing
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("loss_type", ["softmax", "grpo", "bnpo", "dr_grpo", "dapo"])
def test_every_loss_type_and_fused_linear_agree(tok, tmp_path, loss_type):
    """One step with each loss type; fused_linear (hidden states + lm_head) gives the same parameters."""
    a, b = build_model(tok, seed=6, **TINY), build_model(tok, seed=6, **TINY)
    ds = GRPODataset(OFFLINE, tok, num_samples=4)
    before = seq_logprobs(GRPOTrainer(copy.deepcopy(a), ds, cfg(tmp_path)), OFFLINE)
    ta = GRPOTrainer(a, ds, cfg(tmp_path, loss_type=loss_type))
    ma = ta.training_step(OFFLINE)
    mb = GRPOTrainer(b, ds, cfg(tmp_path, loss_type=loss_type, fused_linear=True)).training_step(OFFLINE)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-4, abs=1e-6)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=k)
    assert seq_logprobs(ta, OFFLINE)[0] > before[0]  # reward 1.0 row goes up whatever the normalizer


def test_offline_responses_scored_by_reward_funcs(tok, tmp_path):
    rows = [{"prompt": "12=", "responses": ["12", "1", "99", "123"], "answer": "12"}]
    tr = GRPOTrainer(build_model(tok, seed=7, **TINY), rows, cfg(tmp_path, per_device_batch_size=1), tokenizer=tok)
    m = tr.training_step(rows)
    want = [1.0, 0.5, 0.0, 2 / 3]
    assert m["rewards/digit_copy"] == pytest.approx(sum(want) / 4)
    assert m["reward"] == pytest.approx(sum(want) / 4)
    assert m["reward_std"] == pytest.approx(float(torch.tensor(want).std()), rel=1e-5)


def test_kl_to_frozen_reference(tok, tmp_path):
    tr = GRPOTrainer(build_model(tok, seed=8, **TINY), GRPODataset(OFFLINE, tok, num_samples=4),
                     cfg(tmp_path, loss_type="grpo", kl_coef=0.1))
    m1 = tr.training_step(OFFLINE)
    m2 = tr.training_step(OFFLINE)
    assert m1["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference before the first update
    assert m2["kl"] > 1e-5
    assert all(not p.requires_grad for p in tr.ref_model.parameters())


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("step_time", "tokens_per_sec", "elapsed")} for r in rows]


def test_resume_continues_exactly(tok, tmp_path):
    rows = make_copy_rows(64, 3, seed=0)
    c = dict(max_steps=4, save_steps=2, shuffle=True, lr_scheduler="cosine", warmup_steps=1, learning_rate=3e-3)
    full = GRPOTrainer(build_model(tok, seed=0, **TINY), rows, cfg(tmp_path / "a", **c), tokenizer=tok)
    hist = full.train()
    ck = tmp_path / "a" / "out" / "checkpoint-2"
    assert (ck / "model.safetensors").is_file() and (ck / "trainer_state.pt").is_file()
    resumed = GRPOTrainer(build_model(tok, seed=123, **TINY), rows,
                          cfg(tmp_path / "b", resume_from_checkpoint=str(ck), **c), tokenizer=tok)
    hist2 = resumed.train()
    assert _strip(hist2) == _strip(hist)
    for (k, x), y in zip(full.unwrapped.state_dict().items(), resumed.unwrapped.state_dict().values()):
        assert torch.equal(x, y), k
    lines = [json.loads(s) for s in open(tmp_path / "b" / "out" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    again = GRPOTrainer(build_model(tok, seed=0, **TINY), rows,
                        cfg(tmp_path / "a", resume_from_checkpoint="latest", **c), tokenizer=tok)
    assert again.load_checkpoint("latest").endswith("checkpoint-4") and again.step == 4


def test_config_io_and_validation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("max_steps: 7\nloss_type: grpo\nreward_funcs: [digit_copy, format]\n")
    c = GRPOConfig.from_file(str(p), learning_rate=0.5)
    assert (c.max_steps, c.loss_type, c.reward_funcs, c.learning_rate) == (7, "grpo", ["digit_copy", "format"], 0.5)
    j = tmp_path / "c.json"
    c.save(str(j))
    assert GRPOConfig.from_file(str(j)) == c
    assert c.replace(max_steps=9, seed=None).max_steps == 9
    with pytest.raises(ValueError, match="unknown GRPOConfig keys: \\['nope'\\]"):
        GRPOConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="divisible by gradient_accumulation_steps"):
        GRPOConfig(per_device_batch_size=3, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="num_generations"):
        GRPOConfig(num_generations=0)


def test_trainer_input_errors(tok, tmp_path):
    ds = GRPODataset(OFFLINE, tok, num_samples=4)
    with pytest.raises(ValueError, match="4 responses per prompt but config.num_generations is 2"):
        GRPOTrainer(build_model(tok, **TINY), ds, cfg(tmp_path, num_generations=2))
    with pytest.raises(ValueError, match="tokenizer is required"):
        GRPOTrainer(build_model(tok, **TINY), [{"prompt": "1="}], cfg(tmp_path))
    with pytest.raises(ValueError, match="not a checkpoint"):
        GRPOTrainer(build_model(tok, **TINY), ds, cfg(tmp_path, resume_from_checkpoint=str(tmp_path))).train()


def test_demo_cli_reward_rises(tmp_path, capsys):
    """`grpo-kernels train` with no task arguments: the built-in demo, shortened to 80 steps."""
    from grpo_kernels.cli import main

    out = tmp_path / "demo"
    assert main(["train", "--max-steps", "80", "--output-dir", str(out), "--progress-bar", "false"]) == 0
    text = capsys.readouterr().out
    assert "built-in demo" in text and "summary: 80 steps" in text and str(out / "reward_curve.png") in text
    rows = [json.loads(s) for s in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 81))
    for key in ("reward", "reward_std", "rewards/digit_copy", "kl", "clip_ratio", "entropy",
                "completions/mean_length", "loss", "step_time", "tokens_per_sec"):
        assert key in rows[0], key
    first = sum(r["reward"] for r in rows[:10]) / 10
    last = sum(r["reward"] for r in rows[-10:]) / 10
    assert first < 0.12  # chance level of a random-init policy
    assert last > first + 0.15, (first, last)  # seed 0: 0.07 -> ~0.4 (and 0.99 by step 200 of the full demo)
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert json.load(open(out / "config.json"))["max_steps"] == 80


def test_cli_config_resolution_and_errors(tmp_path, capsys):
    from grpo_kernels.cli import main

    p = tmp_path / "c.yaml"
    p.write_text("max_steps: 3\nlearning_rate: 0.25\n")
    assert main(["train", "--print-config", "--max-steps", "7", "--loss-type", "dapo"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["max_steps"], d["loss_type"], d["reward_funcs"], d["output_dir"]) == (7, "dapo", ["digit_copy"],
                                                                                   "grpo_demo_output")
    assert main(["train", "--config", str(p), "--model", str(tmp_path / "nope"), "--dataset", "x.jsonl"]) == 2
    assert "not a local directory" in capsys.readouterr().err
    assert main(["train", "--dataset", "x.jsonl"]) == 2
    assert "--model LOCAL_PATH is required" in capsys.readouterr().err


def test_cli_local_model_and_jsonl(tok, tmp_path, capsys):
    from grpo_kernels.cli import main

    model_dir = tmp_path / "model"
    build_model(tok, seed=0, **TINY).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in make_copy_rows(8, 2)) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--per-device-batch-size", "2", "--num-generations", "4", "--max-new-tokens", "3", "--reward-funcs",
            "digit_copy", "exact_answer", "--reward-weights", "1.0", "0.5", "--save-steps", "1", "--progress-bar", "false"]
    assert main(argv) == 0
    rows = [json.loads(s) for s in open(out / "metrics.jsonl")]
    assert len(rows) == 2
    for r in rows:
        assert r["reward"] == pytest.approx(r["rewards/digit_copy"] + 0.5 * r["rewards/exact_answer"], abs=1e-6)
    assert (out / "checkpoint-1" / "trainer_state.pt").is_file() and (out / "checkpoint-2" / "model.safetensors").is_file()
    assert main(argv[:-4] + ["--max-steps", "3", "--resume"]) == 0  # continues from checkpoint-2
    assert [json.loads(s)["step"] for s in open(out / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.gpu
@pytest.mark.parametrize("fused_linear", [False, True])
def test_gpu_training_steps_bf16(tok, tmp_path, fused_linear):
    """A few demo steps on CUDA (bf16 autocast, the fused kernels): finite loss, parameters move."""
    model = build_model(tok, seed=0, **TINY)
    rows = make_copy_rows(16, seed=0)
    ds = GRPODataset(rows, tok)
    tr = GRPOTrainer(model, ds, cfg(tmp_path, device="cuda", bf16=True, fused_linear=fused_linear,
                                    loss_type="grpo", max_steps=3))
    before = params(tr.unwrapped)
    for _ in range(3):
        m = tr.training_step(rows[:2])
        assert m["loss"] == m["loss"] and abs(m["loss"]) < 1e3  # finite
    after = params(tr.unwrapped)
    assert any(not torch.equal(before[k].cpu(), after[k].cpu()) for k in before)
