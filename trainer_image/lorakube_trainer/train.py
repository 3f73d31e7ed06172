"""One training run, start to finish: check inputs, build, (maybe) resume, fit, write artifacts."""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import Strategy

from lorakube_api import contract

from . import checkpoint as ckpt
from . import buckets, modelscope_repos, remote, shutdown, storage
from .artifacts import (MetricsWriter, check_comfyui, check_loaded, restore_metrics_from_checkpoint, save_comfyui,
                        write_json, write_manifest, write_model_card)
from .caching import cache_folder
from .callbacks import FinalStateCallback, ResumeCallback, SigtermCallback, StepCallback
from .config import ConfigError, TrainConfig
from .data import DataPosition, Record, load_records
from .dataset_checked import load_records_once
from .dataset_layout import ENV_DATASET_CHECKED
from .datamodule import CaptionDataModule
from .distributed import Topology, needs_rendezvous_check, plan_topology, wait_for_master
from .families import get_family
from .families.base import Family
from .metrics_server import TrainingMetrics, serve_from_env
from .module import LoRAModule
from .pretrained import start_from_lora
from .progress import ProgressReporter, publish_artifacts, reporter_from_env
from .strategies import StrategyPlan, build_strategy, lightning_precision, resolve_precision, weight_dtype
from .validation import generate_images, save_grid

log = logging.getLogger(__name__)

StrategyFactory = Callable[[StrategyPlan], Strategy | str]


@dataclasses.dataclass(frozen=True)
class RunResult:
    global_rank: int
    steps_done: int
    final_lora: dict[str, torch.Tensor] | None     # rank 0 only
    artifacts: dict[str, Any] | None               # rank 0 only: the manifest


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.accelerator == "gpu":
        return True
    return cfg.accelerator == "auto" and torch.cuda.is_available()


def _planned_global_rank(topology: Topology, env: Mapping[str, str]) -> int:
    if env.get("RANK"):
        return int(env["RANK"])
    return topology.node_rank * topology.devices + int(env.get("LOCAL_RANK") or 0)


def run(cfg: TrainConfig, env: Mapping[str, str] | None = None, *,
        strategy_factory: StrategyFactory = build_strategy, family: Family | None = None,
        extra_callbacks: Sequence[pl.Callback] = ()) -> RunResult:
    """Train per `cfg`. Tests inject a family, a strategy factory or callbacks; the CLI never does.
    Rank 0 serves its live metrics (metrics_server.py) from before the model loads until the end."""
    env = os.environ if env is None else env
    live = TrainingMetrics()
    server = serve_from_env(live, env) if _planned_global_rank(plan_topology(cfg, env), env) == 0 else None
    try:
        return _run(cfg, env, live, strategy_factory, family, extra_callbacks)
    finally:
        if server is not None:
            server.stop()


