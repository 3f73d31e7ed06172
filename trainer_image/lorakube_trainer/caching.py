"""--cache_latents: VAE latents and text conditioning computed once per dataset record, written to
`<output_path>/latent-cache/<key>/`, then training reads them instead of running the encoders,
which are moved off the accelerator.

Ranks split the records (rank r encodes r, r + W, ...) and write one safetensors file per record
atomically; after a barrier each rank encodes whatever it still cannot see (storage that is not
shared between pods), so the cache works on shared and on local volumes. The key covers everything
the tensors depend on, so a changed dataset, model, size or precision never reuses stale files.

With --caption_dropout the conditioning of the empty caption is stored once beside the records.
--shuffle_caption and --caption_tag_dropout change a caption every step, so config.py refuses them
with this cache (one encoding per record); --caption_prefix, --caption_suffix and
--keep_tokens_separator change it the same way every step, so the cache encodes the caption as they
leave it (data.fixed_caption), and its key covers them.

Only centre crops can be cached (a random crop differs every time); with --random_flip both the
plain and the mirrored latents are stored, and the per-sample flip decision is the same draw the
uncached path makes, so cached and uncached runs see the same samples.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from .config import TrainConfig
from .data import CaptionedImages, Record, SampleKey, fixed_caption, flip_decision, resize_and_crop
from .families.base import Family
from .files import save_safetensors

COND_PREFIX = "cond."


def _record_identity(record: Record) -> tuple[str, int, int, str]:
    stat = record.path.stat()
    return str(record.path), stat.st_size, stat.st_mtime_ns, record.text


def cache_folder(cfg: TrainConfig, records: list[Record], dtype: torch.dtype) -> Path:
    identity = {
        "family": cfg.model_family, "model": str(Path(cfg.model_path).resolve()), "height": cfg.height,
        "width": cfg.width, "dtype": str(dtype), "flip": cfg.random_flip,
        "records": [_record_identity(r) for r in records],
    }
    if cfg.aspect_ratio_buckets:
        identity["buckets"] = True          # each record at its bucket's size
    # Only when set, so the key (and an existing cache) of a run without them is unchanged.
    for name in ("keep_tokens_separator", "caption_prefix", "caption_suffix"):
        if getattr(cfg, name):
            identity[name] = getattr(cfg, name)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.output_path) / "latent-cache" / key


def record_file(folder: Path, index: int) -> Path:
    return folder / f"record-{index:06d}.safetensors"


def empty_caption_file(folder: Path) -> Path:
    """The conditioning of "" (what --caption_dropout trains on instead of a caption)."""
    return folder / "empty-caption.safetensors"


@torch.no_grad()
def encode_record(family: Family, pipe: Any, record: Record, cfg: TrainConfig, device: torch.device,
                  dtype: torch.dtype, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """The record's latents (plain and, with --random_flip, mirrored) and text conditioning, at
    `size` (its aspect-ratio bucket) or the fixed --height/--width."""
    height, width = size or (cfg.height, cfg.width)
    with Image.open(record.path) as img:
        plain = resize_and_crop(img, height, width, center_crop=True, random_flip=False,
                                rng=np.random.default_rng(0))
    variants = [plain, plain.flip(-1)] if cfg.random_flip else [plain]
    latents = family.encode_images(pipe, torch.stack(variants).to(device, dtype))
    cond = family.encode_prompts(pipe, [trained_caption(record, cfg)], device)
    tensors = {"latents": latents}
    tensors.update({COND_PREFIX + k: v[0] for k, v in cond.items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def trained_caption(record: Record, cfg: TrainConfig) -> str:
    """The caption every step trains the record on (config.py refuses this cache where it would vary)."""
    return fixed_caption(record.text, keep_tokens_separator=cfg.keep_tokens_separator, prefix=cfg.caption_prefix,
                         suffix=cfg.caption_suffix)


def build_cache(family: Family, pipe: Any, records: list[Record], cfg: TrainConfig, folder: Path, *,
                device: torch.device, dtype: torch.dtype, rank: int, world_size: int,
                barrier: Callable[[], None], sizes: list[tuple[int, int]] | None = None) -> int:
    """Fill the cache; returns how many records this rank encoded. `sizes`: each record's bucket."""
    folder.mkdir(parents=True, exist_ok=True)

    def encode(indices: range | list[int]) -> int:
        done = 0
        for i in indices:
            path = record_file(folder, i)
            if not path.is_file():
                size = None if sizes is None else sizes[i]
                save_safetensors(encode_record(family, pipe, records[i], cfg, device, dtype, size), path)
                done += 1
        return done

    def encode_empty_caption() -> None:
        path = empty_caption_file(folder)
        if cfg.caption_dropout > 0 and not path.is_file():
            cond = family.encode_prompts(pipe, [""], device)
            save_safetensors({k: v[0].detach().to("cpu").contiguous() for k, v in cond.items()}, path)

    done = encode(range(rank, len(records), world_size))
    if rank == 0:
        encode_empty_caption()
    barrier()
    encode_empty_caption()
    return done + encode(range(len(records)))         # what another pod wrote to storage we cannot see


class CachedCaptions(CaptionedImages):
    """Same sample order and flip decisions as CaptionedImages, tensors from the cache."""

    def __init__(self, records: list[Record], folder: Path, **kwargs: Any) -> None:
        super().__init__(records, **kwargs)
        self.folder = folder

    def __getitem__(self, key: SampleKey) -> dict:
        index = self.record_index(key)
        tensors = load_file(str(record_file(self.folder, index)))
        flip = flip_decision(self.random_flip, self.sample_rng(key))
        cond = {k[len(COND_PREFIX):]: v for k, v in tensors.items() if k.startswith(COND_PREFIX)}
        if self.caption_dropped(key):
            cond = load_file(str(empty_caption_file(self.folder)))
        return {"latents": tensors["latents"][1 if flip else 0], "cond": cond,
                "text": self.caption(key, index), "index": index}
