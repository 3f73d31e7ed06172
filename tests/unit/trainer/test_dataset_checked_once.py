"""A staged dataset's images are read once per cache entry (dataset_checked.py), not once per
training process: each process here is a real Python process, and an audit hook counts the image
files it opens (the interpreter's own `open` events, nothing patched)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorakube_api import contract
from lorakube_trainer import dataset_checked, input_cache
from lorakube_trainer.dataset_layout import DatasetError

EXAMPLE_DATASET = Path(__file__).resolve().parents[3] / "examples" / "dataset"
IMAGES = len(list((EXAMPLE_DATASET / "train").glob("*.png")))

# One training process's dataset step, reporting how many image files it opened.
PROCESS = """
import json, sys
opened = []
def hook(event, args):
    if event == "open" and str(args[0]).endswith(".png"):
        opened.append(str(args[0]))
sys.addaudithook(hook)
from lorakube_trainer.dataset_checked import load_records_once
records = load_records_once(sys.argv[1], int(sys.argv[2]))
print(json.dumps({"records": len(records), "image_opens": len(opened)}))
"""


def _stage(tmp_path: Path, key: str, source: Path = EXAMPLE_DATASET) -> Path:
    """The dataset as an entry of the node's cache, filled the way every downloader fills one."""
    return input_cache.stage(tmp_path / "cache" / "inputs", key, f"s3://sets/{key}", None,
                             lambda folder, progress: shutil.copytree(source, folder, dirs_exist_ok=True))


def _start(dataset: Path, max_pixels: int = contract.DEFAULT_MAX_IMAGE_PIXELS) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", PROCESS, str(dataset), str(max_pixels)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _opens(dataset: Path, max_pixels: int = contract.DEFAULT_MAX_IMAGE_PIXELS) -> int:
    body = _result(_start(dataset, max_pixels))
    assert body["records"] == IMAGES
    return body["image_opens"]


def test_the_second_process_on_the_node_does_not_read_the_images_again(tmp_path):
    entry = _stage(tmp_path, "shapes")
    assert _opens(entry) == IMAGES                       # the first process (or job) checks each image
    markers = sorted(p.name for p in entry.glob(f"{dataset_checked.MARKER_PREFIX}*"))
    assert len(markers) == 1
    assert json.loads((entry / markers[0]).read_text())["images"] == IMAGES
    assert _opens(entry) == 0                            # a second process, a second job: none
    assert _opens(entry / ".") == 0                      # the same folder, spelled otherwise
    # A lower pixel limit is another verdict: checked again, then marked for that limit too.
    assert _opens(entry, 1_000_000) == IMAGES
    assert _opens(entry, 1_000_000) == 0
    # A folder outside the cache has no entry to mark: checked every time, as before.
    assert _opens(EXAMPLE_DATASET) == IMAGES
    assert _opens(EXAMPLE_DATASET) == IMAGES


def test_local_ranks_starting_together_read_the_images_once_between_them(tmp_path):
    entry = _stage(tmp_path, "together")
    procs = [_start(entry) for _ in range(3)]
    opens = sorted(_result(proc)["image_opens"] for proc in procs)
    # One checked while holding the entry's lock; the others waited for its verdict.
    assert opens == [0, 0, IMAGES]


def test_a_dataset_that_fails_the_check_is_never_marked_checked(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(EXAMPLE_DATASET, broken)
    victim = sorted((broken / "train").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:60])          # a download cut short
    entry = _stage(tmp_path, "broken", broken)
    for _ in range(2):                                    # every process fails, naming the file
        with pytest.raises(DatasetError, match=f"{victim.name} is not a readable image"):
            dataset_checked.load_records_once(entry)
    assert not list(entry.glob(f"{dataset_checked.MARKER_PREFIX}*"))


def test_the_marker_is_deleted_with_its_entry(tmp_path):
    entry = _stage(tmp_path, "evicted")
    dataset_checked.load_records_once(entry)
    assert list(entry.glob(f"{dataset_checked.MARKER_PREFIX}*"))
    input_cache._IN_USE.pop(str(entry.parent / "evicted.use")).close()     # this process stops using it
    assert input_cache.evict_for(entry.parent, needed=1 << 40, cap=1, keep="other") == ["evicted"]
    assert not entry.exists()
