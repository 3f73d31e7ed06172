"""A small JSON client for the kube-apiserver: get/list/create/patch/delete and watch streams.

The node works on plain dicts (the wire format) rather than the generated model classes, so
field names match the API docs one to one and patches stay readable. Authentication and TLS
come from the kubeconfig via the official client's loader, so every auth form it supports works.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer from the apiserver; `status` is the HTTP code, `body` the decoded Status."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Endpoint:
    """Where the apiserver listens, as the kubeconfig says (used by the in-cluster forwarder)."""

    host: str
    port: int
    ca_pem: bytes


class KubeApi:
    def __init__(self, kubeconfig: Path) -> None:
        cfg = k8s_client.Configuration()
        k8s_config.load_kube_config(
            config_file=str(kubeconfig), client_configuration=cfg, persist_config=False
        )
        self._base = cfg.host.rstrip("/")
        self._headers: dict[str, str] = {"Accept": "application/json"}
        token = cfg.api_key.get("authorization") if cfg.api_key else None
        if token:
            self._headers["Authorization"] = token
        self._pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=20,  # informers, setup workers and the writers share it
            cert_reqs=ssl.CERT_REQUIRED if cfg.verify_ssl else ssl.CERT_NONE,
            ca_certs=cfg.ssl_ca_cert,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
        )
        parsed = urllib.parse.urlsplit(self._base)
        ca_pem = Path(cfg.ssl_ca_cert).read_bytes() if cfg.ssl_ca_cert else b""
        self.endpoint = Endpoint(
            host=parsed.hostname or "127.0.0.1", port=parsed.port or 443, ca_pem=ca_pem
        )

    def _url(self, path: str, params: dict[str, Any] | None) -> str:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return self._base + path + ("?" + urllib.parse.urlencode(query) if query else "")

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Any:
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        resp = self._pool.request(
            method,
            self._url(path, params),
            body=data,
            headers=headers,
            timeout=urllib3.Timeout(connect=5.0, read=timeout),
            retries=False,
        )
        decoded = _decode(resp.data) if resp.data else None
        if resp.status >= 300:
            raise ApiError(method, path, resp.status, decoded)
        return decoded

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def create(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body=body)

    def patch(self, path: str, body: dict[str, Any], *, strategic: bool = False) -> Any:
        kind = STRATEGIC_MERGE_PATCH if strategic else MERGE_PATCH
        return self.request("PATCH", path, body=body, content_type=kind)

    def delete(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("DELETE", path, body=body)

    def watch(self, path: str, resource_version: str,
              timeout_seconds: int = 240) -> Iterator[dict[str, Any]]:
        """Yield watch events until the server closes the stream (normal after timeout_seconds).

        Raises ApiError(410) when the resourceVersion is too old; the caller relists.
        """
        query = {"watch": "true", "resourceVersion": resource_version,
                 "timeoutSeconds": timeout_seconds, "allowWatchBookmarks": "true"}
        resp = self._pool.request(
            "GET",
            self._url(path, query),
            headers=self._headers,
            preload_content=False,
            timeout=urllib3.Timeout(connect=5.0, read=timeout_seconds + 30),
            retries=False,
        )
        try:
            if resp.status >= 300:
                raise ApiError("WATCH", path, resp.status, _decode(resp.read()))
            buffer = b""
            for chunk in resp.stream(64 * 1024, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object", {})
                        raise ApiError("WATCH", path, int(status.get("code", 500)), status)
                    yield event
        finally:
            resp.release_conn()


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
