"""Where the node keeps things: `<state dir>/node/...` (one place, so cleanup finds all).

The subdirectory lets the control plane hand the node its own cluster state directory.
"""

from __future__ import annotations

import json
from pathlib import Path


class StateLayout:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "node"
        for sub in ("pods", "logs", "pvcs", "certs", "procs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def pidfile(self) -> Path:
        return self.root / "daemon.pid"

    @property
    def daemon_log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def ready_marker(self) -> Path:
        return self.root / "daemon.ready"

    @property
    def pvcs(self) -> Path:
        return self.root / "pvcs"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def mountpoints(self) -> Path:  # written by older daemons only
        return self.root / "created-mountpoints.json"

    def pod_dir(self, uid: str) -> Path:
        return self.root / "pods" / uid

    def hosts(self, uid: str) -> Path:
        return self.pod_dir(uid) / "etc" / "hosts"

    def resolv_conf(self, uid: str) -> Path:
        return self.pod_dir(uid) / "etc" / "resolv.conf"

    def log_dir(self, namespace: str, pod: str, uid: str) -> Path:
        return self.root / "logs" / namespace / pod / uid

    def process_record(self, uid: str, container: str) -> Path:
        # Outside the pod dir: it must survive until the process is confirmed gone.
        return self.root / "procs" / f"{uid}_{container}.json"

    def process_records(self) -> list[Path]:
        return sorted((self.root / "procs").glob("*.json"))

    def created_mountpoints(self) -> list[str]:
        """Mount points an older daemon recorded here; the list is host-wide now (see
        hostregistry.MOUNTPOINTS_FILE) and cleanup folds this one into it."""
        if not self.mountpoints.exists():
            return []
        return list(json.loads(self.mountpoints.read_text()))
