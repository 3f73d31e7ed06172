"""Background daemons that outlive the command that started them, tracked by pid files.

A pid alone is not an identity (pids are reused), so each record also keeps the process start time
from /proc/<pid>/stat; stopping or reporting a record whose start time no longer matches treats the
process as gone rather than signalling a stranger.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class DaemonRecord:
    name: str
    pid: int
    start_time: int
    log: str

    def save(self, pid_dir: Path) -> Path:
        pid_dir.mkdir(parents=True, exist_ok=True)
        path = pid_dir / f"{self.name}.json"
        path.write_text(json.dumps(asdict(self)) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> DaemonRecord:
        return cls(**json.loads(path.read_text()))


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from the state letter on (field 3 is index 0); None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; split after its closing one.
    return raw[raw.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of stat, counted from "state" (3)


def is_running(record: DaemonRecord) -> bool:
    """True while the recorded process exists and is not a zombie."""
    fields = stat_fields(record.pid)
    if fields is None or fields[0] == "Z":
        return False
    return int(fields[19]) == record.start_time


def start_daemon(name: str, argv: list[str], log_path: Path, pid_dir: Path,
                 env: dict[str, str] | None = None) -> DaemonRecord:
    """Start argv in its own session with output to log_path, and record it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # Own session: a Ctrl-C in the shell that ran `up` must not take the cluster down with it.
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=env,
        )
    start_time = process_start_time(process.pid)
    if start_time is None:
        raise RuntimeError(f"{name} exited immediately; see {log_path}")
    record = DaemonRecord(name, process.pid, start_time, str(log_path))
    record.save(pid_dir)
    return record


def _reap(pid: int) -> None:
    # When the daemon is our own child (pytest fixture), collect it so no zombie lingers.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def has_exited(record: DaemonRecord) -> bool:
    """True once every thread of the process has exited (so its ports and files are released).

    A multi-threaded process shows as a zombie while its other threads still exit, so the state
    letter alone is too early; what may remain after this is only the parent's reaping.
    """
    fields = stat_fields(record.pid)
    if fields is None or int(fields[19]) != record.start_time:
        return True
    if fields[0] != "Z":
        return False
    try:
        return len(os.listdir(f"/proc/{record.pid}/task")) <= 1
    except FileNotFoundError:
        return True


def _wait_gone(record: DaemonRecord, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        _reap(record.pid)
        if has_exited(record):
            _reap(record.pid)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_daemons(records: list[DaemonRecord], grace_seconds: float = 15.0) -> None:
    """SIGTERM all at once, SIGKILL whatever outlives the grace period; returns once all are gone."""
    alive = [record for record in records if is_running(record)]
    for record in records:
        if record not in alive:
            _reap(record.pid)
    for record in alive:
        os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    stubborn = [r for r in alive if not _wait_gone(r, max(0.0, deadline - time.monotonic()))]
    for record in stubborn:
        if is_running(record):
            os.kill(record.pid, signal.SIGKILL)
    for record in stubborn:
        if not _wait_gone(record, 10.0):
            raise RuntimeError(f"{record.name} (pid {record.pid}) survived SIGKILL")


def stop_daemon(record: DaemonRecord, grace_seconds: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after the grace period; returns once the process is gone."""
    stop_daemons([record], grace_seconds)


def log_tail(path: str | Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def free_loopback_ports(count: int) -> list[int]:
    """Ports the kernel says are free on 127.0.0.1 right now (held open together so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether a plain-HTTP health endpoint of a daemon answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def http_answers(url: str, timeout: float = 2.0) -> bool:
    """Whether anything answers HTTP there now, whatever the status (an unauthenticated 403 counts:
    the server is up, it only refuses the anonymous probe)."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def wait_until_serving(process: subprocess.Popen, name: str, serving: Callable[[], bool], output: Path,
                       where: str, timeout: float, interval: float = 0.1) -> None:
    """Poll `serving()` until it holds; a process that exits first fails at once, with the tail of
    its output (what says why), instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = output.read_text(errors="replace")[-2000:] if output.exists() else ""
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")
        if serving():
            return
        time.sleep(interval)
    raise RuntimeError(f"{name} did not answer on {where} within {timeout:.0f} s")


def stop_group(process: subprocess.Popen | None, grace_seconds: float = 10.0) -> None:
    """SIGTERM to the process group a `start_new_session` child leads (the server and anything it
    forked), SIGKILL when it outlives the grace."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_seconds)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on the port (TIME_WAIT leftovers of closed connections don't count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def mounts_under(directory: Path) -> list[str]:
    root = str(directory.resolve())
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        # Mount points escape spaces as \040; state dirs never contain them, so a prefix test is enough.
        mount_point = line.split()[1]
        if mount_point == root or mount_point.startswith(root + "/"):
            found.append(mount_point)
    return found