def _run(cfg: TrainConfig, env: Mapping[str, str], live: TrainingMetrics, strategy_factory: StrategyFactory,
         family: Family | None, extra_callbacks: Sequence[pl.Callback]) -> RunResult:
    family = family or get_family(cfg.model_family)
    # The original framework's module names become the family's diffusers names (logged).
    targets = family.resolve_lora_targets(cfg.lora_target_modules or family.default_lora_targets)
    on_gpu = _use_gpu(cfg)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, on_gpu))
    topology = plan_topology(cfg, env)
    # s3:// model/dataset staged into this node's cache, output and checkpoints in local working
    # folders that are uploaded (remote.py); a local run passes through unchanged.
    # Rank 0 reports the staging of the inputs (the job's Staging phase, staging.py), unless its
    # pod's first process staged them before torch loaded (cli.py): then they are in the cache.
    report = _planned_global_rank(topology, env) == 0 and not remote.inputs_staged_by_this_pod(env)
    cfg, where = remote.localize(cfg, env, topology.node_rank, report_staging=report)
    # Every image was read by this pod's preflight already (a dataset on a volume), or by the first
    # process that used the dataset's cache entry on this node (a staged one: dataset_checked.py).
    options = {"dataset_format": cfg.dataset_format, "default_caption": cfg.default_caption,
               "caption_extension": cfg.caption_extension}
    if where.dataset:
        records = load_records_once(cfg.dataset_path, cfg.max_image_pixels, **options)
    else:
        records = load_records(cfg.dataset_path, cfg.max_image_pixels, **options,
                               verify_images=env.get(ENV_DATASET_CHECKED) != cfg.dataset_path)
    loaded = ckpt.resolve_resume(cfg.resume, Path(cfg.checkpoint_dir))
    start_step = 0 if loaded is None else loaded.step
    if loaded is not None and _planned_global_rank(topology, env) == 0:
        # A checkpoint from a bucket carries the metric lines up to its step (callbacks.py).
        restored = restore_metrics_from_checkpoint(loaded.folder, Path(cfg.output_path), loaded.step)
        if restored:
            log.info("restored %s up to step %d from %s", ", ".join(restored), loaded.step, loaded.folder)
    if loaded is not None:
        log.info("resuming from %s (step %d of %d)", loaded.folder, loaded.step, cfg.total_steps)
        if loaded.state.get("world_size") != topology.world_size:
            log.warning("checkpoint was written by %s processes, now %d: the data order and noise differ from "
                        "an uninterrupted run", loaded.state.get("world_size"), topology.world_size)

    remaining = cfg.total_steps - start_step
    if remaining <= 0:
        return _artifacts_only(cfg, family, targets, loaded, topology, env, on_gpu, live, where)

    dtype = weight_dtype(cfg.precision)
    sizes = bucket_sizes(cfg, records) if cfg.aspect_ratio_buckets else None
    module = _build_module(cfg, family, targets, dtype, loaded)
    cache = cache_folder(cfg, records, dtype) if cfg.cache_latents else None
    if cache is not None:
        module.enable_latent_cache(records, cache, sizes)
    start = DataPosition.after_optimizer_steps(start_step, cfg.accumulate_grad_batches, cfg.steps_per_epoch)
    datamodule = CaptionDataModule(cfg, records, start, topology.world_size, cache, sizes)
    planned_rank = _planned_global_rank(topology, env)
    reporter: ProgressReporter | None = reporter_from_env(cfg.total_steps, env, live) if planned_rank == 0 else None
    metrics = (MetricsWriter(Path(cfg.output_path) / contract.ARTIFACT_METRICS, start_step)
               if planned_rank == 0 else None)
    step_cb, final_cb = StepCallback(cfg, reporter, metrics, live if planned_rank == 0 else None), FinalStateCallback()
    trainer = pl.Trainer(**trainer_kwargs(cfg, topology, on_gpu, remaining, strategy_factory),
                         callbacks=[ResumeCallback(cfg, loaded), step_cb, final_cb, SigtermCallback(cfg, env),
                                    *extra_callbacks])
    # A SIGTERM must never run a collective inside the handler, as Lightning's does (see shutdown.py).
    shutdown.keep_lightning_off_sigterm(trainer)
    if needs_rendezvous_check(topology):
        waited = wait_for_master(topology.master_addr, topology.master_port, cfg.rendezvous_timeout)
        log.info("rank 0 at %s:%s reachable after %.1f s", topology.master_addr, topology.master_port, waited)
    trainer.fit(module, datamodule=datamodule)
    steps_done = start_step + trainer.global_step
    if steps_done != cfg.total_steps:
        raise RuntimeError(f"training stopped at step {steps_done} of {cfg.total_steps}")
    if not trainer.is_global_zero:
        return RunResult(trainer.global_rank, steps_done, None, None)
    state = final_cb.state
    assert state is not None
    # Free the training copy before the post-save check loads a fresh pipeline.
    del trainer, module, datamodule
    gc.collect()                # Lightning's trainer and module reference each other
    if on_gpu:
        torch.cuda.empty_cache()
    return RunResult(0, steps_done, state,
                     write_artifacts(cfg, family, targets, state, steps_done, on_gpu, topology, where))


