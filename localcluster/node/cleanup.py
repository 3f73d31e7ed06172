"""Leave the host as it was: pod processes, namespaces, veths, the bridge, mount points.

Mounts need no unmounting: every pod mount lives in a private mount namespace that the
kernel frees with the pod's last process. Used on daemon start (after a crash) and by
stop_node_daemon after the daemon has exited, whatever state it left. Other daemons'
pods are never touched; the bridge goes only when no other daemon is alive.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from . import hostregistry, network
from .layout import StateLayout
from .runtime import kill_recorded

log = logging.getLogger(__name__)


def sweep(state_dir: Path) -> None:
    layout = StateLayout(state_dir)
    killed = sum(kill_recorded(record) for record in layout.process_records())
    if killed:
        log.warning("killed %d leftover pod processes", killed)
        time.sleep(0.2)  # let the kernel tear their mount namespaces down
    network.remove_pod_nets(hostregistry.release_owner(state_dir))
    abandoned = hostregistry.release_abandoned()
    if abandoned:
        log.warning("removed pods of crashed daemons whose state is gone: %s", abandoned)
        network.remove_pod_nets(abandoned)
    with hostregistry.network_lock():
        if not hostregistry.other_daemons(state_dir):
            network.delete_bridge_if_unused()
    remove_created_mountpoints(layout)


def remove_created_mountpoints(layout: StateLayout) -> None:
    # Deepest first, and only if still empty: a directory that got content is not ours.
    for path in sorted(layout.created_mountpoints(), key=lambda p: p.count("/"), reverse=True):
        target = Path(path)
        with contextlib.suppress(OSError):
            if target.is_dir():
                target.rmdir()
            elif target.is_file() and target.stat().st_size == 0:
                target.unlink()
    layout.mountpoints.unlink(missing_ok=True)
