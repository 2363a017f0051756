"""TRL's loss options in ours: :func:`loss_options_from_trl` maps a TRL ``GRPOConfig`` to a :class:`LossOptions`.

TRL calls the KL coefficient ``beta``; ours is ``kl_coef`` (our ``beta`` is the temperature of the softmax weights
of ``loss_type="softmax"``, which TRL does not have). Every other TRL option that changes the loss has our field
of the same name and meaning (checked against TRL 1.16's ``GRPOTrainer._compute_loss`` in
tests/test_trl_parity.py), or is refused with a ``ValueError`` naming it -- never a silent fallback to different
math. Read from the config by attribute, so a TRL ``GRPOConfig``, an ``argparse.Namespace``, a dict or any object
with TRL's field names works; a missing field takes TRL 1.16's default:

==============================================  ====================================================================
TRL (``trl.GRPOConfig``)                        ours
==============================================  ====================================================================
``beta``                                        ``kl_coef``
``loss_type``                                   the same (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``,
                                                ``sapo``, ``luspo``, ``vespo``)
``epsilon``, ``epsilon_high``, ``delta``        the same
``scale_rewards``                               the same (``True`` → ``"group"``, ``False`` → ``"none"``, as TRL)
``importance_sampling_level``, ``temperature``  the same
``max_completion_length``                       the same (the ``dr_grpo`` normalizer)
``use_bias_correction_kl``                      the same
``sapo_temperature_pos|neg``, ``vespo_*``       the same
``entropy_coef``, ``top_entropy_quantile``      the same
``off_policy_mask_threshold``                   the same
``vllm_importance_sampling_correction|mode``,   the same; the correction applies when the call passes
``vllm_importance_sampling_clip_min|max``       ``sampling_logprobs`` (TRL: with ``use_vllm``), so
(``vllm_importance_sampling_cap``: clip_max)    ``vllm_importance_sampling_correction`` is False here when
                                                ``use_vllm`` is off
==============================================  ====================================================================

:class:`GRPOTrainer` (``from grpo_kernels.integrations.trl import GRPOTrainer``) is ``trl.GRPOTrainer`` with this
loss computed from the hidden states (:mod:`grpo_kernels.integrations.trl_trainer`); it is imported on first
access, so importing this module does not import TRL.

``num_generations`` is the ``group_size`` of the loss call. Not loss options, so not read here: the adaptive
entropy controller (``use_adaptive_entropy``, ``entropy_target``, ``entropy_coef_min|max|delta``: a trainer
feature, :class:`grpo_kernels.trainer.GRPOConfig` has it) and ``mask_truncated_completions`` (it changes the mask
the caller passes). Refused: ``loss_type`` values we do not compute.
"""

from __future__ import annotations

from ..options import CLIPPED_LOSS_TYPES, LossOptions

# TRL 1.16's defaults of the fields read here
_TRL_DEFAULTS = dict(beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=None, delta=None, scale_rewards="group",
                     importance_sampling_level="token", temperature=1.0, max_completion_length=512,
                     use_bias_correction_kl=True, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                     vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, entropy_coef=0.0,
                     top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
                     vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="sequence_mask",
                     vllm_importance_sampling_clip_min=None, vllm_importance_sampling_clip_max=3.0,
                     vllm_importance_sampling_cap=None)

# the TRL fields that are our fields of the same name
_SAME_NAME = ("loss_type", "epsilon", "epsilon_high", "delta", "importance_sampling_level", "temperature",
              "max_completion_length", "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg",
              "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef",
              "top_entropy_quantile", "off_policy_mask_threshold", "vllm_importance_sampling_mode",
              "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max")


def _get(args, name):
    if isinstance(args, dict):
        return args.get(name, _TRL_DEFAULTS[name])
    return getattr(args, name, _TRL_DEFAULTS[name])


def loss_options_from_trl(args) -> LossOptions:
    """The :class:`LossOptions` that computes TRL's loss for the TRL ``GRPOConfig`` ``args`` (validated).

    Raises ValueError naming the TRL option when the config asks for something we do not compute.
    """
    g = lambda name: _get(args, name)  # noqa: E731
    loss_type = g("loss_type")
    if loss_type not in CLIPPED_LOSS_TYPES:
        raise ValueError(f"TRL loss_type={loss_type!r} is not supported by grpo_kernels "
                         f"(supported: {', '.join(CLIPPED_LOSS_TYPES)})")
    fields = {name: g(name) for name in _SAME_NAME}
    if g("vllm_importance_sampling_cap") is not None:  # TRL's deprecated spelling of clip_max
        fields["vllm_importance_sampling_clip_max"] = g("vllm_importance_sampling_cap")
    scale = g("scale_rewards")
    fields["scale_rewards"] = {True: "group", False: "none"}.get(scale, scale)
    fields["vllm_importance_sampling_correction"] = bool(g("use_vllm") and g("vllm_importance_sampling_correction"))
    fields["kl_coef"] = float(g("beta"))
    return LossOptions(**fields).validate()


def __getattr__(name):
    # lazy: `GRPOTrainer` imports TRL (and checks its version) only when it is asked for
    if name == "GRPOTrainer":
        from .trl_trainer import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
