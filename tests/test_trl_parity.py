"""Parity with TRL's own code: our loss, metrics and logits gradient equal what TRL 1.16's
``GRPOTrainer._compute_loss`` computes on the same batch (fp64, ≤ 1e-10 relative).

TRL's real method runs on a stand-in trainer (``_trl_trainer``): the attributes TRL's ``__init__`` copies from its
``GRPOConfig``, an accelerator of one process, and TRL's own ``get_high_entropy_mask`` / ``get_off_policy_mask`` /
``get_gamma_weights``. Its per-token log-probs and entropies come from TRL's own
``selective_log_softmax_and_entropy`` applied to a leaf ``logits`` tensor, so both sides differentiate the same
logits (TRL's fused LM head returns fp32 whatever the model dtype; the fp32 end-to-end case at the bottom runs
that real path through a tiny model). Our options come from the same TRL config through
:func:`grpo_kernels.integrations.trl.loss_options_from_trl`, so the mapping is under test too.

The engine importance-sampling ratio is computed by TRL inside ``_generate_and_score_completions`` (generation,
rewards and vLLM together), which cannot run here: ours is checked against hand-derived numbers in
``test_sampling_correction_hand_derived``, and the parity cases hand TRL our ratio to check everything after it.
"""

import contextlib
import itertools
import math
import types
import warnings
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")  # in the [dev] extras
from trl.trainer.grpo_trainer import GRPOTrainer as TRLTrainer  # noqa: E402
from trl.trainer.utils import selective_log_softmax_and_entropy  # noqa: E402

from grpo_kernels import grpo_loss  # noqa: E402
from grpo_kernels import reference as R  # noqa: E402
from grpo_kernels.integrations.trl import loss_options_from_trl  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

S, G, P, C, V = 8, 4, 3, 6, 23  # sequences, group size, prompt and completion length, vocabulary


class _OneProcess:
    """The accelerator of a single process, as TRL calls it in ``_compute_loss``."""

    num_processes = 1
    sync_gradients = True
    is_main_process = True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def _trl_args(tmp_path, **kw):
    return trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=S,
                          num_generations=G, max_completion_length=C, **kw)


def _trl_trainer(args, logits, use_vllm):
    """A stand-in ``self`` for TRL's unbound ``_compute_loss``: the attributes its ``__init__`` sets from ``args``."""
    t = types.SimpleNamespace()
    t.args = args
    t.loss_type = args.loss_type
    t.beta = args.beta
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.importance_sampling_level = args.importance_sampling_level
    t.top_entropy_quantile = args.top_entropy_quantile
    t.off_policy_mask_threshold = args.off_policy_mask_threshold
    t.max_completion_length = args.max_completion_length
    t.temperature = args.temperature
    t.entropy_coef = args.entropy_coef
    t.use_adaptive_entropy = args.use_adaptive_entropy
    t._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    t._last_world_entropy = float("inf")
    t._entropy_window_stats = None
    t.use_vllm = use_vllm
    t.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    t.aux_loss_enabled = False
    t.current_gradient_accumulation_steps = 1
    t.accelerator = _OneProcess()
    t.model = torch.nn.Module()  # .training is True
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.get_high_entropy_mask = types.MethodType(TRLTrainer.get_high_entropy_mask, t)
    t.get_off_policy_mask = TRLTrainer.get_off_policy_mask
    t.get_gamma_weights = TRLTrainer.get_gamma_weights

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False,
                                      **unused):
        lp, ent = selective_log_softmax_and_entropy(logits, input_ids[:, -logits_to_keep:],
                                                    temperature=args.temperature)
        return lp, ent, None

    t._get_per_token_logps_and_entropies = per_token_logps_and_entropies
    return t


def _batch(seed, per_token_advantages=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, C, V, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, V, (S, C), generator=g)
    mask = torch.ones(S, C, dtype=torch.long)
    mask[1, 4:] = 0
    mask[6, 2:] = 0
    mask[3] = 0  # an empty completion
    cur = R.token_logprobs(logits, tokens)
    old = cur + 0.3 * torch.randn(S, C, generator=g, dtype=torch.float64)
    ref = cur + 0.2 * torch.randn(S, C, generator=g, dtype=torch.float64)
    sampling = old + 0.15 * torch.randn(S, C, generator=g, dtype=torch.float64)
    sampling[0, 1] = float("nan")  # a token the engine could not score
    adv = torch.randn(S, C if per_token_advantages else 1, generator=g, dtype=torch.float64)
    adv = adv if per_token_advantages else adv.squeeze(-1)
    adv[2] = 0.0
    return dict(logits=logits, tokens=tokens, mask=mask, old=old, ref=ref, sampling=sampling, adv=adv,
                num_items=mask.sum().to(torch.float64) + 3.0)


