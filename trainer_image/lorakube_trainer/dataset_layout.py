"""Where a dataset's metadata.csv lives (the documented folder layout), without torch or PIL, so
preflight can look for it in the first second of a pod; data.py reads and checks the rows."""

from __future__ import annotations

from pathlib import Path

METADATA_FILE = "metadata.csv"
TRAIN_SUBDIR = "train"
REQUIRED_COLUMNS = ("file_name", "text")


class DatasetError(ValueError):
    """The dataset is malformed; the message names the file or row and how to fix it."""


def find_metadata(dataset_path: str | Path) -> Path:
    root = Path(dataset_path)
    candidates = [root / TRAIN_SUBDIR / METADATA_FILE, root / METADATA_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"no {METADATA_FILE} in {root}: expected {candidates[0]} (or {candidates[1]}) "
        f"with columns {','.join(REQUIRED_COLUMNS)}"
    )
