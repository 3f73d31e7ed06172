"""The node-local cache of staged inputs (models and datasets fetched from object storage or a hub).

Layout under `<cache>/inputs/` (`<cache>` is LORAKUBE_CACHE_DIR):

    <key>/                 a complete entry: filled in a temporary folder, STAGED_MARKER written
                           last, then renamed here, so a partial download is never taken for one
    .<key>.partial-XXXX/   a download under way (or left by a process that died: removed by eviction)
    <key>.lock             held exclusively by the process that checks, fills or evicts <key>
    <key>.use              held shared by every process that uses <key>, until it exits
    <key>.progress         {"done": n, "total": m} of the download under way, for the processes that
                           wait for it (the other local ranks, another job on the node)
    .evict.lock            one eviction at a time

LORAKUBE_CACHE_MAX_BYTES caps the entries' total size: before a download, the least recently used
entries that no process holds (neither `.lock` nor `.use`) are deleted, marker first, until the
new input fits. The cap is a target for eviction, not a quota: an input that does not fit even
after every unused entry went is still downloaded (with a warning), since failing the job would
not free the disk either. The marker's modification time is the entry's last use.

Downloaders plug in through `stage`: they get a fresh folder to fill and an `on_bytes(done, total)`
callback to call as bytes arrive; everything else (lock, cache hit, eviction, marker, rename,
progress for waiters) is done here, the same for every URI scheme.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

ENV_CACHE_MAX_BYTES = "LORAKUBE_CACHE_MAX_BYTES"
STAGED_MARKER = ".lorakube-staged.json"
EVICT_LOCK = ".evict.lock"
PARTIAL_INFIX = ".partial-"
# How often a waiting process looks at the download it waits for (and reports its bytes), and how
# often the downloader refreshes the progress file those waiters read.
WAIT_POLL_S = 1.0
PROGRESS_FILE_INTERVAL_S = 1.0

# on_bytes(done, total): bytes of this input fetched so far (this process or another on the node)
# and the input's total size (None while unknown). Called only while bytes are being fetched or
# waited for: a cache hit calls nothing.
ByteProgress = Callable[[int, "int | None"], None]
# fill(folder, on_bytes): download the input into `folder` (empty, on the cache's filesystem).
Filler = Callable[[Path, ByteProgress], None]

# `.use` locks of the entries this process uses, open (so held) until it exits.
_IN_USE: dict[str, IO[str]] = {}


class FileBytes:
    """An input's bytes so far, summed over its files, for the clients that report per file (the
    hubs' per-file progress objects, some fed from worker threads). A file reported from 0 again
    (the client started it over) replaces its earlier count instead of adding to it; the sum goes
    to `progress`, never past `total`."""

    def __init__(self, progress: ByteProgress, total: int | None) -> None:
        self._progress, self._total = progress, total
        self._files: dict[str, int] = {}
        self._done = 0
        self._lock = threading.Lock()

    def set(self, name: str, count: int) -> None:
        with self._lock:
            self._update(name, max(0, count))

    def add(self, name: str, delta: int) -> None:
        with self._lock:
            self._update(name, max(0, self._files.get(name, 0) + delta))

    def _update(self, name: str, count: int) -> None:
        # A running sum: a dataset of many small files must not be summed again at every chunk.
        self._done += count - self._files.get(name, 0)
        self._files[name] = count
        done = self._done if self._total is None else min(self._done, self._total)
        self._progress(done, self._total)


class Throttle:
    """At most one `due()` per interval, and always the first and a forced (final) one."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: float | None = None

    def due(self, force: bool = False) -> bool:
        now = self.clock()
        if force or self._last is None or now - self._last >= self.interval_s:
            self._last = now
            return True
        return False


