"""Kubeconfig files with the credentials embedded, so one file is all a client needs."""

from __future__ import annotations

import base64
from pathlib import Path

import yaml


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def render(server: str, ca_file: Path, user: str, credentials: dict[str, str],
           cluster_name: str = "lorakube-local") -> dict:
    context = f"{user}@{cluster_name}"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": cluster_name,
            "cluster": {"server": server, "certificate-authority-data": _b64(ca_file)},
        }],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": context, "context": {"cluster": cluster_name, "user": user}}],
        "current-context": context,
    }


def write_for_cert(path: Path, server: str, ca_file: Path, user: str,
                   cert: Path, key: Path) -> Path:
    credentials = {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)}
    return _write(path, render(server, ca_file, user, credentials))


def write_for_token(path: Path, server: str, ca_file: Path, user: str, token: str) -> Path:
    return _write(path, render(server, ca_file, user, {"token": token}))


def _write(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)  # holds a private key or a bearer token
    return path
