"""``grpo_kernels.integrations.trl.GRPOTrainer`` against plain ``trl.GRPOTrainer`` (TRL 1.16), on CPU.

Tiny random models built from configs (a tied Qwen2, an untied Llama, one with a config ``logit_scale``), a
character tokenizer, an in-memory dataset and a python reward. Both trainers load the same saved weights:

* same batch: one ``inputs`` dict from TRL's own ``_generate_and_score_completions`` (old/reference log-probs
  perturbed so that the clipping, KL and masks all act), fed to both trainers' ``compute_loss``: loss, every
  parameter gradient and every logged metric agree (fp32, ≤ 1e-5 relative) for every loss type, KL on/off, the
  entropy bonus (static and adaptive), num_iterations > 1, gradient accumulation, eval mode, tool masks,
  per-token advantages, off-policy masking, chunking, tied and untied heads;
* our no-grad old/reference log-probs equal TRL's fused LM head's;
* ``train()`` for 10 optimizer steps from the same seed: parameters and logged metrics stay together;
* unsupported options raise at construction, naming the option; the import checks TRL's version;
* the ``python/trl_recipe.py --smoke`` run.
"""

import copy
import importlib.util
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")  # the [trl] / [dev] extras
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from trl.trainer.utils import split_tensor_dict  # noqa: E402

from grpo_kernels.integrations.trl import GRPOTrainer  # noqa: E402
from grpo_kernels.trainer.demo import build_tokenizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 4  # generations per prompt
PROMPTS = ["12=", "345=", "6=", "7890="]
METRIC_NAMES = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "vespo/phi_seq_mean",
                "policy_loss", "entropy_coef")


def reward(prompts, completions, **kwargs):
    """Digits of the prompt echoed in the completion, minus a length cost: varied rewards within a group."""
    return [float(sum(ch in p for ch in c)) - 0.2 * len(c) for p, c in zip(prompts, completions)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    """Saved tiny checkpoints: ``tied`` (Qwen2, tie_word_embeddings), ``untied`` (Llama), ``scaled`` (Llama with a
    config ``logit_scale``, which TRL's fused head applies)."""
    root = tmp_path_factory.mktemp("tiny_models")
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    specs = {"tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
             "untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
             "scaled": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                        dict(tie_word_embeddings=False, logit_scale=0.5))}
    paths = {}
    for i, (name, (cfg_cls, model_cls, kw)) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        model = model_cls(cfg_cls(**common, **kw))
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def dataset():
    return datasets.Dataset.from_dict({"prompt": PROMPTS * 4})


def _config(out, **kw):
    base = dict(output_dir=str(out), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=8,
                num_generations=G, max_completion_length=8, save_strategy="no", seed=0, disable_tqdm=True,
                logging_steps=1)
    base.update(kw)
    return trl.GRPOConfig(**base)


