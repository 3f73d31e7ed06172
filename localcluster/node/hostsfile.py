"""Cluster DNS as hosts files: which names resolve to which pod IPs, and the per-pod file.

Why hosts files and not a DNS server: glibc (and so Python, torch's c10d store, NCCL's
bootstrap) reads /etc/hosts before DNS, the file needs no daemon port, and rewriting it in
place is instantly visible to every pod that bind-mounted it. The price is that search
domains do not apply to hosts-file lookups, so every short form a pod could use
(`x`, `x.ns`, `x.ns.svc`, `x.ns.svc.cluster.local`) is written out explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True, order=True)
class Record:
    namespace: str
    name: str  # relative to "<ns>.svc", e.g. "job-node-0.job" or "job"
    ip: str


def _is_terminal(pod: Mapping[str, Any]) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def _is_ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions", []))


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def records(pods: Iterable[Mapping[str, Any]], services: Iterable[Mapping[str, Any]]) -> list[Record]:
    """A records as CoreDNS's kubernetes plugin would serve them for headless Services.

    Non-headless Services are left out on purpose: without kube-proxy their ClusterIP
    leads nowhere, and a name that resolves but never connects is worse than NXDOMAIN.
    """
    live = [p for p in pods if p.get("status", {}).get("podIP") and not _is_terminal(p)
            and not p.get("metadata", {}).get("deletionTimestamp")]
    out: set[Record] = set()
    for svc in services:
        spec = svc.get("spec", {})
        if spec.get("clusterIP") != "None":
            continue
        ns = svc["metadata"]["namespace"]
        svc_name = svc["metadata"]["name"]
        publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
        for pod in live:
            meta = pod["metadata"]
            if meta.get("namespace") != ns or not _selects(spec.get("selector") or {},
                                                           meta.get("labels") or {}):
                continue
            if not publish_not_ready and not _is_ready(pod):
                continue
            ip = pod["status"]["podIP"]
            out.add(Record(ns, svc_name, ip))
            pod_spec = pod.get("spec", {})
            if pod_spec.get("subdomain") == svc_name and pod_spec.get("hostname"):
                out.add(Record(ns, f"{pod_spec['hostname']}.{svc_name}", ip))
    return sorted(out)


def names_for(record: Record, viewer_namespace: str) -> list[str]:
    base = f"{record.name}.{record.namespace}"
    names = [f"{base}.svc.{CLUSTER_DOMAIN}", f"{base}.svc", base]
    if record.namespace == viewer_namespace:
        names.append(record.name)
    return names


def render(pod: Mapping[str, Any], pod_ip: str, cluster: Iterable[Record]) -> str:
    """The pod's /etc/hosts: loopback, the pod's own names (as kubelet writes them), then
    the cluster records visible from its namespace."""
    meta = pod["metadata"]
    spec = pod.get("spec", {})
    ns = meta["namespace"]
    hostname = spec.get("hostname") or meta["name"]
    own = [hostname]
    if spec.get("subdomain"):
        fqdn = f"{hostname}.{spec['subdomain']}.{ns}.svc.{CLUSTER_DOMAIN}"
        own = [fqdn, f"{hostname}.{spec['subdomain']}.{ns}.svc", hostname]
    lines = [
        "# Kubernetes-managed hosts file (lorakube process node).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod_ip}\t{' '.join(own)}",
    ]
    for record in cluster:
        lines.append(f"{record.ip}\t{' '.join(names_for(record, ns))}")
    for alias in spec.get("hostAliases") or []:
        lines.append(f"{alias['ip']}\t{' '.join(alias.get('hostnames', []))}")
    return "\n".join(lines) + "\n"


RESOLV_CONF = (
    "# lorakube process node: cluster names come from /etc/hosts; there is no DNS server,\n"
    "# so an unknown name fails fast instead of timing out.\n"
    "nameserver 127.0.0.1\n"
    "options timeout:1 attempts:1\n"
)


def write_in_place(path: Path, content: str) -> bool:
    """Rewrite without replacing the inode: pods see the file through a bind mount of that
    inode, so a rename would leave them reading the old one. Returns whether it changed.

    New content is written before truncating, so a concurrent reader never sees an empty file.
    """
    data = content.encode()
    try:
        with open(path, "rb") as current:
            if current.read() == data:
                return False
    except FileNotFoundError:
        path.write_bytes(data)
        return True
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    return True
