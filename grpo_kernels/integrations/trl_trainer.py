"""TRL's ``GRPOTrainer`` with grpo_kernels' loss: :class:`GRPOTrainer`, a subclass of ``trl.GRPOTrainer``.

Same constructor, same config (``trl.GRPOConfig``), same data flow, rewards, generation, logging and
checkpoints -- TRL's own code for all of it. What changes is the part that touches the LM head:

* the **policy loss** (TRL's ``_compute_loss``) is :func:`grpo_kernels.fused_linear_grpo_loss` on the model's
  last hidden states and its LM-head weight (and bias): the ``[B, T, V]`` logits are never built, only chunks
  of the completion rows, and the logits gradient is written in the same sweep (docs/design.md §7);
* the **no-grad log-prob passes** (old policy and reference model in ``_generate_and_score_completions``)
  go through :meth:`GRPOTrainer._get_per_token_logps_and_entropies`, which runs the backbone and then
  ``hidden @ W.T`` chunk by chunk into :func:`grpo_kernels.token_logprobs` (only the completion rows, never the
  logits of the whole batch).

The loss options come from the TRL config once, at construction, through
:func:`grpo_kernels.integrations.trl.loss_options_from_trl` (TRL's ``beta`` is our ``kl_coef``; everything else
has TRL's name). Anything this path would compute differently from TRL raises at construction, naming the
option: an unsupported ``loss_type``, logit soft-capping (``final_logit_softcapping``), the MoE
load-balancing loss (``router_aux_loss_coef``), vision-language models, FSDP and DeepSpeed ZeRO-3 (the LM-head
weight is read outside the model's forward), ``top_entropy_quantile < 1`` on several processes (TRL takes the
quantile over all ranks), and models whose forward has no ``logits_to_keep``. A positive
``logit_scale`` (TRL's fused head reads it from the config) is folded into the temperature.

Normalization, exactly TRL's (``GA`` = ``current_gradient_accumulation_steps`` in training, 1 in evaluation):
the loss is called with ``loss_scale = 1/GA`` -- TRL divides grpo/bnpo/dr_grpo/sapo/luspo and the entropy
bonus by GA -- and, for cispo/dapo/vespo, with ``num_items_in_batch = N / num_processes / steps_per_generation``
(training) or ``N / num_processes`` (evaluation), ``N = inputs["num_items_in_batch"].clamp(min=1)``, so that
``loss_scale · Σ/num_items`` is TRL's ``Σ / (N / num_processes · GA / steps_per_generation)``.

Metrics go into ``self._metrics`` under TRL's names with TRL's values and in TRL's conditions: ``kl`` (with
``beta != 0``), ``entropy``, ``clip_ratio/low_mean|high_mean|region_mean|low_min|high_max`` (grpo, bnpo,
dr_grpo, dapo, luspo), ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``policy_loss`` and ``entropy_coef`` when
the entropy bonus is enabled. Means over processes are TRL's (sum and count reduced together). The adaptive
entropy controller (``use_adaptive_entropy``) is TRL's: the coefficient applied is the one of the previous
optimizer step (0 while the last window's entropy is above ``entropy_target``), the window's entropy sum and
active-token count come from our ``entropy/active_sum`` / ``entropy/active_tokens`` metrics, and at each
optimizer-step boundary ``entropy_coef`` moves by ``entropy_coef_delta`` within ``[entropy_coef_min,
entropy_coef_max]``.

Precision: the LM-head GEMMs run in the dtype TRL's fused head uses (fp32 with ``cast_lm_head_to_fp32``, else the
autocast dtype of the forward, else the hidden states' dtype); log-probs, entropies and the loss in fp32. Under
bf16 autocast with fp32 master weights the head weight is cast to bf16 for the call, so its gradient is
accumulated in fp32 and rounded once to bf16 before autograd adds it to the fp32 weight (TRL keeps it in fp32).

Tied embeddings (``tie_word_embeddings=True``): the LM-head weight *is* the input embedding; the fused loss
returns its LM-head gradient through autograd, which adds it once to the embedding's lookup gradient.

TRL internals this module overrides or depends on (TRL 1.16; the import checks the version):

* overrides ``GRPOTrainer._compute_loss(model, inputs)`` (called by TRL's ``compute_loss``) and
  ``GRPOTrainer._get_per_token_logps_and_entropies(...)`` -- without grad only; with grad it is TRL's;
* reads the ``inputs`` dict of ``_generate_and_score_completions`` (``prompt_ids``, ``prompt_mask``,
  ``completion_ids``, ``completion_mask``, ``tool_mask``, ``advantages``, ``num_items_in_batch``,
  ``old_per_token_logps``, ``ref_per_token_logps``, ``sampling_per_token_logps``);
* reads the attributes TRL's ``__init__`` sets: ``loss_type``, ``beta``, ``max_completion_length``,
  ``top_entropy_quantile``, ``entropy_coef``, ``use_adaptive_entropy``, ``_entropy_bonus_enabled``,
  ``_last_world_entropy``, ``_entropy_window_stats``, ``aux_loss_enabled``, ``_is_vlm``, ``_metrics``,
  ``current_gradient_accumulation_steps``, ``accelerator``;
* calls the model's forward with ``logits_to_keep=1`` (TRL's ``add_fused_lm_head`` wrapper passes it to the
  original forward) and reads the backbone's ``last_hidden_state`` with a forward hook on ``model.base_model``
  -- the module TRL's fused head runs; the LM head is ``get_output_embeddings()``;
* ``trl.trainer.utils.nanmin`` / ``nanmax`` for the ``clip_ratio/low_min|high_max`` reductions.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

_TRL_RANGE = ("1.16", "1.17")


def _check_trl():
    try:
        import trl
    except ImportError as e:  # pragma: no cover - the [trl] extra is installed in CI
        raise ImportError("grpo_kernels.integrations.trl.GRPOTrainer needs TRL 1.16.x, which is not installed: "
                          "pip install 'grpo_kernels[trl]' (or 'trl>=1.16,<1.17')") from e
    from packaging.version import Version

    v = Version(trl.__version__)
    if not (Version(_TRL_RANGE[0]) <= v < Version(_TRL_RANGE[1])):
        raise ImportError(f"grpo_kernels.integrations.trl.GRPOTrainer is written against TRL 1.16.x (it overrides "
                          f"TRL internals), but trl {trl.__version__} is installed: "
                          f"pip install 'trl>={_TRL_RANGE[0]},<{_TRL_RANGE[1]}'")


_check_trl()

from accelerate.utils import is_peft_model  # noqa: E402
from trl import GRPOTrainer as _TRLGRPOTrainer  # noqa: E402
from trl.trainer.utils import nanmax, nanmin  # noqa: E402

from .. import kernels as _kernels  # noqa: E402
from ..fused_linear import default_chunk_size, fused_linear_grpo_loss  # noqa: E402
from ..loss import token_logprobs  # noqa: E402
from ..options import LossOptions  # noqa: E402
from .trl import loss_options_from_trl  # noqa: E402

__all__ = ["GRPOTrainer"]

_TOKEN_MEAN_TYPES = ("cispo", "dapo", "vespo")  # TRL's num_items_in_batch normalizer
_CLIP_METRIC_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_CLIP_MEANS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def _logit_scale(text_config) -> float:
    """The multiplier TRL's fused LM head applies to the logits (``add_fused_lm_head`` reads the same fields)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        ls = text_config.logits_scaling
        scale = ls if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / ls
    return 1.0 if scale is None else float(scale)


