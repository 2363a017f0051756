"""Checkpoints of :class:`~grpo_kernels.trainer.GRPOTrainer`: save atomically, find the newest complete one,
restore exactly (the lock that keeps two runs out of one ``output_dir`` is :mod:`.outdir`).

A checkpoint directory ``output_dir/checkpoint-<step>/`` holds:

* ``model.safetensors`` (+ ``config.json``, and the tokenizer files when the trainer has a tokenizer), rank 0;
* ``trainer_state.pt``: optimizer, LR scheduler, step, metric history, ``target_reached``, the config and the
  world size (rank 0);
* ``rng_state_<rank>.pt``: every rank's Python / torch / CUDA / numpy RNG state;
* ``checkpoint_complete.json``, written last: the step, the world size, the format and the size of every other file.

Under FSDP (``config.fsdp`` under torchrun, :mod:`.fsdp`) the model and the optimizer are sharded, and so is the
checkpoint (format ``"fsdp"``): ``sharded/`` holds them as written by ``torch.distributed.checkpoint``
(``get_state_dict``: every rank its shard file, rank 0 the ``.metadata``), ``trainer_state.pt`` has no optimizer, and
instead of ``model.safetensors`` there is only the model's ``config.json`` (``final/`` and :meth:`save_model` still
write one full safetensors file, gathered on rank 0). An FSDP checkpoint is restored by an FSDP run of the same
world size (each rank reads its shard), a full one by a run without FSDP.

Atomic saves: every file is written into a temporary sibling directory ``output_dir/.tmp-checkpoint-<step>``
(rank 0 the model and state, every rank its RNG file), each file is fsynced, all ranks meet at a barrier, and
rank 0 writes the completion marker and renames the directory to ``checkpoint-<step>`` (then fsyncs
``output_dir``). A crash at any moment leaves either the previous checkpoints only (and a ``.tmp-*`` directory,
which nothing reads and the next run removes) or a complete new one. :func:`checkpoint_problem` checks a
checkpoint against its marker (a missing, truncated or extended file is caught; contents are not hashed), and
:meth:`CheckpointMixin.latest_checkpoint` returns the newest checkpoint that passes, warning about each newer
one it skips.

Resuming needs the same world size: the data order (:meth:`GRPOTrainer.batch_indices`) depends on it (and so do
FSDP's shards); and the fields of :data:`RESUME_MUST_MATCH` must equal the checkpoint's (the others may differ, with
a warning, except :data:`RESUME_IGNORED`). :class:`CheckpointMixin` reads the trainer's ``config``, ``step``, ``history``,
``target_reached``, ``optimizer``, ``scheduler``, ``unwrapped``, ``tokenizer``, ``device``, ``rank``,
``world_size``, ``is_main`` and ``fsdp``.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..options import LossOptions
from .fsdp import SHARDED_DIR

STATE_FILE = "trainer_state.pt"
MODEL_FILE = "model.safetensors"
COMPLETE_FILE = "checkpoint_complete.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"  # temporary directories of saves in progress (ignored by every reader)

#: Config fields that must equal the checkpoint's to resume: they decide the data order, the sampled batch and
#: the loss, so a run resumed with other values would not continue the checkpoint's run.
RESUME_MUST_MATCH: Tuple[str, ...] = ("seed", "shuffle", "per_device_batch_size", "num_generations",
                                      "num_iterations") + tuple(LossOptions.names())
#: Config fields that may differ on resume without a word (where the run writes, how long it runs, what it logs).
RESUME_IGNORED: Tuple[str, ...] = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "max_steps",
                                   "progress_bar", "logging_steps", "plot", "save_steps", "save_final",
                                   "target_reward", "stop_at_target")
#: What a run writes into output_dir (``overwrite_output_dir`` removes these and nothing else).
RUN_ARTIFACTS = ("metrics.jsonl", "config.json", "reward_curve.png", "final")


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


# --------------------------------------------------------------------------- durable files
def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """Make a rename / new entry in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _torch_save(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _files(root: str) -> Dict[str, int]:
    """``{relative path: size}`` of every file under ``root``."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root).replace(os.sep, "/")] = os.path.getsize(p)
    return out


def _tmp_sibling(path: str) -> str:
    path = os.path.normpath(path)
    return os.path.join(os.path.dirname(path), TMP_PREFIX + os.path.basename(path))


def _publish(tmp: str, final: str) -> None:
    """Rename the finished ``tmp`` directory to ``final``, replacing an existing ``final`` (moved aside first,
    then removed: a crash in between leaves ``final`` absent, never torn), and make the rename durable."""
    _fsync_dir(tmp)
    old = None
    if os.path.lexists(final):
        old = _tmp_sibling(final) + ".old"
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint (``None`` when it is): no completion marker (the save did not
    finish), an unreadable marker, or a file that is missing or has another size than the marker records."""
    marker = os.path.join(path, COMPLETE_FILE)
    if not os.path.isfile(marker):
        return f"no {COMPLETE_FILE} (its save did not finish)"
    try:
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
        files = info["files"]
        world = int(info.get("world_size", 1))
        weights = f"{SHARDED_DIR}/.metadata" if info.get("format") == "fsdp" else MODEL_FILE
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except Exception as e:  # noqa: BLE001 - any damage to the marker means: not complete
        return f"unreadable {COMPLETE_FILE} ({_first_line(e)})"
    for name in (weights, STATE_FILE) + tuple(f"rng_state_{r}.pt" for r in range(world)):
        if name not in files:
            return f"{COMPLETE_FILE} does not list {name}"
    for rel, size in sorted(files.items()):
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            return f"{rel} is missing"
        got = os.path.getsize(p)
        if got != size:
            return f"{rel} has {got} bytes, {size} were written"
    return None


def find_checkpoints(directory: str) -> List[Tuple[int, str]]:
    """``[(step, path)]`` of the ``checkpoint-<step>`` directories of ``directory``, newest first (complete
    or not; ``.tmp-*`` directories of unfinished saves are not listed)."""
    found = []
    for d in glob.glob(os.path.join(glob.escape(directory), "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d))
        if m and os.path.isdir(d):
            found.append((int(m.group(1)), d))
    return sorted(found, reverse=True)


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """``(must-match differences, other differences)`` between a checkpoint's config and this run's, each as
    ``"name: <checkpoint's> -> <this run's>"``; :data:`RESUME_IGNORED` fields and keys missing on either side
    (configs of other versions) are left out."""
    errors, others = [], []
    for k in current:
        if k in RESUME_IGNORED or k not in saved or saved[k] == current[k]:
            continue
        (errors if k in RESUME_MUST_MATCH else others).append(f"{k}: {saved[k]!r} -> {current[k]!r}")
    return errors, others


# --------------------------------------------------------------------------- the output-directory lock
class CheckpointMixin:
    """``save_model``, ``save_checkpoint``, ``latest_checkpoint`` and ``load_checkpoint`` of the trainer."""

    def _barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def _full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """Under FSDP the full model state dict, gathered on rank 0 (a collective: every rank calls this before
        rank 0 writes); None otherwise (``save_pretrained`` reads the model itself)."""
        if not getattr(self, "fsdp", False):
            return None
        from .fsdp import full_model_state_dict

        return full_model_state_dict(self.unwrapped)

    def _write_model(self, path: str, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                     weights: bool = True) -> None:
        """Model (safetensors; from ``state_dict`` when given) and tokenizer into ``path``, every file fsynced (rank
        0 only). ``weights=False``: the model's config only (the weights of an FSDP checkpoint are in its shards)."""
        os.makedirs(path, exist_ok=True)
        if weights:
            self.unwrapped.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
        else:
            self.unwrapped.config.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        for rel in _files(path):
            _fsync_file(os.path.join(path, rel))

    def save_model(self, path: str):
        """The model (safetensors) and tokenizer to ``path`` (rank 0; every rank waits for it). Under FSDP every
        rank must call it: the full weights are gathered on rank 0 first."""
        sd = self._full_state_dict()
        if self.is_main:
            self._write_model(path, sd)
        self._barrier()

    def _save_model_atomic(self, path: str) -> None:
        """:meth:`save_model` into a temporary sibling, renamed to ``path`` when complete (``final/``: a crash
        leaves the previous ``final/`` or the new one, never a torn one)."""
        sd = self._full_state_dict()
        if self.is_main:
            tmp = _tmp_sibling(path)
            if os.path.lexists(tmp):
                shutil.rmtree(tmp)
            self._write_model(tmp, sd)
            _publish(tmp, path)
        self._barrier()

    def save_checkpoint(self, path: Optional[str] = None) -> str:
        """``output_dir/checkpoint-<step>``, written atomically (see the module docstring): model (safetensors)
        + tokenizer + optimizer/scheduler/step/history on rank 0 (under FSDP: the model and optimizer shards of
        every rank, through ``torch.distributed.checkpoint``), every rank's RNG state, then the completion
        marker. Returns the checkpoint's path."""
        fsdp = getattr(self, "fsdp", False)
        path = os.path.normpath(path or os.path.join(self.config.output_dir, f"checkpoint-{self.step}"))
        tmp = _tmp_sibling(path)
        if self.is_main:
            if os.path.lexists(tmp):  # left by a crashed save
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        self._barrier()  # the directory exists for every rank
        if fsdp:  # every rank writes its shard (fsynced); rank 0 the metadata, last
            from .fsdp import save_sharded

            save_sharded(self.unwrapped, self.optimizer, os.path.join(tmp, SHARDED_DIR))
        if self.is_main:
            self._write_model(tmp, weights=not fsdp)
            _torch_save({"step": self.step, "optimizer": None if fsdp else self.optimizer.state_dict(),
                         "scheduler": self.scheduler.state_dict(), "history": self.history,
                         "target_reached": self.target_reached, "config": self.config.to_dict(),
                         "world_size": self.world_size, "fsdp": fsdp,
                         "adaptive_entropy": None if self.adaptive_entropy is None
                         else self.adaptive_entropy.state_dict()}, os.path.join(tmp, STATE_FILE))
        _torch_save(_rng_state(), os.path.join(tmp, f"rng_state_{self.rank}.pt"))
        self._barrier()  # every rank's files are durable before the marker says so
        if self.is_main:
            marker = os.path.join(tmp, COMPLETE_FILE)
            info = {"step": self.step, "world_size": self.world_size, "format": "fsdp" if fsdp else "full",
                    "files": _files(tmp)}
            with open(marker, "w", encoding="utf-8") as f:
                json.dump(info, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _publish(tmp, path)
        self._barrier()  # no rank goes on (or reads it) before the rename
        return path

    def latest_checkpoint(self) -> Optional[str]:
        """The newest complete ``checkpoint-<step>`` directory of ``output_dir`` (None if there is none); each
        newer, incomplete one (a save cut short by a crash, a truncated or missing file) is skipped with a
        warning naming it and what is wrong."""
        for _, d in find_checkpoints(self.config.output_dir):
            problem = checkpoint_problem(d)
            if problem is None:
                return d
            if self.is_main:
                warnings.warn(f"skipping incomplete checkpoint {d}: {problem}", stacklevel=2)
        return None

    def _read_checkpoint_file(self, path: str, name: str, reader: Callable[[str], Any]):
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise ValueError(f"checkpoint {path!r} has no {name}")
        try:
            return reader(p)
        except Exception as e:  # noqa: BLE001 - torch/safetensors raise RuntimeError, EOFError, pickle errors ...
            raise ValueError(f"checkpoint {path!r}: cannot read {name} ({_first_line(e)}); it is damaged, "
                             f"resume from an earlier checkpoint") from e

    def _check_resume_config(self, saved: Optional[Dict[str, Any]], path: str) -> None:
        if not saved:
            return
        errors, others = config_differences(saved, self.config.to_dict())
        if errors:
            raise ValueError(f"checkpoint {path!r} comes from a run with a different config ({'; '.join(errors)}; "
                             f"checkpoint's -> this run's): resume with the same values, or start a new run "
                             f"(another output_dir, or overwrite_output_dir)")
        if others and self.is_main:
            warnings.warn(f"resuming from {path} with a config that differs from the checkpoint's: "
                          f"{'; '.join(others)} (checkpoint's -> this run's; the optimizer and LR schedule continue "
                          f"from the checkpoint's state)", stacklevel=3)

    def load_checkpoint(self, path: str):
        """Restore model weights, optimizer, scheduler, step, metric history and RNG from ``path`` ("latest" = the
        newest complete ``checkpoint-*`` in ``output_dir``); returns the directory restored from.

        Every check comes before anything is changed: the checkpoint is complete (a checkpoint without a
        completion marker, from an older version, is loaded with a warning), readable, of the same world size,
        sharded exactly when this run is (FSDP), and its config agrees with this run's (:data:`RESUME_MUST_MATCH`).
        Under FSDP every rank reads its own shard of the model and optimizer (``torch.distributed.checkpoint``)."""
        if path == "latest":
            p = self.latest_checkpoint()
            if p is None:
                found = find_checkpoints(self.config.output_dir)
                why = (f"{len(found)} incomplete ones were skipped" if found else
                       "checkpoints are written every save_steps (--save-steps N) steps")
                raise ValueError(f"resume_from_checkpoint='latest' but {self.config.output_dir!r} has no complete "
                                 f"checkpoint ({why}); start over with overwrite_output_dir (--overwrite-output-dir)")
            path = p
        if not os.path.isdir(path):
            raise ValueError(f"resume_from_checkpoint: {path!r} is not a checkpoint (no such directory)")
        problem = checkpoint_problem(path)
        if problem is not None:
            if os.path.isfile(os.path.join(path, COMPLETE_FILE)):
                raise ValueError(f"checkpoint {path!r} is incomplete: {problem}; resume from an earlier checkpoint")
            if not os.path.isfile(os.path.join(path, STATE_FILE)):
                raise ValueError(f"resume_from_checkpoint: {path!r} is not a checkpoint (no {STATE_FILE})")
            if self.is_main:
                warnings.warn(f"checkpoint {path} has no {COMPLETE_FILE} (written by an older grpo-kernels, or its "
                              f"save was interrupted); loading it anyway", stacklevel=2)
        from safetensors.torch import load_file

        state = self._read_checkpoint_file(path, STATE_FILE,
                                           lambda p: torch.load(p, map_location="cpu", weights_only=False))
        saved_world, saved_fsdp = int(state.get("world_size", 1)), bool(state.get("fsdp"))
        fsdp = getattr(self, "fsdp", False)
        if saved_world != self.world_size:
            what = " (FSDP-sharded: one shard of the model and optimizer per rank)" if saved_fsdp else ""
            raise ValueError(f"checkpoint {path!r} was written with world_size={saved_world}{what} but this run has "
                             f"world_size={self.world_size}; resume with {saved_world} processes (torchrun "
                             f"--nproc_per_node {saved_world}): the data order depends on the world size")
        if saved_fsdp != fsdp:
            raise ValueError(f"checkpoint {path!r} is " + ("FSDP-sharded (fsdp=True) but this run is not sharded"
                                                           if saved_fsdp else "not sharded but this run uses FSDP")
                             + f"; resume with fsdp={saved_fsdp} (--fsdp {str(saved_fsdp).lower()})")
        self._check_resume_config(state.get("config"), path)
        rng = self._read_checkpoint_file(path, f"rng_state_{self.rank}.pt",
                                         lambda p: torch.load(p, map_location="cpu", weights_only=False))
        if fsdp:
            from .fsdp import load_sharded

            # a collective: every rank got this far (the checks above read the same files on every rank)
            shards = os.path.join(path, SHARDED_DIR)
            if not os.path.isfile(os.path.join(shards, ".metadata")):
                raise ValueError(f"checkpoint {path!r} has no {SHARDED_DIR}/.metadata (its FSDP shards)")
            try:
                load_sharded(self.unwrapped, self.optimizer, shards)
            except Exception as e:  # noqa: BLE001 - DCP raises CheckpointException on every rank when one fails
                raise ValueError(f"checkpoint {path!r}: cannot read {SHARDED_DIR}/ ({_first_line(e)}); it is "
                                 f"damaged, resume from an earlier checkpoint") from e
            self._restore_trainer_state(state, rng)
            return path
        sd = self._read_checkpoint_file(path, MODEL_FILE, lambda p: load_file(p, device=str(self.device)))
        want = set(self.unwrapped.state_dict())
        tied = set(getattr(self.unwrapped, "_tied_weights_keys", None) or [])
        missing, unexpected = sorted(want - set(sd) - tied), sorted(set(sd) - want)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path!r} does not match the model: missing={missing}, unexpected={unexpected}")
        self.unwrapped.load_state_dict(sd, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self._restore_trainer_state(state, rng)
        return path

    def _restore_trainer_state(self, state: Dict[str, Any], rng: Dict[str, Any]) -> None:
        """Scheduler, step, metric history, ``target_reached`` and this rank's RNG streams from a checkpoint."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.target_reached = state.get("target_reached")
        if self.adaptive_entropy is not None and state.get("adaptive_entropy") is not None:
            self.adaptive_entropy.load_state_dict(state["adaptive_entropy"])
        _set_rng_state(rng)
