"""Record every version of the objects a test creates, as a watch sees them, for fixtures.

The e2e tests use it (opt-in, ``LORAKUBE_RECORD_STATUSES``) to capture real LoRATrainingJob
statuses for tests that must read what the operator really writes (the Argo CD health check).
Only what such tests need is kept: apiVersion, kind, metadata name and generation, spec and
status; local paths (``scrub``) are replaced by neutral ones so the files can be committed.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def trim(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
            "metadata": {"name": meta.get("name"), "generation": meta.get("generation")},
            "spec": obj.get("spec"), "status": obj.get("status")}


def scrubbed(text: str, scrub: Mapping[str, str]) -> str:
    # Longest first, so a path inside another replaced one is replaced whole.
    for local, neutral in sorted(scrub.items(), key=lambda item: -len(item[0])):
        text = text.replace(local, neutral)
    return text


class WatchRecorder:
    """`kubectl get <resource> -n <namespace> --watch -o json` in the background; each version whose
    trimmed form changed (not just annotations, finalizers or resourceVersion) is written as
    ``<nnn>-<name>-<phase>.json`` into `folder` (phase ``NoStatus`` before any status)."""

    def __init__(self, kubectl: Path, kubeconfig: Path, resource: str, namespace: str, folder: Path,
                 scrub: Mapping[str, str]) -> None:
        self.folder = folder
        self.scrub = dict(scrub)
        self.written: list[Path] = []
        self._last: dict[str, str] = {}
        folder.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [str(kubectl), "--kubeconfig", str(kubeconfig), "get", resource, "-n", namespace,
             "--watch", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        # kubectl prints each object as indented JSON whose closing brace is alone on its line.
        assert self._process.stdout is not None
        lines: list[str] = []
        for line in self._process.stdout:
            lines.append(line)
            if line.rstrip("\n") == "}":
                self.record(json.loads("".join(lines)))
                lines = []

    def record(self, obj: Mapping[str, Any]) -> Path | None:
        trimmed = trim(obj)
        name = trimmed["metadata"]["name"]
        text = scrubbed(json.dumps(trimmed, indent=2, sort_keys=True) + "\n", self.scrub)
        if self._last.get(name) == text:
            return None
        self._last[name] = text
        phase = (trimmed["status"] or {}).get("phase", "NoStatus")
        path = self.folder / f"{len(self.written) + 1:03d}-{name}-{phase}.json"
        path.write_text(text)
        self.written.append(path)
        return path

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
        self._thread.join(timeout=10)
