"""The general module end to end on the toy family: each flag's effect on the real Lightning run,
the artifacts a user picks up, checkpoints and exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from toy_family import ToyFamily
from trainer_testlib import CrashAt, SimulatedNodeLoss, sha256

from lorakube_api import contract
from lorakube_trainer import validation
from lorakube_trainer import checkpoint as ckpt
from lorakube_trainer.config import ConfigError
from lorakube_trainer.distributed import resolve_topology
from lorakube_trainer.train import RunResult, run, trainer_kwargs


class Spy(pl.Callback):
    """Records what the Trainer and the optimizer really got."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        opt = trainer.optimizers[0]
        self.lr = opt.param_groups[0]["lr"]
        self.opt_params = [p for g in opt.param_groups for p in g["params"]]
        self.lora_names = [n for n, p in pl_module.denoiser.named_parameters() if p.requires_grad]
        self.frozen_dtypes = {p.dtype for p in pl_module.pipe.vae.parameters()} | {
            p.dtype for n, p in pl_module.denoiser.named_parameters() if not p.requires_grad}
        self.trainable_dtypes = {p.dtype for p in self.opt_params}
        self.accumulate = trainer.accumulate_grad_batches
        self.precision = trainer.precision
        self.loader_workers = trainer.train_dataloader.num_workers


def _run(cfg, family: ToyFamily | None = None, callbacks=()) -> tuple[RunResult, ToyFamily]:
    family = family or ToyFamily()
    return run(cfg, env={}, family=family, extra_callbacks=callbacks), family


def test_artifacts_a_user_picks_up(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("--max_epochs", "2", "--lora_rank", "2", "--lora_alpha", "3", "--checkpoint_every_n_steps", "0",
                   "--validation_prompt", "red", "--validation_prompt", "blue")
    result, _ = _run(cfg)
    out = Path(cfg.output_path)
    assert result.steps_done == 8
    manifest = json.loads((out / contract.ARTIFACT_MANIFEST).read_text())["files"]
    assert set(manifest) == {contract.ARTIFACT_LORA_DIFFUSERS, contract.ARTIFACT_LORA_COMFYUI,
                             contract.ARTIFACT_TRAINING_CONFIG, contract.ARTIFACT_METRICS,
                             contract.ARTIFACT_VALIDATION_GRID, contract.ARTIFACT_MODEL_CARD}
    for name, entry in manifest.items():
        assert entry == {"sha256": sha256(out / name), "bytes": (out / name).stat().st_size}
    lora = load_file(str(out / contract.ARTIFACT_LORA_DIFFUSERS))
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)     # LoRA tensors only
    assert {v.shape[0] for k, v in lora.items() if ".lora_A." in k} == {2}
    with safe_open(str(out / contract.ARTIFACT_LORA_DIFFUSERS), "pt") as fh:
        assert fh.metadata()["lora_alpha"] == "3"
    comfy = load_file(str(out / contract.ARTIFACT_LORA_COMFYUI))
    assert {float(v) for k, v in comfy.items() if k.endswith(".alpha")} == {3.0}
    grid = Image.open(out / contract.ARTIFACT_VALIDATION_GRID).convert("RGB")
    cell, left, top_px = validation.MIN_CELL_PX, validation.LABEL_PX, validation.HEADER_PX
    assert grid.size == (left + 2 * cell, top_px + 2 * cell)     # 2 prompts x (base, LoRA), labelled
    base_row = grid.crop((left, top_px, left + 2 * cell, top_px + cell))
    lora_row = grid.crop((left, top_px + cell, left + 2 * cell, top_px + 2 * cell))
    assert base_row.tobytes() != lora_row.tobytes()               # the LoRA changes the output
    header, margin = grid.crop((left, 0, grid.width, top_px)), grid.crop((0, top_px, left, grid.height))
    assert header.getextrema() != ((255, 255),) * 3 and margin.getextrema() != ((255, 255),) * 3  # text drawn
    metrics = [json.loads(line) for line in (out / contract.ARTIFACT_METRICS).read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9)) and metrics[-1]["epoch"] == 1
    config = json.loads((out / contract.ARTIFACT_TRAINING_CONFIG).read_text())
    assert config["lora_rank"] == 2 and config["resolved_lora_target_modules"] == ["to_q", "to_k"]
    assert config["precision"] == "32" and config["topology"]["world_size"] == 1


