"""The training knobs users expect from today's LoRA trainers, on the real Lightning run of the toy
family: learning-rate warm-up and schedules, gradient clipping, LoRA dropout, an EMA of the LoRA
weights, and starting from an existing LoRA (--pretrained_lora_path) — each with exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from toy_family import ToyFamily
from trainer_testlib import CrashAt, SimulatedNodeLoss, sha256

from lorakube_api import contract
from lorakube_trainer import checkpoint as ckpt
from lorakube_trainer.config import ConfigError, parse_config
from lorakube_trainer.schedule import lr_factor
from lorakube_trainer.train import RunResult, run


def _run(cfg, callbacks=()) -> RunResult:
    return run(cfg, env={}, family=ToyFamily(), extra_callbacks=callbacks)


def _metrics(cfg) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(cfg.output_path) / contract.ARTIFACT_METRICS).read_text().splitlines()]


# --- the schedule itself (pure) -------------------------------------------------------------------

def test_warm_up_ramps_linearly_and_never_multiplies_by_zero() -> None:
    assert [lr_factor("constant", i, 10, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [lr_factor("constant", i, 10, 0) for i in range(3)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(("kind", "expected"), [
    # 2 warm-up steps, then 8 steps decaying over (total - warm-up) = 8
    ("linear", [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
    ("cosine", [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]),
])
def test_decaying_schedules_after_the_warm_up(kind: str, expected: list[float]) -> None:
    got = [lr_factor(kind, i, 10, 2) for i in range(10)]
    assert got == pytest.approx(expected)
    assert got[-1] > 0                                      # the last step still learns


# --- flags: bad values name the flag --------------------------------------------------------------

@pytest.mark.parametrize(("extra", "flag"), [
    (("--lr_warmup_steps", "-1"), "--lr_warmup_steps"),
    (("--lr_scheduler", "step"), None),                     # argparse: not one of the choices
    (("--max_grad_norm", "-0.5"), "--max_grad_norm"),
    (("--lora_dropout", "1"), "--lora_dropout"),
    (("--ema_decay", "1.5"), "--ema_decay"),
    (("--ema_decay", "0.99", "--training_strategy", "deepspeed_stage_3"), "--ema_decay"),
    (("--pretrained_lora_path", "/no/such/lora.safetensors"), "--pretrained_lora_path"),
    (("--guidance_scale", "0"), "--guidance_scale"),
    (("--guidance_scale", "-3.5"), "--guidance_scale"),
    (("--guidance_scale", "nan"), "--guidance_scale"),
])
def test_a_bad_knob_is_refused_naming_its_flag(make_cfg, extra: tuple[str, ...], flag: str | None) -> None:
    if flag is None:
        with pytest.raises(SystemExit):
            make_cfg(*extra)
        return
    with pytest.raises(ConfigError) as err:
        make_cfg(*extra)
    assert err.value.flag == flag


def test_guidance_scale_defaults_to_one_and_is_refused_by_families_without_an_embedding(make_cfg, tmp_path) -> None:
    assert make_cfg().guidance_scale == contract.DEFAULT_TRAINING_GUIDANCE == 1.0      # flux: unchanged
    assert make_cfg("--guidance_scale", "3.5").guidance_scale == 3.5
    base = ["--model_path", str(tmp_path), "--dataset_path", str(tmp_path), "--output_path", str(tmp_path / "o")]
    assert parse_config(["--model_family", "flux2-dev", *base], env={}).guidance_scale == 1.0
    for family in ("sd3", "kolors", "hunyuan-dit", "flux2-klein", "z-image", "qwen-image"):
        assert parse_config(["--model_family", family, *base], env={}).guidance_scale is None
        with pytest.raises(ConfigError, match=rf"^--guidance_scale: {family} has no guidance embedding to feed it "
                                              r"to \(only flux, flux2-dev have one\); drop --guidance_scale$"):
            parse_config(["--model_family", family, *base, "--guidance_scale", "1.0"], env={})


# --- each knob's effect on a real run -------------------------------------------------------------

def test_the_learning_rate_of_each_step_follows_warm_up_and_schedule(make_cfg) -> None:
    cfg = make_cfg("--learning_rate", "0.01", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
                   "--max_epochs", "2", "--checkpoint_every_n_steps", "0", "--output_formats", "diffusers")
    _run(cfg)
    lrs = [m["lr"] for m in _metrics(cfg)]                  # what metrics.jsonl shows per step
    assert lrs == pytest.approx([0.01 * lr_factor("cosine", i, 8, 2) for i in range(8)])
    assert lrs[0] == pytest.approx(0.005) and lrs[1] == pytest.approx(0.01) and lrs[-1] < lrs[2]


class GradNorms(pl.Callback):
    """The global norm of the LoRA gradients the optimizer applied at each step (gradients stay in
    place until the next step's closure zeroes them)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        grads = [p.grad for p in pl_module.denoiser.parameters() if p.requires_grad and p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


def test_gradient_clipping_bounds_the_applied_gradient_norm(make_cfg, tmp_path: Path) -> None:
    args = ("--checkpoint_every_n_steps", "0", "--output_formats", "diffusers")
    free, clipped = GradNorms(), GradNorms()
    _run(make_cfg(*args, output=tmp_path / "free"), callbacks=[free])
    _run(make_cfg(*args, "--max_grad_norm", "0.001", output=tmp_path / "clipped"), callbacks=[clipped])
    assert min(free.norms) > 0.001                          # the bound below really cuts these gradients
    assert max(clipped.norms) <= 0.001 * 1.0001


def test_lora_dropout_is_in_the_lora_layers_and_changes_training(make_cfg, tmp_path: Path) -> None:
    args = ("--checkpoint_every_n_steps", "0", "--output_formats", "diffusers")
    plain = _run(make_cfg(*args, output=tmp_path / "plain"))

    class DropoutSeen(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.rates = {m.p for m in pl_module.denoiser.modules() if isinstance(m, torch.nn.Dropout)}

    seen = DropoutSeen()
    dropped = _run(make_cfg(*args, "--lora_dropout", "0.5", output=tmp_path / "dropped"), callbacks=[seen])
    assert seen.rates == {0.5}
    assert any(not torch.equal(plain.final_lora[k], dropped.final_lora[k]) for k in plain.final_lora)


def test_the_ema_is_checkpointed_and_exported_as_the_lora(make_cfg) -> None:
    cfg = make_cfg("--ema_decay", "0.5", "--checkpoint_every_n_steps", "1", "--keep_last_checkpoints", "4",
                   "--learning_rate", "0.01", "--output_formats", "diffusers")
    result = _run(cfg)
    last = ckpt.load(Path(cfg.checkpoint_dir) / contract.checkpoint_dir_name(4))
    ema, weights = last.ema(), last.trainable
    assert ema is not None and set(ema) == set(weights)
    assert all(torch.equal(result.final_lora[k], ema[k]) for k in ema)            # the export is the EMA
    assert any(not torch.equal(ema[k], weights[k]) for k in ema)                  # which is not the weights
    # One step's update, by hand: ema_4 = 0.5 * ema_3 + 0.5 * w_4.
    before = ckpt.load(Path(cfg.checkpoint_dir) / contract.checkpoint_dir_name(3)).ema()
    for k in ema:
        torch.testing.assert_close(ema[k], 0.5 * before[k] + 0.5 * weights[k], rtol=0, atol=1e-7)


def test_a_run_starts_from_a_pretrained_lora(make_cfg, tmp_path: Path) -> None:
    args = ("--checkpoint_every_n_steps", "0", "--output_formats", "diffusers")
    first = _run(make_cfg(*args, output=tmp_path / "first"))

    class InitialLora(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.state = {k: v.clone() for k, v in pl_module.lora_state().items()}

    seen = InitialLora()
    _run(make_cfg(*args, "--pretrained_lora_path", str(tmp_path / "first"), output=tmp_path / "second"),
         callbacks=[seen])
    assert set(seen.state) == set(first.final_lora)
    assert all(torch.equal(seen.state[k], first.final_lora[k]) for k in seen.state)


def test_a_pretrained_lora_of_another_shape_is_refused_with_the_fix(make_cfg, tmp_path: Path) -> None:
    args = ("--checkpoint_every_n_steps", "0", "--output_formats", "diffusers")
    _run(make_cfg(*args, "--lora_rank", "2", "--lora_alpha", "2", output=tmp_path / "first"))
    with pytest.raises(ConfigError, match="has rank 2 but --lora_rank is 4; set --lora_rank 2"):
        _run(make_cfg(*args, "--pretrained_lora_path", str(tmp_path / "first"), output=tmp_path / "second"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"holds no {contract.ARTIFACT_LORA_DIFFUSERS}"):
        _run(make_cfg(*args, "--pretrained_lora_path", str(empty), output=tmp_path / "third"))


def test_an_interrupted_run_with_every_knob_resumes_bit_identically(make_cfg, tmp_path: Path) -> None:
    pretrained = _run(make_cfg("--checkpoint_every_n_steps", "0", "--output_formats", "diffusers",
                               output=tmp_path / "pretrained"))
    assert pretrained.final_lora
    args = ("--max_epochs", "2", "--checkpoint_every_n_steps", "3", "--output_formats", "diffusers",
            "--lr_scheduler", "linear", "--lr_warmup_steps", "3", "--max_grad_norm", "0.05",
            "--lora_dropout", "0.2", "--ema_decay", "0.7", "--random_flip",
            "--pretrained_lora_path", str(tmp_path / "pretrained"))
    whole = _run(make_cfg(*args, output=tmp_path / "whole"))
    cut = make_cfg(*args, output=tmp_path / "cut")
    with pytest.raises(SimulatedNodeLoss):
        _run(cut, callbacks=[CrashAt(5)])                    # the checkpoint at step 3 survives
    resumed = _run(cut)
    assert resumed.steps_done == whole.steps_done == 8
    for key, tensor in whole.final_lora.items():
        assert torch.equal(tensor, resumed.final_lora[key]), key
    name = contract.ARTIFACT_LORA_DIFFUSERS
    assert sha256(tmp_path / "whole" / name) == sha256(tmp_path / "cut" / name)
    assert [m["lr"] for m in _metrics(cut)] == [m["lr"] for m in _metrics(make_cfg(*args, output=tmp_path / "whole"))]


def test_a_rerun_after_the_last_checkpoint_exports_the_same_ema(make_cfg) -> None:
    """A crash while writing the artifacts: the next attempt finds the last step's checkpoint and
    writes the artifacts only; the LoRA it exports must still be the EMA, not the raw weights."""
    cfg = make_cfg("--ema_decay", "0.5", "--checkpoint_every_n_steps", "4", "--learning_rate", "0.01",
                   "--output_formats", "diffusers")
    first = _run(cfg)
    lora = Path(cfg.output_path) / contract.ARTIFACT_LORA_DIFFUSERS
    exported = sha256(lora)
    lora.unlink()
    again = _run(cfg)
    assert sha256(lora) == exported
    assert all(torch.equal(first.final_lora[k], again.final_lora[k]) for k in first.final_lora)
