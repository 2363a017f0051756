"""The trainer with the TRL loss family (issue 12's trainer part): every new loss type and knob through a training
step (logits and fused-linear paths agree), global token normalizers under gradient accumulation,
``mask_truncated_completions`` and TRL's adaptive entropy controller (with exact resume)."""

import pytest
import torch

from grpo_kernels.trainer import GRPOConfig, GRPODataset, GRPOTrainer
from grpo_kernels.trainer.demo import build_model, build_tokenizer, make_copy_rows
from grpo_kernels.trainer.objective import AdaptiveEntropy
from grpo_kernels.trainer.rollout import Rollout

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)
OFFLINE = [
    {"prompt": "12=", "responses": ["12", "1", "99", "123"], "rewards": [1.0, 0.5, 0.0, 0.7]},
    {"prompt": "3456=", "responses": ["3456", "3", "", "0000"], "rewards": [0.2, 0.9, 0.1, 0.0]},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), device="cpu", progress_bar=False, plot=False, save_final=False,
                num_generations=4, per_device_batch_size=2, max_new_tokens=4, learning_rate=1e-2, warmup_steps=0,
                lr_scheduler="constant", reward_funcs=["digit_copy"], use_chat_template=False, shuffle=False)
    base.update(kw)
    return GRPOConfig(**base)


FAMILY = {
    "cispo": dict(loss_type="cispo", epsilon_high=5.0, num_iterations=2),
    "sapo": dict(loss_type="sapo", num_iterations=2),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2),
    "vespo": dict(loss_type="vespo", num_iterations=2),
    "entropy_bonus": dict(loss_type="grpo", entropy_coef=0.05),
    "entropy_mask": dict(loss_type="dapo", top_entropy_quantile=0.5),
    "bias_corrected_kl": dict(loss_type="grpo", kl_coef=0.1, num_iterations=2),
    "off_policy_mask": dict(loss_type="grpo", off_policy_mask_threshold=0.0, num_iterations=2),
    "agg_token_mean": dict(loss_type="grpo", loss_agg_mode="token-mean"),
}


def _first_update_grads(tr):
    """The gradients the optimizer receives at its first step (AdamW's first step is ~lr·sign(g): parameters
    would turn rounding noise in near-zero entries into visible differences)."""
    grads = {}

    def hook(opt, args, kw):
        if not grads:
            grads.update({n: p.grad.clone() for n, p in tr.unwrapped.named_parameters() if p.grad is not None})

    tr.optimizer.register_step_pre_hook(hook)
    return grads


@pytest.mark.parametrize("case", list(FAMILY))
def test_each_loss_family_option_trains_and_fused_linear_agrees(tok, tmp_path, case):
    """One step (num_iterations=2 where the loss type needs old log-probs); the logits and fused-linear paths
    give the optimizer the same gradients."""
    ds = GRPODataset(OFFLINE, tok, num_samples=4)
    ta = GRPOTrainer(build_model(tok, seed=6, **TINY), ds, cfg(tmp_path, **FAMILY[case]))
    tb = GRPOTrainer(build_model(tok, seed=6, **TINY), ds, cfg(tmp_path, fused_linear=True, **FAMILY[case]))
    ga, gb = _first_update_grads(ta), _first_update_grads(tb)
    ma, mb = ta.training_step(OFFLINE), tb.training_step(OFFLINE)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-4, abs=1e-6)
    assert ga.keys() == gb.keys() and any(g.abs().max() > 1e-4 for g in ga.values())
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.parametrize("kw", [dict(loss_type="cispo", epsilon_high=5.0), dict(loss_type="vespo"),
                                dict(loss_type="grpo", loss_agg_mode="token-mean")],
                         ids=["cispo", "vespo", "token-mean"])
def test_token_mean_normalizers_are_global_under_accumulation(tok, tmp_path, kw):
    """The token-mean loss types divide by the whole step's tokens (num_items_in_batch), so two micro-batches
    give the optimizer the gradient of one batch."""
    seen = []
    for ga in (1, 2):
        tr = GRPOTrainer(build_model(tok, seed=5, **TINY), GRPODataset(OFFLINE, tok, num_samples=4),
                         cfg(tmp_path, gradient_accumulation_steps=ga, **kw))
        seen.append(_first_update_grads(tr))
        tr.training_step(OFFLINE)
    one, two = seen
    assert any(g.abs().max() > 1e-4 for g in one.values())
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-7, rtol=1e-5, msg=k)


