"""TRL's loss options map one to one onto ours (TRL's ``beta`` is our ``kl_coef``), and the ones we do not
compute yet are refused by name."""

import pytest
import trl  # in the [dev] extras

from grpo_kernels.integrations.trl import loss_options_from_trl
from grpo_kernels.options import LossOptions

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' TrainingArguments deprecations


def _trl_config(tmp_path, **kw):
    return trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **kw)


def test_trl_defaults(tmp_path):
    opts = loss_options_from_trl(_trl_config(tmp_path))
    # TRL's defaults, ours where TRL has no field; the engine correction is off without use_vllm
    assert opts == LossOptions(loss_type="dapo", kl_coef=0.0, max_completion_length=512,
                               vllm_importance_sampling_correction=False)
    assert opts.beta is None  # TRL's beta never becomes the softmax temperature
    assert opts.use_bias_correction_kl is True  # TRL's default


def test_trl_beta_is_our_kl_coef(tmp_path):
    opts = loss_options_from_trl(_trl_config(tmp_path, beta=0.04, use_bias_correction_kl=False, loss_type="grpo",
                                             epsilon=0.1, epsilon_high=0.28, delta=2.0, temperature=0.7,
                                             importance_sampling_level="sequence", max_completion_length=64,
                                             scale_rewards="batch"))
    assert opts == LossOptions(loss_type="grpo", kl_coef=0.04, epsilon=0.1, epsilon_high=0.28, delta=2.0,
                               temperature=0.7, importance_sampling_level="sequence", max_completion_length=64,
                               scale_rewards="batch", use_bias_correction_kl=False,
                               vllm_importance_sampling_correction=False)


@pytest.mark.parametrize("trl_value, ours", [(True, "group"), (False, "none"), ("none", "none")])
def test_trl_scale_rewards(tmp_path, trl_value, ours):
    assert loss_options_from_trl({"scale_rewards": trl_value}).scale_rewards == ours
    assert loss_options_from_trl(_trl_config(tmp_path, scale_rewards=trl_value)).scale_rewards == ours


@pytest.mark.parametrize("kw, expected", [
    (dict(beta=0.04), dict(kl_coef=0.04, use_bias_correction_kl=True)),
    (dict(entropy_coef=0.01, top_entropy_quantile=0.2), dict(entropy_coef=0.01, top_entropy_quantile=0.2)),
    (dict(off_policy_mask_threshold=0.5), dict(off_policy_mask_threshold=0.5)),
    (dict(loss_type="cispo", epsilon_high=5.0), dict(loss_type="cispo", epsilon_high=5.0)),
    (dict(loss_type="sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.2),
     dict(loss_type="sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.2)),
    (dict(loss_type="luspo", importance_sampling_level="sequence"),
     dict(loss_type="luspo", importance_sampling_level="sequence")),
    (dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5),
     dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5)),
    (dict(use_vllm=True, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_min=0.5,
          vllm_importance_sampling_clip_max=2.0),
     dict(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate",
          vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0)),
    (dict(use_vllm=True, vllm_importance_sampling_cap=2.5),  # TRL's deprecated name of clip_max
     dict(vllm_importance_sampling_correction=True, vllm_importance_sampling_clip_max=2.5)),
])
def test_trl_loss_family_options_map_one_to_one(tmp_path, kw, expected):
    opts = loss_options_from_trl(_trl_config(tmp_path, **kw))
    for name, value in expected.items():
        assert getattr(opts, name) == value, name


def test_trl_options_we_do_not_compute_are_refused_by_name():
    with pytest.raises(ValueError, match="loss_type='reinforce'"):
        loss_options_from_trl({"loss_type": "reinforce"})
    with pytest.raises(ValueError, match="luspo.*importance_sampling_level='sequence'"):
        loss_options_from_trl({"loss_type": "luspo"})  # TRL only warns; ours refuses (docs/design.md §4)
