"""The lorakube process node: registers Nodes and runs the pods bound to them as local
processes, each in its own network and mount namespace (see README.md beside this file).

This module stays import-light (no Kubernetes client): the control plane imports it to
start and stop the daemon, which runs as `python -m localcluster.node run ...`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from localcluster.processes import DaemonRecord, process_start_time, stop_daemon

from .layout import StateLayout
from .nodespec import NodeSpec

__all__ = ["NodeSpec", "NodeStartError", "start_node_daemon", "stop_node_daemon"]

START_TIMEOUT_SECONDS = 60.0
# Passed from the caller's environment to every container unless `env` is given: what a
# trainer image would bake in as ENV (offline hub, caches) on a real cluster.
IMAGE_ENV_PASSTHROUGH = ("HF_HUB_OFFLINE", "HF_HOME", "HF_DATASETS_OFFLINE",
                         "TRANSFORMERS_OFFLINE", "TORCH_HOME", "LORAKUBE_CACHE")
STOP_TIMEOUT_SECONDS = 45.0


class NodeStartError(RuntimeError):
    """The node daemon did not come up; the message points at its log."""


def start_node_daemon(
    kubeconfig: Path,
    state_dir: Path,
    nodes: list[NodeSpec],
    path_prefix: list[Path] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    kubelet_port: int = 10250,
    kubelet_client_ca: Path | None = None,
    restart_backoff: tuple[float, float] | None = None,
    timeout: float = START_TIMEOUT_SECONDS,
) -> int:
    """Start the daemon detached and return its pid once its nodes are registered.

    `path_prefix` goes first on every container's PATH (default: the directory of the
    running interpreter, i.e. the project's venv, so `python` and `lorakube-train` resolve).
    `env` plays the part of the image's ENV: every container gets it before the pod's own
    env (default: IMAGE_ENV_PASSTHROUGH taken from this process's environment).
    `restart_backoff` is (base, cap) in seconds of the crash-loop back-off (default
    kubelet's 10 s doubling to 300 s); tests shrink it instead of sleeping through it.
    Raises NodeStartError with the daemon's log tail if it exits or does not come up
    within `timeout` seconds.
    """
    if not nodes:
        raise ValueError("start_node_daemon: nodes is empty; pass at least one NodeSpec")
    state_dir = Path(state_dir).resolve()
    layout = StateLayout(state_dir)
    ready = layout.ready_marker
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "localcluster.node", "run", "--kubeconfig",
           str(Path(kubeconfig).resolve()), "--state-dir", str(state_dir),
           "--kubelet-port", str(kubelet_port)]
    for node in nodes:
        cmd += ["--node", node.to_arg()]
    if path_prefix is None:
        # Not resolved: a venv's python is a symlink to the base interpreter, and the venv's
        # bin directory (with the console scripts) is what pods need.
        path_prefix = [Path(sys.executable).parent]
    if env is None:
        env = {key: os.environ[key] for key in IMAGE_ENV_PASSTHROUGH if key in os.environ}
    for prefix in path_prefix:
        cmd += ["--path-prefix", str(prefix)]
    for key, value in env.items():
        cmd += ["--env", f"{key}={value}"]
    if kubelet_client_ca is not None:
        cmd += ["--kubelet-client-ca", str(kubelet_client_ca)]
    if restart_backoff is not None:
        cmd += ["--restart-backoff-base", str(restart_backoff[0]),
                "--restart-backoff-max", str(restart_backoff[1])]
    log_path = layout.daemon_log
    with open(log_path, "ab") as logfile:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logfile,
                                stderr=subprocess.STDOUT, start_new_session=True)
    layout.pidfile.write_text(json.dumps({"pid": proc.pid, "start": process_start_time(proc.pid)}))
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                stop_node_daemon(state_dir)
            tail = log_path.read_text(errors="replace")[-3000:]
            raise NodeStartError(f"process node did not come up (log {log_path}):\n{tail}")
        time.sleep(0.2)
    return proc.pid


def stop_node_daemon(state_dir: Path) -> None:
    """SIGTERM the daemon (it fails its pods, deletes its nodes, tears the network down),
    wait, SIGKILL if it hangs, then sweep whatever it may have left behind."""
    from .cleanup import sweep  # the sweep needs the network helpers; keep import-time light

    state_dir = Path(state_dir).resolve()
    layout = StateLayout(state_dir)
    pidfile = layout.pidfile
    if pidfile.exists():
        record = json.loads(pidfile.read_text())
        if record.get("start") is not None:
            daemon = DaemonRecord("node", int(record["pid"]), record["start"],
                                  str(layout.daemon_log))
            stop_daemon(daemon, STOP_TIMEOUT_SECONDS)
        pidfile.unlink(missing_ok=True)
    sweep(state_dir)
