"""LightningDataModule: the checked dataset plus this rank's resumable sampler."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from .config import TrainConfig
from .data import CaptionedImages, DataPosition, Record, ShardSampler


class CaptionDataModule(pl.LightningDataModule):
    def __init__(self, cfg: TrainConfig, records: list[Record], start: DataPosition, world_size: int) -> None:
        super().__init__()
        self.cfg, self.records, self.start, self.world_size = cfg, records, start, world_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self.trainer is not None and self.trainer.world_size != self.world_size:
            raise RuntimeError(f"world size {self.trainer.world_size} differs from the planned {self.world_size}")
        dataset = CaptionedImages(
            self.records, seed=cfg.seed, height=cfg.height, width=cfg.width, center_crop=cfg.center_crop,
            random_flip=cfg.random_flip, samples_per_epoch=cfg.steps_per_epoch * cfg.batch_size * self.world_size,
        )
        sampler = ShardSampler(rank=rank, world_size=self.world_size, batch_size=cfg.batch_size,
                               batches_per_epoch=cfg.steps_per_epoch, max_epochs=cfg.max_epochs, start=self.start)
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
