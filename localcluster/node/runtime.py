"""Container processes: start through the launcher, signal the process group, report exit.

Each container is its own session (and so process group): SIGTERM on deletion reaches the
command and everything it forked (torch dataloader workers, shells), and the daemon's own
signals never reach the pods.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from localcluster.processes import process_start_time, stat_fields

from . import hostregistry

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("launch.py")
# The launcher needs only the standard library: -S skips `site` (and so every .pth file of the
# environment), which made up most of its start-up (~100 ms of CPU each, vs ~25 ms).
LAUNCHER_FLAGS = ("-I", "-S")


@dataclass(frozen=True)
class LaunchSpec:
    netns: Path
    hostname: str
    mounts: list[dict[str, object]]
    cwd: str
    argv: list[str]
    env: dict[str, str]

    def to_json(self) -> str:
        # Where the launcher notes the mount points it creates on the host (host-wide: any
        # daemon's cleanup may remove them once no pod uses them; see cleanup.py).
        registry = {"lock": str(hostregistry.MOUNTPOINTS_LOCK),
                    "file": str(hostregistry.MOUNTPOINTS_FILE)}
        return json.dumps({"netns": str(self.netns), "hostname": self.hostname,
                           "mounts": self.mounts, "cwd": self.cwd, "argv": self.argv,
                           "env": self.env, "mountpoints": registry})


@dataclass(frozen=True)
class Exit:
    code: int
    signal: int | None  # the signal that killed it, if any


def exit_from_returncode(returncode: int) -> Exit:
    # Popen reports death by signal as -N; runtimes report 128+N.
    if returncode < 0:
        return Exit(code=128 - returncode, signal=-returncode)
    return Exit(code=returncode, signal=None)


class ContainerProcess:
    """One running container. Callbacks run on a private thread; the daemon queues them."""

    def __init__(self, spec: LaunchSpec, spec_path: Path, log_path: Path, record_path: Path,
                 on_started: Callable[[], None], on_start_failed: Callable[[str], None],
                 on_exit: Callable[[Exit], None]) -> None:
        spec_path.touch(mode=0o600)
        spec_path.write_text(spec.to_json())
        read_fd, write_fd = os.pipe()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as logfile:
            self._proc = subprocess.Popen(
                [sys.executable, *LAUNCHER_FLAGS, str(LAUNCHER), str(spec_path), str(write_fd)],
                stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                pass_fds=(write_fd,), start_new_session=True, close_fds=True, env={},
            )
        os.close(write_fd)
        self.pid = self._proc.pid
        record_path.write_text(json.dumps({"pid": self.pid,
                                           "start": process_start_time(self.pid)}))
        self._record_path = record_path
        self.exited = threading.Event()
        self._thread = threading.Thread(
            target=self._supervise, args=(read_fd, on_started, on_start_failed, on_exit),
            name=f"container-{self.pid}", daemon=True)
        self._thread.start()

    def _supervise(self, read_fd: int, on_started: Callable[[], None],
                   on_start_failed: Callable[[str], None], on_exit: Callable[[Exit], None]) -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            report = pipe.read()
        if report:
            try:
                message = json.loads(report)["error"]
            except (ValueError, KeyError):
                message = report.decode(errors="replace")
            self._proc.wait()
            self._forget()
            on_start_failed(message)
            return
        on_started()
        result = exit_from_returncode(self._proc.wait())
        # A container ends with its main process (as when a PID namespace's init dies):
        # stragglers it forked into the same group go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self._forget()
        on_exit(result)

    def _forget(self) -> None:
        self.exited.set()
        self._record_path.unlink(missing_ok=True)

    def signal_group(self, sig: int) -> None:
        if self.exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)


def run_in_pod(spec: LaunchSpec, argv: list[str], timeout: float) -> tuple[int | None, bytes]:
    """Run `argv` the way a container runs (same launcher: the pod's network namespace, the
    container's mounts, env and working directory) and wait at most `timeout` seconds.

    Returns (exit code, stdout+stderr); the code is None on timeout, when the command's
    whole session is killed. The spec (with the env's secrets) goes through stdin, never
    to disk. A launcher failure comes back as exit 128 with its message as the output.
    """
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, *LAUNCHER_FLAGS, str(LAUNCHER), "/dev/stdin", str(write_fd)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=(write_fd,), start_new_session=True, close_fds=True, env={},
        )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as errors:
        try:
            output, _ = proc.communicate(replace(spec, argv=argv).to_json().encode(),
                                         timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None, b""
        report = errors.read()
    if report:
        try:
            return 128, str(json.loads(report)["error"]).encode()
        except (ValueError, KeyError):
            return 128, report
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what the command left running in its session
    return exit_from_returncode(proc.returncode).code, output


def _session_members(sid: int, not_before: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields is not None and int(fields[3]) == sid and int(fields[19]) >= not_before:
            members.append(int(entry.name))
    return members


def kill_recorded(record_path: Path) -> int:
    """SIGKILL what is left of a container a previous daemon recorded (its session, even
    if the leader is gone). Returns how many processes were signalled."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return 0
    pid, start = int(record["pid"]), record.get("start")
    record_path.unlink(missing_ok=True)
    leader_start = process_start_time(pid)
    if start is None or (leader_start is not None and leader_start != start):
        return 0  # the pid now belongs to an unrelated process
    victims = _session_members(pid, start)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    return len(victims)