def _compare(tmp_path, trl_kw, *, off_policy=True, use_sampling=False, per_token_advantages=False,
             backends=("reference", "auto"), seed=0):
    args = _trl_args(tmp_path, **trl_kw, **(dict(use_vllm=True) if use_sampling else {}))
    opts = loss_options_from_trl(args)
    b = _batch(seed, per_token_advantages)
    mask_f = b["mask"].to(torch.float64)
    old = b["old"] if off_policy else None
    sampling = b["sampling"] if use_sampling else None

    # TRL's side
    logits_t = b["logits"].clone().requires_grad_(True)
    inputs = {"prompt_ids": torch.zeros(S, P, dtype=torch.long), "prompt_mask": torch.ones(S, P, dtype=torch.long),
              "completion_ids": b["tokens"], "completion_mask": b["mask"], "advantages": b["adv"],
              "num_items_in_batch": b["num_items"]}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if args.beta != 0.0:
        inputs["ref_per_token_logps"] = b["ref"]
    if sampling is not None:
        inputs["sampling_per_token_logps"] = sampling
        if args.vllm_importance_sampling_correction:
            behaviour = old if old is not None else R.token_logprobs(b["logits"], b["tokens"], args.temperature)
            inputs["importance_sampling_ratio"] = R._sampling_correction(
                behaviour, sampling, mask_f, mask_f != 0, opts, None)
    trainer = _trl_trainer(args, logits_t, use_vllm=sampling is not None)
    trl_loss = TRLTrainer._compute_loss(trainer, None, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, logits_t)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # ours, through the TRL config's options
    items = b["num_items"] if (opts.loss_type in ("dapo", "cispo", "vespo")) else None
    for backend in backends:
        logits_o = b["logits"].clone().requires_grad_(True)
        kw = dict(group_size=G, advantages=b["adv"], old_logprobs=old,
                  ref_logprobs=b["ref"] if args.beta != 0.0 else None, sampling_logprobs=sampling,
                  num_items_in_batch=items, return_metrics=True, **opts.to_dict())
        if backend == "reference":
            loss, metrics = R.grpo_loss(logits_o, b["tokens"], None, b["mask"], **kw)
        else:
            loss, metrics = grpo_loss(logits_o, b["tokens"], None, b["mask"], backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss, logits_o)
        where = f"{backend}, {trl_kw}, off_policy={off_policy}, sampling={use_sampling}"
        scale = max(1.0, abs(trl_loss.item()))
        assert abs(loss.item() - trl_loss.item()) <= 1e-10 * scale, (where, loss.item(), trl_loss.item())
        gscale = max(trl_grad.abs().max().item(), 1e-30)
        assert (grad - trl_grad).abs().max().item() <= 1e-10 * gscale, where
        for name, value in trl_metrics.items():
            if name in ("entropy_coef",):  # the trainer's, not the loss's
                continue
            assert name in metrics, (where, name, sorted(metrics))
            ours = metrics[name].item()
            if math.isnan(value):
                assert math.isnan(ours), (where, name)
            else:
                # TRL logs the clipping fractions from `.float()` masks: fp32, hence the metric tolerance
                assert abs(ours - value) <= 1e-7 * max(1.0, abs(value)), (where, name, ours, value)
    return trl_loss


TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
KL = {"no_kl": dict(beta=0.0), "kl": dict(beta=0.05), "kl_plain": dict(beta=0.05, use_bias_correction_kl=False)}


def _levels(loss_type):
    return ("sequence",) if loss_type == "luspo" else ("token", "sequence")


BASE_CASES = [(lt, lvl, k) for lt in TRL_LOSS_TYPES for lvl in _levels(lt) for k in KL]


@pytest.mark.parametrize("loss_type, level, kl", BASE_CASES)
@pytest.mark.parametrize("off_policy", [True, False], ids=["off_policy", "on_policy"])
def test_loss_types_match_trl(tmp_path, loss_type, level, kl, off_policy):
    extra = dict(epsilon_high=5.0) if loss_type == "cispo" else {}
    _compare(tmp_path, dict(loss_type=loss_type, importance_sampling_level=level, **KL[kl], **extra),
             off_policy=off_policy)


