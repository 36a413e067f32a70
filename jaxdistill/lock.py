"""One training run per workdir: a lock file holding the owner's host, pid and start time.

`<workdir>/run.lock` is created atomically (O_CREAT | O_EXCL). A lock left behind by a process that
died (SIGKILL, a lost machine) is stale when it names this host and its pid is gone or belongs to a
newer process (the pid's start time differs); it is then replaced with a warning. A lock held from
another host cannot be checked from here: the error says whose it is and how to remove it. In a
multi-host run only process 0 takes the lock (on shared storage the others would see it as
taken) and tells the others whether it got it, so every process fails together.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from absl import logging

from jaxdistill.errors import WorkdirLockedError

LOCK_NAME = "run.lock"


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    started = owner.get("proc_start")
    return started is None or _process_start_time(pid) in (None, started)


def _owner_text(owner: dict) -> str:
    return (f"host {owner.get('host')}, pid {owner.get('pid')}, started "
            f"{owner.get('started', '?')}")


def acquire(workdir: str) -> str:
    """Takes `<workdir>/run.lock` for this process; raises WorkdirLockedError if a live run has it.

    Returns the lock's path.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "proc_start": _process_start_time(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is None:  # being written right now, or garbage from a crash
                time.sleep(0.2)
                owner = _read(path)
            if owner is not None and owner.get("host") != me["host"]:
                raise WorkdirLockedError(
                    f"workdir {workdir} is locked by a run on another machine ({_owner_text(owner)}):"
                    f" use another --workdir, or delete {path} if that run is dead") from None
            if owner is not None and _alive(owner):
                raise WorkdirLockedError(
                    f"workdir {workdir} is in use by another run ({_owner_text(owner)}): wait for "
                    "it to finish or use another --workdir") from None
            logging.warning("replacing the stale lock %s (%s is gone)", path,
                            _owner_text(owner or {}))
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise WorkdirLockedError(f"workdir {workdir}: could not take {path}; another run keeps "
                             "creating it: use another --workdir")


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


def release(path: str) -> None:
    """Removes the lock if this process still owns it."""
    owner = _read(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def held(workdir: str):
    """Holds the workdir lock for the duration of the block (process 0 takes it for all)."""
    import jax

    path, error = None, None
    if jax.process_index() == 0:
        try:
            path = acquire(workdir)
        except WorkdirLockedError as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(failed) and error is None:
            error = WorkdirLockedError(f"workdir {workdir} is in use by another run (process 0 "
                                       "could not take its lock): use another --workdir")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if path is not None:
            release(path)
