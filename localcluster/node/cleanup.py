"""Leave the host as it was: pod processes, namespaces, veths, the bridge, mount points.

Mounts need no unmounting: every pod mount lives in a private mount namespace that the
kernel frees with the pod's last process. Used on daemon start (after a crash) and by
stop_node_daemon after the daemon has exited, whatever state it left. Other daemons'
pods are never touched; the bridge goes only when no other daemon is alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterable
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
    hostregistry.release_owner(state_dir, network.remove_pod_nets)
    abandoned = hostregistry.release_abandoned(network.remove_pod_nets)
    if abandoned:
        log.warning("removed pods of crashed daemons whose state is gone: %s", abandoned)
    with hostregistry.network_lock():
        if not hostregistry.other_daemons(state_dir):
            network.delete_bridge_if_unused()
    # Daemons before the host-wide list kept their own; hand it over.
    remove_unused_mountpoints(extra=layout.created_mountpoints())
    layout.mountpoints.unlink(missing_ok=True)


def remove_unused_mountpoints(extra: Iterable[str] = ()) -> list[str]:
    """Remove the mount points launchers created on the host that no pod uses any more, of
    any daemon; returns the removed paths.

    Since Linux 3.18 `rmdir` of a directory that is a mount point in *another* mount
    namespace succeeds and silently detaches that mount there: removing `/data` on the
    host would empty `/data` inside a running pod of another cluster. So a path goes only
    when no mount namespace on the host has a mount at or below it, and that is decided
    under the lock the launcher holds (shared) from creating a mount point until its mount
    exists."""
    removed = []
    with hostregistry.mountpoints_lock():
        created = sorted(set(hostregistry.created_mountpoints()) | set(extra))
        if not created:
            return []
        mounted = mounted_paths()
        kept: list[str] = []
        # Deepest first, so a created parent is empty once its created children are gone.
        for path in sorted(created, key=lambda p: p.count("/"), reverse=True):
            target = Path(path)
            if not os.path.lexists(target):
                continue  # already gone
            # mountinfo names mount points with symlinks resolved (`/var/run` is `/run`).
            if is_busy(os.path.realpath(path), mounted) or any(is_below(k, path) for k in kept):
                kept.append(path)  # in use now: the next cleanup (of any daemon) retries
                continue
            with contextlib.suppress(OSError):
                # Only if still empty: a directory that got content is not ours any more.
                if target.is_dir() and not target.is_symlink():
                    target.rmdir()
                elif target.is_file() and target.stat().st_size == 0:
                    target.unlink()
            if not os.path.lexists(target):
                removed.append(path)
        hostregistry.keep_created_mountpoints(kept)
    return removed


def is_below(path: str, ancestor: str) -> bool:
    return path != ancestor and path.startswith(ancestor.rstrip("/") + "/")


def is_busy(path: str, mounted: Iterable[str]) -> bool:
    """Whether some mount sits at `path` or below it (then removing `path` would detach it)."""
    return any(m == path or is_below(m, path) for m in mounted)


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def mountinfo_mount_points(text: str) -> set[str]:
    """The mount points (5th field, octal escapes decoded) of a /proc/PID/mountinfo."""
    points = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.add(_OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def mounted_paths() -> set[str]:
    """Mount points of every mount namespace that has a process on this host (each
    namespace read once). Pods do not chroot, so their paths are host paths."""
    seen: set[str] = set()
    points: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            namespace = os.readlink(proc / "ns" / "mnt")
            if namespace in seen:
                continue
            text = (proc / "mountinfo").read_text()
        except OSError:
            continue  # exited meanwhile (and took its namespace's last reference, or not)
        seen.add(namespace)
        points |= mountinfo_mount_points(text)
    return points
