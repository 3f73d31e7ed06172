"""One process node per host: the bridge, the pod subnet and 10.250.0.1:6443 are host-wide."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO

LOCK_PATH = Path("/run/lorakube/process-node.lock")


class NodeBusyError(RuntimeError):
    pass


def holder() -> dict[str, object] | None:
    """Who holds the lock now ({pid, state_dir}), or None if it is free."""
    if not LOCK_PATH.exists():
        return None
    with open(LOCK_PATH, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                return json.loads(f.read() or "{}")
            except ValueError:
                return {}
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def acquire(state_dir: Path) -> IO[str]:
    """Take the lock for this process's lifetime (the kernel drops it when we exit)."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    f = open(LOCK_PATH, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read()
        f.close()
        raise NodeBusyError(busy_message(owner)) from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "state_dir": str(state_dir)}))
    f.flush()
    return f


def busy_message(owner: object) -> str:
    return (f"another lorakube process node owns the pod network ({owner}); stop it first with "
            "`python -m localcluster.node stop --state-dir DIR` (its state dir is shown here)")