def test_flags_reach_the_trainer_module_and_data(make_cfg) -> None:
    spy = Spy()
    cfg = make_cfg("--learning_rate", "0.003", "--accumulate_grad_batches", "2", "--batch_size", "3",
                   "--lora_target_modules", "to_k", "--height", "32", "--width", "48", "--precision", "bf16",
                   "--use_gradient_checkpointing", "--dataloader_num_workers", "0", "--checkpoint_every_n_steps", "0")
    result, family = _run(cfg, callbacks=[spy])
    assert spy.lr == 0.003 and spy.accumulate == 2 and spy.precision == "bf16-mixed"
    assert result.steps_done == 4                                  # 4 optimizer steps of 2 micro-batches
    assert spy.lora_names and all(n.startswith("to_k.lora_") for n in spy.lora_names)
    assert len(spy.opt_params) == len(spy.lora_names)              # only LoRA in AdamW
    assert spy.frozen_dtypes == {torch.bfloat16}                    # bf16 really loads bf16
    assert spy.trainable_dtypes == {torch.float32}                  # LoRA kept in fp32
    assert family.gc_enabled
    assert set(family.batch_shapes[:4]) == {(3, 3, 32, 48)}
    assert spy.loader_workers == 0


def test_trainer_kwargs_from_flags(make_cfg) -> None:
    cfg = make_cfg("--precision", "16-mixed", "--accumulate_grad_batches", "4", "--training_strategy", "ddp")
    topo = resolve_topology({contract.ENV_NNODES: "2", contract.ENV_NPROC_PER_NODE: "1",
                             contract.ENV_MASTER_ADDR: "h", contract.ENV_MASTER_PORT: "1"}, None, None)
    kw = trainer_kwargs(cfg, topo, on_gpu=False, remaining_steps=5)
    assert (kw["num_nodes"], kw["devices"], kw["precision"], kw["max_steps"]) == (2, 1, "16-mixed", 5)
    assert kw["accumulate_grad_batches"] == 4 and kw["use_distributed_sampler"] is False
    assert kw["enable_checkpointing"] is False and kw["accelerator"] == "cpu"


def test_seed_decides_the_result(make_cfg, tmp_path: Path) -> None:
    args = ("--checkpoint_every_n_steps", "0", "--random_flip", "--output_formats", "diffusers")
    a, _ = _run(make_cfg(*args, "--seed", "1", output=tmp_path / "a"))
    # Worker processes change nothing: samples are pure functions of (seed, epoch, position).
    b, _ = _run(make_cfg(*args, "--seed", "1", "--dataloader_num_workers", "2", output=tmp_path / "b"))
    c, _ = _run(make_cfg(*args, "--seed", "2", output=tmp_path / "c"))
    assert all(torch.equal(a.final_lora[k], b.final_lora[k]) for k in a.final_lora)
    assert any(not torch.equal(a.final_lora[k], c.final_lora[k]) for k in a.final_lora)
    assert not (tmp_path / "a" / contract.ARTIFACT_LORA_COMFYUI).exists()     # --output_formats


def test_validation_every_n_steps_writes_intermediate_grids(make_cfg) -> None:
    cfg = make_cfg("--validation_every_n_steps", "2", "--checkpoint_every_n_steps", "0")
    _run(cfg)
    grids = sorted(p.name for p in (Path(cfg.output_path) / "validation").iterdir())
    assert grids == ["step-000000002.png"]                          # 4 and the end: the final grid


def test_checkpoint_interval_and_retention(make_cfg) -> None:
    cfg = make_cfg("--max_epochs", "2", "--checkpoint_every_n_steps", "2", "--keep_last_checkpoints", "2")
    _run(cfg)
    steps = [s for s, _ in ckpt.list_checkpoints(Path(cfg.checkpoint_dir))]
    assert steps == [8, 6]                                          # 2, 4 pruned
    state = ckpt.load(Path(cfg.checkpoint_dir) / contract.checkpoint_dir_name(8)).state
    assert state["step"] == 8 and state["data_position"] == {"epoch": 2, "batch_in_epoch": 0}
    assert state["optimizer"]["state"]                              # AdamW moments saved


