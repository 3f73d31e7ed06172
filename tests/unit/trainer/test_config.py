"""CLI/config: every flag lands in the typed config; bad values name the flag and exit with
EXIT_INVALID_ARGS; --config YAML uses the flag names and the command line overrides it."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from lorakube_api import contract
from lorakube_trainer.cli import run_cli
from lorakube_trainer.config import DEFAULT_VALIDATION_PROMPT, ConfigError, parse_config

BASE = ["--model_family", "flux", "--model_path", "m", "--dataset_path", "d", "--output_path", "o"]


def test_defaults_keep_the_original_trainers_values() -> None:
    cfg = parse_config(BASE, env={})
    assert (cfg.height, cfg.width, cfg.steps_per_epoch, cfg.max_epochs) == (1024, 1024, 500, 1)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.learning_rate, cfg.batch_size) == (4, 4.0, 1e-4, 1)
    assert cfg.precision is None and cfg.training_strategy == "auto"      # 16-mixed on GPU, 32 on CPU
    assert cfg.lora_target_modules is None          # the family's defaults
    assert cfg.checkpoint_dir == str(Path("o") / contract.DEFAULT_CHECKPOINT_SUBDIR)
    assert cfg.output_formats == contract.OUTPUT_FORMATS
    assert cfg.validation_prompts == (DEFAULT_VALIDATION_PROMPT,)
    assert cfg.resume == "auto" and cfg.rendezvous_timeout == contract.DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS
    assert not (cfg.center_crop or cfg.random_flip or cfg.use_gradient_checkpointing or cfg.cache_latents)


def test_every_flag_is_parsed_into_the_config() -> None:
    flags = contract.TRAINING_FLAGS
    argv = BASE + [
        flags["loraTargetModules"], "to_q, to_k,to_v",
        flags["stepsPerEpoch"], "12", flags["maxEpochs"], "3", flags["height"], "512", flags["width"], "768",
        flags["centerCrop"], flags["randomFlip"], flags["batchSize"], "2", flags["dataloaderNumWorkers"], "3",
        flags["precision"], "bf16", flags["learningRate"], "3e-4", flags["loraRank"], "16",
        flags["loraAlpha"], "8", flags["gradientCheckpointing"], flags["accumulateGradBatches"], "4",
        flags["strategy"], "deepspeed_stage_2", flags["seed"], "7", flags["checkpointEverySteps"], "5",
        flags["validationPrompts"], "a cat", flags["validationPrompts"], "a dog", flags["validationEverySteps"], "6",
        contract.FLAG_CHECKPOINT_DIR, "ck", contract.FLAG_RESUME, "never", contract.FLAG_OUTPUT_FORMATS, "comfyui",
        "--num_nodes", "2", "--devices", "4", "--rendezvous_timeout", "9", "--keep_last_checkpoints", "2",
        "--validation_inference_steps", "3", "--accelerator", "cpu", "--cache_latents",
    ]
    cfg = parse_config(argv, env={})
    assert cfg.lora_target_modules == ("to_q", "to_k", "to_v")
    assert (cfg.steps_per_epoch, cfg.max_epochs, cfg.height, cfg.width) == (12, 3, 512, 768)
    assert cfg.center_crop and cfg.random_flip and cfg.use_gradient_checkpointing
    assert (cfg.batch_size, cfg.dataloader_num_workers, cfg.accumulate_grad_batches) == (2, 3, 4)
    assert cfg.precision == "bf16-mixed"            # the original's alias
    assert (cfg.learning_rate, cfg.lora_rank, cfg.lora_alpha, cfg.seed) == (3e-4, 16, 8.0, 7)
    assert cfg.training_strategy == "deepspeed_stage_2"
    assert cfg.checkpoint_every_n_steps == 5 and cfg.keep_last_checkpoints == 2 and cfg.checkpoint_dir == "ck"
    assert cfg.validation_prompts == ("a cat", "a dog") and cfg.validation_every_n_steps == 6
    assert cfg.validation_inference_steps == 3 and cfg.accelerator == "cpu" and cfg.cache_latents
    assert cfg.resume == "never" and cfg.output_formats == ("comfyui",)
    assert (cfg.num_nodes, cfg.devices, cfg.rendezvous_timeout) == (2, 4, 9.0)
    assert cfg.total_steps == 12 * 3                 # optimizer steps, whatever the accumulation
    with_token = dataclasses.replace(cfg, modelscope_model_id="me/lora", modelscope_access_token="secret")
    assert with_token.to_json()["modelscope_access_token"] == "***"      # never written out
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.height = 64  # type: ignore[misc]


def test_steps_per_epoch_counts_optimizer_steps_whatever_the_accumulation() -> None:
    cfg = parse_config(BASE + ["--steps_per_epoch", "250", "--accumulate_grad_batches", "4", "--max_epochs", "3"],
                       env={})
    assert cfg.total_steps == 750                    # 3000 micro-batches per process
    assert cfg.epoch_of_step(250) == 0 and cfg.epoch_of_step(251) == 1 and cfg.epoch_of_step(750) == 2


def test_rendezvous_timeout_comes_from_the_environment_unless_given() -> None:
    env = {contract.ENV_RENDEZVOUS_TIMEOUT: "42"}
    assert parse_config(BASE, env=env).rendezvous_timeout == 42.0
    assert parse_config(BASE + ["--rendezvous_timeout", "3"], env=env).rendezvous_timeout == 3.0


def test_yaml_config_uses_flag_names_and_the_command_line_wins(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("model_family: kolors\nmodel_path: m\ndataset_path: d\noutput_path: o\nheight: 512\n"
                    "width: 512\nlora_rank: 8\ncenter_crop: true\nvalidation_prompt: [one, two]\n"
                    "lora_target_modules: [to_q, to_v]\nlearning_rate: 0.001\n")
    cfg = parse_config(["--config", str(path), "--lora_rank", "32"], env={})
    assert cfg.model_family == "kolors" and cfg.height == 512 and cfg.center_crop
    assert cfg.lora_rank == 32                       # command line over file
    assert cfg.validation_prompts == ("one", "two") and cfg.lora_target_modules == ("to_q", "to_v")
    assert cfg.learning_rate == 0.001
    replaced = parse_config(["--config", str(path), "--validation_prompt", "three"], env={})
    assert replaced.validation_prompts == ("three",)


@pytest.mark.parametrize(("text", "flag"), [
    ("lora_rnak: 4\n", "--config"),                       # typo in a key
    ("center_crop: yes please\n", "--center_crop"),
    ("lora_rank: many\n", "--lora_rank"),
    ("precision: fp8\n", "--precision"),
    ("- a list\n", "--config"),
])
def test_bad_yaml_names_the_key(tmp_path: Path, text: str, flag: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + ["--config", str(path)], env={})
    assert err.value.flag == flag


@pytest.mark.parametrize(("extra", "flag", "hint"), [
    (["--height", "1000"], "--height", "multiple of 16"),
    (["--width", "8"], "--width", "multiple of 16"),
    (["--steps_per_epoch", "0"], "--steps_per_epoch", ">= 1"),
    (["--learning_rate", "0"], "--learning_rate", "> 0"),
    (["--lora_alpha", "-1"], "--lora_alpha", "> 0"),
    (["--lora_rank", "0"], "--lora_rank", ">= 1"),
    (["--lora_target_modules", " , "], "--lora_target_modules", "empty"),
    (["--output_formats", "diffusers,onnx"], "--output_formats", "onnx"),
    (["--batch_size", "0"], "--batch_size", ">= 1"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers", ">= 0"),
    (["--rendezvous_timeout", "0"], "--rendezvous_timeout", "> 0"),
    (["--modelscope_model_id", "me/x"], "--modelscope_model_id", "MODELSCOPE_API_TOKEN in the environment"),
    (["--modelscope_access_token", "t"], "--modelscope_access_token", "only used with --modelscope_model_id"),
    (["--cache_latents"], "--cache_latents", "needs --center_crop"),
    (["--checkpoint_dir", "hf://me/ckpt"], "--checkpoint_dir", "s3://bucket/prefix, gs://bucket/prefix or az://"),
])
def test_invalid_values_name_the_flag_and_the_fix(extra: list[str], flag: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + extra, env={})
    assert err.value.flag == flag and hint in str(err.value)


def test_kolors_needs_multiples_of_64() -> None:
    argv = ["--model_family", "kolors", "--model_path", "m", "--dataset_path", "d", "--output_path", "o"]
    with pytest.raises(ConfigError, match="multiple of 64.*use e.g. 512"):
        parse_config(argv + ["--height", "500", "--width", "512"], env={})


def test_missing_required_flag() -> None:
    with pytest.raises(ConfigError, match="--dataset_path: is required"):
        parse_config(["--model_family", "flux", "--model_path", "m", "--output_path", "o"], env={})


def test_cli_exit_codes_for_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(BASE + ["--height", "100"]) == contract.EXIT_INVALID_ARGS
    assert "--height" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:               # argparse: unknown choice
        run_cli(BASE + ["--precision", "fp8"])
    assert exc.value.code == contract.EXIT_INVALID_ARGS
    with pytest.raises(SystemExit) as exc:
        run_cli(BASE + ["--lora_rank", "four"])
    assert exc.value.code == contract.EXIT_INVALID_ARGS


def test_the_operators_flag_table_is_accepted() -> None:
    """Every flag the operator may derive from spec.training parses (booleans as switches)."""
    argv = list(BASE)
    values = {"precision": "32", "strategy": "ddp", "validationPrompts": "p", "loraTargetModules": "to_q",
              "learningRate": "0.1", "loraAlpha": "2", "lrScheduler": "cosine", "loraDropout": "0.1",
              "emaDecay": "0.5", "maxGradNorm": "1"}
    for key, flag in contract.TRAINING_FLAGS.items():
        if key in contract.BOOLEAN_TRAINING_FLAGS:
            argv.append(flag)
        else:
            argv += [flag, values.get(key, "16")]
    cfg = parse_config(argv, env={})
    assert cfg.training_strategy == "ddp" and cfg.height == 16


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="the package is installed here")
def test_modelscope_upload_without_the_package_fails_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(BASE + ["--modelscope_model_id", "me/lora", "--modelscope_access_token", "tok"])
    assert code == contract.EXIT_INVALID_ARGS
    err = capsys.readouterr().err
    assert "--modelscope_model_id" in err and "pip install modelscope" in err


@pytest.mark.parametrize(("flag", "where", "code"), [
    ("--output_path", "file", contract.EXIT_PREFLIGHT_OUTPUT),
    ("--output_path", "file/child", contract.EXIT_PREFLIGHT_OUTPUT),
    ("--checkpoint_dir", "file/ckpt", contract.EXIT_PREFLIGHT_CHECKPOINT),
    ("--output_path", "/proc/lorakube-out", contract.EXIT_PREFLIGHT_OUTPUT),  # nobody may create entries, root included
])
def test_an_output_folder_that_cannot_be_written_fails_at_startup(tmp_path: Path, flag: str, where: str, code: int,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("in the way")
    argv = ["--model_family", "flux", "--model_path", str(tmp_path / "no-model"), "--dataset_path",
            str(tmp_path / "no-data"), "--output_path", str(tmp_path / "out"), flag, str(tmp_path / where)]
    # Neither the model nor the dataset exists: preflight stops at the output check, before either.
    assert run_cli(argv) == code
    out = capsys.readouterr().out
    check = "checkpoint" if flag == "--checkpoint_dir" else "output"
    assert f"PreflightFailed: {check} not writable: {tmp_path / where}" in out
    assert ("is a file, not a folder" in out) if where.startswith("file") else ("No such file" in out)


def test_modelscope_token_may_come_from_the_environment() -> None:
    cfg = parse_config(BASE + ["--modelscope_model_id", "me/lora"], env={"MODELSCOPE_API_TOKEN": "from-secret"})
    assert cfg.modelscope_model_id == "me/lora" and cfg.modelscope_access_token is None


@pytest.mark.parametrize("uri", ["s3://ckpt/run", "gs://ckpt/run", "az://ckpt/run"])
def test_checkpoints_may_go_to_any_object_store(uri: str) -> None:
    assert parse_config(BASE + ["--checkpoint_dir", uri], env={}).checkpoint_dir == uri
