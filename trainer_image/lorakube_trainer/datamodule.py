"""LightningDataModule: the checked dataset plus this rank's resumable sampler."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from .caching import CachedCaptions
from .config import TrainConfig
from .data import CaptionedImages, DataPosition, Record, ShardSampler, micro_batches_per_epoch


class CaptionDataModule(pl.LightningDataModule):
    def __init__(self, cfg: TrainConfig, records: list[Record], start: DataPosition, world_size: int,
                 cache_folder: Path | None = None, sizes: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.cfg, self.records, self.start, self.world_size = cfg, records, start, world_size
        self.cache_folder = cache_folder
        self.sizes = sizes              # each record's aspect-ratio bucket, or None: --height x --width

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self.trainer is not None and self.trainer.world_size != self.world_size:
            raise RuntimeError(f"world size {self.trainer.world_size} differs from the planned {self.world_size}")
        batches = micro_batches_per_epoch(cfg.steps_per_epoch, cfg.accumulate_grad_batches)
        common = dict(seed=cfg.seed, height=cfg.height, width=cfg.width, center_crop=cfg.center_crop,
                      random_flip=cfg.random_flip, samples_per_epoch=batches * cfg.batch_size * self.world_size,
                      caption_dropout=cfg.caption_dropout, sizes=self.sizes, batch_size=cfg.batch_size,
                      world_size=self.world_size, shuffle_caption=cfg.shuffle_caption,
                      keep_tokens=cfg.keep_tokens, caption_tag_dropout=cfg.caption_tag_dropout,
                      keep_tokens_separator=cfg.keep_tokens_separator, caption_prefix=cfg.caption_prefix,
                      caption_suffix=cfg.caption_suffix)
        # The cache is filled in LoRAModule.on_fit_start, which Lightning runs before asking for this loader.
        dataset = (CaptionedImages(self.records, **common) if self.cache_folder is None
                   else CachedCaptions(self.records, self.cache_folder, **common))
        sampler = ShardSampler(rank=rank, world_size=self.world_size, batch_size=cfg.batch_size,
                               batches_per_epoch=batches, max_epochs=cfg.max_epochs, start=self.start)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.dataloader_num_workers,
            # The loader draws its workers' base seed from this generator instead of torch's global
            # RNG, which the training step owns (and checkpoints) alone.
            generator=torch.Generator().manual_seed(cfg.seed),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