def bucket_sizes(cfg: TrainConfig, records: list[Record]) -> list[tuple[int, int]]:
    """Each record's aspect-ratio bucket (--aspect_ratio_buckets), logged as a histogram."""
    shapes = buckets.bucket_shapes(cfg.height, cfg.width, contract.SIZE_MULTIPLE[cfg.model_family])
    sizes = buckets.assign([r.path for r in records], shapes)
    used = collections.Counter(sizes)
    log.info("aspect-ratio buckets (height x width: images): %s",
             ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(used.items(), key=lambda kv: kv[0][1] / kv[0][0])))
    return sizes


def _artifacts_only(cfg: TrainConfig, family: Family, targets: list[str], loaded: ckpt.LoadedCheckpoint,
                    topology: Topology, env: Mapping[str, str], on_gpu: bool, live: TrainingMetrics,
                    where: storage.Locations) -> RunResult:
    """The newest checkpoint already holds the last step (a crash while writing the artifacts)."""
    rank = _planned_global_rank(topology, env)
    log.info("checkpoint step %d already reaches the %d planned steps: writing artifacts only",
             loaded.step, cfg.total_steps)
    if rank != 0:
        return RunResult(rank, loaded.step, None, None)
    reporter_from_env(cfg.total_steps, env, live).report(loaded.step, cfg.epoch_of_step(loaded.step), None, 0, force=True)
    # The run exports its moving average when it kept one (--ema_decay), as a finished run does.
    state = dict(loaded.ema() or loaded.trainable) if cfg.ema_decay else dict(loaded.trainable)
    return RunResult(0, loaded.step, state,
                     write_artifacts(cfg, family, targets, state, loaded.step, on_gpu, topology, where))


def _build_module(cfg: TrainConfig, family: Family, targets: list[str], dtype: torch.dtype,
                  loaded: ckpt.LoadedCheckpoint | None) -> LoRAModule:
    # Seeded before the LoRA layers are created, so their initial values are reproducible.
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        pipe = family.load_pipeline(cfg.model_path, dtype)
    except FileNotFoundError as exc:
        raise ConfigError(contract.FLAG_MODEL_PATH, str(exc)) from exc
    if cfg.guidance_scale is not None:
        try:
            family.set_training_guidance(cfg.guidance_scale, family.denoiser(pipe))
        except ValueError as exc:
            raise ConfigError(contract.TRAINING_FLAGS["guidanceScale"], str(exc)) from exc
    module = LoRAModule(family, pipe, cfg, targets, dtype)
    if loaded is not None:
        family.set_lora_state_dict(module.denoiser, loaded.trainable)
        module.step_offset = loaded.step
        module.resumed_ema = loaded.ema()
    elif cfg.pretrained_lora_path:
        start_from_lora(family, module.denoiser, cfg)
    return module


def trainer_kwargs(cfg: TrainConfig, topology: Topology, on_gpu: bool, remaining_steps: int,
                   strategy_factory: StrategyFactory = build_strategy) -> dict[str, Any]:
    """Everything pl.Trainer gets except callbacks: a pure function of the flags and the topology."""
    return dict(
        accelerator="gpu" if on_gpu else "cpu",
        devices=topology.devices,
        num_nodes=topology.num_nodes,
        strategy=strategy_factory(StrategyPlan(cfg.training_strategy, topology.world_size, on_gpu,
                                               cfg.rendezvous_timeout)),
        precision=lightning_precision(cfg.precision),
        # One pass of the sampler covers every remaining epoch (see data.ShardSampler), so a resume
        # in the middle of an epoch needs no special case.
        max_epochs=1,
        max_steps=remaining_steps,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        # Clips the LoRA gradients' global norm (DeepSpeed takes it into its own config).
        gradient_clip_val=cfg.max_grad_norm or None,
        gradient_clip_algorithm="norm",
        logger=False,
        enable_checkpointing=False,     # checkpoints are ours: LoRA + optimizer only (callbacks.save_checkpoint)
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the ShardSampler already shards per rank
        num_sanity_val_steps=0,
        default_root_dir=cfg.output_path,
    )