def max_bytes_from_env(env: Mapping[str, str], name: str = ENV_CACHE_MAX_BYTES,
                       unset: str = "no cap") -> int | None:
    """The cap in bytes, or None (unset: `unset` applies). Accepts a plain number or one with a
    K/M/G/T(i) suffix. `name`: the variable (archives.py reads its own cap the same way)."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
    number = raw.rstrip("KMGTikmgtBb")
    suffix = raw[len(number):].lower().removesuffix("b")
    try:
        value = int(float(number) * units[suffix])
    except (ValueError, KeyError):
        raise ValueError(f"{name}={raw!r} is not a size; give bytes, such as 50000000000 or 50Gi") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be more than 0 (unset it for {unset})")
    return value


# ---------------------------------------------------------------------------------------------
# Choosing what to evict (pure)


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    size: int
    last_used: float
    in_use: bool        # another process holds it: never evicted


def choose_evictions(entries: Sequence[Entry], needed: int, cap: int | None, partial_bytes: int = 0) -> list[str]:
    """The keys to delete, least recently used first, so that the cache plus `needed` bytes fits
    in `cap`; entries in use are skipped. When even deleting every unused entry would not make it
    fit, all of them go (the download will exceed the cap anyway; whatever stays only adds to it)."""
    if cap is None:
        return []
    used = sum(e.size for e in entries) + partial_bytes
    chosen = []
    for entry in sorted((e for e in entries if not e.in_use), key=lambda e: (e.last_used, e.key)):
        if used + needed <= cap:
            break
        chosen.append(entry.key)
        used -= entry.size
    return chosen


# ---------------------------------------------------------------------------------------------
# Locks


def _try_lock(path: Path, mode: int) -> IO[str] | None:
    """The open, locked file, or None when another open file holds a conflicting lock."""
    handle = open(path, "a")
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return handle


@contextlib.contextmanager
def locked(path: Path, while_waiting: Callable[[], None] | None = None,
           poll_s: float = WAIT_POLL_S) -> Iterator[None]:
    """Hold `path` exclusively; while another process holds it, call `while_waiting` every poll."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = _try_lock(path, fcntl.LOCK_EX)
    while handle is None:
        if while_waiting is not None:
            while_waiting()
        time.sleep(poll_s)
        handle = _try_lock(path, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def hold_in_use(root: Path, key: str) -> None:
    """Mark `key` as used by this process until it exits (eviction skips it)."""
    path = root / f"{key}.use"
    # By path, not key: the same input has the same key in every cache root this process uses.
    if str(path) in _IN_USE:
        return
    handle = open(path, "a")
    fcntl.flock(handle, fcntl.LOCK_SH)
    _IN_USE[str(path)] = handle


# ---------------------------------------------------------------------------------------------
# Entries


def entry_bytes(folder: Path) -> int:
    """A complete entry's size, as its marker records it (or counted, for an entry without)."""
    try:
        recorded = json.loads((folder / STAGED_MARKER).read_text()).get("bytes")
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, int):
        return recorded
    return _tree_bytes(folder)


def _tree_bytes(folder: Path) -> int:
    total = 0
    for base, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(base, name)).st_size
    return total


def _complete_entries(root: Path) -> list[tuple[str, Path]]:
    if not root.is_dir():
        return []
    return sorted((p.name, p) for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / STAGED_MARKER).is_file())


def _partial_key(name: str) -> str | None:
    if name.startswith(".") and PARTIAL_INFIX in name:
        return name[1:].split(PARTIAL_INFIX, 1)[0]
    return None


