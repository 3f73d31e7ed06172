"""Pod networking: one bridge on the host, one network namespace + veth pair per pod.

    host: lkbr0 10.250.0.1/16 ──┬── lkv0002 ═ eth0 10.250.0.2/16 (netns lkpod-0002)
                                └── lkv0003 ═ eth0 10.250.0.3/16 (netns lkpod-0003)

Pods get no default route: only the pod network and their own loopback are reachable,
which is all the workloads here need and keeps them off the host's other networks.
Device names derive from the IP (unique host-wide, see hostregistry), so several daemons
share the bridge and a crashed daemon's leftovers are recognisable by prefix.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import hostregistry
from .hostregistry import GATEWAY, NETWORK

log = logging.getLogger(__name__)

BRIDGE = "lkbr0"
# The gateway's MAC address, pinned. A Linux bridge whose address was never set explicitly takes
# the lowest MAC among its ports and changes it whenever a pod (of any daemon on the host) starts
# or ends. The other pods keep the old address in their ARP cache, so their packets to the gateway
# (the apiserver forwarder) go nowhere until the entry goes stale, fails its probes and
# re-resolves (~30 s measured), and their HTTP calls time out and back off meanwhile: a trainer's
# final status write took 19-70 s whenever its peer's pod ended first. An address set by hand is
# never recomputed. Locally administered, unicast ("lk" in the middle).
BRIDGE_MAC = "02:6c:6b:00:00:01"
NETNS_PREFIX = "lkpod-"
VETH_PREFIX = "lkv"
NETNS_DIR = Path("/run/netns")


class NetworkError(RuntimeError):
    """Setting up or tearing down a pod network namespace, veth or the bridge failed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class PodNet:
    ip: str
    netns: str
    veth: str

    @property
    def mac(self) -> str:
        """The pod's eth0 address, derived from its IP (locally administered, unicast: 0a:58 then
        the IP's four bytes). An IP freed by one pod and given to the next keeps its MAC, so the
        host's and other pods' ARP caches stay right; with a fresh random MAC, packets went to the
        old pod's address until the stale entry expired, and the new pod's probes timed out for
        tens of seconds."""
        return "0a:58:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(self.ip).packed)

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def pod_net_for(ip: str) -> PodNet:
    offset = int(ipaddress.IPv4Address(ip)) - int(NETWORK.network_address)
    return PodNet(ip=ip, netns=f"{NETNS_PREFIX}{offset:04x}", veth=f"{VETH_PREFIX}{offset:04x}")


def ensure_bridge() -> None:
    if not bridge_exists():
        _ip("link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge")
    elif bridge_mac() != BRIDGE_MAC:
        # Made by a daemon that did not pin it: pin it now (one last change for its pods).
        _ip("link", "set", BRIDGE, "address", BRIDGE_MAC)
    addrs = _ip("-o", "-4", "addr", "show", "dev", BRIDGE).stdout
    if f"{GATEWAY}/{NETWORK.prefixlen}" not in addrs:
        _ip("addr", "add", f"{GATEWAY}/{NETWORK.prefixlen}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def _ip_batch(lines: list[str], netns: str | None = None) -> None:
    """Several `ip` commands in one process (stops at the first that fails): a pod's sandbox
    took a dozen process starts, which is most of its cost when hundreds start at once."""
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    result = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if result.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed: {result.stderr.strip()} (commands: "
                           f"{'; '.join(lines)})")


def create_pod_net(net: PodNet) -> None:
    """The pod's namespace and veth, plugged into the bridge. Safe to run for several pods at
    once (and beside other daemons): only the plugging in takes the host-wide network lock,
    since the bridge may have gone with another daemon and must not go while a port is added."""
    delete_pod_net(net)  # a leftover with the same name would make `netns add` fail
    try:
        _ip_batch([f"netns add {net.netns}",
                   f"link add {net.veth} type veth peer name eth0 address {net.mac} netns {net.netns}"])
        _ip_batch([f"addr add {net.ip}/{NETWORK.prefixlen} dev eth0", "link set eth0 up",
                   "link set lo up"], netns=net.netns)
        with hostregistry.network_lock():
            if not bridge_exists():
                ensure_bridge()
            _ip("link", "set", net.veth, "master", BRIDGE, "up")
    except NetworkError:
        delete_pod_net(net)
        raise


def kill_netns_processes(net: PodNet) -> int:
    """SIGKILL whatever still lives in the pod's network namespace: only pod processes can be
    there, including any that escaped the container's process group with setsid."""
    if not net.netns_path.exists():
        return 0
    pids = [int(p) for p in _ip("netns", "pids", net.netns, check=False).stdout.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def delete_pod_net(net: PodNet) -> None:
    kill_netns_processes(net)
    # Deleting the namespace destroys eth0 and with it the host end of the pair.
    if net.netns_path.exists():
        _ip("netns", "delete", net.netns, check=False)
    _ip("link", "delete", net.veth, check=False)  # usually gone with the namespace already


def bridge_exists() -> bool:
    return _ip("link", "show", BRIDGE, check=False).returncode == 0


def bridge_mac() -> str | None:
    # From `ip`, not /sys/class/net: sysfs shows the network namespace it was mounted in.
    fields = _ip("-o", "link", "show", BRIDGE, check=False).stdout.split()
    return fields[fields.index("link/ether") + 1] if "link/ether" in fields else None


def remove_pod_nets(ips: list[str]) -> None:
    for ip in ips:
        delete_pod_net(pod_net_for(ip))


def bridge_ports() -> list[str]:
    out = _ip("-o", "link", "show", "master", BRIDGE, check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def delete_bridge_if_unused() -> bool:
    """Delete the bridge unless some pod (of any daemon, of any version) is still plugged in."""
    if not bridge_exists() or bridge_ports():
        return False
    _ip("link", "delete", BRIDGE, check=False)
    return True


def netns_taken(ip: str) -> bool:
    return pod_net_for(ip).netns_path.exists()
