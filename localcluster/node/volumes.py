"""Volumes as host directories, and how each container mounts them.

emptyDir lives under the pod's state directory, a PersistentVolumeClaim under a per-claim
directory that outlives pods (so checkpoints survive a gang restart, as a real PV would),
hostPath is the path itself, and configMap / secret / downwardAPI / projected sources
(including ServiceAccount tokens from the TokenRequest API) are written out as files.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import podspec
from .kubeapi import ApiError, KubeApi
from .podspec import NotReadyYet, PodSpecError

TOKEN_TTL_SECONDS = 3600
IMPLICIT_SA_VOLUME = "kube-api-access-node"


@dataclass
class TokenFile:
    """A projected token kept fresh: rewritten once 80% of its lifetime has passed."""

    path: Path
    service_account: str
    audience: str | None
    ttl: int
    refresh_at: float = 0.0


@dataclass
class PodVolumes:
    paths: dict[str, Path] = field(default_factory=dict)
    tokens: list[TokenFile] = field(default_factory=list)


def _write_file(path: Path, data: bytes, mode: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)  # the bind mount is of the directory, so a rename is visible


class VolumeBuilder:
    def __init__(self, api: KubeApi, pvc_root: Path, node_allocatable: Mapping[str, str]) -> None:
        self._api = api
        self._pvc_root = pvc_root
        self._allocatable = node_allocatable

    # -- object lookups -------------------------------------------------------------------

    def object_data(self, namespace: str, kind: str, name: str) -> dict[str, bytes] | None:
        """All keys of a ConfigMap or Secret as bytes, None if the object does not exist."""
        plural = "configmaps" if kind == "configMap" else "secrets"
        try:
            obj = self._api.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()} if kind == "configMap" \
            else {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        if kind == "configMap":
            out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def request_token(self, pod: Mapping[str, Any], token: TokenFile) -> None:
        meta = pod["metadata"]
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": token.ttl,
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                        "name": meta["name"], "uid": meta["uid"]}},
        }
        if token.audience:
            body["spec"]["audiences"] = [token.audience]
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{token.service_account}/token"
        try:
            answer = self._api.create(path, body)
        except ApiError as exc:
            if exc.status == 404:
                raise NotReadyYet(
                    f"ServiceAccount {meta['namespace']}/{token.service_account} not found"
                ) from exc
            raise
        _write_file(token.path, answer["status"]["token"].encode(), 0o644)
        granted = int(answer["spec"].get("expirationSeconds") or token.ttl)
        token.refresh_at = time.time() + 0.8 * granted

    # -- materialisation ------------------------------------------------------------------

    def build(self, pod: Mapping[str, Any], pod_dir: Path, ca_pem: bytes) -> PodVolumes:
        result = PodVolumes()
        volumes = list(pod.get("spec", {}).get("volumes") or [])
        if any(podspec.wants_implicit_sa_mount(pod, c) for c in podspec.all_containers(pod)):
            volumes.append(_implicit_sa_volume())
        for volume in volumes:
            name = volume["name"]
            result.paths[name] = self._build_one(pod, volume, pod_dir / "volumes" / name,
                                                 result, ca_pem)
        return result

    def _build_one(self, pod: Mapping[str, Any], volume: Mapping[str, Any], target: Path,
                   result: PodVolumes, ca_pem: bytes) -> Path:
        name = volume["name"]
        ns = pod["metadata"]["namespace"]
        if "emptyDir" in volume:
            target.mkdir(parents=True, exist_ok=True)
            return target
        if "hostPath" in volume:
            return _host_path(name, volume["hostPath"])
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"].get("claimName", "")
            path = self._pvc_root / ns / claim
            path.mkdir(parents=True, exist_ok=True)
            return path
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume or "secret" in volume:
            kind = "configMap" if "configMap" in volume else "secret"
            src = volume[kind]
            src_name = src.get("name") if kind == "configMap" else src.get("secretName")
            self._write_keys(self.object_data(ns, kind, src_name or ""), ns, kind, src_name, src,
                             target, f"volumes[{name}].{kind}")
            return target
        if "downwardAPI" in volume:
            self._write_downward(pod, volume["downwardAPI"], target)
            return target
        if "projected" in volume:
            projected = volume["projected"]
            for index, source in enumerate(projected.get("sources") or []):
                where = f"volumes[{name}].projected.sources[{index}]"
                if "serviceAccountToken" in source:
                    spec = source["serviceAccountToken"]
                    token = TokenFile(
                        path=target / spec.get("path", "token"),
                        service_account=podspec.service_account_name(pod),
                        audience=spec.get("audience"),
                        ttl=max(600, int(spec.get("expirationSeconds") or TOKEN_TTL_SECONDS)),
                    )
                    self.request_token(pod, token)
                    result.tokens.append(token)
                elif "configMap" in source or "secret" in source:
                    kind = "configMap" if "configMap" in source else "secret"
                    src = source[kind]
                    data = self.object_data(ns, kind, src.get("name") or "")
                    if data is None and (kind, src.get("name")) == ("configMap", "kube-root-ca.crt"):
                        # Without the root-CA publisher the kubeconfig's CA is the same file.
                        _write_file(target / "ca.crt", ca_pem, None)
                        continue
                    self._write_keys(data, ns, kind, src.get("name"), src, target, where)
                elif "downwardAPI" in source:
                    self._write_downward(pod, source["downwardAPI"], target)
                elif "_implicitCA" in source:
                    _write_file(target / "ca.crt", ca_pem, None)
                else:
                    raise PodSpecError(f"{where}: unsupported projection {sorted(source)}")
            return target
        kinds = sorted(k for k in volume if k != "name")
        raise PodSpecError(
            f"volumes[{name}]: volume type {kinds} is not supported by the process node; use "
            "emptyDir, hostPath, persistentVolumeClaim, configMap, secret, downwardAPI or projected"
        )

    @staticmethod
    def _write_keys(data: Mapping[str, bytes] | None, ns: str, kind: str, obj_name: str | None,
                    src: Mapping[str, Any], target: Path, where: str) -> None:
        """Write a ConfigMap's or Secret's keys (``data``; None when the object is missing)."""
        if data is None:
            if src.get("optional"):
                return
            raise NotReadyYet(f"{where}: {kind} {ns}/{obj_name} not found")
        items = src.get("items")
        default_mode = src.get("defaultMode")
        if items:
            for item in items:
                if item["key"] not in data:
                    if src.get("optional"):
                        continue
                    raise NotReadyYet(f"{where}: key {item['key']!r} not in {kind} {obj_name}")
                _write_file(target / item["path"], data[item["key"]], item.get("mode", default_mode))
        else:
            for key, value in data.items():
                _write_file(target / key, value, default_mode)

    def _write_downward(self, pod: Mapping[str, Any], spec: Mapping[str, Any], target: Path) -> None:
        containers = {c["name"]: c for c in podspec.all_containers(pod)}
        for item in spec.get("items") or []:
            if "fieldRef" in item:
                value = podspec.field_value(pod, item["fieldRef"].get("fieldPath", ""))
            else:
                ref = item.get("resourceFieldRef", {})
                container = containers.get(ref.get("containerName", ""), {})
                value = podspec.resource_value(container, ref, self._allocatable)
            _write_file(target / item["path"], value.encode(), item.get("mode"))


def _implicit_sa_volume() -> dict[str, Any]:
    # What the ServiceAccount admission plugin would have added (token + CA + namespace).
    return {"name": IMPLICIT_SA_VOLUME, "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_TTL_SECONDS}},
        {"_implicitCA": {}},
        {"downwardAPI": {"items": [{"path": "namespace",
                                    "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
    ]}}


def _host_path(name: str, spec: Mapping[str, Any]) -> Path:
    path = Path(spec.get("path", ""))
    kind = spec.get("type") or ""
    if not path.is_absolute():
        raise PodSpecError(f"volumes[{name}].hostPath.path must be absolute, got {str(path)!r}")
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "FileOrCreate":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    elif kind == "Directory" and not path.is_dir():
        raise NotReadyYet(f"volumes[{name}].hostPath: {path} is not a directory")
    elif kind == "File" and not path.is_file():
        raise NotReadyYet(f"volumes[{name}].hostPath: {path} is not a file")
    elif kind == "" and not path.exists():
        path.mkdir(parents=True, exist_ok=True)  # as the docker-era default did
    return path


def container_mounts(container: Mapping[str, Any], volumes: PodVolumes,
                     wants_sa: bool) -> list[dict[str, object]]:
    """Bind mounts for one container, as the launcher takes them."""
    mounts: list[dict[str, object]] = []
    cname = container.get("name")
    for m in container.get("volumeMounts") or []:
        name = m.get("name")
        if name not in volumes.paths:
            raise PodSpecError(f"containers[{cname}].volumeMounts[{name}]: no volume named {name!r}")
        src = volumes.paths[name]
        if m.get("subPath"):
            src = src / m["subPath"]
            if not src.exists():
                src.mkdir(parents=True)
        mounts.append({"src": str(src), "dst": m["mountPath"],
                       "readOnly": bool(m.get("readOnly"))})
    if wants_sa:
        mounts.append({"src": str(volumes.paths[IMPLICIT_SA_VOLUME]), "dst": podspec.SA_MOUNT_PATH,
                       "readOnly": True})
    return mounts
