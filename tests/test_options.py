"""``LossOptions`` is the one definition of a loss knob: every public entry point accepts each field with the
same default and passes it on to the same math; and ``beta`` cannot be mistaken for TRL's KL coefficient."""

import dataclasses
import inspect
import warnings

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference as ref
from grpo_kernels.options import BETA_IS_NOT_THE_KL_COEF, LossOptions

S, T, H, V, G = 4, 6, 8, 13, 2

# For each option: a non-default value, and the context in which it changes the loss.
NON_DEFAULT = {
    "loss_type": ("dapo", {}),
    "beta": (0.5, {"loss_type": "softmax"}),
    "temperature": (0.7, {"loss_type": "softmax"}),
    "kl_coef": (0.3, {"loss_type": "grpo", "ref": True}),
    "epsilon": (0.01, {"loss_type": "grpo", "old": True}),
    "epsilon_high": (0.01, {"loss_type": "grpo", "old": True}),
    "delta": (1.001, {"loss_type": "grpo", "old": True}),
    "scale_rewards": ("none", {"loss_type": "grpo", "old": True}),
    "importance_sampling_level": ("sequence", {"loss_type": "grpo", "old": True}),
    "max_completion_length": (50, {"loss_type": "dr_grpo"}),
    "use_bias_correction_kl": (False, {"loss_type": "grpo", "old": True, "ref": True, "opts": {"kl_coef": 0.3}}),
    "sapo_temperature_pos": (3.0, {"loss_type": "sapo", "old": True}),
    "sapo_temperature_neg": (3.0, {"loss_type": "sapo", "old": True}),
    "vespo_k_pos": (0.5, {"loss_type": "vespo", "old": True}),
    "vespo_lambda_pos": (0.5, {"loss_type": "vespo", "old": True}),
    "vespo_k_neg": (0.5, {"loss_type": "vespo", "old": True}),
    "vespo_lambda_neg": (0.5, {"loss_type": "vespo", "old": True}),
    "entropy_coef": (0.1, {"loss_type": "grpo"}),
    "top_entropy_quantile": (0.5, {"loss_type": "grpo"}),
    "off_policy_mask_threshold": (0.0, {"loss_type": "grpo", "old": True, "sampling": True,
                                        "opts": {"vllm_importance_sampling_correction": False}}),
    "vllm_importance_sampling_correction": (False, {"loss_type": "grpo", "old": True, "sampling": True}),
    "vllm_importance_sampling_mode": ("token_truncate", {"loss_type": "grpo", "old": True, "sampling": True}),
    "vllm_importance_sampling_clip_min": (0.97, {"loss_type": "grpo", "old": True, "sampling": True,
                                                 "opts": {"vllm_importance_sampling_mode": "token_truncate"}}),
    "vllm_importance_sampling_clip_max": (1.02, {"loss_type": "grpo", "old": True, "sampling": True,
                                                 "opts": {"vllm_importance_sampling_mode": "token_truncate"}}),
    "loss_agg_mode": ("seq-mean-token-sum", {"loss_type": "grpo"}),
}


def test_every_option_has_a_test_value():
    assert set(NON_DEFAULT) == set(LossOptions.names())


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (S, T), generator=g)
    mask = torch.ones(S, T)
    mask[1, 4:] = 0
    rewards = torch.rand(S, generator=g, dtype=torch.float64)
    logits = hidden @ weight.t()
    lp = ref.token_logprobs(logits, tokens)
    old = lp + 0.3 * torch.randn(S, T, generator=g, dtype=torch.float64)
    refl = lp - 0.5 * torch.rand(S, T, generator=g, dtype=torch.float64)
    return hidden, weight, logits, tokens, mask, rewards, old, refl


