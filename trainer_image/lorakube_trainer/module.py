"""The general LightningModule: a frozen pipeline, LoRA in its denoiser, the family's loss.

Only the denoiser is a registered submodule (so DDP/DeepSpeed see it and nothing else); the rest of
the pipeline (VAE, text encoders) is kept out of the module tree, frozen, and moved to the device
by hand. The optimizer sees the LoRA parameters alone, kept in fp32 even over a bf16/fp16 base.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lorakube_api import contract

from . import speed
from .caching import build_cache
from .config import ConfigError, TrainConfig
from .data import Record
from .ema import LoraEma
from .families.base import Family
from .schedule import lr_factor


log = logging.getLogger(__name__)


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class LoRAModule(pl.LightningModule):
    def __init__(self, family: Family, pipe: Any, cfg: TrainConfig, targets: list[str],
                 weight_dtype: torch.dtype) -> None:
        super().__init__()
        self.family = family
        self.cfg = cfg
        self.weight_dtype = weight_dtype
        self._pipe = [pipe]                     # a list: not registered as a submodule
        self.denoiser = family.denoiser(pipe)
        try:
            family.add_lora(self.denoiser, cfg.lora_rank, cfg.lora_alpha, targets, dropout=cfg.lora_dropout)
        except ValueError as exc:
            raise ConfigError(contract.TRAINING_FLAGS["loraTargetModules"], str(exc)) from exc
        params = trainable_parameters(self.denoiser)
        if not params:
            raise ConfigError(contract.TRAINING_FLAGS["loraTargetModules"],
                              f"{','.join(targets)} matched no layer of the {family.name} denoiser; "
                              "use module names such as to_q,to_k,to_v")
        for p in params:
            # fp32 LoRA weights and optimizer moments over a low-precision frozen base.
            p.data = p.data.float()
        if cfg.use_gradient_checkpointing:
            family.enable_gradient_checkpointing(self.denoiser)
        self._apply_speed_options(cfg)
        self.denoiser.train()
        self.last_micro_batch_loss = torch.zeros(())
        self._cache: tuple[list[Record], Path, list[tuple[int, int]] | None] | None = None
        self.step_offset = 0                    # optimizer steps done before this process started (resume)
        self.ema: LoraEma | None = None         # --ema_decay; made once the weights sit on their device
        self.resumed_ema: dict[str, torch.Tensor] | None = None

    def _apply_speed_options(self, cfg: TrainConfig) -> None:
        """speed.py's opt-in flags, in the order they compose: weights quantized under the LoRA
        layers, then the memory layout, then compilation of what the module now is."""
        speed.apply_sdpa_backend(cfg.sdpa_backend)      # after add_lora, which sets the default
        if cfg.base_weights != "auto":
            count = speed.quantize_base(self.denoiser, cfg.base_weights)
            log.info("--base_weights %s: %d frozen linear layers stored in 8 bits", cfg.base_weights, count)
        if cfg.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        if cfg.compile_blocks:
            log.info("--compile_blocks: %d denoiser blocks compiled", speed.compile_blocks(self.denoiser))

    @property
    def pipe(self) -> Any:
        return self._pipe[0]

    @property
    def absolute_step(self) -> int:
        return self.step_offset + self.trainer.global_step

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA tensors, whole even under ZeRO-3 (gathered; every rank must call this)."""
        with self.gathered():
            return {k: v.detach().to("cpu", torch.float32).clone()
                    for k, v in self.family.lora_state_dict(self.denoiser).items()}

    def gathered(self) -> contextlib.AbstractContextManager:
        params = trainable_parameters(self.denoiser)
        if params and hasattr(params[0], "ds_id"):      # partitioned by ZeRO-3
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def encoders_to(self, device: torch.device | str) -> None:
        """Move the frozen non-denoiser components (VAE, text encoders)."""
        for component in self.pipe.components.values():
            if isinstance(component, torch.nn.Module) and component is not self.denoiser:
                component.to(device)

    def enable_latent_cache(self, records: list[Record], folder: Path,
                            sizes: list[tuple[int, int]] | None = None) -> None:
        self._cache = (records, folder, sizes)

    def on_fit_start(self) -> None:
        self.encoders_to(self.device)
        if self._cache is None:
            return
        records, folder, sizes = self._cache
        done = build_cache(self.family, self.pipe, records, self.cfg, folder, device=self.device, sizes=sizes,
                           dtype=self.weight_dtype, rank=self.global_rank, world_size=self.trainer.world_size,
                           barrier=lambda: self.trainer.strategy.barrier("lorakube-latent-cache"))
        log.info("latent cache %s: this rank encoded %d of %d records", folder, done, len(records))
        # Training reads the cache from now on: give the accelerator memory back to the denoiser.
        self.encoders_to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def on_train_start(self) -> None:
        if not self.cfg.ema_decay:
            return
        self.ema = LoraEma(self.cfg.ema_decay, lambda: self.family.lora_state_dict(self.denoiser))
        if self.resumed_ema is not None:
            self.ema.load(self.resumed_ema)
        elif self.step_offset:
            log.warning("the checkpoint holds no EMA (it was written without --ema_decay): the average starts "
                        "from the step %d weights", self.step_offset)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # Called once per optimizer step (after gradient accumulation); global_step counts the steps
        # done, so absolute_step is this step's 0-based index in the whole run.
        factor = lr_factor(self.cfg.lr_scheduler, self.absolute_step, self.cfg.total_steps, self.cfg.lr_warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = self.cfg.learning_rate * factor
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.ema is not None:
            self.ema.update()

    def final_lora_state(self) -> dict[str, torch.Tensor]:
        """What the run exports: the EMA when --ema_decay is on, else the weights (every rank calls it)."""
        state = self.lora_state()
        return state if self.ema is None else self.ema.state()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if "latents" in batch:
            latents = batch["latents"].to(self.device)
            cond = {k: v.to(self.device) for k, v in batch["cond"].items()}
        else:
            pixels = batch["pixels"].to(self.device, self.weight_dtype)
            with torch.no_grad():
                latents = self.family.encode_images(self.pipe, pixels)
                cond = self.family.encode_prompts(self.pipe, list(batch["text"]), self.device)
        # A VAE may return channels-last strides; randn_like keeps strides, so the same seed would draw
        # differently laid-out noise for cached (contiguous) and fresh latents. One layout for both.
        latents = latents.contiguous()
        loss = self.family.training_loss(self.pipe, self.denoiser, latents, cond)
        self.last_micro_batch_loss = loss.detach().float()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # torch's AdamW defaults (weight decay 0.01) as in the original trainer; optimizer_step sets
        # each step's learning rate (--lr_scheduler, --lr_warmup_steps).
        return speed.make_optimizer(trainable_parameters(self.denoiser), self.cfg.learning_rate, self.cfg.fused_adamw)
