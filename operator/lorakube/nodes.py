"""Bad-node avoidance: which node a failed attempt blames, and the exclusion its successor carries.

Pure functions over what `kube.observe` gathered (pod views, log tails, the state of the nodes
of failed pods). A failure is blamed on a node only on evidence that points at the machine, not
at the job: its node went NotReady or vanished, the kubelet refused the pod at admission (a
device plugin that lost its GPUs), the kernel driver logged an Xid or an uncorrectable ECC error,
or a collective (NCCL, gloo, the rendezvous store) timed out on a peer the message names, which
blames the peer's node. The next attempt's pods then carry a required node affinity
`kubernetes.io/hostname NotIn [...]`, so the scheduler places the gang elsewhere.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lorakube.pods import FAILED, PodView

HOSTNAME_LABEL = "kubernetes.io/hostname"
# The operator cannot know how many nodes fit the gang (capacity, taints, quotas change under
# it), so the list is bounded instead: the oldest exclusion is dropped first. A cluster with
# fewer spare nodes than this should turn spec.runPolicy.nodeAvoidance off or watch
# status.excludedNodes; the scheduler leaves pods Pending (startupDeadlineSeconds) rather than
# break the rule.
MAX_EXCLUDED_NODES = 8

# Reasons, as status.excludedNodes[].reason and the NodeExcluded Event show them.
NODE_NOT_READY = "NodeNotReady"
NODE_MISSING = "NodeMissing"
ADMISSION_ERROR = "DeviceAdmissionFailed"
GPU_ERROR = "GpuHardwareError"
PEER_TIMEOUT = "PeerTimeout"

# What the kubelet writes as a pod's status.reason when a device plugin fails at admission (or
# the node lost the pod): the pod never ran, the node did this.
NODE_POD_REASONS = frozenset({"UnexpectedAdmissionError", "NodeLost", "OutOfnvidia.com/gpu"})
# The NVIDIA kernel driver's own error reports as they reach a container's log (a CUDA error
# quoting dmesg, a forwarding sidecar): `NVRM: Xid (PCI:0000:3b:00): 79, ...`, ECC errors.
XID_PATTERN = re.compile(r"NVRM: Xid \([^)]*\): (\d+)")
ECC_PATTERN = re.compile(r"uncorrectable ECC|double[- ]bit ECC|uncontained ECC", re.IGNORECASE)
# Xids NVIDIA's catalog attributes to the application (illegal access, page fault, a stopped
# channel, the cleanup after one): the job's bug, not the GPU's, so they blame no node.
APPLICATION_XIDS = frozenset({13, 31, 43, 45})
# A collective or store that timed out or lost its connection; only then does a peer named in the
# same message count (a message naming a peer in passing blames nobody).
PEER_FAILURE_PATTERN = re.compile(
    r"timed? ?out|timeout|connection (?:reset|closed|refused)|closed by (?:remote )?peer|"
    r"remote process exited|unhandled system error|socket.*(?:error|closed)", re.IGNORECASE)

# Node states as kube.observe reports them (the same words as reconcile's).
_NOT_READY, _MISSING = "NotReady", "Missing"


@dataclasses.dataclass(frozen=True)
class Blame:
    node: str
    reason: str
    detail: str      # the evidence, for the Event


def gpu_error_line(text: str | None) -> str | None:
    """The first line of `text` reporting a GPU hardware fault (an Xid other than the
    application's, an uncorrectable ECC error), or None."""
    for line in (text or "").splitlines():
        xid = XID_PATTERN.search(line)
        if (xid and int(xid.group(1)) not in APPLICATION_XIDS) or ECC_PATTERN.search(line):
            return line.strip()
    return None


def _text(pod: PodView, log_tails: Mapping[str, str]) -> str:
    return "\n".join(t for t in (pod.message, log_tails.get(pod.name)) if t)


def _peer_nodes(text: str, pod: PodView, peers: Sequence[PodView]) -> list[PodView]:
    """Other pods of the job that `text` names by pod name (the pods' hostnames, also in their
    DNS names) or IP address. A peer that exited on its own (an exit code: a user error, the
    kernel's OOM kill) closed the connection by dying, which is its own failure's story, not its
    node's; only a peer still running (hung) or gone without a word is blamed."""
    named = []
    for peer in peers:
        if peer.name == pod.name or not peer.node_name or peer.exit_code is not None:
            continue
        if re.search(rf"(?<![\w-]){re.escape(peer.name)}(?![\w-])", text) or (
                peer.pod_ip and re.search(rf"(?<![\d.]){re.escape(peer.pod_ip)}(?![\d])", text)):
            named.append(peer)
    return named


def attribute(pods: Iterable[PodView], log_tails: Mapping[str, str],
              node_states: Mapping[str, str]) -> list[Blame]:
    """The nodes the failure of this attempt's pods points at, each once, in the order found
    (pods by rank). `pods` are the attempt's pods; `node_states` holds the state kube.observe
    read for the nodes of failed or deleted ones."""
    pods = sorted(pods, key=lambda p: p.rank)
    found: dict[str, Blame] = {}

    def blame(node: str | None, reason: str, detail: str) -> None:
        if node and node not in found:
            found[node] = Blame(node, reason, detail)

    for pod in pods:
        failed = pod.phase == FAILED or pod.deleting
        if not failed:
            continue
        state = node_states.get(pod.node_name or "")
        if state == _NOT_READY:
            blame(pod.node_name, NODE_NOT_READY, f"pod {pod.name} failed while its node was NotReady")
        elif state == _MISSING:
            blame(pod.node_name, NODE_MISSING, f"pod {pod.name} failed and its node is gone")
        if pod.reason in NODE_POD_REASONS:
            blame(pod.node_name, ADMISSION_ERROR, f"pod {pod.name}: {pod.reason}: {pod.message or ''}".rstrip(": "))
        text = _text(pod, log_tails)
        if not text:
            continue
        line = gpu_error_line(text)
        if line:
            blame(pod.node_name, GPU_ERROR, f"pod {pod.name} logged: {line[:300]}")
        for line in text.splitlines():
            if not PEER_FAILURE_PATTERN.search(line):
                continue
            for peer in _peer_nodes(line, pod, pods):
                blame(peer.node_name, PEER_TIMEOUT,
                      f"pod {pod.name} timed out on peer {peer.name}: {line.strip()[:300]}")
    return list(found.values())


def add_exclusions(current: Sequence[Mapping[str, Any]], blames: Sequence[Blame], since: str,
                   attempt: int, limit: int = MAX_EXCLUDED_NODES) -> tuple[list[dict[str, Any]], list[Blame]]:
    """status.excludedNodes with `blames` added (a node already listed keeps its first entry),
    at most `limit` entries, the oldest dropped first; and the blames that are new."""
    entries = [dict(e) for e in current]
    listed = {e.get("node") for e in entries}
    new = [b for b in blames if b.node not in listed]
    entries += [{"node": b.node, "reason": b.reason, "since": since, "attempt": attempt} for b in new]
    return entries[-limit:], new


def excluded(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted({e["node"] for e in entries if e.get("node")})


def with_exclusion(affinity: Mapping[str, Any] | None, nodes: Sequence[str]) -> dict[str, Any] | None:
    """The user's affinity with `kubernetes.io/hostname NotIn nodes` required. Required node
    selector terms are ORed, so the requirement is ANDed into every term (a user's term keeps
    its own expressions and fields); with no term, it becomes the only one."""
    result = copy.deepcopy(dict(affinity)) if affinity else {}
    if not nodes:
        return result or None
    requirement = {"key": HOSTNAME_LABEL, "operator": "NotIn", "values": sorted(nodes)}
    node_affinity = result.setdefault("nodeAffinity", {})
    required = node_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    required["nodeSelectorTerms"] = [
        {**term, "matchExpressions": list(term.get("matchExpressions") or []) + [requirement]} for term in terms]
    return result
