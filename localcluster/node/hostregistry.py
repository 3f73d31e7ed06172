"""What several node daemons on one host share, kept under /run/lorakube/ with file locks.

The bridge, the pod subnet and the gateway address 10.250.0.1 are host-wide, so more than
one cluster (a demo and a test session, or parallel test sessions) can only coexist if
they agree on who owns which pod IP. Each daemon holds a lock on its own registration
file for as long as it lives (the kernel drops it if the daemon dies), and pod IPs are
allocated in one shared table under another lock. The apiserver forwarder uses both to
send a pod's connection to *its* cluster's apiserver.

Mount points that pods needed on the host are host-wide too: which daemon created `/data`
says nothing about whose pods mount it now, so they are listed in one file (see
`launch.py` and `cleanup.remove_unused_mountpoints`).
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

RUN_DIR = Path("/run/lorakube")
DAEMONS_DIR = RUN_DIR / "node-daemons"
IPAM_FILE = RUN_DIR / "pod-ips.json"
IPAM_LOCK = RUN_DIR / "pod-ips.lock"
NETWORK_LOCK = RUN_DIR / "network.lock"
# One path per line, appended by the launcher (under a shared lock) before it creates a
# missing mount point on the host; pruned by cleanup under the exclusive lock.
MOUNTPOINTS_FILE = RUN_DIR / "created-mountpoints"
MOUNTPOINTS_LOCK = RUN_DIR / "mountpoints.lock"

NETWORK = ipaddress.IPv4Network("10.250.0.0/16")
GATEWAY = ipaddress.IPv4Address("10.250.0.1")


class NodeBusyError(RuntimeError):
    """Another node daemon already owns what this one needs (its message names the owner)."""


class IpamExhausted(RuntimeError):
    """Every address of the pod network is taken."""


@contextmanager
def network_lock() -> Iterator[None]:
    """Held while creating the bridge or deciding to delete it, so a daemon that is starting
    never loses the bridge to one that is stopping."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(NETWORK_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def owner_id(state_dir: Path) -> str:
    return str(Path(state_dir).resolve())


def _daemon_file(owner: str) -> Path:
    return DAEMONS_DIR / (hashlib.sha256(owner.encode()).hexdigest()[:16] + ".json")


@dataclass(frozen=True)
class DaemonInfo:
    pid: int
    state_dir: str
    apiserver: tuple[str, int]


def register_daemon(state_dir: Path, apiserver: tuple[str, int]) -> IO[str]:
    """Announce this daemon; the returned file must stay open for the daemon's lifetime."""
    DAEMONS_DIR.mkdir(parents=True, exist_ok=True)
    owner = owner_id(state_dir)
    f = open(_daemon_file(owner), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        current = f.read()
        f.close()
        raise NodeBusyError(
            f"a process node already runs for state dir {owner} ({current}); stop it with "
            f"`python -m localcluster.node stop --state-dir {owner}`") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "state_dir": owner, "apiserver": list(apiserver)}))
    f.flush()
    return f


def live_daemons() -> list[DaemonInfo]:
    """Daemons whose registration lock is held right now (i.e. that are alive)."""
    if not DAEMONS_DIR.is_dir():
        return []
    out = []
    for path in sorted(DAEMONS_DIR.glob("*.json")):
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                try:
                    data = json.loads(f.read())
                except ValueError:
                    continue
                out.append(DaemonInfo(int(data["pid"]), data["state_dir"],
                                      (data["apiserver"][0], int(data["apiserver"][1]))))
                continue
            # Unlocked: that daemon is gone. The file stays (removing it could race with a
            # restart of the same daemon re-opening it).
            fcntl.flock(f, fcntl.LOCK_UN)
    return out


def other_daemons(state_dir: Path) -> list[DaemonInfo]:
    owner = owner_id(state_dir)
    return [d for d in live_daemons() if d.state_dir != owner]


# -- pod IPs ----------------------------------------------------------------------------------