def _entry_points():
    """name -> f(hidden, weight, logits, tokens, rewards, mask, **kw) -> loss, for every public entry point."""
    def module(cls, x, *rest, **kw):
        opts = {k: v for k, v in kw.items() if k in LossOptions.names()}
        call = {k: v for k, v in kw.items() if k not in opts}
        return cls(group_size=G, **opts)(x, *rest, **call)

    return {
        "grpo_loss": lambda h, w, z, y, r, m, **kw: gk.grpo_loss(z, y, r, m, group_size=G, **kw),
        "grpo_loss[cpu]": lambda h, w, z, y, r, m, **kw: gk.grpo_loss(z, y, r, m, group_size=G, backend="cpu", **kw),
        "GRPOLoss": lambda h, w, z, y, r, m, **kw: module(gk.GRPOLoss, z, y, r, m, **kw),
        "fused_linear_grpo_loss": lambda h, w, z, y, r, m, **kw: gk.fused_linear_grpo_loss(
            h, w, y, r, m, group_size=G, chunk_size=5, **kw),
        "FusedLinearGRPOLoss": lambda h, w, z, y, r, m, **kw: module(gk.FusedLinearGRPOLoss, h, w, y, r, m, **kw),
        "reference.grpo_loss": lambda h, w, z, y, r, m, **kw: ref.grpo_loss(z, y, r, m, group_size=G, **kw),
    }


@pytest.mark.parametrize("fn", [gk.grpo_loss, gk.fused_linear_grpo_loss, ref.grpo_loss],
                         ids=["grpo_loss", "fused_linear_grpo_loss", "reference.grpo_loss"])
def test_signatures_list_every_option_with_its_default(fn):
    params = inspect.signature(fn).parameters
    for f in dataclasses.fields(LossOptions):
        assert f.name in params, f.name
        p = params[f.name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default == f.default, f.name
        assert f.name in fn.__doc__, f"{f.name} is not documented in {fn.__name__}'s docstring"


@pytest.mark.parametrize("cls", [gk.GRPOLoss, gk.FusedLinearGRPOLoss])
def test_modules_hold_options_with_the_same_defaults(cls):
    assert cls(group_size=G).options == LossOptions()
    for name, (value, ctx) in NON_DEFAULT.items():
        extra = {"loss_type": ctx["loss_type"]} if "loss_type" in ctx and name != "loss_type" else {}
        assert getattr(cls(group_size=G, **extra, **{name: value}).options, name) == value


def test_config_produces_loss_options_with_the_same_defaults():
    cfg = gk.GRPOConfig()
    assert cfg.loss_options() == LossOptions()
    for name, (value, ctx) in NON_DEFAULT.items():
        extra = {"loss_type": ctx["loss_type"]} if "loss_type" in ctx and name != "loss_type" else {}
        cfg = gk.GRPOConfig(**extra, **{name: value})
        assert getattr(cfg.loss_options(), name) == value
    fields = {f.name: f.default for f in dataclasses.fields(gk.GRPOConfig)}
    for f in dataclasses.fields(LossOptions):
        assert fields[f.name] == f.default, f.name


def test_cli_has_a_flag_per_option_with_the_same_default(tmp_path):
    """Each option is a ``grpo-kernels train`` flag; unset, the demo's config has the option's default, and set,
    it reaches ``config.loss_options()``."""
    import argparse

    from grpo_kernels.trainer import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    dests = {a.dest for a in parser._actions}
    _, _, _, cfg = cli.build_demo(parser.parse_args([]), {})
    assert cfg.loss_options() == LossOptions(loss_type=cfg.loss_type)  # the demo sets only the loss type
    for name, (value, ctx) in NON_DEFAULT.items():
        assert name in dests, f"grpo-kernels train has no --{name.replace('_', '-')} flag"
        extra = ["--loss-type", ctx["loss_type"]] if "loss_type" in ctx and name != "loss_type" else []
        args = parser.parse_args(extra + [f"--{name.replace('_', '-')}", str(value)])
        _, _, _, cfg = cli.build_demo(args, cli._overrides(args))
        assert getattr(cfg.loss_options(), name) == value, name


@pytest.mark.parametrize("name", list(NON_DEFAULT))
def test_each_option_reaches_the_math_through_every_entry_point(name):
    """Setting the option changes the loss, and every entry point gives the oracle's value and gradient."""
    value, ctx = NON_DEFAULT[name]
    hidden, weight, logits, tokens, mask, rewards, old, refl = _problem()
    base = {"loss_type": ctx.get("loss_type", "softmax")} if name != "loss_type" else {}
    base.update(ctx.get("opts", {}))
    data = {}
    if ctx.get("old"):
        data["old_logprobs"] = old
    if ctx.get("sampling"):
        data["sampling_logprobs"] = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(5),
                                                             dtype=old.dtype)
    if ctx.get("ref") or name == "kl_coef":
        data["ref_logprobs"] = refl
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ref_logprobs with the default kl_coef=0 warns (tested below)
        default = ref.grpo_loss(logits, tokens, rewards, mask, group_size=G, **base, **data)
    expected_leaf = logits.clone().requires_grad_(True)
    expected = ref.grpo_loss(expected_leaf, tokens, rewards, mask, group_size=G, **base, **data, **{name: value})
    (expected_grad,) = torch.autograd.grad(expected, expected_leaf)
    assert abs(expected.item() - default.item()) > 1e-6, f"{name}={value!r} does not change the loss here"
    for ep, f in _entry_points().items():
        hh, ww, zz = (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True),
                      logits.clone().requires_grad_(True))
        got = f(hh, ww, zz, tokens, rewards, mask, **base, **data, **{name: value})
        assert got.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12), ep
        if "fused" in ep.lower():
            gh, gw = torch.autograd.grad(got, (hh, ww))
            torch.testing.assert_close(gh, expected_grad @ weight, rtol=1e-9, atol=1e-11, msg=ep)
            torch.testing.assert_close(gw, expected_grad.reshape(-1, V).t() @ hidden.reshape(-1, H),
                                       rtol=1e-9, atol=1e-11, msg=ep)
        else:
            (gz,) = torch.autograd.grad(got, zz)
            torch.testing.assert_close(gz, expected_grad, rtol=1e-9, atol=1e-11, msg=ep)


