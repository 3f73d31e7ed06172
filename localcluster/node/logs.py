"""`python -m localcluster.node logs NS POD`: read a container log straight from the state dir.

The fallback when `kubectl logs` cannot reach the node's kubelet API. Logs live at
node/logs/<namespace>/<pod>/<pod uid>/<container>.log; the newest uid wins when a pod name was
reused (a gang restart recreates pods under the same names).
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import hostregistry
from .layout import StateLayout


def find_log(state_dir: Path, namespace: str, pod: str, container: str | None) -> Path:
    logs_root = StateLayout(state_dir).root / "logs"
    pod_dir = logs_root / namespace / pod
    runs = sorted((p for p in pod_dir.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no logs for pod {namespace}/{pod} under {logs_root}")
    files = sorted(runs[-1].glob("*.log"))
    if container:
        chosen = runs[-1] / f"{container}.log"
        if not chosen.exists():
            names = [f.stem for f in files]
            raise FileNotFoundError(f"pod {namespace}/{pod} has no container {container!r}; "
                                    f"choose one of {names}")
        return chosen
    if not files:
        raise FileNotFoundError(f"pod {namespace}/{pod} has not started a container yet")
    return files[0]


def print_logs(namespace: str, pod: str, container: str | None, state_dir: Path | None) -> int:
    if state_dir is None:
        running = hostregistry.live_daemons()
        if len(running) != 1:
            found = [d.state_dir for d in running] or "none"
            print(f"error: pass --state-dir (running process nodes: {found})", file=sys.stderr)
            return 2
        state_dir = Path(running[0].state_dir)
    try:
        path = find_log(state_dir, namespace, pod, container)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(path.read_bytes())
    return 0
