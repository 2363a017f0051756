"""TRL's loss options in ours: :func:`loss_options_from_trl` maps a TRL ``GRPOConfig`` to a :class:`LossOptions`.

TRL calls the KL coefficient ``beta``; ours is ``kl_coef`` (our ``beta`` is the temperature of the softmax weights
of ``loss_type="softmax"``, which TRL does not have). Every TRL option that changes the loss maps one to one or is
refused with a ``ValueError`` naming it -- never a silent fallback to different math. Read from the config (by
attribute, so a TRL ``GRPOConfig``, an ``argparse.Namespace`` or any object with TRL's field names works; a missing
field takes TRL 1.16's default):

================================  ============================================================================
TRL (``trl.GRPOConfig``)          ours
================================  ============================================================================
``beta``                          ``kl_coef``
``loss_type``                     ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``; others refused)
``epsilon``, ``epsilon_high``     the same
``delta``                         the same
``scale_rewards``                 the same (``True`` → ``"group"``, ``False`` → ``"none"``, as TRL does)
``importance_sampling_level``     the same
``temperature``                   the same
``max_completion_length``         the same (the ``dr_grpo`` normalizer)
================================  ============================================================================

``num_generations`` is the ``group_size`` of the loss call. Refused while not supported (issue tracker: the loss
family): ``use_bias_correction_kl=True`` with ``beta > 0`` (TRL's default is on), ``entropy_coef != 0``,
``use_adaptive_entropy``, ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, and the vLLM importance-sampling
correction when ``use_vllm`` is on.
"""

from __future__ import annotations

from ..options import LOSS_TYPES, LossOptions

# TRL 1.16's defaults of the fields read here
_TRL_DEFAULTS = dict(beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=None, delta=None, scale_rewards="group",
                     importance_sampling_level="token", temperature=1.0, max_completion_length=512,
                     use_bias_correction_kl=True, entropy_coef=0.0, use_adaptive_entropy=False,
                     top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
                     vllm_importance_sampling_correction=True)


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
    if loss_type not in LOSS_TYPES or loss_type == "softmax":
        raise ValueError(f"TRL loss_type={loss_type!r} is not supported by grpo_kernels yet "
                         f"(supported: {', '.join(t for t in LOSS_TYPES if t != 'softmax')})")
    beta = g("beta")
    refused = []
    if beta and g("use_bias_correction_kl"):
        refused.append("use_bias_correction_kl=True with beta > 0 (TRL's default; set use_bias_correction_kl=False "
                       "for the plain k3 KL)")
    if g("entropy_coef"):
        refused.append(f"entropy_coef={g('entropy_coef')!r}")
    if g("use_adaptive_entropy"):
        refused.append("use_adaptive_entropy=True")
    if g("top_entropy_quantile") < 1.0:
        refused.append(f"top_entropy_quantile={g('top_entropy_quantile')!r}")
    if g("off_policy_mask_threshold") is not None:
        refused.append(f"off_policy_mask_threshold={g('off_policy_mask_threshold')!r}")
    if g("use_vllm") and g("vllm_importance_sampling_correction"):
        refused.append("vllm_importance_sampling_correction=True (with use_vllm)")
    if refused:
        raise ValueError("these TRL options change the loss and are not supported by grpo_kernels yet: "
                         + "; ".join(refused))
    scale = g("scale_rewards")
    scale = {True: "group", False: "none"}.get(scale, scale)
    return LossOptions(loss_type=loss_type, kl_coef=float(beta), epsilon=g("epsilon"), epsilon_high=g("epsilon_high"),
                       delta=g("delta"), scale_rewards=scale, importance_sampling_level=g("importance_sampling_level"),
                       temperature=g("temperature"), max_completion_length=g("max_completion_length")).validate()
