"""Aspect-ratio buckets (--aspect_ratio_buckets): train on images of mixed shapes without cropping
them square.

The buckets are every (height, width) with sides a multiple of the family's size multiple whose
area is at most the requested height x width, the largest such shape per aspect ratio, up to
MAX_ASPECT. Each image goes to the bucket whose aspect ratio is nearest its own (on a log scale,
so 2:1 and 1:2 are equally far from 1:1), is resized to cover it and loses only the few pixels the
rounding to the multiple leaves over.

Each micro-batch holds one bucket, so it stacks into one tensor. The epoch's order is a pure
function of (seed, epoch): each bucket's images are shuffled and cut into batches, the batches of
all buckets are shuffled together, and batch g goes to rank g mod W — laid out in the per-sample
positions that data.ShardSampler hands rank r (r, r + W, ...), so the sampler, resume and the
disjoint split across ranks work exactly as without buckets.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# 4:1 is as far as buckets go (a panorama beyond it is cropped to 4:1); further, the short side at
# 1024² area falls under 512 pixels.
MAX_ASPECT = 4.0


def bucket_shapes(height: int, width: int, multiple: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """(height, width) shapes of about height x width pixels, sides multiples of `multiple`, sorted
    from the tallest to the widest; always includes the square-most shape of the requested area."""
    area = height * width
    shapes = set()
    side = multiple
    while side * side <= area * max_aspect:
        other = (area // side) // multiple * multiple
        if other >= multiple and max(side, other) / min(side, other) <= max_aspect:
            shapes.add((side, other))
            shapes.add((other, side))
        side += multiple
    # Keep, per aspect ratio, only the largest shape (the one nearest the requested area).
    best: dict[float, tuple[int, int]] = {}
    for h, w in shapes:
        ratio = round(w / h, 6)
        if ratio not in best or h * w > best[ratio][0] * best[ratio][1]:
            best[ratio] = (h, w)
    return sorted(best.values(), key=lambda hw: hw[1] / hw[0])


def nearest_bucket(image_height: int, image_width: int, shapes: Sequence[tuple[int, int]]) -> int:
    """Index of the shape whose aspect ratio is nearest the image's (ties go to the larger area)."""
    target = math.log(image_width / image_height)
    return min(range(len(shapes)),
               key=lambda i: (abs(math.log(shapes[i][1] / shapes[i][0]) - target), -shapes[i][0] * shapes[i][1]))


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header, without decoding the pixels."""
    with Image.open(path) as img:
        width, height = img.size
    return height, width


def assign(paths: Sequence[Path], shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each image's training shape (height, width)."""
    return [shapes[nearest_bucket(*image_size(p), shapes)] for p in paths]


def bucketed_epoch_order(seed: int, epoch: int, sizes: Sequence[tuple[int, int]], length: int,
                         batch_size: int, world_size: int) -> np.ndarray:
    """The epoch's global sample order (record index per position, `length` long) such that every
    rank's every micro-batch holds records of one size.

    Position p belongs to rank p mod W; rank r's k-th micro-batch is positions
    k·B·W + r + j·W for j < B. Batch g of the shuffled list fills micro-batch k = g // W of rank
    r = g mod W. A bucket whose images do not fill its last batch repeats its first images, as the
    plain order repeats records when an epoch is longer than the dataset.
    """
    group = batch_size * world_size
    if length % group:
        raise ValueError(f"epoch length {length} is not a multiple of batch size x world size {group}")
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    rng = np.random.default_rng([seed, epoch, 0xB0C7])
    needed = length // batch_size
    batches: list[np.ndarray] = []
    while len(batches) < needed:
        one_pass = []
        for size in sorted(by_size):
            members = rng.permutation(by_size[size])
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                if len(chunk) < batch_size:
                    chunk = np.concatenate([chunk, np.resize(members, batch_size - len(chunk))])
                one_pass.append(chunk)
        batches.extend(one_pass[i] for i in rng.permutation(len(one_pass)))
    order = np.empty(length, dtype=np.int64)
    for g, chunk in enumerate(batches[:needed]):
        k, r = divmod(g, world_size)
        order[k * group + r + np.arange(batch_size) * world_size] = chunk
    return order
