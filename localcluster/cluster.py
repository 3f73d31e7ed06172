"""One local cluster: control plane + process node, brought up and down as background daemons.

State lives in one directory (default ``${LORAKUBE_CACHE:-~/.cache/lorakube}/cluster``):
``cluster.json`` (ports, server, what was started), ``admin.kubeconfig``, ``pki/``, ``logs/``,
``pids/`` and etcd's data. A later process (``status``, ``down``) works from that directory alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from localcluster import build as build_mod
from localcluster.build import Binaries
from localcluster.certs import pki_paths
from localcluster.controlplane import ControlPlane, Layout, Ports
from localcluster.node import NodeSpec, start_node_daemon, stop_node_daemon
from localcluster.processes import (
    DaemonRecord, has_exited, is_running, mounts_under, port_in_use, process_start_time,
)

STATE_FILE = "cluster.json"
NODE_RECORD = "node"


class ClusterError(RuntimeError):
    """The cluster is not in a state the requested action can work from; the message says why."""


def default_state_dir() -> Path:
    return build_mod.cache_root() / "cluster"


def default_nodes(count: int = 1, gpus: int = 0) -> list[NodeSpec]:
    return [NodeSpec(name=f"localnode-{index}", gpus=gpus) for index in range(count)]


@dataclass
class ClusterState:
    """What cluster.json records."""

    server: str
    ports: dict[str, int]
    binaries: str
    nodes: list[dict] = field(default_factory=list)
    daemons: dict[str, dict] = field(default_factory=dict)

    def save(self, state_dir: Path) -> None:
        (state_dir / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState | None:
        path = state_dir / STATE_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def records(self) -> list[DaemonRecord]:
        return [DaemonRecord(**record) for record in self.daemons.values()]


@dataclass(frozen=True)
class ClusterStatus:
    state_dir: Path
    server: str | None
    running: dict[str, bool]

    @property
    def up(self) -> bool:
        return bool(self.running) and all(self.running.values())

    @property
    def partly_up(self) -> bool:
        return any(self.running.values()) and not self.up

    def describe(self) -> str:
        if not self.running:
            return f"no cluster in {self.state_dir}"
        if not any(self.running.values()):
            return f"cluster in {self.state_dir}: stopped (logs in {self.state_dir / 'logs'})"
        lines = [f"cluster in {self.state_dir}: {'up' if self.up else 'NOT fully up'}"]
        if self.server:
            lines.append(f"  server: {self.server}")
        lines += [
            f"  {name}: {'running' if alive else 'stopped'}" for name, alive in self.running.items()
        ]
        return "\n".join(lines)


class LocalCluster:
    """A control plane and a process node in ``state_dir``.

    ``up()`` returns once the apiserver is ready, the controllers have created the ``default``
    ServiceAccount and every node is Ready; the daemons keep running after this process exits
    until ``down()``.
    """

    def __init__(self, state_dir: Path | None = None, nodes: Sequence[NodeSpec] | None = None,
                 log: Callable[[str], None] = print, *,
                 node_path: Sequence[Path] | None = None,
                 node_env: Mapping[str, str] | None = None,
                 node_restart_backoff: tuple[float, float] | None = None,
                 audit_policy: Path | None = None) -> None:
        """``node_path`` and ``node_env`` play the container image: directories put in front of
        PATH and variables set for every container. Left out, the node's defaults apply (see
        ``start_node_daemon``): this Python environment's bin directory, so pods find
        ``lorakube-train`` the way an image would provide it, and the image-like variables
        (offline hub, caches) taken from this process's environment. ``node_restart_backoff``
        is the node's crash-loop back-off (base, cap) in seconds, kubelet's (10, 300) if left
        out."""
        self.state_dir = Path(state_dir or default_state_dir()).resolve()
        self._nodes = nodes
        self._node_path = list(node_path) if node_path is not None else None
        self._node_env = dict(node_env) if node_env is not None else None
        self._node_restart_backoff = node_restart_backoff
        # An apiserver audit policy file: the apiserver then writes logs/audit.log (JSON lines).
        self._audit_policy = audit_policy
        self._log = log
        self._binaries: Binaries | None = None

    # -- where things are -------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return Layout(self.state_dir)

    @property
    def kubeconfig(self) -> Path:
        return self.layout.admin_kubeconfig

    @property
    def ca_file(self) -> Path:
        return pki_paths(self.layout.pki_dir).ca.cert

    @property
    def server(self) -> str:
        state = ClusterState.load(self.state_dir)
        if state is None:
            raise ClusterError(f"no cluster in {self.state_dir}: run `python -m localcluster up`")
        return state.server

    @property
    def binaries(self) -> Binaries:
        if self._binaries is None:
            state = ClusterState.load(self.state_dir)
            self._binaries = (
                Binaries(Path(state.binaries)) if state else build_mod.build(log=self._log)
            )
        return self._binaries

    # -- lifecycle ----------------------------------------------------------------------------
    def status(self) -> ClusterStatus:
        state = ClusterState.load(self.state_dir)
        if state is None:
            return ClusterStatus(self.state_dir, None, {})
        running = {name: is_running(DaemonRecord(**rec)) for name, rec in state.daemons.items()}
        return ClusterStatus(self.state_dir, state.server, running)

    def up(self, timeout: float = 240.0) -> LocalCluster:
        current = self.status()
        if current.up:
            self._log(f"already up: {current.server}")
            return self
        if current.partly_up:
            raise ClusterError(
                f"a cluster in {self.state_dir} is partly running:\n{current.describe()}\n"
                f"Run `python -m localcluster down --state-dir {self.state_dir}` first."
            )
        self._reset_state_dir()
        self._binaries = build_mod.build(log=self._log)
        nodes = list(self._nodes) if self._nodes is not None else default_nodes()
        started = time.monotonic()
        plane = ControlPlane.prepare(self.state_dir, self._audit_policy)
        state = ClusterState(
            server=plane.server,
            ports=asdict(plane.ports),
            binaries=str(self._binaries.directory),
            nodes=[asdict(node) for node in nodes],
        )
        state.save(self.state_dir)
        try:
            self._log(f"starting control plane in {self.state_dir}")
            for record in plane.start(self._binaries, log=self._log, timeout=timeout):
                state.daemons[record.name] = asdict(record)
                state.save(self.state_dir)
            if nodes:
                state.daemons[NODE_RECORD] = asdict(self._start_node(nodes))
                state.save(self.state_dir)
            self._wait_settled(nodes, timeout)
        except BaseException:
            self._log("startup failed; stopping what was started")
            self.down()
            raise
        self._log(f"cluster up in {time.monotonic() - started:.1f} s: {plane.server}")
        return self

    def _reset_state_dir(self) -> None:
        leftover_mounts = mounts_under(self.state_dir) if self.state_dir.exists() else []
        if leftover_mounts:
            raise ClusterError(
                f"{self.state_dir} still has mounts from an earlier run: {leftover_mounts}; "
                f"run `python -m localcluster down --state-dir {self.state_dir}` or unmount them."
            )
        if self.state_dir.exists() and any(self.state_dir.iterdir()):
            if not (self.state_dir / STATE_FILE).is_file():
                raise ClusterError(
                    f"{self.state_dir} is not empty and holds no {STATE_FILE}: refusing to wipe a "
                    "directory localcluster did not create; pass an empty or new --state-dir."
                )
            # A fresh cluster each time: old certs, ports and etcd data would only confuse.
            shutil.rmtree(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)

    @property
    def node_state_dir(self) -> Path:
        # Handed our state dir, the node daemon keeps its own layout (pid file, log, pod dirs)
        # in this subdirectory.
        return self.state_dir / "node"

    def _start_node(self, nodes: list[NodeSpec]) -> DaemonRecord:
        self._log(f"starting process node ({', '.join(node.name for node in nodes)})")
        try:
            pid = start_node_daemon(
                self.kubeconfig, self.state_dir, nodes, self._node_path, env=self._node_env,
                # The kubelet endpoint accepts only the apiserver's client cert from our CA.
                kubelet_client_ca=self.ca_file, restart_backoff=self._node_restart_backoff,
            )
        except Exception as error:  # the node reports its own failures with its log tail
            raise ClusterError(f"the process node did not start: {error}") from error
        start_time = process_start_time(pid)
        if start_time is None:
            raise ClusterError(
                f"the process node (pid {pid}) exited at once; see {self.node_state_dir}"
            )
        return DaemonRecord(NODE_RECORD, pid, start_time, str(self.node_state_dir / "daemon.log"))

    def _wait_settled(self, nodes: list[NodeSpec], timeout: float) -> None:
        """Ready means usable: namespaces get a `default` ServiceAccount and nodes take pods."""
        deadline = time.monotonic() + timeout
        while self.kubectl("get", "serviceaccount", "default", "-n", "default").returncode != 0:
            if time.monotonic() > deadline:
                raise ClusterError(
                    "kube-controller-manager did not create the `default` ServiceAccount within "
                    f"{timeout:.0f} s; see {self.layout.log('kube-controller-manager')}"
                )
            time.sleep(0.5)
        for node in nodes:
            remaining = max(1, int(deadline - time.monotonic()))
            while True:
                result = self.kubectl(
                    "wait", "--for=condition=Ready", f"node/{node.name}", f"--timeout={remaining}s"
                )
                if result.returncode == 0:
                    break
                # `kubectl wait` fails at once while the Node object does not exist yet.
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"node {node.name} not Ready within {timeout:.0f} s: "
                        f"{result.stderr.strip()}; see the node log in {self.node_state_dir}"
                    )
                time.sleep(0.5)
                remaining = max(1, int(deadline - time.monotonic()))
        self._log(f"  {len(nodes)} node(s) Ready")

    def down(self) -> list[str]:
        """Stop the node, then the control plane; return whatever is still left (empty = clean)."""
        state = ClusterState.load(self.state_dir)
        if state is None:
            return []
        plane = ControlPlane.load(self.state_dir, Ports(**state.ports))
        # Pid files cover components started before a failed `up` could record them in state.
        records = {record.name: record for record in [*plane.records(), *state.records()]}
        if self.node_state_dir.exists():
            stop_node_daemon(self.state_dir)
        plane.stop()
        problems = leftovers(list(records.values()), list(state.ports.values()), self.state_dir)
        for problem in problems:
            self._log(f"left behind: {problem}")
        return problems

    # -- helpers for tests and the demo --------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, timeout: float = 120.0,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
        command = [str(self.binaries.kubectl), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        return subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout)


def leftovers(records: Sequence[DaemonRecord], ports: Sequence[int], state_dir: Path) -> list[str]:
    """Processes, listening loopback ports and mounts of this cluster that are still there."""
    problems = [f"process {r.name} (pid {r.pid})" for r in records if not has_exited(r)]
    problems += [f"port 127.0.0.1:{port} still listening" for port in ports if port_in_use(port)]
    problems += [f"mount {mount}" for mount in mounts_under(state_dir)]
    return problems
