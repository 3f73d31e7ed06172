"""Container launcher: enter the pod's network namespace, make a private mount namespace,
bind the pod's volumes and files, then exec the container command (same pid).

Run as a script (`python -I -S launch.py SPEC.json ERRFD`), never imported by the daemon: it
must start fast and must not pull in the daemon's threads. If anything fails before exec,
one line of JSON goes to ERRFD and the exit code is 128 (what runtimes report for
StartError); a successful exec closes ERRFD (close-on-exec), which the daemon reads as
"started".
"""

import ctypes
import fcntl
import json
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, dst, flags):
    _check(_libc.mount(src.encode() if src else None, dst.encode(), None, flags, None),
           f"mount {src} on {dst}")


def _missing_on_host(dsts):
    """The directories and files the mounts at `dsts` would create on the host filesystem.
    A path below another mount's target is created inside that volume, not on the host."""
    targets = {os.path.normpath(d) for d in dsts}
    missing = set()
    for dst in targets:
        if any(_is_below(dst, other) for other in targets):
            continue
        path = dst
        while not os.path.lexists(path) and path != os.path.dirname(path):
            # As the kernel names mount points (`/var/run/x` is `/run/x` in mountinfo).
            missing.add(os.path.realpath(path))
            path = os.path.dirname(path)
    return sorted(missing)


def _is_below(path, ancestor):
    return path != ancestor and path.startswith(ancestor.rstrip("/") + "/")


def _note_created(registry, paths):
    # One write with O_APPEND: concurrent launchers (the lock is shared) never interleave.
    fd = os.open(registry["file"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, "".join(p + "\n" for p in paths).encode())
    finally:
        os.close(fd)


def _prepare_target(src, dst):
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    elif not os.path.exists(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()


def enter(spec):
    with open(spec["netns"]) as netns:
        _check(_libc.setns(netns.fileno(), CLONE_NEWNET), "setns(net)")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(mount, uts)")
    # Private, recursively: nothing mounted here may propagate back to the host.
    _mount(None, "/", MS_REC | MS_PRIVATE)
    name = spec["hostname"].encode()
    _check(_libc.sethostname(name, len(name)), "sethostname")
    registry = spec.get("mountpoints")
    lock = None
    if registry:
        # Shared: launchers do not wait for each other, only for a cleanup deciding what to
        # remove. Held until every bind mount exists, so that cleanup, which removes a
        # created mount point only if no mount namespace on the host has a mount there,
        # cannot remove one between our mkdir and our mount.
        os.makedirs(os.path.dirname(registry["lock"]), exist_ok=True)
        lock = os.open(registry["lock"], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(lock, fcntl.LOCK_SH)
    try:
        created = _missing_on_host(m["dst"] for m in spec["mounts"])
        if registry and created:
            _note_created(registry, created)  # before creating: a crash leaks nothing
        for m in sorted(spec["mounts"], key=lambda m: m["dst"].count("/")):
            _prepare_target(m["src"], m["dst"])
            _mount(m["src"], m["dst"], MS_BIND | MS_REC)
            if m.get("readOnly"):
                _mount(None, m["dst"], MS_BIND | MS_REMOUNT | MS_RDONLY)
    finally:
        if lock is not None:
            os.close(lock)
    os.makedirs(spec["cwd"], exist_ok=True)
    os.chdir(spec["cwd"])


def main():
    spec_path, errfd = sys.argv[1], int(sys.argv[2])
    os.set_inheritable(errfd, False)
    try:
        with open(spec_path) as f:
            spec = json.load(f)
        enter(spec)
        program = spec["argv"][0]
        try:
            os.execvpe(program, spec["argv"], spec["env"])
        except FileNotFoundError:
            where = "" if "/" in program else f" in $PATH ({spec['env'].get('PATH', '')})"
            raise FileNotFoundError(f"executable {program!r} not found{where}") from None
    except Exception as exc:  # report every pre-exec failure the same way
        os.write(errfd, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        os._exit(128)


if __name__ == "__main__":
    main()
