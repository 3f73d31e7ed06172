"""The node-local input cache (input_cache.py): LRU eviction under LORAKUBE_CACHE_MAX_BYTES that
never touches an entry another process uses or fills, partial downloads never taken as complete,
and the throttled staging reports rank 0 sends (staging.py)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lorakube_api import contract
from lorakube_trainer import input_cache as ic
from lorakube_trainer import remote
from lorakube_trainer.staging import StagingReporter


def test_throttle_lets_the_first_then_one_per_interval_and_every_forced_one_through():
    now = [100.0]
    throttle = ic.Throttle(2.0, lambda: now[0])
    seen = []
    for t in (100.0, 100.5, 101.9, 102.0, 102.1, 104.5):
        now[0] = t
        seen.append(throttle.due())
    assert seen == [True, False, False, True, False, True]
    assert throttle.due(force=True)


def E(key: str, size: int, used: float, in_use: bool = False) -> ic.Entry:
    return ic.Entry(key, size, used, in_use)


def test_eviction_takes_the_least_recently_used_unused_entries_until_the_new_input_fits():
    entries = [E("new", 40, 30.0), E("old", 30, 10.0), E("busy", 50, 5.0, in_use=True), E("mid", 20, 20.0)]
    # 140 cached + 30 needed against 120: 50 must go -> "old" (30) then "mid" (20); "busy" is older but in use
    assert ic.choose_evictions(entries, 30, 120) == ["old", "mid"]
    assert ic.choose_evictions(entries, 0, 140) == []                  # fits already
    assert ic.choose_evictions(entries, 30, None) == []                # no cap, no eviction
    # cannot fit even with every unused entry gone: all unused ones go, the busy one stays
    assert ic.choose_evictions(entries, 500, 120) == ["old", "mid", "new"]
    # bytes of downloads under way count too
    assert ic.choose_evictions(entries, 0, 140, partial_bytes=10) == ["old"]


@pytest.mark.parametrize("raw, expected", [("1000", 1000), ("50Gi", 50 << 30), ("2G", 2 * 10**9), ("1.5GB", 1_500_000_000),
                                           ("512Mi", 512 << 20), ("", None)])
def test_cache_cap_from_env(raw, expected):
    assert ic.max_bytes_from_env({ic.ENV_CACHE_MAX_BYTES: raw}) == expected


@pytest.mark.parametrize("raw", ["lots", "0", "-5", "12Q"])
def test_a_bad_cache_cap_names_the_variable(raw):
    with pytest.raises(ValueError, match=ic.ENV_CACHE_MAX_BYTES):
        ic.max_bytes_from_env({ic.ENV_CACHE_MAX_BYTES: raw})


def filler(size: int, chunks: int = 4):
    def fill(folder: Path, on_bytes: ic.ByteProgress) -> None:
        done = 0
        for i in range(chunks):
            (folder / f"part-{i}").write_bytes(b"x" * (size // chunks))
            done += size // chunks
            on_bytes(done, size)
    return fill


def make_entry(root: Path, key: str, size: int, last_used: float) -> Path:
    folder = ic.stage(root, key, key, size, filler(size))
    os.utime(folder / ic.STAGED_MARKER, (last_used, last_used))
    return folder


HOLDER = """
import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_SH if sys.argv[1].endswith(".use") else fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def hold(path: Path) -> subprocess.Popen:
    """Another process holding `path` (a `.use` lock shared, anything else exclusive)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_stage_evicts_the_oldest_unused_entry_and_never_one_another_process_uses(tmp_path):
    root = tmp_path / "inputs"
    ic._IN_USE.clear()
    now = time.time()
    for key, age in (("aaa", 300), ("bbb", 200), ("ccc", 100)):
        make_entry(root, key, 1000, now - age)
    # this test process "used" them when staging; let go so that only the holder below counts
    for handle in ic._IN_USE.values():
        handle.close()
    ic._IN_USE.clear()
    user = hold(root / "aaa.use")        # the oldest is in use by another job on the node
    try:
        ic.stage(root, "ddd", "ddd", 1000, filler(1000), cap=3000)
    finally:
        user.kill()
        user.wait()
    left = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert left == ["aaa", "ccc", "ddd"]     # bbb was the least recently used entry nobody held


def test_an_entry_being_filled_is_not_evicted_and_its_partial_folder_is_kept(tmp_path):
    root = tmp_path / "inputs"
    ic._IN_USE.clear()
    make_entry(root, "old", 1000, time.time() - 100)
    ic._IN_USE.clear()
    partial = root / f".busy{ic.PARTIAL_INFIX}abc"
    partial.mkdir()
    (partial / "half").write_bytes(b"y" * 500)
    filling = hold(root / "busy.lock")
    try:
        deleted = ic.evict_for(root, 600, 1000, keep="new")
    finally:
        filling.kill()
        filling.wait()
    assert deleted == ["old"] and partial.is_dir()


def test_a_partial_download_is_never_taken_as_complete(tmp_path):
    root = tmp_path / "inputs"

    def broken(folder: Path, on_bytes: ic.ByteProgress) -> None:
        (folder / "weights").write_bytes(b"z" * 10)
        on_bytes(10, 100)
        raise OSError("connection reset")

    with pytest.raises(OSError):
        ic.stage(root, "k", "s3://b/k", 100, broken)
    assert not (root / "k").exists()
    assert [p.name for p in root.iterdir() if p.is_dir()] == []
    # a partial folder left by a process that died (no lock held) is cleaned up by the next eviction
    dead = root / f".k{ic.PARTIAL_INFIX}dead"
    dead.mkdir()
    (dead / "weights").write_bytes(b"z" * 10)
    ic.evict_for(root, 0, 10**9, keep="other")
    assert not dead.exists()
    # and a later stage downloads again and completes
    folder = ic.stage(root, "k", "s3://b/k", 100, filler(100))
    assert json.loads((folder / ic.STAGED_MARKER).read_text())["bytes"] == 100
    assert ic.entry_bytes(folder) == 100


def test_a_waiting_process_sees_the_downloaders_bytes_through_the_progress_file(tmp_path):
    root = tmp_path / "inputs"
    root.mkdir()
    (root / "k.progress").write_text(json.dumps({"done": 40, "total": 100}))
    seen = []
    downloader = hold(root / "k.lock")
    try:
        def finish_later() -> None:
            if len(seen) == 2:          # after two polls the other process finishes
                folder = root / "k"
                folder.mkdir()
                (folder / ic.STAGED_MARKER).write_text(json.dumps({"bytes": 100}))
                downloader.kill()
                downloader.wait()

        original = ic.read_progress

        def reading(path: Path):
            found = original(path)
            seen.append(found)
            finish_later()
            return found

        ic.read_progress = reading
        try:
            folder = ic.stage(root, "k", "s3://b/k", 100, filler(100), on_bytes=lambda d, t: None)
        finally:
            ic.read_progress = original
    finally:
        if downloader.poll() is None:
            downloader.kill()
            downloader.wait()
    assert seen[:2] == [(40, 100), (40, 100)]
    assert folder == root / "k" and not (root / "k" / "part-0").exists()   # used, not downloaded again


def test_staging_reports_are_throttled_with_the_first_and_last_of_each_input_sent():
    now = [0.0]
    out = io.StringIO()
    reporter = StagingReporter(3, out=out, interval_s=2.0, clock=lambda: now[0])
    reporter.begin("model", "s3://models/m")
    for t, done in ((0.0, 0), (0.5, 10), (1.0, 20), (2.1, 30), (2.2, 40), (4.5, 90)):
        now[0] = t
        reporter.on_bytes(done, 100)
    reporter.end(100, complete=False)
    reporter.begin("dataset", "s3://datasets/d")
    reporter.end(7, complete=True)           # a cache hit: no bytes callback at all
    sent = [(s.input, s.bytesDone, s.bytesTotal, s.cached, s.complete) for s in reporter.sent]
    assert sent == [("model", 0, None, False, False), ("model", 0, 100, False, False),
                    ("model", 30, 100, False, False), ("model", 90, 100, False, False),
                    ("model", 100, 100, False, False),
                    ("dataset", 0, None, False, False), ("dataset", 7, 7, True, True)]
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all(line["event"] == contract.STAGING_EVENT and line["attempt"] == 3 for line in lines)
    assert lines[-1]["complete"] is True and lines[-1]["cached"] is True


def test_only_this_pods_first_process_counts_as_having_staged_the_inputs():
    assert remote.inputs_staged_by_this_pod({remote.ENV_INPUTS_STAGED: str(os.getpid())})      # the same process
    assert remote.inputs_staged_by_this_pod({remote.ENV_INPUTS_STAGED: str(os.getppid())})     # a launched local rank
    assert not remote.inputs_staged_by_this_pod({remote.ENV_INPUTS_STAGED: "1"})               # set in the job's env
    assert not remote.inputs_staged_by_this_pod({})


def test_file_bytes_sums_files_counts_a_restarted_file_once_and_stops_at_the_total():
    seen: list[tuple[int, int | None]] = []
    counted = ic.FileBytes(lambda done, total: seen.append((done, total)), 100)
    counted.set("a", 0)
    counted.add("a", 30)
    counted.add("b", 20)
    counted.set("a", 0)             # the client starts a over (a retry): its 30 bytes no longer count
    counted.add("a", 40)
    counted.add("b", -50)           # a client taking back more than it gave never goes below 0
    counted.add("b", 90)
    assert seen == [(0, 100), (30, 100), (50, 100), (20, 100), (60, 100), (40, 100), (100, 100)]


def test_file_bytes_from_several_threads_add_up():
    seen: list[int] = []
    counted = ic.FileBytes(lambda done, total: seen.append(done), None)

    def feed(name: str) -> None:
        for _ in range(2000):
            counted.add(name, 3)

    threads = [threading.Thread(target=feed, args=(f"part-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[-1] == 4 * 2000 * 3 and seen == sorted(seen)


def test_the_last_staging_report_after_a_download_is_the_downloads_total():
    """An https:// archive is larger than the folder it extracts to: bytesDone must not go back."""
    reporter = StagingReporter(1, out=io.StringIO(), interval_s=0.0)
    reporter.begin("dataset", "https://h/set.tar")
    reporter.on_bytes(0, 500)
    reporter.on_bytes(500, 500)
    reporter.end(420, complete=True)         # the extracted folder's size
    assert [(s.bytesDone, s.bytesTotal, s.cached) for s in reporter.sent][-1] == (500, 500, False)
