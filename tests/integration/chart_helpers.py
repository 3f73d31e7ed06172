"""What the chart tests share: helm runs with the cluster's binary, rendering, and parsing."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lorakube"
MONITORING_API = "monitoring.coreos.com/v1/ServiceMonitor"


def helm(local_cluster, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(local_cluster.helm_path), *args], capture_output=True, text=True, timeout=timeout,
                            env={"KUBECONFIG": str(local_cluster.kubeconfig), "PATH": "/usr/bin:/bin",
                                 "HOME": str(local_cluster.state_dir), "HELM_CACHE_HOME": str(local_cluster.state_dir / "helm-cache"),
                                 "HELM_CONFIG_HOME": str(local_cluster.state_dir / "helm-config"),
                                 "HELM_DATA_HOME": str(local_cluster.state_dir / "helm-data")})
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}\n{result.stdout[-2000:]}")
    return result


def set_args(values: dict[str, Any]) -> list[str]:
    """--set-json per top-level key: exact types, no string coercion."""
    import json

    return [arg for key, value in values.items() for arg in ("--set-json", f"{key}={json.dumps(value)}")]


def render(local_cluster, values: dict[str, Any] | None = None, *extra: str, release: str = "lorakube",
           namespace: str = "lorakube-system") -> list[dict[str, Any]]:
    out = helm(local_cluster, "template", release, str(CHART), "-n", namespace, *set_args(values or {}), *extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for doc in by_kind(docs, kind) if name is None or doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]
