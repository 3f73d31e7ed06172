"""Leave the host as it was: pod processes, namespaces, veths, the bridge, mount points.

Mounts need no unmounting: every pod mount lives in a private mount namespace that the
kernel frees with the pod's last process. Used on daemon start (after a crash) and by
stop_node_daemon after the daemon has exited, whatever state it left.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from . import lock, network
from .layout import StateLayout
from .runtime import kill_recorded

log = logging.getLogger(__name__)


def sweep(state_dir: Path) -> None:
    layout = StateLayout(state_dir)
    killed = sum(kill_recorded(record) for record in layout.process_records())
    if killed:
        log.warning("killed %d leftover pod processes", killed)
        time.sleep(0.2)  # let the kernel tear their mount namespaces down
    owner = lock.holder()
    if owner is not None and owner.get("state_dir") != str(state_dir):
        # Another daemon owns the pod network now; its bridge and pods are not ours to remove.
        log.warning("not touching the pod network: it belongs to %s", owner)
        return
    network.teardown_all()
    if layout.ipam.exists():
        network.Ipam(layout.ipam).clear()
    remove_created_mountpoints(layout)


def remove_created_mountpoints(layout: StateLayout) -> None:
    # Deepest first, and only if still empty: a directory that got content is not ours.
    for path in sorted(layout.created_mountpoints(), key=lambda p: p.count("/"), reverse=True):
        try:
            Path(path).rmdir()
        except OSError:
            pass
        try:
            if Path(path).is_file() and Path(path).stat().st_size == 0:
                Path(path).unlink()
        except OSError:
            pass
    layout.mountpoints.unlink(missing_ok=True)