def test_a_crash_after_the_last_step_resumes_to_the_artifacts(make_cfg, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_cfg("--checkpoint_every_n_steps", "3")             # 4 steps: checkpoints 3 and 4 (the last)
    first, _ = _run(cfg)
    manifest = Path(cfg.output_path) / contract.ARTIFACT_MANIFEST
    manifest.unlink()                                              # as if the pod died while writing artifacts
    capsys.readouterr()
    family = ToyFamily()
    again, _ = _run(cfg, family)
    assert again.steps_done == 4 and not family.batch_shapes      # no training step ran again
    assert manifest.is_file()
    assert all(torch.equal(first.final_lora[k], again.final_lora[k]) for k in first.final_lora)
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == final["totalSteps"] == 4               # the final progress report


def test_cached_latents_train_like_the_uncached_path(make_cfg, tmp_path: Path, dataset: Path) -> None:
    args = ("--center_crop", "--random_flip", "--batch_size", "2", "--checkpoint_every_n_steps", "0",
            "--max_epochs", "2", "--output_formats", "diffusers")
    plain, _ = _run(make_cfg(*args, output=tmp_path / "plain"))
    family = ToyFamily()
    cached, _ = _run(make_cfg(*args, "--cache_latents", output=tmp_path / "cached"), family)
    for key, tensor in plain.final_lora.items():
        assert torch.allclose(tensor, cached.final_lora[key], atol=1e-5), key
    files = list((tmp_path / "cached" / "latent-cache").glob("*/record-*.safetensors"))
    assert len(files) == 5
    # Encoded once per record (both flips in one call), never again while training.
    assert family.batch_shapes == [(2, 3, 16, 16)] * 5
    again = ToyFamily()
    _run(make_cfg(*args, "--cache_latents", output=tmp_path / "cached"), again)
    assert again.batch_shapes == []                                # the cache is reused


def test_bad_target_modules_is_an_invalid_argument(make_cfg) -> None:
    with pytest.raises(ConfigError, match="--lora_target_modules"):
        _run(make_cfg("--lora_target_modules", "no_such_layer"))


@pytest.mark.parametrize(("accumulate", "extra"),
                         [(1, ()), (2, ()), (3, ()), (1, ("--cache_latents", "--center_crop"))])
def test_interrupted_run_resumes_bit_identically(make_cfg, tmp_path: Path, accumulate: int, extra: tuple) -> None:
    args = (*extra, "--max_epochs", "3", "--accumulate_grad_batches", str(accumulate), "--random_flip",
            "--batch_size", "2",
            "--checkpoint_every_n_steps", "1" if accumulate == 2 else "2", "--output_formats", "diffusers")
    # 4 steps per epoch: the resume from step 2 (accumulate 3) starts in the middle of an epoch.
    whole, _ = _run(make_cfg(*args, output=tmp_path / "whole"))
    interrupted = make_cfg(*args, output=tmp_path / "cut")
    crash_step = {1: 5, 2: 4, 3: 3}[accumulate]
    with pytest.raises(SimulatedNodeLoss):
        _run(interrupted, callbacks=[CrashAt(crash_step)])
    # A half-written newer checkpoint (crash while saving) must be ignored.
    half = Path(interrupted.checkpoint_dir) / contract.checkpoint_dir_name(crash_step + 1)
    half.mkdir()
    (half / ckpt.TRAINABLE_FILE).write_bytes(b"partial")
    resumed, _ = _run(interrupted)
    assert resumed.steps_done == whole.steps_done
    for key, tensor in whole.final_lora.items():
        assert torch.equal(tensor, resumed.final_lora[key]), key
    name = contract.ARTIFACT_LORA_DIFFUSERS
    assert sha256(tmp_path / "whole" / name) == sha256(tmp_path / "cut" / name)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / contract.ARTIFACT_METRICS).read_text().splitlines()]
    assert steps == list(range(1, whole.steps_done + 1))            # replayed steps not logged twice


def test_resume_never_starts_over_and_path_picks_a_checkpoint(make_cfg) -> None:
    cfg = make_cfg("--checkpoint_every_n_steps", "2")
    _run(cfg)
    fresh = ToyFamily()
    _run(make_cfg("--checkpoint_every_n_steps", "2", "--resume", "never"), fresh)
    assert len(fresh.batch_shapes) == 4                            # all 4 steps trained again
    picked = ToyFamily()
    folder = Path(cfg.checkpoint_dir) / contract.checkpoint_dir_name(2)
    result, _ = _run(make_cfg("--checkpoint_every_n_steps", "2", "--resume", str(folder)), picked)
    assert len(picked.batch_shapes) == 2 and result.steps_done == 4  # steps 3 and 4 only


def test_center_crop_and_flip_flags_reach_the_dataset(make_cfg, dataset: Path) -> None:
    from lorakube_trainer.data import DataPosition, SampleKey, load_records, resize_and_crop
    from lorakube_trainer.datamodule import CaptionDataModule

    cfg = make_cfg("--center_crop", "--height", "32", "--width", "16")
    loader = CaptionDataModule(cfg, load_records(dataset), DataPosition(0, 0), world_size=1).train_dataloader()
    ds = loader.dataset
    assert ds.center_crop and not ds.random_flip and loader.batch_size == cfg.batch_size
    key = SampleKey(0, 0)
    with Image.open(ds.records[ds.record_index(key)].path) as img:
        expected = resize_and_crop(img, 32, 16, center_crop=True, random_flip=False, rng=ds.sample_rng(key))
    assert torch.equal(ds[key]["pixels"], expected)
