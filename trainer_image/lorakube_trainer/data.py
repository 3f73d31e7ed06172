"""The image-caption dataset in the documented folder layout, and a resumable per-rank sampler.

Layout: `<dataset_path>/train/metadata.csv` with columns `file_name,text` and the images beside it
(DiffSynth-Studio's layout); `<dataset_path>/metadata.csv` with file names relative to it is
accepted too. Every record is checked before training starts, so a bad dataset fails at once with
the file or row named instead of hours into a run.

Determinism: which record a sample shows and how it is cropped/flipped are pure functions of
(seed, epoch, position in the epoch's global order). Nothing here touches the global RNGs, so a
resumed run sees exactly the samples the interrupted one would have seen next.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# Re-exported: the layout is shared with preflight, which must not import torch.
from .dataset_layout import METADATA_FILE, REQUIRED_COLUMNS, TRAIN_SUBDIR, DatasetError, find_metadata  # noqa: F401

# 8192 x 8192: well above any training resolution; anything larger is treated as a decompression bomb.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192


@dataclasses.dataclass(frozen=True)
class Record:
    path: Path
    text: str


def _check_image(path: Path, where: str, max_pixels: int) -> None:
    try:
        with Image.open(path) as img:
            # Image.open reads only the header, so the size check happens before any decoding.
            width, height = img.size
            if width * height > max_pixels:
                raise DatasetError(f"{where}: {path.name} is {width}x{height} pixels, more than the limit of "
                                   f"{max_pixels}; downscale it")
            img.verify()
    except DatasetError:
        raise
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{where}: {path.name} looks like a decompression bomb ({exc}); downscale it") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{where}: {path.name} is not a readable image ({exc}); replace or remove it") from exc


def load_records(dataset_path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[Record]:
    """Read and check metadata.csv and every image it names."""
    metadata = find_metadata(dataset_path)
    base = metadata.parent.resolve()
    try:
        with metadata.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise DatasetError(f"{metadata}: missing column(s) {','.join(missing)}; the header must be "
                                   f"{','.join(REQUIRED_COLUMNS)} (found {','.join(columns) or 'no header'})")
            rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{metadata}: not UTF-8 text ({exc}); save it as UTF-8 CSV") from exc
    except csv.Error as exc:
        raise DatasetError(f"{metadata}: not a valid CSV file ({exc})") from exc

    records = []
    for line, row in enumerate(rows, start=2):      # line 1 is the header
        where = f"{metadata.name} row {line}"
        name = (row.get("file_name") or "").strip()
        if not name:
            raise DatasetError(f"{where}: empty file_name")
        relative = Path(name)
        if relative.is_absolute():
            raise DatasetError(f"{where}: file_name {name!r} is an absolute path; give it relative to {base.name}/")
        path = (base / relative).resolve()
        if not path.is_relative_to(base):
            raise DatasetError(f"{where}: file_name {name!r} points outside the dataset folder; "
                               f"keep images inside {base.name}/")
        if not path.is_file():
            raise DatasetError(f"{where}: image {name!r} not found in {base}")
        _check_image(path, where, max_pixels)
        records.append(Record(path=path, text=(row.get("text") or "").strip()))
    if not records:
        raise DatasetError(f"{metadata}: no rows; add one line per image as file_name,text")
    return records


def flip_decision(random_flip: bool, rng: np.random.Generator) -> bool:
    return random_flip and bool(rng.random() < 0.5)


def resize_and_crop(img: Image.Image, height: int, width: int, center_crop: bool,
                    random_flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """Resize so the image covers height x width, crop to exactly that, maybe flip, scale to [-1, 1]."""
    img = img.convert("RGB")
    scale = max(height / img.height, width / img.width)
    new_w, new_h = max(width, math.ceil(img.width * scale)), max(height, math.ceil(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if center_crop:
        left, top = (new_w - width) // 2, (new_h - height) // 2
    else:
        left = int(rng.integers(0, new_w - width + 1))
        top = int(rng.integers(0, new_h - height + 1))
    img = img.crop((left, top, left + width, top + height))
    if flip_decision(random_flip, rng):
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


# Decoded centre crops kept in memory per process (about 85 images at 1024x1024).
DECODED_CACHE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class SampleKey:
    epoch: int
    position: int       # index into the epoch's global order (all ranks)


def epoch_order(seed: int, epoch: int, num_records: int, length: int) -> np.ndarray:
    """The epoch's global sample order: shuffled passes over the records, `length` long."""
    rng = np.random.default_rng([seed, epoch, 0x0D47A])
    passes = -(-length // num_records)
    return np.concatenate([rng.permutation(num_records) for _ in range(passes)])[:length]


class CaptionedImages(torch.utils.data.Dataset):
    """Map-style dataset indexed by SampleKey (what ShardSampler yields)."""

    def __init__(self, records: list[Record], *, seed: int, height: int, width: int, center_crop: bool,
                 random_flip: bool, samples_per_epoch: int) -> None:
        self.records = records
        self.seed, self.height, self.width = seed, height, width
        self.center_crop, self.random_flip = center_crop, random_flip
        self.samples_per_epoch = samples_per_epoch      # global: all ranks together
        self._orders: dict[int, np.ndarray] = {}
        self._decoded: dict[int, torch.Tensor] = {}      # record index -> its centre crop (unflipped)
        self._decoded_bytes = 0

    def record_index(self, key: SampleKey) -> int:
        order = self._orders.get(key.epoch)
        if order is None:
            order = epoch_order(self.seed, key.epoch, len(self.records), self.samples_per_epoch)
            self._orders = {key.epoch: order}           # one epoch at a time is all a sampler needs
        return int(order[key.position])

    def __len__(self) -> int:
        return self.samples_per_epoch

    def sample_rng(self, key: SampleKey) -> np.random.Generator:
        """The sample's own augmentation randomness (crop offsets, then the flip)."""
        return np.random.default_rng([self.seed, key.epoch, key.position, 0xC409])

    def __getitem__(self, key: SampleKey) -> dict:
        index = self.record_index(key)
        record = self.records[index]
        rng = self.sample_rng(key)
        pixels = self._decoded.get(index)
        if pixels is not None:
            # A centre crop is the same every time: only the flip (the same draw) is per sample.
            return {"pixels": pixels.flip(-1) if flip_decision(self.random_flip, rng) else pixels,
                    "text": record.text, "index": index}
        try:
            with Image.open(record.path) as img:
                if self.center_crop:
                    pixels = resize_and_crop(img, self.height, self.width, True, False, rng)
                    self._remember(index, pixels)
                    if flip_decision(self.random_flip, rng):
                        pixels = pixels.flip(-1)
                else:
                    pixels = resize_and_crop(img, self.height, self.width, False, self.random_flip, rng)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{record.path.name}: cannot decode image ({exc}); replace or remove it") from exc
        return {"pixels": pixels, "text": record.text, "index": index}

    def _remember(self, index: int, pixels: torch.Tensor) -> None:
        """Keep a decoded centre crop (decoding and resizing cost ~1 ms a step on a small image),
        up to DECODED_CACHE_BYTES per process; past that, images are decoded every time."""
        size = pixels.numel() * pixels.element_size()
        if self._decoded_bytes + size <= DECODED_CACHE_BYTES:
            self._decoded[index] = pixels
            self._decoded_bytes += size


def micro_batches_per_epoch(steps_per_epoch: int, accumulate: int) -> int:
    """Micro-batches each process draws per epoch: --steps_per_epoch counts optimizer steps (see
    contract.STEPS_PER_EPOCH_MEANING), each of which takes `accumulate` micro-batches on every rank,
    so an epoch always ends on a step boundary."""
    return steps_per_epoch * accumulate


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: the next micro-batch to draw (per rank)."""

    epoch: int
    batch_in_epoch: int

    @classmethod
    def after_optimizer_steps(cls, steps: int, accumulate: int, steps_per_epoch: int) -> "DataPosition":
        return cls(epoch=steps // steps_per_epoch, batch_in_epoch=(steps % steps_per_epoch) * accumulate)


class ShardSampler(torch.utils.data.Sampler[SampleKey]):
    """Yields this rank's samples from `start` to the end of the last epoch.

    Rank r takes positions r, r + W, r + 2W, ... of each epoch's global order (like
    DistributedSampler), so ranks see disjoint samples and the split does not depend on timing.
    """

    def __init__(self, *, rank: int, world_size: int, batch_size: int, batches_per_epoch: int,
                 max_epochs: int, start: DataPosition) -> None:
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.batches_per_epoch, self.max_epochs, self.start = batches_per_epoch, max_epochs, start

    def __iter__(self) -> Iterator[SampleKey]:
        per_rank = self.batches_per_epoch * self.batch_size
        for epoch in range(self.start.epoch, self.max_epochs):
            first = self.start.batch_in_epoch * self.batch_size if epoch == self.start.epoch else 0
            for k in range(first, per_rank):
                yield SampleKey(epoch=epoch, position=self.rank + k * self.world_size)

    def __len__(self) -> int:
        done = self.start.epoch * self.batches_per_epoch + self.start.batch_in_epoch
        return max(0, self.max_epochs * self.batches_per_epoch - done) * self.batch_size
