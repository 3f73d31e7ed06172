"""Test-only entry point: probe_launcher.py plus a record of every sample the data loader really
fetched on each rank, one JSON line per sample in $PROBE_DIR/yields-rank-<r>.jsonl:

    {"epoch": 0, "position": 3, "index": 1}

The record is written from inside the dataset's __getitem__ (the loaders run without workers in
these tests), so it counts what the loader produced, not what a callback saw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

import probe_launcher
from lorakube_trainer import data

_original_getitem = data.CaptionedImages.__getitem__


def _recording_getitem(self: data.CaptionedImages, key: data.SampleKey) -> dict:
    item = _original_getitem(self, key)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    out = Path(os.environ["PROBE_DIR"]) / f"yields-rank-{rank}.jsonl"
    with out.open("a") as fh:
        fh.write(json.dumps({"epoch": key.epoch, "position": key.position, "index": item["index"]}) + "\n")
    return item


if __name__ == "__main__":
    data.CaptionedImages.__getitem__ = _recording_getitem
    Path(os.environ["PROBE_DIR"]).mkdir(parents=True, exist_ok=True)
    probe_launcher.main()