def _trainers(model_path, tok, dataset, out, trainer_kw=None, **kw):
    """(plain TRL, ours) on the same checkpoint and config."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        ref = trl.GRPOTrainer(model=model_path, reward_funcs=reward, args=_config(out / "trl", **kw),
                              train_dataset=dataset, processing_class=tok)
        ours = GRPOTrainer(model=model_path, reward_funcs=reward, args=_config(out / "ours", **kw),
                           train_dataset=dataset, processing_class=tok, **(trainer_kw or {}))
    return ref, ours


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# name -> (checkpoint, TRL config, extras). extras: ga (micro-batches), eval, perturb (old/ref log-prob noise),
# tool_mask, per_token_adv, sampling (inject engine log-probs), trainer (our keyword extras)
_LOSS_TYPES = {"grpo": {}, "bnpo": {}, "dr_grpo": dict(max_completion_length=8), "dapo": {},
               "cispo": dict(epsilon_high=5.0), "sapo": {}, "luspo": dict(importance_sampling_level="sequence"),
               "vespo": {}}
CASES = {
    **{f"{lt}-{model}": (model, dict(loss_type=lt, num_iterations=2, **kw), {})
       for lt, kw in _LOSS_TYPES.items() for model in ("tied", "untied")},
    "grpo-kl": ("tied", dict(loss_type="grpo", beta=0.05, num_iterations=2), {}),
    "dapo-kl-plain": ("untied", dict(loss_type="dapo", beta=0.05, use_bias_correction_kl=False, num_iterations=2), {}),
    "vespo-kl": ("tied", dict(loss_type="vespo", beta=0.05, num_iterations=2), {}),
    "cispo-kl-sequence": ("untied", dict(loss_type="cispo", epsilon_high=5.0, beta=0.05, num_iterations=2,
                                         importance_sampling_level="sequence"), {}),
    "grpo-kl-on-policy": ("tied", dict(loss_type="grpo", beta=0.05), {}),
    "entropy-on-policy": ("tied", dict(loss_type="grpo", entropy_coef=0.05), {}),
    "entropy-quantile-dapo": ("untied", dict(loss_type="dapo", entropy_coef=0.03, top_entropy_quantile=0.5,
                                             num_iterations=2), {}),
    "adaptive-entropy": ("tied", dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.01,
                                      entropy_target=5.0, num_iterations=2), {}),
    "ga2-dapo-kl": ("tied", dict(loss_type="dapo", beta=0.05, gradient_accumulation_steps=2,
                                 per_device_train_batch_size=4), dict(ga=2)),
    "ga2-grpo-entropy": ("untied", dict(loss_type="grpo", entropy_coef=0.05, gradient_accumulation_steps=2,
                                        per_device_train_batch_size=4, num_iterations=2), dict(ga=2)),
    "ga2-sapo-adaptive": ("tied", dict(loss_type="sapo", use_adaptive_entropy=True, entropy_coef=0.02,
                                       entropy_target=5.0, gradient_accumulation_steps=2,
                                       per_device_train_batch_size=4), dict(ga=2)),
    "eval-dapo": ("tied", dict(loss_type="dapo", beta=0.05, num_iterations=2, entropy_coef=0.02), dict(eval=True)),
    "eval-grpo": ("untied", dict(loss_type="grpo", num_iterations=2), dict(eval=True)),
    "tool-mask-per-token-adv": ("tied", dict(loss_type="dapo", beta=0.05, num_iterations=2),
                                dict(tool_mask=True, per_token_adv=True)),
    "off-policy-mask": ("untied", dict(loss_type="grpo", off_policy_mask_threshold=0.01, num_iterations=2),
                        dict(sampling=True)),
    "temperature-delta": ("tied", dict(loss_type="grpo", temperature=0.7, delta=1.5, epsilon=0.1, epsilon_high=0.28,
                                       num_iterations=2), {}),
    "logit-scale": ("scaled", dict(loss_type="bnpo", beta=0.05, num_iterations=2), {}),
    "chunked-torch-backend": ("untied", dict(loss_type="dapo", beta=0.05, entropy_coef=0.02, num_iterations=2),
                              dict(trainer=dict(chunk_size=5, kernel_backend="torch"))),
}


def _prepared_inputs(trainer, extras):
    """One generation batch from TRL's own pipeline, with noise on the old/reference log-probs (as after a few
    optimizer steps), and the injected extras."""
    torch.manual_seed(1)
    batch = [{"prompt": p} for p in PROMPTS[:2] for _ in range(G)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = trainer._generate_and_score_completions(batch)
    g = torch.Generator().manual_seed(0)
    m = inputs["completion_mask"]
    shape = m.shape
    if "old_per_token_logps" in inputs:
        inputs["old_per_token_logps"] = inputs["old_per_token_logps"] + 0.3 * torch.randn(shape, generator=g) * m
    if "ref_per_token_logps" in inputs:
        inputs["ref_per_token_logps"] = inputs["ref_per_token_logps"] + 0.2 * torch.randn(shape, generator=g) * m
    if extras.get("tool_mask"):
        inputs["tool_mask"] = (torch.rand(shape, generator=g) > 0.25).long()
    if extras.get("per_token_adv"):
        inputs["advantages"] = inputs["advantages"][:, None] + 0.3 * torch.randn(shape, generator=g)
    if extras.get("sampling"):
        base = inputs.get("old_per_token_logps", torch.zeros(shape))
        inputs["sampling_per_token_logps"] = base + 0.2 * torch.randn(shape, generator=g).abs() * m
    return inputs


def _loss_and_grads(trainer, inputs, ga, eval_mode):
    trainer.model.train(not eval_mode)
    trainer.current_gradient_accumulation_steps = ga
    trainer.model.zero_grad(set_to_none=True)
    losses = []
    for micro in (split_tensor_dict(inputs, ga) if ga > 1 else [inputs]):
        if eval_mode:
            with torch.no_grad():
                loss = trainer.compute_loss(trainer.model, micro)
        else:
            loss = trainer.compute_loss(trainer.model, micro)
            loss.backward()
        losses.append(loss.item())
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    mode = "eval" if eval_mode else "train"
    return losses, grads, {k: list(v) for k, v in trainer._metrics[mode].items()}


@pytest.mark.parametrize("case", list(CASES))
def test_same_batch_matches_trl(tmp_path, tok, dataset, models, case):
    model_name, kw, extras = CASES[case]
    ref, ours = _trainers(models[model_name], tok, dataset, tmp_path, trainer_kw=extras.get("trainer"), **kw)
    inputs = _prepared_inputs(ref, extras)
    for t in (ref, ours):  # the generation-time metrics (rewards, lengths) are not under test here
        t._metrics = {"train": type(t._metrics["train"])(list), "eval": type(t._metrics["eval"])(list)}
    ga = extras.get("ga", 1)
    ev = extras.get("eval", False)
    ref_losses, ref_grads, ref_metrics = _loss_and_grads(ref, copy.deepcopy(inputs), ga, ev)
    losses, grads, metrics = _loss_and_grads(ours, copy.deepcopy(inputs), ga, ev)

    for a, b in zip(losses, ref_losses):  # the loss is a near-cancelling sum: relative to max(|loss|, 1e-2)
        assert abs(a - b) <= 1e-5 * max(abs(b), 1e-2), (case, losses, ref_losses)
    if not ev:
        assert set(grads) == set(ref_grads), (case, set(grads) ^ set(ref_grads))
        for name, g in ref_grads.items():
            assert _rel(grads[name], g) <= 1e-5, (case, name, _rel(grads[name], g))
    assert set(metrics) == set(ref_metrics), (case, set(metrics) ^ set(ref_metrics))
    assert set(ref_metrics) <= set(METRIC_NAMES)
    for name, ref_values in ref_metrics.items():
        assert len(metrics[name]) == len(ref_values), (case, name)
        for a, b in zip(metrics[name], ref_values):
            assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * max(1.0, abs(b)), (case, name, a, b)
    if kw.get("use_adaptive_entropy"):  # the controller's state moved the same way
        assert ours.entropy_coef == pytest.approx(ref.entropy_coef, abs=1e-12)
        assert ours._last_world_entropy == pytest.approx(ref._last_world_entropy, rel=1e-6)


def test_tied_head_gradient_flows_once(tmp_path, tok, dataset, models):
    """Qwen2 with tie_word_embeddings: one parameter is both the embedding and the LM head, and its gradient (lookup
    + head) equals TRL's; the untied Llama has two, each equal to TRL's."""
    for name, n_head_params in (("tied", 1), ("untied", 2)):
        ref, ours = _trainers(models[name], tok, dataset, tmp_path / name, loss_type="dapo", num_iterations=2)
        lm = ours.model
        head, emb = lm.get_output_embeddings().weight, lm.get_input_embeddings().weight
        assert (head is emb) == (n_head_params == 1)
        inputs = _prepared_inputs(ref, {})
        _, ref_grads, _ = _loss_and_grads(ref, inputs, 1, False)
        _, grads, _ = _loss_and_grads(ours, inputs, 1, False)
        for pname, p in lm.named_parameters():
            if p is head or p is emb:
                assert _rel(grads[pname], ref_grads[pname]) <= 1e-5, (name, pname)


def test_no_grad_logprobs_match_trl_fused_head(tmp_path, tok, dataset, models):
    """Old-policy and reference log-probs (and entropies) from our chunked no-grad path = TRL's fused LM head, and
    ``_generate_and_score_completions`` of both trainers gives the same batch (same seed)."""
    ref, ours = _trainers(models["untied"], tok, dataset, tmp_path, trainer_kw=dict(chunk_size=7), beta=0.05,
                          num_iterations=2, temperature=0.8)
    a = _prepared_inputs(ref, {})
    b = _prepared_inputs(ours, {})
    assert torch.equal(a["completion_ids"], b["completion_ids"])
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=key)
    ids = torch.cat([a["prompt_ids"], a["completion_ids"]], 1)
    am = torch.cat([a["prompt_mask"], a["completion_mask"]], 1)
    C = a["completion_ids"].shape[1]
    with torch.no_grad():
        want = trl.GRPOTrainer._get_per_token_logps_and_entropies(ref, ref.model, ids, am, C, batch_size=3,
                                                                   compute_entropy=True)
        got = ours._get_per_token_logps_and_entropies(ours.model, ids, am, C, batch_size=3, compute_entropy=True)
    assert got[2] is None
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert (got[0][a["completion_mask"] == 0] == 0).all()


def test_train_ten_steps_matches_trl(tmp_path, tok, dataset, models):
    """``train()`` with the same seed: 10 optimizer steps (2 micro-batches each, 2 iterations per generation, KL, an
    adaptive entropy bonus): same parameters and the same logged metrics."""
    kw = dict(loss_type="dapo", max_steps=10, learning_rate=1e-2, beta=0.05, num_iterations=2,
              gradient_accumulation_steps=2, per_device_train_batch_size=4, entropy_coef=0.01,
              use_adaptive_entropy=True, entropy_target=5.0)
    trained = []
    for cls in (trl.GRPOTrainer, GRPOTrainer):  # each trained right after its construction (which seeds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = cls(model=models["tied"], reward_funcs=reward, args=_config(tmp_path / cls.__module__, **kw),
                    train_dataset=dataset, processing_class=tok)
            t.train()
        trained.append(t)
    ref, ours = trained
    start = transformers.AutoModelForCausalLM.from_pretrained(models["tied"])
    moved = max((p - q).abs().max().item() for p, q in zip(ref.model.parameters(), start.parameters()))
    assert moved > 1e-2  # the run did move the weights
    for (name, p), q in zip(ours.model.named_parameters(), ref.model.parameters()):
        assert (p - q).abs().max().item() <= 1e-4, name
    skip = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
    assert len(ours.state.log_history) == len(ref.state.log_history) == 11
    for ra, rb in zip(ref.state.log_history, ours.state.log_history):
        assert set(ra) == set(rb)
        for k, va in ra.items():
            if k in skip or not isinstance(va, float):
                continue
            vb = rb[k]
            assert (math.isnan(va) and math.isnan(vb)) or math.isclose(va, vb, rel_tol=1e-4, abs_tol=1e-5), \
                (ra.get("step"), k, va, vb)
    assert any(r.get("clip_ratio/region_mean", 0) > 0 for r in ref.state.log_history)  # clipping did act
    assert ours.entropy_coef == pytest.approx(ref.entropy_coef)


def test_unsupported_options_raise_at_construction(tmp_path, tok, dataset, models):
    with pytest.raises(ValueError, match="loss_type"):
        GRPOTrainer(model=models["tied"], reward_funcs=reward, args=_config(tmp_path, loss_type="my_loss"),
                    train_dataset=dataset, processing_class=tok)
    capped = tmp_path / "capped"
    model = transformers.AutoModelForCausalLM.from_pretrained(models["untied"])
    model.config.final_logit_softcapping = 30.0
    model.save_pretrained(capped)
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        GRPOTrainer(model=str(capped), reward_funcs=reward, args=_config(tmp_path), train_dataset=dataset,
                    processing_class=tok)
    with pytest.raises(ValueError, match="no_such_backend"):
        GRPOTrainer(model=models["tied"], reward_funcs=reward, args=_config(tmp_path), train_dataset=dataset,
                    processing_class=tok, kernel_backend="no_such_backend")
    with pytest.raises(ValueError, match="chunk_size"):
        GRPOTrainer(model=models["tied"], reward_funcs=reward, args=_config(tmp_path), train_dataset=dataset,
                    processing_class=tok, chunk_size=0)


def test_trl_version_is_checked(monkeypatch):
    from grpo_kernels.integrations import trl_trainer

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(ImportError, match="1.16"):
        trl_trainer._check_trl()
    monkeypatch.setattr(trl, "__version__", "1.16.3")
    trl_trainer._check_trl()


def test_import_does_not_import_trl():
    """Only accessing ``GRPOTrainer`` imports TRL (the access itself is what this module's import does)."""
    code = ("import sys, grpo_kernels.integrations.trl as m; assert 'trl' not in sys.modules; "
            "assert m.loss_options_from_trl")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    import grpo_kernels.integrations.trl as m

    assert m.GRPOTrainer is GRPOTrainer
    with pytest.raises(AttributeError):
        m.NoSuchThing


def test_recipe_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("trl_recipe", os.path.join(ROOT, "python", "trl_recipe.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = recipe.main(["--smoke", "--output-dir", str(tmp_path / "run")])
    assert isinstance(trainer, GRPOTrainer)
    assert trainer.state.global_step == 2
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert logged and all(math.isfinite(r["loss"]) for r in logged)
    assert "kl" in logged[-1] and "entropy" in logged[-1]