def evict_for(root: Path, needed: int, cap: int | None, keep: str) -> list[str]:
    """Make room for `needed` bytes under `cap` (see choose_evictions); returns the keys deleted.
    Holds each entry's `.lock` and `.use` while deciding, so an entry being filled, checked or used
    by any process is never touched, and no process can start using one while it is deleted.
    Partial folders nobody fills any more (their process died) are deleted first."""
    if cap is None:
        return []
    held: list[IO[str]] = []
    deleted: list[str] = []
    with locked(root / EVICT_LOCK):
        try:
            partial_bytes = 0
            for path in sorted(root.iterdir()):
                key = _partial_key(path.name)
                if key is None or not path.is_dir() or key == keep:
                    continue
                handle = _try_lock(root / f"{key}.lock", fcntl.LOCK_EX)
                if handle is None:          # its download is still under way
                    partial_bytes += _tree_bytes(path)
                    continue
                held.append(handle)
                log.info("removing %s, a download that did not finish", path)
                shutil.rmtree(path, ignore_errors=True)
            entries = []
            for key, folder in _complete_entries(root):
                free = key != keep and _lock_both(root, key, held)
                with contextlib.suppress(OSError):
                    entries.append(Entry(key, entry_bytes(folder), (folder / STAGED_MARKER).stat().st_mtime,
                                         in_use=not free))
            for key in choose_evictions(entries, needed, cap, partial_bytes):
                folder = root / key
                # The marker first: a deletion cut short leaves a folder no process takes as complete.
                (folder / STAGED_MARKER).unlink(missing_ok=True)
                shutil.rmtree(folder, ignore_errors=True)
                deleted.append(key)
                log.info("evicted %s from the cache (least recently used; %s=%d)", folder, ENV_CACHE_MAX_BYTES, cap)
            left = sum(e.size for e in entries if e.key not in deleted) + partial_bytes
            if left + needed > cap:
                log.warning("the cache holds %d bytes in use and the next input needs %d: more than %s=%d; "
                            "downloading it anyway", left, needed, ENV_CACHE_MAX_BYTES, cap)
        finally:
            for handle in held:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
    return deleted


def _lock_both(root: Path, key: str, held: list[IO[str]]) -> bool:
    """Take `<key>.lock` and `<key>.use` exclusively (appended to `held`); False if either is taken."""
    first = _try_lock(root / f"{key}.lock", fcntl.LOCK_EX)
    if first is None:
        return False
    held.append(first)
    second = _try_lock(root / f"{key}.use", fcntl.LOCK_EX)
    if second is None:
        return False
    held.append(second)
    return True


# ---------------------------------------------------------------------------------------------
# Progress shared with waiting processes


def _write_progress(path: Path, done: int, total: int | None) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"done": done, "total": total}))
    os.replace(tmp, path)


def read_progress(path: Path) -> tuple[int, int | None] | None:
    try:
        body = json.loads(path.read_text())
        return int(body["done"]), (None if body.get("total") is None else int(body["total"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# Staging


def stage(root: Path, key: str, uri: str, total: int | None, fill: Filler, *,
          on_bytes: ByteProgress | None = None, cap: int | None = None,
          record: Mapping[str, object] | None = None) -> Path:
    """`root/key`, filled by `fill` unless a complete entry is there already; see the module doc.
    `total` (bytes, if known before the download) sizes the eviction; `record` goes into the marker."""
    report = on_bytes or (lambda done, total: None)
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    progress_file = root / f"{key}.progress"

    def waiting() -> None:
        seen = read_progress(progress_file)
        if seen is not None:
            report(*seen)

    with locked(root / f"{key}.lock", while_waiting=waiting):
        if (final / STAGED_MARKER).is_file():
            log.info("using %s staged before in %s", uri, final)
            os.utime(final / STAGED_MARKER)         # the entry's last use, for eviction
            hold_in_use(root, key)
            return final
        evict_for(root, total or 0, cap, keep=key)
        partial = Path(tempfile.mkdtemp(prefix=f".{key}{PARTIAL_INFIX}", dir=root))
        throttle = Throttle(PROGRESS_FILE_INTERVAL_S)

        def progress(done: int, size: int | None) -> None:
            if throttle.due(force=size is not None and done >= size):
                _write_progress(progress_file, done, size)
            report(done, size)

        try:
            log.info("staging %s (%s bytes)", uri, "unknown" if total is None else total)
            fill(partial, progress)
            size = _tree_bytes(partial)
            marker = {"uri": uri, "bytes": size, **(record or {})}
            (partial / STAGED_MARKER).write_text(json.dumps(marker, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)        # a leftover without the marker
            os.replace(partial, final)
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
            progress_file.unlink(missing_ok=True)
        hold_in_use(root, key)
        log.info("staged %s in %s", uri, final)
        return final