def test_mask_truncated_completions(tok, tmp_path):
    """Rows that never emit eos within the budget get no loss; finished rows keep theirs."""
    tr = GRPOTrainer(build_model(tok, seed=1, **TINY), GRPODataset(OFFLINE, tok, num_samples=4),
                     cfg(tmp_path, mask_truncated_completions=True))
    eos, x = tr.eos_id, 5
    ids = torch.tensor([[x, x, eos, 0], [x, x, x, x], [eos, 0, 0, 0], [x, x, x, x]])
    cm = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    r = Rollout(responses=[""] * 4, logprobs=None, completion_ids=ids, completion_mask=cm,
                prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1, dtype=torch.bool))
    want = cm.clone()
    want[1] = want[3] = False
    assert torch.equal(tr._loss_mask(r), want)
    tr.config.mask_truncated_completions = False
    assert torch.equal(tr._loss_mask(r), cm)


def test_mask_truncated_completions_in_a_step(tok, tmp_path):
    """Generation with a 2-token budget from a random model truncates (almost) every row: the masked step's
    loss counts only the finished rows' tokens."""
    rows = make_copy_rows(4, 3, seed=0)
    out = {}
    for masked in (False, True):
        tr = GRPOTrainer(build_model(tok, seed=3, **TINY), rows,
                         cfg(tmp_path, max_new_tokens=2, loss_type="dapo", mask_truncated_completions=masked),
                         tokenizer=tok)
        torch.manual_seed(0)
        rollout = tr.generate_responses([r["prompt_ids"] for r in tr.train_dataset][:2], num_samples=4)
        finished = ((rollout.completion_ids == tr.eos_id) & rollout.completion_mask).any(1)
        out[masked] = (tr._loss_mask(rollout).sum().item(), (rollout.completion_mask[finished]).sum().item())
    assert out[True][0] == out[True][1] < out[False][0]


def test_adaptive_entropy_controller_by_hand():
    c = AdaptiveEntropy(coef=0.01, target=0.5, coef_min=0.0, coef_max=0.02, delta=0.005)
    assert c.applied() == 0.0  # no measurement yet: no bonus
    c.observe({"entropy/active_sum": torch.tensor(2.0), "entropy/active_tokens": torch.tensor(8.0)})
    c.observe({"entropy/active_sum": torch.tensor(1.0), "entropy/active_tokens": torch.tensor(4.0)})
    assert c.step() == pytest.approx(0.25)  # 3 / 12 <= target: up
    assert c.coef == pytest.approx(0.015) and c.applied() == pytest.approx(0.015)
    c.observe({"entropy/active_sum": torch.tensor(0.1), "entropy/active_tokens": torch.tensor(1.0)})
    c.step()
    assert c.coef == pytest.approx(0.02)  # capped at coef_max
    c.observe({"entropy/active_sum": torch.tensor(9.0), "entropy/active_tokens": torch.tensor(3.0)})
    assert c.step() == pytest.approx(3.0)  # above the target: down, and no bonus next step
    assert c.coef == pytest.approx(0.015) and c.applied() == 0.0
    d = AdaptiveEntropy(0.0, 0.5, 0.0, 1.0, 0.1)
    d.load_state_dict(c.state_dict())
    assert d.coef == c.coef and d.last_entropy == c.last_entropy


def test_adaptive_entropy_in_training_and_resume(tok, tmp_path):
    rows = make_copy_rows(32, 3, seed=0)
    c = dict(max_steps=4, save_steps=2, use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=100.0,
             entropy_coef_delta=0.002, loss_type="grpo", learning_rate=3e-3)
    full = GRPOTrainer(build_model(tok, seed=0, **TINY), rows, cfg(tmp_path / "a", **c), tokenizer=tok)
    hist = full.train()
    coefs = [h["entropy_coef"] for h in hist]
    # the entropy (~ log V nats) is below the target of 100: the coefficient rises every step
    assert coefs == pytest.approx([0.012, 0.014, 0.016, 0.018])
    ck = tmp_path / "a" / "out" / "checkpoint-2"
    resumed = GRPOTrainer(build_model(tok, seed=9, **TINY), rows,
                          cfg(tmp_path / "b", resume_from_checkpoint=str(ck), **c), tokenizer=tok)
    hist2 = resumed.train()
    assert [h["entropy_coef"] for h in hist2] == pytest.approx(coefs)  # the history includes steps 1-2
    for (k, x), y in zip(full.unwrapped.state_dict().items(), resumed.unwrapped.state_dict().values()):
        assert torch.equal(x, y), k


def test_adaptive_entropy_config_errors(tmp_path):
    with pytest.raises(ValueError, match="entropy_coef_min .* must be <= entropy_coef_max"):
        GRPOConfig(output_dir=str(tmp_path), use_adaptive_entropy=True, entropy_coef_min=0.5, entropy_coef_max=0.1)
    with pytest.raises(ValueError, match="entropy_target must be a finite number >= 0"):
        GRPOConfig(output_dir=str(tmp_path), use_adaptive_entropy=True, entropy_target=-1.0)