def write_artifacts(cfg: TrainConfig, family: Family, targets: list[str], state: dict[str, torch.Tensor],
                    steps: int, on_gpu: bool, topology: Topology,
                    where: storage.Locations = storage.Locations()) -> dict[str, Any]:
    out = Path(cfg.output_path)
    out.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    # On CPU half precision is slow or unsupported for sampling; on GPU use the training dtype.
    check_dtype = weight_dtype(cfg.precision) if on_gpu else torch.float32

    def fresh_pipeline() -> Any:
        pipe = family.load_pipeline(cfg.model_path, check_dtype)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.to(device)
        return pipe

    size = dict(seed=cfg.seed, height=cfg.height, width=cfg.width, steps=cfg.validation_inference_steps)
    pipe = fresh_pipeline()
    base_images = generate_images(family, pipe, cfg.validation_prompts, **size)
    lora_images = None
    if "diffusers" in cfg.output_formats:
        path = out / contract.ARTIFACT_LORA_DIFFUSERS
        family.save_diffusers_lora(state, path, cfg.lora_rank, cfg.lora_alpha)
        family.load_lora_into_pipeline(pipe, path)
        check_loaded(family, pipe, state, path)
        lora_images = generate_images(family, pipe, cfg.validation_prompts, **size)
        names.append(path.name)
    if "comfyui" in cfg.output_formats:
        path = out / contract.ARTIFACT_LORA_COMFYUI
        save_comfyui(family, state, path, cfg.lora_rank, cfg.lora_alpha)
        check_comfyui(path, state, cfg.lora_alpha)
        names.append(path.name)
    if lora_images is None:
        # Only the ComfyUI file was asked for: the grid still shows the trained LoRA.
        family.set_lora_state_dict(_with_lora(family, pipe, targets, cfg), state)
        lora_images = generate_images(family, pipe, cfg.validation_prompts, **size)
    save_grid([base_images, lora_images], out / contract.ARTIFACT_VALIDATION_GRID,
              row_labels=["base", "+ LoRA"], column_labels=cfg.validation_prompts)
    names.append(contract.ARTIFACT_VALIDATION_GRID)
    del pipe

    write_json(out / contract.ARTIFACT_TRAINING_CONFIG,
               {**remote.public_config(cfg.to_json(), where), "resolved_lora_target_modules": targets, "steps_done": steps,
                "topology": {"num_nodes": topology.num_nodes, "processes_per_node": topology.devices,
                             "world_size": topology.world_size, "accelerator": "gpu" if on_gpu else "cpu"},
                "versions": _versions()})
    names.append(contract.ARTIFACT_TRAINING_CONFIG)
    metrics = out / contract.ARTIFACT_METRICS
    if metrics.is_file():
        names.append(metrics.name)
    write_model_card(out / contract.ARTIFACT_MODEL_CARD, family=family, model_path=where.model or cfg.model_path, rank=cfg.lora_rank,
                     alpha=cfg.lora_alpha, steps=steps, targets=targets, prompts=cfg.validation_prompts,
                     formats=cfg.output_formats, guidance=cfg.guidance_scale)
    names.append(contract.ARTIFACT_MODEL_CARD)
    manifest = write_manifest(out, names)
    manifest_file = out / contract.ARTIFACT_MANIFEST
    if where.output:
        # Listed in status only once uploaded and read back, the manifest last (remote.py).
        output_uri, published = where.output, remote.publish_artifacts(out, where.output, manifest)
    else:
        output_uri, published = cfg.output_path, {**manifest["files"], manifest_file.name: {
            "sha256": ckpt.sha256_file(manifest_file), "bytes": manifest_file.stat().st_size}}
    publish_artifacts(output_uri, published)
    if cfg.modelscope_model_id:
        # The original framework's upload; listed in status too, once read back (modelscope_repos.py).
        verified = modelscope_repos.publish_artifacts(out, cfg.modelscope_model_id, published,
                                                      token=cfg.modelscope_access_token,
                                                      env=storage.role_env(None, "output"))
        publish_artifacts(output_uri, published, also={modelscope_repos.model_uri(cfg.modelscope_model_id): verified})
    return manifest


def _with_lora(family: Family, pipe: Any, targets: list[str], cfg: TrainConfig) -> torch.nn.Module:
    denoiser = family.denoiser(pipe)
    family.add_lora(denoiser, cfg.lora_rank, cfg.lora_alpha, targets)
    return denoiser


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for dist in ("torch", "lightning", "diffusers", "transformers", "peft", "deepspeed"):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return found


