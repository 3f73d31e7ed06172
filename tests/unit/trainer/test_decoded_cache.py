"""A centre-cropped image is decoded and resized once per process, then served from memory with the
same per-sample flip: the samples are exactly what decoding every time gives (issue #12, CPU overhead)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from trainer_testlib import write_dataset
from PIL import Image

from lorakube_trainer import data
from lorakube_trainer.data import CaptionedImages, SampleKey, load_records, resize_and_crop


def _dataset(root: Path, center_crop: bool) -> CaptionedImages:
    records = load_records(write_dataset(root, [(48, 32), (32, 48), (40, 40)]))
    return CaptionedImages(records, seed=3, height=16, width=16, center_crop=center_crop, random_flip=True,
                           samples_per_epoch=12)


def _decoded_now(ds: CaptionedImages, key: SampleKey) -> torch.Tensor:
    record = ds.records[ds.record_index(key)]
    with Image.open(record.path) as img:
        return resize_and_crop(img, ds.height, ds.width, ds.center_crop, ds.random_flip, ds.sample_rng(key))


def test_centre_crops_come_from_memory_and_equal_a_fresh_decode(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "d", center_crop=True)
    keys = [SampleKey(epoch=0, position=p) for p in range(12)]
    expected = [_decoded_now(ds, k) for k in keys]
    first = [ds[k]["pixels"] for k in keys]
    for got, want in zip(first, expected):
        assert torch.equal(got, want)
    # Both orientations occur, so the flip is really applied to the remembered crop.
    assert any(torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a in first for b in first)
    # The files are no longer read: delete them and the next epoch's samples still load, identical.
    for record in ds.records:
        record.path.unlink()
    assert all(torch.equal(ds[k]["pixels"], want) for k, want in zip(keys, expected))


def test_random_crops_are_decoded_every_time(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "d", center_crop=False)
    key = SampleKey(epoch=0, position=0)
    assert torch.equal(ds[key]["pixels"], _decoded_now(ds, key))
    assert ds._decoded == {}


def test_the_memory_budget_bounds_what_is_kept(tmp_path: Path, monkeypatch) -> None:
    one_crop = 3 * 16 * 16 * 4
    monkeypatch.setattr(data, "DECODED_CACHE_BYTES", 2 * one_crop)
    ds = _dataset(tmp_path / "d", center_crop=True)
    samples = [ds[SampleKey(epoch=0, position=p)] for p in range(12)]
    assert len(ds._decoded) == 2 and ds._decoded_bytes == 2 * one_crop
    assert all(np.isfinite(s["pixels"].numpy()).all() for s in samples)


def test_a_crop_from_memory_keeps_its_samples_caption_dropout(tmp_path: Path) -> None:
    records = load_records(write_dataset(tmp_path / "d", [(48, 32), (32, 48)]))
    ds = CaptionedImages(records, seed=3, height=16, width=16, center_crop=True, random_flip=False,
                         samples_per_epoch=40, caption_dropout=0.5)
    keys = [SampleKey(epoch=0, position=p) for p in range(40)]
    texts = [ds[k]["text"] for k in keys]                  # the first two decode, the rest from memory
    assert texts == [ds.caption(k, ds.record_index(k)) for k in keys]
    assert "" in texts[2:] and any(texts[2:])              # dropped and kept samples both come from memory
