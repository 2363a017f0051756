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
    assert opts == LossOptions(loss_type="dapo", kl_coef=0.0, max_completion_length=512)
    assert opts.beta is None  # TRL's beta never becomes the softmax temperature


def test_trl_beta_is_our_kl_coef(tmp_path):
    opts = loss_options_from_trl(_trl_config(tmp_path, beta=0.04, use_bias_correction_kl=False, loss_type="grpo",
                                             epsilon=0.1, epsilon_high=0.28, delta=2.0, temperature=0.7,
                                             importance_sampling_level="sequence", max_completion_length=64,
                                             scale_rewards="batch"))
    assert opts == LossOptions(loss_type="grpo", kl_coef=0.04, epsilon=0.1, epsilon_high=0.28, delta=2.0,
                               temperature=0.7, importance_sampling_level="sequence", max_completion_length=64,
                               scale_rewards="batch")


@pytest.mark.parametrize("trl_value, ours", [(True, "group"), (False, "none"), ("none", "none")])
def test_trl_scale_rewards(tmp_path, trl_value, ours):
    assert loss_options_from_trl({"scale_rewards": trl_value}).scale_rewards == ours
    assert loss_options_from_trl(_trl_config(tmp_path, scale_rewards=trl_value)).scale_rewards == ours


@pytest.mark.parametrize("kw, name", [
    (dict(beta=0.04), "use_bias_correction_kl"),  # TRL's default bias-corrected KL
    (dict(entropy_coef=0.01), "entropy_coef"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    (dict(loss_type="cispo"), "cispo"),
    (dict(loss_type="sapo"), "sapo"),
])
def test_trl_options_we_do_not_compute_are_refused_by_name(tmp_path, kw, name):
    with pytest.raises(ValueError, match=name):
        loss_options_from_trl(_trl_config(tmp_path, **kw))