class GRPOTrainer(_TRLGRPOTrainer):
    """``trl.GRPOTrainer`` whose log-probs and loss come from grpo_kernels (module docstring).

    Args: those of ``trl.GRPOTrainer`` (``model``, ``reward_funcs``, ``args`` = a ``trl.GRPOConfig``, ...), plus
    two keyword-only extras:

    Keyword Args:
        kernel_backend: the grpo_kernels backend of the per-chunk log-prob/gradient kernel (``"auto"``,
            ``"torch"``, ``"cpu"``, ``"cuda"``, ``"triton"``); the GEMMs are always torch's.
        chunk_size: completion rows whose logits are built at a time (default: about 64 MiB of logits on CPU,
            ``min(512 MiB, free/8)`` on GPU; :func:`grpo_kernels.fused_linear.default_chunk_size`).

    Raises:
        ValueError / NotImplementedError at construction, naming the TRL option (or model feature) this trainer
        does not compute the way TRL does.
    """

    def __init__(self, *args, kernel_backend: str = "auto", chunk_size: Optional[int] = None, **kwargs):
        bound = inspect.signature(_TRLGRPOTrainer.__init__).bind(self, *args, **kwargs)
        config = bound.arguments.get("args")
        if config is not None:  # fail before TRL loads models
            loss_options_from_trl(config)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self._gk_backend = kernel_backend
        self._gk_chunk_size = chunk_size
        super().__init__(*args, **kwargs)
        self._loss_options = self._check_supported()

    # ------------------------------------------------------------------ construction checks
    def _check_supported(self) -> LossOptions:
        opts = loss_options_from_trl(self.args)
        _kernels.resolve_backend(self._gk_backend, self.accelerator.device)  # a bad kernel_backend fails here
        if self._is_vlm:
            raise NotImplementedError("grpo_kernels' GRPOTrainer supports text-only causal LMs; vision-language "
                                      "models (a ProcessorMixin processing_class) are not supported")
        if self.aux_loss_enabled:
            raise NotImplementedError(f"router_aux_loss_coef={self.router_aux_loss_coef}: the MoE load-balancing "
                                      "loss is not supported by grpo_kernels' GRPOTrainer (set "
                                      "router_aux_loss_coef=0.0, or use trl.GRPOTrainer)")
        if self.is_fsdp_enabled or (self.is_deepspeed_enabled
                                    and getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3):
            raise NotImplementedError("FSDP and DeepSpeed ZeRO-3 are not supported by grpo_kernels' GRPOTrainer: "
                                      "it reads the LM-head weight outside the model's forward, where it is sharded")
        if self.accelerator.num_processes > 1 and self.top_entropy_quantile < 1.0:
            raise NotImplementedError("top_entropy_quantile < 1 with several processes: TRL takes the entropy "
                                      "quantile over all ranks, grpo_kernels over the local batch")
        lm = self._causal_lm(self.model)
        text_config = lm.config.get_text_config()
        if getattr(text_config, "final_logit_softcapping", None) is not None:
            raise NotImplementedError(f"final_logit_softcapping={text_config.final_logit_softcapping}: logit "
                                      "soft-capping is not supported by grpo_kernels' GRPOTrainer")
        scale = _logit_scale(text_config)
        if not scale > 0:
            raise NotImplementedError(f"logit_scale={scale}: only a positive logit scale is supported")
        if scale != 1.0:  # z·s/τ = z/(τ/s): the same log-softmax and entropy
            opts = opts.replace(temperature=opts.temperature / scale).validate()
        if "logits_to_keep" not in inspect.signature(type(lm).forward).parameters:
            raise NotImplementedError(f"{type(lm).__name__}.forward has no `logits_to_keep` argument, which "
                                      "grpo_kernels' GRPOTrainer needs to skip the full LM head")
        if lm.get_output_embeddings() is None:
            raise NotImplementedError(f"{type(lm).__name__} has no output embeddings (LM head)")
        return opts

    # ------------------------------------------------------------------ model access
    def _causal_lm(self, model):
        lm = self.accelerator.unwrap_model(model)
        return lm.get_base_model() if is_peft_model(lm) else lm

    def _hidden_states(self, model, input_ids, attention_mask, logits_to_keep):
        """``(hidden (B, C, H), compute_dtype, lm)``: the backbone's last hidden states at the ``C =
        logits_to_keep`` positions that predict the completion tokens, from the model's own forward (through
        any DDP wrapper) with ``logits_to_keep=1``, and the dtype TRL's fused head would compute the logits in
        (fp32 with ``cast_lm_head_to_fp32``, else the autocast dtype of the forward, else the hidden dtype)."""
        lm = self._causal_lm(model)
        captured = {}

        def hook(module, args, output):
            h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            captured["h"] = h
            dev = h.device.type
            captured["autocast"] = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)

        handle = lm.base_model.register_forward_hook(hook)
        try:
            with self.accelerator.autocast():
                model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
        finally:
            handle.remove()
        h = captured["h"][:, -logits_to_keep - 1:-1]
        if self.args.cast_lm_head_to_fp32:
            dtype = torch.float32
        else:
            dtype = captured["autocast"] or h.dtype
        return h, dtype, lm

    @staticmethod
    def _head(lm, dtype):
        head = lm.get_output_embeddings()
        w, b = head.weight, getattr(head, "bias", None)
        return w.to(dtype), (None if b is None else b.to(dtype)), w.device

    # ------------------------------------------------------------------ no-grad log-probs (old / reference)
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's signature and outputs (``(logps (B, C), entropies or None, None)``, fp32, 0 at padding).

        Without grad: the backbone in micro-batches of ``batch_size`` rows, then the completion rows' logits
        chunk by chunk into :func:`grpo_kernels.token_logprobs`. With grad enabled (not used by this trainer's
        loss), TRL's own implementation."""
        if torch.is_grad_enabled() or compute_aux_loss or any(v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        batch_size = batch_size or input_ids.size(0)
        logps, ents = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start:start + batch_size]
            am = attention_mask[start:start + batch_size]
            hidden, dtype, lm = self._hidden_states(model, ids, am, logits_to_keep)
            w, b, dev = self._head(lm, dtype)
            valid = am[:, -logits_to_keep:].to(dev) != 0
            lp, ent = self._chunked_logprobs(hidden.to(dev, dtype), w, b, ids[:, -logits_to_keep:].to(dev), valid,
                                             compute_entropy)
            logps.append(lp)
            ents.append(ent)
        return torch.cat(logps, 0), (torch.cat(ents, 0) if compute_entropy else None), None

    @torch.no_grad()
    def _chunked_logprobs(self, hidden, weight, bias, tokens, valid, compute_entropy):
        B, C, H = hidden.shape
        V = weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp = torch.zeros(B * C, dtype=acc, device=hidden.device)
        ent = torch.zeros(B * C, dtype=acc, device=hidden.device) if compute_entropy else None
        rows = valid.reshape(-1).nonzero().squeeze(-1)
        n = rows.numel()
        chunk = self._gk_chunk_size or default_chunk_size(max(n, 1), V, hidden.dtype, hidden.device)
        h2 = hidden.reshape(B * C, H)
        y2 = tokens.reshape(-1)
        tau = self._loss_options.temperature
        with torch.autocast(hidden.device.type, enabled=False):
            for a in range(0, n, chunk):
                idx = rows[a:a + chunk]
                hc = h2.index_select(0, idx)
                z = hc @ weight.t() if bias is None else torch.addmm(bias, hc, weight.t())
                out = token_logprobs(z, y2[idx], tau, return_entropy=compute_entropy, backend=self._gk_backend)
                if compute_entropy:
                    logp[idx], ent[idx] = out[0].to(acc), out[1].to(acc)
                else:
                    logp[idx] = out.to(acc)
                del z, hc
        return logp.view(B, C), (None if ent is None else ent.view(B, C))

    # ------------------------------------------------------------------ the loss
    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        if any(inputs.get(k) is not None for k in ("pixel_values", "image_grid_thw", "token_type_ids",
                                                     "mm_token_type_ids")):
            raise NotImplementedError("multimodal inputs are not supported by grpo_kernels' GRPOTrainer")

        hidden, dtype, lm = self._hidden_states(model, input_ids, attention_mask, logits_to_keep)
        weight, bias, dev = self._head(lm, dtype)
        hidden = hidden.to(dev, dtype)

        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        opts = self._loss_options
        if self._entropy_bonus_enabled:
            # the coefficient of the end of the previous optimizer step (TRL: every micro-batch of a window alike)
            if self.use_adaptive_entropy:
                apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
            else:
                apply_coef = self.entropy_coef
            opts = opts.replace(entropy_coef=float(apply_coef))
        else:
            opts = opts.replace(entropy_coef=0.0)

        num_items = None
        if self.loss_type in _TOKEN_MEAN_TYPES:
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":  # TRL: N/np · GA/spg, of which loss_scale carries the 1/GA
                num_items = num_items / self.args.steps_per_generation
            num_items = num_items.to(dev)
        sampling = None
        if opts.off_policy_mask_threshold is not None or opts.vllm_importance_sampling_correction:
            sampling = inputs.get("sampling_per_token_logps")
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        loss_scale = 1.0 / ga

        with torch.autocast(dev.type, enabled=False):
            loss, metrics = fused_linear_grpo_loss(
                hidden, weight, completion_ids.to(dev), None, mask.to(dev), group_size=1, bias=bias,
                old_logprobs=inputs.get("old_per_token_logps"), ref_logprobs=ref, sampling_logprobs=sampling,
                advantages=inputs["advantages"], num_items_in_batch=num_items, loss_scale=loss_scale,
                return_metrics=True, backend=self._gk_backend, chunk_size=self._gk_chunk_size, **opts.to_dict())

        self._log_metrics(mode, loss, metrics, mask, loss_scale, opts)
        return loss

    # ------------------------------------------------------------------ metrics and the entropy controller
    def _global_mean(self, mean: torch.Tensor, count) -> float:
        """TRL's ``global_masked_mean`` from a local mean over ``count`` items."""
        if self.accelerator.num_processes == 1:
            return mean.item()
        count = torch.as_tensor(count, dtype=mean.dtype, device=mean.device)
        totals = self.accelerator.reduce(torch.stack([mean * count, count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_metrics(self, mode, loss, metrics, mask, loss_scale, opts):
        m = self._metrics[mode]
        n_tok = metrics["num_tokens"]
        n_seq = mask.shape[0]
        seq_level = self.importance_sampling_level == "sequence"

        if self._entropy_bonus_enabled:
            policy = metrics["policy_loss"] if "policy_loss" in metrics else loss.detach() / loss_scale
            if self.loss_type in _TOKEN_MEAN_TYPES:  # TRL's normalizer of these includes GA
                policy = policy * loss_scale
            m["policy_loss"].append(self.accelerator.gather(policy.float()).nanmean().item())
            if self.use_adaptive_entropy and mode == "train":
                stats = torch.stack([metrics["entropy/active_sum"], metrics["entropy/active_tokens"]]).float()
                self._entropy_window_stats = (stats if self._entropy_window_stats is None
                                              else self._entropy_window_stats + stats)
                if self.accelerator.sync_gradients:
                    window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                    world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                    if world_entropy <= self.args.entropy_target:
                        self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta,
                                                self.args.entropy_coef_max)
                    else:
                        self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta,
                                                self.args.entropy_coef_min)
                    self._last_world_entropy = world_entropy
                    self._entropy_window_stats = None
            if mode == "train" and self.accelerator.sync_gradients:
                m["entropy_coef"].append(self.entropy_coef)

        if self.beta != 0.0:
            m["kl"].append(self._global_mean(metrics["kl"], n_tok))
        m["entropy"].append(self._global_mean(metrics["entropy"], n_tok))
        count = n_seq if seq_level else n_tok
        if self.loss_type in _CLIP_METRIC_TYPES:
            for name in _CLIP_MEANS:
                m[name].append(self._global_mean(metrics[name], count))
            m["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(metrics["clip_ratio/low_min"]
                                                                          .reshape(1).float())).item())
            m["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(metrics["clip_ratio/high_max"]
                                                                           .reshape(1).float())).item())
        elif self.loss_type == "cispo":
            m["cispo_clip_ratio"].append(self._global_mean(metrics["cispo_clip_ratio"], count))
        elif self.loss_type == "vespo":
            m["vespo/phi_seq_mean"].append(self._global_mean(metrics["vespo/phi_seq_mean"], n_seq))

    @property
    def loss_options(self) -> LossOptions:
        """The :class:`~grpo_kernels.options.LossOptions` this trainer computes (from its TRL config)."""
        return self._loss_options
