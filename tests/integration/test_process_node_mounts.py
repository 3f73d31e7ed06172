"""Mount points the launcher creates on the host, with pods of several daemons on one host.

Real launcher, real mount namespaces, no control plane (so it is fast): pods are started
exactly as the daemon starts containers. Needs root, as the process node does.

The failure this guards against: cluster A's cleanup removed `/data` (which A's pods had
needed) while a pod of cluster B had its volume bind-mounted at `/data` in its private
mount namespace; since Linux 3.18 that rmdir succeeds and detaches B's mount, so B's
trainer found an empty `/data`.
"""

from __future__ import annotations

import queue
import sys
from pathlib import Path

import pytest

from localcluster.node import cleanup, hostregistry
from localcluster.node.runtime import ContainerProcess, Exit, LaunchSpec, run_in_pod
from localcluster.pytest_plugin import wait_for

# The pods below share the host's network namespace: only their mounts matter here.
HOST_NETNS = Path("/proc/self/ns/net")


def _spec(mounts: list[dict[str, object]], argv: list[str]) -> LaunchSpec:
    return LaunchSpec(netns=HOST_NETNS, hostname="mounts-test", mounts=mounts, cwd="/",
                      argv=argv, env={"PATH": "/usr/bin:/bin"})


def _start(tmp_path: Path, name: str, spec: LaunchSpec) -> tuple[ContainerProcess, queue.Queue]:
    exits: queue.Queue[Exit | str] = queue.Queue()
    proc = ContainerProcess(spec, tmp_path / f"{name}.json", tmp_path / f"{name}.log",
                            tmp_path / f"{name}.record", on_started=lambda: None,
                            on_start_failed=exits.put, on_exit=exits.put)
    return proc, exits


def _mounted_in(pid: int, path: Path) -> bool:
    try:
        text = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return False
    return str(path) in cleanup.mountinfo_mount_points(text)


@pytest.mark.parametrize("through_symlink", [False, True],
                         ids=["plain", "symlinked-parent"])  # as /var/run is /run
def test_cleanup_keeps_a_created_mount_point_while_another_pod_has_a_mount_there(
        tmp_path: Path, through_symlink: bool) -> None:
    dataset = tmp_path / "hostpath"
    dataset.mkdir()
    (dataset / "metadata.csv").write_text("file_name,text\n")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    parent = tmp_path / ("link" if through_symlink else "real") / "host"
    mount_point = parent / "data"  # does not exist on the host: the launcher creates it
    real_parent = (tmp_path / "real").resolve() / "host"  # how the kernel names it
    mounts: list[dict[str, object]] = [{"src": str(dataset), "dst": str(mount_point)}]

    # A pod of cluster A needed the mount point and ended.
    code, output = run_in_pod(_spec(mounts, ["true"]), ["true"], timeout=30)
    assert code == 0, output
    assert mount_point.is_dir() and not any(mount_point.iterdir())

    # A pod of cluster B mounts its volume there and reads it after cluster A cleaned up.
    go = tmp_path / "go"
    reader = (f"import os, sys, time\n"
              f"while not os.path.exists({str(go)!r}): time.sleep(0.05)\n"
              f"sys.exit(0 if os.path.exists({str(mount_point / 'metadata.csv')!r}) else 3)\n")
    holder, exits = _start(tmp_path, "holder", _spec(mounts, [sys.executable, "-c", reader]))
    try:
        wait_for("the holder pod's bind mount",
                 lambda: _mounted_in(holder.pid, real_parent / "data"), 10, 0.05)

        removed = cleanup.remove_unused_mountpoints()  # cluster A's node stops

        assert str(real_parent / "data") not in removed and mount_point.is_dir()
    finally:
        go.touch()
        result = exits.get(timeout=30)
    assert result == Exit(code=0, signal=None), (
        f"the pod lost its volume ({result}): {(tmp_path / 'holder.log').read_text()}")

    # Once no pod uses them, the next cleanup (of any daemon) removes both created paths.
    removed = cleanup.remove_unused_mountpoints()
    assert {str(real_parent / "data"), str(real_parent)} <= set(removed)
    assert not real_parent.exists()
    with hostregistry.mountpoints_lock():
        assert str(real_parent) not in hostregistry.created_mountpoints()


def test_a_mount_point_below_another_mount_is_created_in_that_volume_not_on_the_host(
        tmp_path: Path) -> None:
    outer, inner = tmp_path / "outer-src", tmp_path / "inner-src"
    outer.mkdir()
    inner.mkdir()
    top = tmp_path / "top"
    mounts: list[dict[str, object]] = [{"src": str(outer), "dst": str(top)},
                                       {"src": str(inner), "dst": str(top / "nested")}]

    code, output = run_in_pod(_spec(mounts, ["true"]), ["true"], timeout=30)

    assert code == 0, output
    assert (outer / "nested").is_dir()  # made inside the outer volume
    with hostregistry.mountpoints_lock():
        noted = hostregistry.created_mountpoints()
    assert str(top) in noted and str(top / "nested") not in noted
    assert str(top) in cleanup.remove_unused_mountpoints()