# ----------------------------------------------------------------------------------------------------------
# beta is not TRL's beta (issue 17)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_beta_with_a_clipped_loss_is_an_error_everywhere(loss_type):
    hidden, weight, logits, tokens, mask, rewards, old, refl = _problem()
    for ep, f in _entry_points().items():
        with pytest.raises(ValueError) as e:
            f(hidden, weight, logits, tokens, rewards, mask, loss_type=loss_type, beta=0.04, ref_logprobs=refl)
        assert BETA_IS_NOT_THE_KL_COEF in str(e.value), ep
        assert "kl_coef" in str(e.value) and "TRL" in str(e.value)
    for cls in (gk.GRPOLoss, gk.FusedLinearGRPOLoss):
        with pytest.raises(ValueError, match="the KL coefficient is `kl_coef`"):
            cls(group_size=G, loss_type=loss_type, beta=0.04)
    with pytest.raises(ValueError, match="the KL coefficient is `kl_coef`"):
        gk.GRPOConfig(loss_type=loss_type, beta=0.04)
    with pytest.raises(ValueError, match="the KL coefficient is `kl_coef`"):
        LossOptions(loss_type=loss_type, beta=0.04).validate()


def test_beta_with_a_clipped_loss_is_an_error_in_the_cli(capsys, tmp_path):
    from grpo_kernels.cli import main

    rc = main(["train", "--loss-type", "grpo", "--beta", "0.04", "--max-steps", "1", "--output-dir", str(tmp_path)])
    assert rc == 2
    assert "the KL coefficient is `kl_coef`" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was started


def test_softmax_keeps_beta_as_its_temperature():
    hidden, weight, logits, tokens, mask, rewards, old, refl = _problem()
    seq = (ref.token_logprobs(logits, tokens) * mask).sum(-1)
    for beta in (None, 0.1, 0.7):
        w = torch.softmax(rewards.view(-1, G) / (0.1 if beta is None else beta), -1).reshape(-1)
        expected = -(w * seq).sum() / (S // G)
        got = gk.grpo_loss(logits, tokens, rewards, mask, group_size=G, beta=beta)
        assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    # the lesson's compute_grpo_loss keeps beta too
    assert gk.compute_grpo_loss(seq.view(-1, G), rewards.view(-1, G), beta=0.7).item() == pytest.approx(
        gk.grpo_loss(logits, tokens, rewards, mask, group_size=G, beta=0.7).item(), rel=1e-12)


def test_reference_logprobs_without_kl_coef_warn():
    hidden, weight, logits, tokens, mask, rewards, old, refl = _problem()
    for ep, f in _entry_points().items():
        with pytest.warns(UserWarning, match="reference log-probs are ignored because kl_coef is 0"):
            f(hidden, weight, logits, tokens, rewards, mask, loss_type="grpo", ref_logprobs=refl)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning with a KL weight, or without reference log-probs
            f(hidden, weight, logits, tokens, rewards, mask, loss_type="grpo", ref_logprobs=refl, kl_coef=0.1)
            f(hidden, weight, logits, tokens, rewards, mask, loss_type="grpo")
