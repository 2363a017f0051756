"""The guarded ``output_dir``: :class:`OutputDirLock` keeps two runs out of one directory, and
:class:`OutputDirMixin` refuses a directory that holds another run's files unless the run resumes it
(``resume_from_checkpoint``) or replaces it (``overwrite_output_dir``).

The lock is ``output_dir/.lock``, created exclusively, holding the pid and host of the run; a lock whose pid is
dead (or a zombie) is stale and taken over with a note. Under DDP only rank 0 takes it, and every rank raises the
same error when it cannot be had. The mixin reads the trainer's ``config``, ``is_main`` and ``world_size``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from typing import Optional, Tuple

import torch.distributed as dist

from .checkpoint import LOCK_FILE, RUN_ARTIFACTS, TMP_PREFIX


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


_HELD_LOCKS: set = set()  # lock files held by this process (a lock naming our own pid but not here is stale)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:  # pragma: no cover - platforms without signal 0
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is not running
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class OutputDirLock:
    """``<output_dir>/.lock``, created with ``O_CREAT | O_EXCL`` and holding ``<pid>\\n<hostname>\\n`` of the run.

    :meth:`acquire` raises ``ValueError`` naming the holder when another live process holds it; a lock whose
    process is gone (same host, pid not running, e.g. after ``kill -9``) is stale and taken over with a note on
    stderr. A lock from another host cannot be checked and counts as held (the message says which file to
    remove). :meth:`release` removes the file if it is still ours.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.abspath(os.path.join(directory, LOCK_FILE))
        self.held = False

    def _holder(self) -> Optional[Tuple[int, str]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().split()
            return int(lines[0]), (lines[1] if len(lines) > 1 else socket.gethostname())
        except (OSError, ValueError, IndexError):
            return None

    def acquire(self) -> "OutputDirLock":
        import time

        host = socket.gethostname()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    try:
                        age = time.time() - os.path.getmtime(self.path)
                    except OSError:
                        continue  # just released
                    if age < 5:  # being written by a process that just created it
                        raise ValueError(f"output_dir {self.directory!r} is being locked by another run "
                                         f"({self.path} was just created)") from None
                    print(f"note: removing the unreadable lock file {self.path}", file=sys.stderr)
                else:
                    pid, their_host = holder
                    ours = pid == os.getpid() and their_host == host
                    if their_host != host:
                        raise ValueError(f"output_dir {self.directory!r} is locked by process {pid} on host "
                                         f"{their_host!r} ({self.path}); if that run is gone, delete the lock file")
                    if (ours and self.path in _HELD_LOCKS) or (not ours and _pid_alive(pid)):
                        who = "this process (another trainer in it)" if ours else f"process {pid}"
                        raise ValueError(f"output_dir {self.directory!r} is in use by another run: {who} holds "
                                         f"{self.path}; wait for it to finish or choose another output_dir")
                    print(f"note: taking over the stale lock {self.path} of process {pid}, which is no longer "
                          f"running", file=sys.stderr)
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(f"{os.getpid()}\n{host}\n")
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            _HELD_LOCKS.add(self.path)
            return self
        raise ValueError(f"could not lock output_dir {self.directory!r} ({self.path} keeps changing)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD_LOCKS.discard(self.path)
        holder = self._holder()
        if holder is not None and holder[0] == os.getpid():
            try:
                os.unlink(self.path)
            except FileNotFoundError:  # pragma: no cover
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# --------------------------------------------------------------------------- the mixin


class OutputDirMixin:
    """``_guard_output_dir`` (called by ``train``) and ``_check_output_dir``."""

    def _guard_output_dir(self):
        """Rank 0 takes the output-directory lock and checks the directory; every rank raises the same
        ``ValueError`` if that fails (so no rank is left waiting at a collective). Returns the lock (rank 0)."""
        lock, error = None, None
        if self.is_main:
            try:
                lock = self._check_output_dir()
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
                error = e
        if self.world_size > 1 and dist.is_initialized():
            msg = [None if error is None else str(error)]
            dist.broadcast_object_list(msg, src=0)
            if msg[0] is not None and error is None:
                raise ValueError(f"rank 0: {msg[0]}")
        if error is not None:
            raise error
        return lock

    def _check_output_dir(self) -> OutputDirLock:
        cfg = self.config
        out = cfg.output_dir
        os.makedirs(out, exist_ok=True)
        lock = OutputDirLock(out).acquire()
        try:
            entries = sorted(os.listdir(out))
            ours = [e for e in entries if e in RUN_ARTIFACTS or re.fullmatch(r"checkpoint-\d+", e)
                    or e.startswith(TMP_PREFIX)]
            same_run = getattr(self, "_run_dir", None) == os.path.abspath(out)  # train() again on this trainer
            if ours and not cfg.resume_from_checkpoint and not same_run:
                if not cfg.overwrite_output_dir:
                    shown = ", ".join(ours[:4]) + (", ..." if len(ours) > 4 else "")
                    raise ValueError(f"output_dir {out!r} already holds a run ({shown}); continue it with "
                                     f"resume_from_checkpoint='latest' (--resume), or replace it with "
                                     f"overwrite_output_dir=True (--overwrite-output-dir)")
                for e in ours:
                    _remove(os.path.join(out, e))
                print(f"note: overwrite_output_dir: removed the previous run's files from {out} ({len(ours)} "
                      f"entries)", file=sys.stderr)
            for e in os.listdir(out):  # what saves cut short by a crash left: nothing reads it
                if e.startswith(TMP_PREFIX):
                    _remove(os.path.join(out, e))
        except BaseException:
            lock.release()
            raise
        self._run_dir = os.path.abspath(out)
        return lock
