"""A dataset staged into the node's cache (s3://, hf://, modelscope://, https://) is checked once per
cache entry, not once per training process: on a node with 8 GPUs, 8 processes reading every
image's header would be 8 reads of the dataset, and a second job on the node another 8.

The first process to check writes a marker into the entry, beside its staged marker:

    <cache>/inputs/<key>/.lorakube-dataset-checked-<digest>.json

`<digest>` covers what the check's verdict depends on: this check's version and the trainer's,
--max_image_pixels, the dataset's folder inside the entry and the options that pick its images
(format, default caption, caption extension). A marker for other values does not count, so a job
with a lower pixel limit checks again. The entry's `<key>.lock` is held while checking, so the
other local ranks wait for the verdict instead of reading alongside; a check that fails writes no
marker (every process then fails on it, naming the same file). Eviction deletes the marker with
its entry, and an entry's content never changes (its key is its version), so a marker never
vouches for other bytes. The records themselves (step 1, no image opened) are read by every
process as before.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

from lorakube_api import contract

from . import input_cache
from .dataset_layout import CAPTION_SUFFIX, FORMAT_AUTO, Record, load_records

log = logging.getLogger(__name__)

# Raise when check_image refuses something it did not before: markers of older checks then lapse.
CHECK_VERSION = 1
MARKER_PREFIX = ".lorakube-dataset-checked-"


def staged_entry(path: str | Path) -> Path | None:
    """The complete cache entry `path` is in (the nearest folder holding the staged marker), or None."""
    current = Path(path).resolve()
    for folder in (current, *current.parents):
        if (folder / input_cache.STAGED_MARKER).is_file():
            return folder
    return None


def _trainer_version() -> str:
    try:
        return importlib.metadata.version("lorakube")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def marker_path(entry: Path, dataset_path: str | Path, max_pixels: int, dataset_format: str,
                default_caption: str | None, caption_extension: str) -> Path:
    what = {"check": CHECK_VERSION, "trainer": _trainer_version(), "max_image_pixels": max_pixels,
            "folder": Path(dataset_path).resolve().relative_to(entry).as_posix(), "format": dataset_format,
            "default_caption": default_caption, "caption_extension": caption_extension}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
    return entry / f"{MARKER_PREFIX}{digest}.json"


def load_records_once(dataset_path: str | Path, max_pixels: int = contract.DEFAULT_MAX_IMAGE_PIXELS, *,
                      dataset_format: str = FORMAT_AUTO, default_caption: str | None = None,
                      caption_extension: str = CAPTION_SUFFIX) -> list[Record]:
    """dataset_layout.load_records for a dataset in the node's cache, its images checked by the first
    process only (see the module doc); a folder outside the cache is checked every time."""
    options = {"dataset_format": dataset_format, "default_caption": default_caption,
               "caption_extension": caption_extension}
    entry = staged_entry(dataset_path)
    if entry is None:
        return load_records(dataset_path, max_pixels, **options)
    marker = marker_path(entry, dataset_path, max_pixels, dataset_format, default_caption, caption_extension)
    if marker.is_file():
        return load_records(dataset_path, max_pixels, verify_images=False, **options)
    with input_cache.locked(entry.parent / f"{entry.name}.lock"):
        if marker.is_file():            # checked by the process this one waited for
            return load_records(dataset_path, max_pixels, verify_images=False, **options)
        records = load_records(dataset_path, max_pixels, **options)
        tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"checked": True, "images": len({r.path for r in records}),
                                   "max_image_pixels": max_pixels, "check": CHECK_VERSION,
                                   "trainer": _trainer_version()}, sort_keys=True))
        os.replace(tmp, marker)
    log.info("dataset %s checked; the other processes using cache entry %s will not read its images again",
             dataset_path, entry.name)
    return records
