"""The image-caption dataset and a resumable per-rank sampler.

The records come from dataset_layout.load_records (every format, every check, before training);
here they become samples. Kohya repeat counts weight records: each shuffled pass over the data
holds a record `repeats` times. --caption_dropout replaces a sample's caption with "" with that
probability. kohya's tag habits (arrange_tags): --shuffle_caption shuffles the comma-separated tags
of each sample, --caption_tag_dropout leaves each tag out with that probability, and --keep_tokens N
keeps the first N tags in place and never drops them; in a caption holding --keep_tokens_separator
(e.g. `|||`) the tags before it are the fixed ones instead, and those after a second one stay fixed at
the end. --caption_prefix and --caption_suffix are added to every caption after that, so they are
never shuffled or dropped tag by tag (a dropped caption is still the empty one, as in kohya).

Determinism: which record a sample shows, how it is cropped/flipped, whether its caption is dropped
and how its tags are arranged are pure functions of (seed, epoch, position in the epoch's global
order), each from its own stream. Nothing here touches the global RNGs, so a resumed run sees
exactly the samples the interrupted one would have seen next.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from lorakube_api import contract

from .buckets import bucketed_epoch_order

# Re-exported: the formats and checks live in dataset_layout.py, which preflight uses without torch.
from .dataset_layout import (METADATA_FILE, REQUIRED_COLUMNS, TRAIN_SUBDIR, DatasetError, Record,  # noqa: F401
                             find_metadata, load_records)

DEFAULT_MAX_IMAGE_PIXELS = contract.DEFAULT_MAX_IMAGE_PIXELS


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


TAG_SEPARATOR = ","


def _tags(text: str) -> list[str]:
    """Comma-separated tags, stripped; empty ones (a doubled or trailing comma) dropped."""
    return [t.strip() for t in text.split(TAG_SEPARATOR) if t.strip()]


def split_tags(caption: str, keep_tokens: int = 0,
               keep_tokens_separator: str = "") -> tuple[list[str], list[str], list[str]]:
    """(fixed head, movable tags, fixed tail). With the separator in the caption, the head is what
    precedes it and the tail what follows a second one (keep_tokens is then not used, as in kohya);
    otherwise the head is the first keep_tokens tags and there is no tail."""
    if keep_tokens_separator and keep_tokens_separator in caption:
        head, _, body = caption.partition(keep_tokens_separator)
        body, _, tail = body.partition(keep_tokens_separator)
        return _tags(head), _tags(body), _tags(tail.replace(keep_tokens_separator, TAG_SEPARATOR))
    tags = _tags(caption)
    return tags[:keep_tokens], tags[keep_tokens:], []


def arrange_tags(caption: str, rng: np.random.Generator, *, shuffle: bool, keep_tokens: int = 0,
                 tag_dropout: float = 0.0, keep_tokens_separator: str = "") -> str:
    """The caption's comma-separated tags with the fixed ones in place (split_tags), each other tag
    left out with probability `tag_dropout`, the rest shuffled when `shuffle`; joined with ", "."""
    fixed, rest, tail = split_tags(caption, keep_tokens, keep_tokens_separator)
    # One draw per tag, whether or not shuffling follows, so each tag's fate depends only on the stream.
    if tag_dropout > 0:
        rest = [t for t, u in zip(rest, rng.random(len(rest))) if u >= tag_dropout]
    if shuffle:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    return ", ".join(fixed + rest + tail)


def fixed_caption(text: str, *, keep_tokens_separator: str = "", prefix: str = "", suffix: str = "") -> str:
    """A caption as every step trains it when no tag is shuffled or dropped (so the latent cache may
    encode it once): the separator taken out, then prefix and suffix added. Without them, `text`."""
    if keep_tokens_separator and keep_tokens_separator in text:
        head, body, tail = split_tags(text, 0, keep_tokens_separator)
        text = ", ".join(head + body + tail)
    return with_affixes(text, prefix, suffix)


def with_affixes(text: str, prefix: str = "", suffix: str = "") -> str:
    """prefix + " " + text + " " + suffix, as kohya joins them, leaving out the parts that are empty."""
    return " ".join(part for part in (prefix, text, suffix) if part)


def epoch_order(seed: int, epoch: int, num_records: int, length: int) -> np.ndarray:
    """The epoch's global sample order: shuffled passes over the records, `length` long."""
    rng = np.random.default_rng([seed, epoch, 0x0D47A])
    passes = -(-length // num_records)
    return np.concatenate([rng.permutation(num_records) for _ in range(passes)])[:length]


class CaptionedImages(torch.utils.data.Dataset):
    """Map-style dataset indexed by SampleKey (what ShardSampler yields)."""

    def __init__(self, records: list[Record], *, seed: int, height: int, width: int, center_crop: bool,
                 random_flip: bool, samples_per_epoch: int, caption_dropout: float = 0.0,
                 sizes: list[tuple[int, int]] | None = None, batch_size: int = 1, world_size: int = 1,
                 shuffle_caption: bool = False, keep_tokens: int = 0, caption_tag_dropout: float = 0.0,
                 keep_tokens_separator: str = "", caption_prefix: str = "", caption_suffix: str = "") -> None:
        self.records = records
        self.seed, self.height, self.width = seed, height, width
        self.center_crop, self.random_flip = center_crop, random_flip
        self.samples_per_epoch = samples_per_epoch      # global: all ranks together
        # Aspect-ratio buckets (buckets.py): each record's own (height, width), and the batch layout
        # the bucketed order needs so that every micro-batch holds one size.
        self.sizes, self.batch_size, self.world_size = sizes, batch_size, world_size
        self.caption_dropout = caption_dropout
        self.shuffle_caption, self.keep_tokens = shuffle_caption, keep_tokens
        self.caption_tag_dropout = caption_tag_dropout
        self.keep_tokens_separator = keep_tokens_separator
        self.caption_prefix, self.caption_suffix = caption_prefix, caption_suffix
        # One slot per showing in a pass; without repeat counts slot i is record i, so the order
        # (and every existing run's samples) is unchanged.
        self._slots = np.repeat(np.arange(len(records)), [r.repeats for r in records])
        self._orders: dict[int, np.ndarray] = {}
        self._decoded: dict[int, torch.Tensor] = {}      # record index -> its centre crop (unflipped)
        self._decoded_bytes = 0

    def record_index(self, key: SampleKey) -> int:
        order = self._orders.get(key.epoch)
        if order is None:
            if self.sizes is None:
                order = epoch_order(self.seed, key.epoch, len(self._slots), self.samples_per_epoch)
            else:
                # Slots, not records: a repeated record fills its bucket's batches that many times.
                order = bucketed_epoch_order(self.seed, key.epoch, [self.sizes[i] for i in self._slots],
                                             self.samples_per_epoch, self.batch_size, self.world_size)
            self._orders = {key.epoch: order}           # one epoch at a time is all a sampler needs
        return int(self._slots[order[key.position]])

    def caption_dropped(self, key: SampleKey) -> bool:
        """Its own stream (not sample_rng's), so turning dropout on changes no crop or flip."""
        if self.caption_dropout <= 0:
            return False
        return bool(np.random.default_rng([self.seed, key.epoch, key.position, 0xCAD0]).random() < self.caption_dropout)

    def caption(self, key: SampleKey, index: int) -> str:
        if self.caption_dropped(key):
            return ""
        text = self.records[index].text
        if not (self.shuffle_caption or self.caption_tag_dropout > 0):
            return fixed_caption(text, keep_tokens_separator=self.keep_tokens_separator,
                                 prefix=self.caption_prefix, suffix=self.caption_suffix)
        # Its own stream too: the tags' arrangement changes no crop, flip or dropout decision.
        rng = np.random.default_rng([self.seed, key.epoch, key.position, 0x7A65])
        arranged = arrange_tags(text, rng, shuffle=self.shuffle_caption, keep_tokens=self.keep_tokens,
                                tag_dropout=self.caption_tag_dropout, keep_tokens_separator=self.keep_tokens_separator)
        return with_affixes(arranged, self.caption_prefix, self.caption_suffix)

    def size_of(self, index: int) -> tuple[int, int]:
        """(height, width) the record trains at: its bucket's, or the fixed --height/--width."""
        return (self.height, self.width) if self.sizes is None else self.sizes[index]

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
                    "text": self.caption(key, index), "index": index}
        try:
            with Image.open(record.path) as img:
                if self.center_crop:
                    pixels = resize_and_crop(img, *self.size_of(index), True, False, rng)
                    self._remember(index, pixels)
                    if flip_decision(self.random_flip, rng):
                        pixels = pixels.flip(-1)
                else:
                    pixels = resize_and_crop(img, *self.size_of(index), False, self.random_flip, rng)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{record.path.name}: cannot decode image ({exc}); replace or remove it") from exc
        return {"pixels": pixels, "text": self.caption(key, index), "index": index}

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