KNOBS = {
    "entropy_coef": dict(kw=dict(entropy_coef=0.03)),
    "entropy_coef_negative": dict(kw=dict(entropy_coef=-0.02)),
    "top_entropy_quantile": dict(kw=dict(top_entropy_quantile=0.4)),
    "quantile_and_bonus": dict(kw=dict(top_entropy_quantile=0.25, entropy_coef=0.05)),
    "off_policy_mask": dict(kw=dict(off_policy_mask_threshold=0.02)),
    "off_policy_mask_sampling": dict(kw=dict(off_policy_mask_threshold=0.02, vllm_importance_sampling_correction=False),
                                     sampling=True),
    "delta_clip_high": dict(kw=dict(delta=1.3, epsilon_high=0.28, epsilon=0.1)),
    "temperature": dict(kw=dict(temperature=0.7)),
    "per_token_advantages": dict(kw={}, per_token=True),
    **{f"is_{mode}": dict(kw=dict(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.7,
                                  vllm_importance_sampling_clip_max=1.2), sampling=True)
       for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")},
}


def _knob_cases():
    for lt, knob, kl in itertools.product(TRL_LOSS_TYPES, KNOBS, ("no_kl", "kl")):
        mode = KNOBS[knob]["kw"].get("vllm_importance_sampling_mode", "")
        if lt == "vespo" and mode.startswith("sequence"):
            continue  # refused, as TRL refuses it (test_vespo_needs_token_level_engine_ratio)
        yield lt, knob, kl


@pytest.mark.parametrize("loss_type, knob, kl", list(_knob_cases()))
def test_knobs_match_trl(tmp_path, loss_type, knob, kl):
    spec = KNOBS[knob]
    kw = dict(loss_type=loss_type, **KL[kl], **spec["kw"])
    if loss_type == "luspo":
        kw["importance_sampling_level"] = "sequence"
    if loss_type == "cispo":
        kw.setdefault("epsilon_high", 5.0)
    _compare(tmp_path, kw, use_sampling=spec.get("sampling", False), per_token_advantages=spec.get("per_token", False))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo"])
def test_on_policy_entropy_bonus_matches_trl(tmp_path, loss_type):
    """The one-pass path with the entropy gradient in the kernel (on-policy, constant bonus)."""
    _compare(tmp_path, dict(loss_type=loss_type, entropy_coef=0.04), off_policy=False,
             backends=("reference", "auto", "torch"))


def test_sampling_correction_hand_derived():
    """The engine ratio ``exp(ℓ_old − ℓ_sampling)`` on numbers worked out by hand (TRL's definition)."""
    from grpo_kernels.options import LossOptions

    old = torch.tensor([[0.0, -1.0, -2.0], [-0.5, -0.5, 0.0]], dtype=torch.float64)
    sampling = torch.tensor([[math.log(2.0), -1.0, float("nan")], [-0.5 - math.log(4.0), -0.5, 5.0]],
                            dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)  # [1, 2] is masked (garbage 5.0)

    def ratio(mode, lo=None, hi=3.0):
        o = LossOptions(loss_type="grpo", vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=lo,
                        vllm_importance_sampling_clip_max=hi).validate()
        return R._sampling_correction(old, sampling, m, m != 0, o, None)

    # per token: exp(0 − log 2) = 0.5, exp(0) = 1, NaN → 1; exp(log 4) = 4 → truncated to 3 / masked to 0
    torch.testing.assert_close(ratio("token_truncate"), torch.tensor([[0.5, 1.0, 1.0], [3.0, 1.0, 1.0]],
                                                                      dtype=torch.float64))
    torch.testing.assert_close(ratio("token_mask"), torch.tensor([[0.5, 1.0, 1.0], [0.0, 1.0, 1.0]],
                                                                  dtype=torch.float64))
    torch.testing.assert_close(ratio("token_truncate", lo=0.6, hi=None),
                               torch.tensor([[0.6, 1.0, 1.0], [4.0, 1.0, 1.0]], dtype=torch.float64))
    # per sequence: row 0 sums to −log 2 → 0.5; row 1 to log 4 → 4 (masked out: > 3)
    torch.testing.assert_close(ratio("sequence_mask"), torch.tensor([[0.5], [0.0]], dtype=torch.float64))
    torch.testing.assert_close(ratio("sequence_truncate", lo=0.75), torch.tensor([[0.75], [3.0]],
                                                                                 dtype=torch.float64))


def test_end_to_end_with_trl_fused_lm_head(tmp_path):
    """TRL's real per-token path (its fused LM head on a tiny Llama, fp32) against ours from the same model's logits:
    loss and every parameter gradient (fp32 tolerance)."""
    transformers = pytest.importorskip("transformers")
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg)
    args = _trl_args(tmp_path, loss_type="dapo", beta=0.05, entropy_coef=0.02, temperature=0.8)
    opts = loss_options_from_trl(args)
    b = _batch(1)
    ids = torch.cat([torch.randint(0, V, (S, P)), b["tokens"]], 1)
    am = torch.cat([torch.ones(S, P, dtype=torch.long), b["mask"]], 1)
    with torch.no_grad():
        cur = R.token_logprobs(model(input_ids=ids, attention_mask=am).logits[:, P - 1:-1], b["tokens"], 0.8)
    old, ref = (cur + 0.1 * torch.randn(S, C)), (cur + 0.1 * torch.randn(S, C))
    num_items = b["mask"].sum().float()

    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=am).logits[:, P - 1:-1]
    loss, _ = grpo_loss(logits, b["tokens"], None, b["mask"], group_size=G, advantages=b["adv"].float(),
                        old_logprobs=old, ref_logprobs=ref, num_items_in_batch=num_items, return_metrics=True,
                        **opts.to_dict())
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))
    trainer = _trl_trainer(args, None, use_vllm=False)
    trainer._get_per_token_logps_and_entropies = types.MethodType(TRLTrainer._get_per_token_logps_and_entropies,
                                                                   trainer)
    inputs = {"prompt_ids": ids[:, :P], "prompt_mask": am[:, :P], "completion_ids": b["tokens"],
              "completion_mask": b["mask"], "advantages": b["adv"].float(), "num_items_in_batch": num_items,
              "old_per_token_logps": old, "ref_per_token_logps": ref}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_loss = TRLTrainer._compute_loss(trainer, model, inputs)
    trl_loss.backward()
    assert abs(loss.item() - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item()))
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