@contextmanager
def _ipam() -> Iterator[dict[str, dict[str, str]]]:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(IPAM_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table: dict[str, dict[str, str]] = (
            json.loads(IPAM_FILE.read_text()) if IPAM_FILE.exists() else {})
        before = json.dumps(table, sort_keys=True)
        yield table
        if json.dumps(table, sort_keys=True) != before:
            tmp = IPAM_FILE.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
            os.replace(tmp, IPAM_FILE)


def allocate_ip(state_dir: Path, uid: str, in_use: Callable[[str], bool] = lambda ip: False) -> str:
    """The pod's IP (stable for a uid); `in_use` vetoes addresses that still have devices."""
    owner = owner_id(state_dir)
    with _ipam() as table:
        for ip, entry in table.items():
            if entry == {"owner": owner, "uid": uid}:
                return ip
        for host in NETWORK.hosts():
            candidate = str(host)
            if host != GATEWAY and candidate not in table and not in_use(candidate):
                table[candidate] = {"owner": owner, "uid": uid}
                return candidate
    raise IpamExhausted(f"pod network {NETWORK} is exhausted")


def release_ip(state_dir: Path, uid: str) -> None:
    owner = owner_id(state_dir)
    with _ipam() as table:
        for ip in [ip for ip, e in table.items() if e == {"owner": owner, "uid": uid}]:
            del table[ip]


def release_owner(state_dir: Path, remove_devices: Callable[[list[str]], None]) -> list[str]:
    """Remove the devices of every IP of this daemon's pods, then free the IPs; returns them.

    `remove_devices` runs under the table's lock: device names derive from the IP, so once
    an IP is free another daemon may create a pod under the same names at once, and a
    removal after that would take *its* pod down."""
    owner = owner_id(state_dir)
    with _ipam() as table:
        mine = [ip for ip, e in table.items() if e.get("owner") == owner]
        if mine:
            remove_devices(mine)
        for ip in mine:
            del table[ip]
    return mine


def ip_table() -> dict[str, dict[str, str]]:
    with _ipam() as table:
        return dict(table)


def apiserver_for_pod_ip(ip: str) -> tuple[str, int] | None:
    """Which apiserver a connection from this pod IP belongs to (None: not a known pod)."""
    entry: dict[str, Any] | None = ip_table().get(ip)
    if entry is None:
        return None
    for daemon in live_daemons():
        if daemon.state_dir == entry["owner"]:
            return daemon.apiserver
    return None


def release_abandoned(remove_devices: Callable[[list[str]], None]) -> list[str]:
    """Remove the devices of daemons that are dead *and* whose state dir is gone (so no
    restart will ever clean up after them), then free their IPs; returns those IPs.
    `remove_devices` runs under the table's lock, as in `release_owner`."""
    alive = {d.state_dir for d in live_daemons()}
    with _ipam() as table:
        abandoned = [ip for ip, e in table.items()
                     if e.get("owner") not in alive and not Path(e.get("owner", "")).exists()]
        if abandoned:
            remove_devices(abandoned)
        for ip in abandoned:
            del table[ip]
    return abandoned


# -- mount points created on the host ----------------------------------------------------------

@contextmanager
def mountpoints_lock() -> Iterator[None]:
    """Exclusive: held by cleanup while it decides which created mount points to remove.
    The launcher holds the same lock shared from noting a mount point until its bind mount
    exists, so cleanup never sees a mount point that is about to be used but not yet
    mounted."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(MOUNTPOINTS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def created_mountpoints() -> list[str]:
    """Every mount point some launcher created on the host and no cleanup removed yet
    (call under `mountpoints_lock`)."""
    try:
        lines = MOUNTPOINTS_FILE.read_text().splitlines()
    except FileNotFoundError:
        return []
    return sorted({line for line in lines if line.startswith("/")})


def keep_created_mountpoints(paths: list[str]) -> None:
    """Replace the list (call under `mountpoints_lock`, so no launcher appends meanwhile)."""
    if not paths:
        MOUNTPOINTS_FILE.unlink(missing_ok=True)
        return
    tmp = MOUNTPOINTS_FILE.with_suffix(".tmp")
    tmp.write_text("".join(f"{p}\n" for p in sorted(paths)))
    os.replace(tmp, MOUNTPOINTS_FILE)
