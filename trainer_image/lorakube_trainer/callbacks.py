"""Lightning callbacks: resume restore, per-step bookkeeping (metrics, progress, checkpoints,
periodic validation) and the final LoRA hand-off.

Determinism notes (what makes resume bit-exact):
- Each rank seeds (fresh run) or restores (resume) torch/numpy/python RNGs right before its first
  training step, after every setup step that might draw random numbers (LoRA init, Lightning's
  reseeding). A checkpoint captures RNGs after its optimizer step, i.e. exactly what the next
  step would have started from. Nothing between two steps draws from the global RNGs: the data
  pipeline has its own seeded generators and validation runs inside fork_rng.
- Checkpoints are taken only on optimizer-step boundaries, so no gradient accumulation is pending.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from lorakube_api import contract

from . import checkpoint as ckpt
from . import remote, shutdown, storage
from .artifacts import MetricsWriter, save_metrics_with_checkpoint
from .config import ConfigError, TrainConfig
from .data import DataPosition
from .metrics_server import TrainingMetrics
from .module import LoRAModule
from .progress import ProgressReporter
from .strategies import deepspeed_stage
from .validation import save_validation_row

log = logging.getLogger(__name__)

# Collectives after the join may legitimately wait longer than the rendezvous (rank 0 writing a
# checkpoint or sampling validation images while the others wait at the next all-reduce).
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=30)


def seed_rank_rngs(seed: int, rank: int) -> None:
    """Distinct, reproducible noise per rank (identical seeds would give every rank the same noise)."""
    mixed = (seed * 1_000_003 + rank) % (2**32)
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def _is_deepspeed(trainer: pl.Trainer) -> bool:
    return isinstance(trainer.strategy, DeepSpeedStrategy)


class ResumeCallback(pl.Callback):
    """Restores what the module constructor could not: optimizer, grad scaler and RNG states."""

    def __init__(self, cfg: TrainConfig, loaded: ckpt.LoadedCheckpoint | None) -> None:
        self.cfg, self.loaded = cfg, loaded
        self._rng_ready = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # Every rank chose its checkpoint before the join; they must have chosen the same one,
            # or optimizer state and data position would silently diverge.
            steps: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(steps, None if self.loaded is None else self.loaded.step)
            if len(set(steps)) > 1:
                raise ConfigError(contract.FLAG_CHECKPOINT_DIR,
                                  f"ranks found different checkpoints to resume from (step per rank: {steps}); "
                                  "the checkpoint dir must be storage every node shares (one volume or bucket)")
            try:
                from torch.distributed.distributed_c10d import _set_pg_timeout

                _set_pg_timeout(max(COLLECTIVE_TIMEOUT, dt.timedelta(seconds=self.cfg.rendezvous_timeout)), None)
            except (ImportError, RuntimeError, ValueError) as exc:   # private API: best effort
                log.warning("could not raise the collective timeout after the join: %s", exc)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.loaded is None:
            return
        state = self.loaded.state
        if _is_deepspeed(trainer):
            self._restore_zero_optimizer(trainer)
        elif state.get("optimizer") is not None:
            trainer.optimizers[0].load_state_dict(state["optimizer"])
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and state.get("grad_scaler") is not None:
            scaler.load_state_dict(state["grad_scaler"])

    def _restore_zero_optimizer(self, trainer: pl.Trainer) -> None:
        assert self.loaded is not None
        rank, world = trainer.global_rank, trainer.world_size
        saved = self.loaded.optimizer_for(rank)
        if saved is None or self.loaded.state.get("world_size") != world:
            log.warning("no ZeRO optimizer partition for rank %d of %d in %s: the optimizer's moments restart",
                        rank, world, self.loaded.folder)
            return
        # DeepSpeed's loader takes the list of every rank's partition and reads its own entry.
        partitions: list[Any] = [None] * world
        partitions[rank] = saved
        trainer.strategy.deepspeed_engine.optimizer.load_state_dict(
            partitions, load_optimizer_states=True, load_from_fp32_weights=True)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._rng_ready:
            return
        self._rng_ready = True
        rank = trainer.global_rank
        saved = None if self.loaded is None else self.loaded.rng_for(rank)
        if saved is not None:
            ckpt.restore_rng(saved)
        else:
            if self.loaded is not None:
                log.warning("checkpoint %s has no RNG state for rank %d; reseeding (not bit-exact)",
                            self.loaded.folder, rank)
            seed_rank_rngs(self.cfg.seed + (0 if self.loaded is None else self.loaded.step), rank)


class StepCallback(pl.Callback):
    """After each optimizer step: metrics line, progress report, checkpoint, periodic validation."""

    def __init__(self, cfg: TrainConfig, reporter: ProgressReporter | None, metrics: MetricsWriter | None,
                 live: TrainingMetrics | None = None) -> None:
        self.cfg, self.reporter, self.metrics, self.live = cfg, reporter, metrics, live
        self._losses: list[torch.Tensor] = []
        self._last_global_step = 0
        self._start = time.monotonic()
        self._cuda = False
        self.last_loss: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step
        self._start = time.monotonic()
        # Asked once per run, not twice per step: each call asks the CUDA driver, which can be slow.
        self._cuda = torch.cuda.is_available()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert isinstance(pl_module, LoRAModule)
        self._losses.append(pl_module.last_micro_batch_loss)
        if trainer.global_step == self._last_global_step:
            return                          # still accumulating
        self._last_global_step = trainer.global_step
        local = torch.stack(self._losses).mean()
        self._losses.clear()
        mean = trainer.strategy.reduce(local.to(pl_module.device), reduce_op="mean")
        self.last_loss = float(mean)
        step = pl_module.absolute_step
        epoch = self.cfg.epoch_of_step(step)
        if trainer.is_global_zero:
            self._record(step, epoch, trainer)
        cfg = self.cfg
        # Every rank takes part after every step (the same condition on every rank): after a
        # SIGTERM on any rank, all of them stop at this step (shutdown.py).
        stop = bool(cfg.checkpoint_every_n_steps) and shutdown.agree_to_stop(shutdown.stop_requested(),
                                                                             pl_module.device)
        # The last step is always checkpointed: a crash while writing the artifacts then resumes
        # straight to writing them instead of training again.
        if cfg.checkpoint_every_n_steps and (step % cfg.checkpoint_every_n_steps == 0 or step == cfg.total_steps
                                             or stop):
            save_checkpoint(trainer, pl_module, cfg, step, epoch)
        if stop:
            log.info("SIGTERM: every rank stops at step %d (checkpoint written)", step)
            raise shutdown.GracefulStop(step)
        if cfg.validation_every_n_steps and step % cfg.validation_every_n_steps == 0 and step < cfg.total_steps:
            self._validate(trainer, pl_module, step)

    def _record(self, step: int, epoch: int, trainer: pl.Trainer) -> None:
        samples_per_step = self.cfg.batch_size * self.cfg.accumulate_grad_batches * trainer.world_size
        if self.metrics is not None:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            record = {"step": step, "epoch": epoch, "loss": self.last_loss, "lr": lr,
                      "elapsed_s": round(time.monotonic() - self._start, 3)}
            if self._cuda:
                record["gpu_max_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            self.metrics.write(record)
        if self.live is not None and self._cuda and torch.cuda.is_initialized():
            self.live.set_gpu_memory(torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated())
        if self.reporter is not None:
            self.reporter.report(step, epoch, self.last_loss, samples_per_step)

    def _validate(self, trainer: pl.Trainer, pl_module: LoRAModule, step: int) -> None:
        if deepspeed_stage(self.cfg.training_strategy) == 3:
            return      # ZeRO-3 partitions the denoiser: sampling would need every rank; final grid only
        if not trainer.is_global_zero:
            return
        out = Path(self.cfg.output_path) / "validation" / f"step-{step:09d}.png"
        pl_module.denoiser.eval()
        pl_module.encoders_to(pl_module.device)        # offloaded when latents are cached
        try:
            with trainer.precision_plugin.forward_context():
                save_validation_row(pl_module.family, pl_module.pipe, self.cfg, out)
        finally:
            if self.cfg.cache_latents:
                pl_module.encoders_to("cpu")
            pl_module.denoiser.train()


def save_checkpoint(trainer: pl.Trainer, module: LoRAModule, cfg: TrainConfig, step: int, epoch: int) -> None:
    """Every rank calls this: ranks write their RNG files, rank 0 the shared files and the marker."""
    root = Path(cfg.checkpoint_dir)
    rank = trainer.global_rank
    lora = module.lora_state()              # collective under ZeRO-3
    if trainer.is_global_zero:
        ckpt.prepare_tmp(root, step)
    trainer.strategy.barrier("lorakube-ckpt-prepared")
    tmp = ckpt.tmp_dir(root, step)
    # Checkpoints in a bucket: a node that does not see rank 0's folder writes its ranks' files into
    # its own and uploads them; rank 0 collects them before the marker (remote.py).
    via_bucket = storage.remote_of(root) is not None and not tmp.is_dir()
    if via_bucket:
        tmp.mkdir(parents=True, exist_ok=True)
    if tmp.is_dir():
        ckpt.write_rng(tmp, rank)
        own = [ckpt.rng_file(rank)]
        if _is_deepspeed(trainer):
            ckpt.write_rank_optimizer(tmp, rank, trainer.strategy.deepspeed_engine.optimizer.state_dict())
            own.append(ckpt.optimizer_file(rank))
        if via_bucket:
            remote.publish_rank_files(root, tmp, step, own)
    else:
        # This rank does not see rank 0's folder: the checkpoint dir is not shared storage. The
        # checkpoint still completes, but a resume of this rank cannot be exact (and the ranks'
        # resume check will refuse to mix storages).
        log.warning("checkpoint folder %s not visible on rank %d: its RNG state is not saved", tmp, rank)
    if trainer.is_global_zero:
        optimizer = None if _is_deepspeed(trainer) else trainer.optimizers[0].state_dict()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        position = DataPosition.after_optimizer_steps(step, cfg.accumulate_grad_batches, cfg.steps_per_epoch)
        ckpt.write_trainable(tmp, lora)
        if module.ema is not None:
            ckpt.write_ema(tmp, module.ema.state())
        ckpt.write_state(tmp, {
            "step": step,
            "epoch": epoch,
            "data_position": {"epoch": position.epoch, "batch_in_epoch": position.batch_in_epoch},
            "world_size": trainer.world_size,
            "optimizer": optimizer,
            "grad_scaler": None if scaler is None else scaler.state_dict(),
            "config": cfg.to_json(),
        })
        if storage.remote_of(root) is not None:
            # Resumed on another node, the run finds its earlier metric lines here (train.py).
            save_metrics_with_checkpoint(Path(cfg.output_path), tmp, step)
    trainer.strategy.barrier("lorakube-ckpt-written")
    if trainer.is_global_zero:
        if storage.remote_of(root) is not None:
            remote.collect_rank_files(root, tmp, step, trainer.world_size)
        final = ckpt.finalize(root, step)
        ckpt.prune(root, cfg.keep_last_checkpoints)
        if storage.remote_of(root) is not None:
            remote.publish_checkpoint(root, final, cfg.keep_last_checkpoints)
            remote.publish_metrics(Path(cfg.output_path))
        log.info("checkpoint %s written", final)


class FinalStateCallback(pl.Callback):
    """Gathers the final LoRA (or its EMA) on every rank (ZeRO-3 needs them all) and keeps rank 0's copy."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, LoRAModule)
        state = pl_module.final_lora_state()
        if trainer.is_global_zero:
            self.state = state


class SigtermCallback(pl.Callback):
    """While the training loop runs (and checkpoints are on), a SIGTERM asks for a stop at the next
    step boundary instead of ending the process (shutdown.py); before and after, it ends it at once.

    Also the backstop for shutdown.keep_lightning_off_sigterm: if Lightning installed its SIGTERM
    handler anyway (a release that renamed its connector), put lorakube's back before the first step.
    """

    def __init__(self, cfg: TrainConfig, env: Mapping[str, str]) -> None:
        self.cfg, self.env = cfg, env

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if signal.getsignal(signal.SIGTERM) is not shutdown.exit_now:
            log.warning("Lightning replaced the SIGTERM handler; restoring lorakube's")
            shutdown.install()
        shutdown.reset()
        if self.cfg.checkpoint_every_n_steps:
            shutdown.begin_graceful(self.env)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if shutdown.end_graceful():
            # The signal came after the last step's agreement; that step has its checkpoint, so the
            # next attempt goes straight to the artifacts.
            shutdown.exit_now(signal.SIGTERM, None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        shutdown.end_graceful()
