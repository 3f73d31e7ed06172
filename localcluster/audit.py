"""An apiserver audit log of chosen users: who asked the API server for what, counted at the server.

``LocalCluster(audit_policy=write_policy(path, users))`` makes the apiserver write one JSON line
per request of those users (once the response is complete) to ``logs/audit.log``; ``requests``
reads them back. bench/operator_scale.py counts each controller's requests per job with it, and
the operator's tests count its pod creates.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


def write_policy(path: Path, users: Iterable[str]) -> Path:
    """A policy that records only `users`' requests, one entry each, without bodies."""
    policy = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
              "omitStages": ["RequestReceived", "ResponseStarted"],
              "rules": [{"level": "Metadata", "users": list(users)}, {"level": "None"}]}
    path.write_text(yaml.safe_dump(policy))
    return path


def requests(log: Path, user: str, start: float = 0.0, end: float = float("inf")) -> list[dict[str, Any]]:
    """The entries of `user` whose request arrived in [start, end] (epoch seconds)."""
    found: list[dict[str, Any]] = []
    if not log.exists():
        return found
    with log.open() as lines:
        for line in lines:
            if user not in line:
                continue
            entry = json.loads(line)
            if entry.get("user", {}).get("username") != user:
                continue
            received = dt.datetime.fromisoformat(entry["requestReceivedTimestamp"].replace("Z", "+00:00"))
            if start <= received.timestamp() <= end:
                found.append(entry)
    return found


def describe(entry: Mapping[str, Any]) -> str:
    """'verb resource[/subresource][ code]' (the path for a non-resource request); the code only
    when it is not a success."""
    ref = entry.get("objectRef")
    what = entry.get("requestURI", "").split("?")[0] if ref is None else (
        ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else ""))
    code = entry.get("responseStatus", {}).get("code", 200)
    return f"{entry['verb']} {what}" + (f" {code}" if code >= 300 else "")
