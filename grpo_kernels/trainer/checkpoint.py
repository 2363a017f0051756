"""Checkpoints of :class:`~grpo_kernels.trainer.GRPOTrainer`: save, find the newest, restore exactly.

A checkpoint directory ``output_dir/checkpoint-<step>/`` holds:

* ``model.safetensors`` (+ ``config.json``, and the tokenizer files when the trainer has a tokenizer), rank 0;
* ``trainer_state.pt``: optimizer, LR scheduler, step, metric history, ``target_reached``, the config and the
  world size (rank 0);
* ``rng_state_<rank>.pt``: every rank's Python / torch / CUDA / numpy RNG state.

Resuming needs the same world size: the data order (:meth:`GRPOTrainer.batch_indices`) depends on it.
:class:`CheckpointMixin` reads the trainer's ``config``, ``step``, ``history``, ``target_reached``, ``optimizer``,
``scheduler``, ``unwrapped``, ``tokenizer``, ``device``, ``rank``, ``world_size`` and ``is_main``.
"""

from __future__ import annotations

import glob
import os
import random
import re
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

STATE_FILE = "trainer_state.pt"


def _rng_state() -> Dict[str, Any]:
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    try:
        import numpy as np

        rng["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return rng


def _set_rng_state(rng: Dict[str, Any]) -> None:
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng:
        import numpy as np

        np.random.set_state(rng["numpy"])


class CheckpointMixin:
    """``save_model``, ``save_checkpoint``, ``latest_checkpoint`` and ``load_checkpoint`` of the trainer."""

    def _barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def save_model(self, path: str):
        """The model (safetensors) and tokenizer to ``path`` (rank 0; every rank waits for it)."""
        if self.is_main:
            os.makedirs(path, exist_ok=True)
            self.unwrapped.save_pretrained(path, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(path)
        self._barrier()

    def save_checkpoint(self, path: Optional[str] = None) -> str:
        """``output_dir/checkpoint-<step>``: model (safetensors) + tokenizer + optimizer/scheduler/step/history on
        rank 0, and every rank's RNG state."""
        path = path or os.path.join(self.config.output_dir, f"checkpoint-{self.step}")
        self.save_model(path)
        if self.is_main:
            torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "history": self.history,
                        "target_reached": self.target_reached, "config": self.config.to_dict(),
                        "world_size": self.world_size}, os.path.join(path, STATE_FILE))
        torch.save(_rng_state(), os.path.join(path, f"rng_state_{self.rank}.pt"))
        self._barrier()
        return path

    def latest_checkpoint(self) -> Optional[str]:
        """The ``checkpoint-<step>`` directory of ``output_dir`` with the highest step (None if there is none)."""
        found = []
        for d in glob.glob(os.path.join(self.config.output_dir, "checkpoint-*")):
            m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d))
            if m and os.path.isfile(os.path.join(d, STATE_FILE)):
                found.append((int(m.group(1)), d))
        return max(found)[1] if found else None

    def load_checkpoint(self, path: str):
        """Restore model weights, optimizer, scheduler, step, metric history and RNG from ``path`` ("latest" = the
        newest ``checkpoint-*`` in ``output_dir``); returns the directory restored from."""
        if path == "latest":
            p = self.latest_checkpoint()
            if p is None:
                raise ValueError(f"resume_from_checkpoint='latest' but {self.config.output_dir!r} has no checkpoint")
            path = p
        state_file = os.path.join(path, STATE_FILE)
        if not os.path.isfile(state_file):
            raise ValueError(f"resume_from_checkpoint: {path!r} is not a checkpoint (no {STATE_FILE})")
        from safetensors.torch import load_file

        sd = load_file(os.path.join(path, "model.safetensors"), device=str(self.device))
        missing, unexpected = self.unwrapped.load_state_dict(sd, strict=False)
        tied = set(getattr(self.unwrapped, "_tied_weights_keys", None) or [])
        if unexpected or [k for k in missing if k not in tied]:
            raise ValueError(f"checkpoint {path!r} does not match the model: missing={missing}, unexpected={unexpected}")
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        if state.get("world_size", 1) != self.world_size:
            raise ValueError(f"checkpoint was written with world_size={state.get('world_size')} but this run has "
                             f"{self.world_size}; the data order would differ")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.target_reached = state.get("target_reached")
        rng = torch.load(os.path.join(path, f"rng_state_{self.rank}.pt"), map_location="cpu", weights_only=False)
        _set_rng_state(rng)
        return path
