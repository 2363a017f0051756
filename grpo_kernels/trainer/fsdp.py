"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for :class:`~grpo_kernels.trainer.GRPOTrainer`: ``config.fsdp``.

DDP keeps a full replica of the parameters, gradients and AdamW state on every GPU; with ``fsdp`` each rank keeps
``1/W`` of them. Under ``torchrun`` (``W > 1``) the trainer calls :func:`shard` on the policy and on the frozen
reference model:

* **Units.** ``fully_shard`` on every decoder layer (the classes named by the model's ``_no_split_modules``, as
  Hugging Face / accelerate wrap them; without that attribute, the blocks of the longest ``nn.ModuleList``), then
  on the root. The root unit holds what is left: the embeddings, the final norm and the LM head (a tied head and
  embedding are one parameter, in one unit). Rank 0's parameters and buffers are broadcast first, as DDP does.
* **Forward / backward.** FSDP all-gathers a unit's parameters in its forward pre-hook and frees them after the
  forward (the layers; the policy's root stays gathered until the backward, FSDP's default for a root), and
  reduce-scatters the gradients in the backward, averaged over the ranks like DDP's all-reduce. Every micro-batch
  reduce-scatters (no ``no_sync``): the accumulated gradients stay sharded.
* **The fused-linear LM head.** ``fused_linear=True`` reads ``lm_head.weight`` after the forward
  (:mod:`.objective`). Because the policy's root unit is not resharded after its forward, that attribute is then
  the full, unsharded parameter FSDP gathered, its gradient lands in FSDP's unsharded gradient and is
  reduce-scattered with the root unit's after the backward. :func:`shard` keeps that root setting (the frozen
  reference model, which has no backward, frees its root after each forward instead).
* **Generation** (:func:`gathered`): ``generate`` runs one forward per new token, and each rank stops when its own
  sequences are done, so a per-forward all-gather would leave the ranks waiting on each other's collectives (a
  hang). Instead every unit is gathered once (all ranks, same collectives), resharding after forward is switched
  off, ``generate`` runs on the full parameters with no collective at all, and every unit is resharded at the end.
  Cost: the full parameters (not the gradients or optimizer state) are held for the length of the rollout. The
  log-prob passes (old / reference log-probs) run through the ordinary forward hooks: every rank makes the same
  forward calls.
* **Optimizer and clipping.** AdamW is built over the sharded (DTensor) parameters; ``clip_grad_norm_`` handles
  DTensor gradients and returns a replicated DTensor norm (:func:`norm_value`); :func:`grad_norm` is the global norm
  without clipping.
* **Checkpoints** (:mod:`.checkpoint`): the model and optimizer state, sharded, through ``torch.distributed.checkpoint``
  (:func:`save_sharded` / :func:`load_sharded`, ``get_state_dict`` / ``set_state_dict``); ``final/`` and
  ``save_model`` gather the full state dict on rank 0 (:func:`full_model_state_dict`) and write safetensors.

One process (``fsdp=True`` without ``torchrun``, or ``--nproc_per_node 1``) has nothing to shard: the trainer then
trains unsharded, exactly as without ``fsdp``, and says so once.

Needs torch >= 2.6 (``torch.distributed.fsdp.fully_shard``, ``FSDPModule.set_reshard_after_forward``); an older
torch gets a clear error when ``fsdp`` is asked for under torchrun.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch import nn

SHARDED_DIR = "sharded"  # the torch.distributed.checkpoint folder of a checkpoint: model + optimizer shards


def _api():
    """``(fully_shard, FSDPModule)``, or a RuntimeError naming the torch version."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        raise RuntimeError(f"fsdp=True needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this is "
                           f"torch {torch.__version__}. Upgrade torch or train with DDP (fsdp=False)") from None
    return fully_shard, FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was put under FSDP2 by :func:`shard` (or ``fully_shard``)."""
    try:
        _, FSDPModule = _api()
    except RuntimeError:
        return False
    return isinstance(model, FSDPModule)


def decoder_layers(model: nn.Module) -> List[nn.Module]:
    """The modules :func:`shard` makes units of: those whose class is in ``model._no_split_modules`` (the decoder
    layers of a Hugging Face model), else the blocks of the longest ``nn.ModuleList`` of one block type."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def broadcast_from_rank0(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a model)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def shard(model: nn.Module, device: torch.device, frozen: bool = False) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root, over all ranks of the default process group (in place;
    returns ``model``). ``frozen`` (the reference model): the root unit is freed after every forward as well."""
    fully_shard, _ = _api()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # None: FSDP's default, the root is not resharded after forward (the fused-linear head relies on it, see above)
    fully_shard(model, mesh=mesh, reshard_after_forward=True if frozen else None)
    model._grpo_fsdp_units = len(layers) + 1  # noqa: SLF001 - for the trainer's note and the tests
    return model


def _units(model: nn.Module) -> List[nn.Module]:
    _, FSDPModule = _api()
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every FSDP unit of ``model`` unsharded for the duration (one all-gather per unit, on every rank), with no
    resharding after forward: forwards inside (``generate``) run on full parameters without any collective.
    Afterwards the policy's settings are restored (layers reshard after forward, the root does not) and every unit
    is resharded."""
    units = _units(model)
    # The root's lazy init (normally in its first forward) sets up the communication context the explicit
    # unshards use; generation can be the very first forward of a run.
    init = getattr(model._get_fsdp_state(), "_lazy_init", None)  # noqa: SLF001 - no public equivalent
    if init is not None:
        init()
    model.set_reshard_after_forward(False, recurse=True)
    try:
        for m in units:
            m.unshard()
        yield model
    finally:
        for m in units:
            m.set_reshard_after_forward(m is not model, recurse=False)
        for m in units:
            m.reshard()


def norm_value(norm) -> float:
    """A norm from ``clip_grad_norm_`` (a replicated DTensor when the gradients are DTensors) as a float."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def grad_norm(params) -> float:
    """The global L2 norm of the (possibly sharded) gradients of ``params``: local sums of squares, one all-reduce."""
    local, device = None, None
    for p in params:
        g = p.grad
        if g is None:
            continue
        g = g.to_local() if hasattr(g, "to_local") else g
        s = g.detach().double().pow(2).sum()
        local = s if local is None else local + s.to(local.device)
    if local is None:
        return 0.0
    dist.all_reduce(local)
    return float(local.sqrt())


# --------------------------------------------------------------------------- state dicts and checkpoints
def full_model_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model state dict on CPU, on rank 0 (``{}`` elsewhere). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """The sharded model and optimizer state into the folder ``path`` (``torch.distributed.checkpoint``: one file
    per rank and ``.metadata``, every file fsynced). A collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd},
             storage_writer=dcp.FileSystemWriter(path, sync_files=True))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Restore what :func:`save_sharded` wrote into ``model`` and ``optimizer`` (same world size). A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)  # the templates (initializes the optimizer state)
    state: Dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

