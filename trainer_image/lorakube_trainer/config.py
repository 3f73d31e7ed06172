"""The trainer's configuration: every CLI flag parsed once into a typed, frozen dataclass.

Flag names are the original framework's (plus lorakube's additions); the operator derives them from
lorakube_api.contract, so those spellings come from there. A YAML file given with --config uses the same
names as keys (without the dashes); flags on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from lorakube_api import contract

from . import storage
from .speed import BASE_WEIGHTS, CHANNELS_LAST_FAMILIES, SDPA_BACKENDS

# Original flag names that are not in contract.TRAINING_FLAGS but the operator never passes.
FLAG_MODELSCOPE_MODEL_ID = "--modelscope_model_id"
FLAG_MODELSCOPE_ACCESS_TOKEN = "--modelscope_access_token"
ENV_MODELSCOPE_TOKEN = "MODELSCOPE_API_TOKEN"

RESUME_AUTO = "auto"
RESUME_NEVER = "never"
ACCELERATORS = ("auto", "cpu", "gpu")
# Lightning's deprecated spellings that users of the original trainer will type.
PRECISION_ALIASES = {"bf16": "bf16-mixed"}


class ConfigError(ValueError):
    """A bad flag value; the message names the flag and says how to fix it."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model_family: str
    model_path: str
    dataset_path: str
    output_path: str
    checkpoint_dir: str
    resume: str
    checkpoint_every_n_steps: int
    keep_last_checkpoints: int
    seed: int
    lora_target_modules: tuple[str, ...] | None    # None: the family's default targets
    steps_per_epoch: int                            # optimizer steps per epoch (contract.STEPS_PER_EPOCH_MEANING)
    max_epochs: int
    height: int
    width: int
    center_crop: bool
    random_flip: bool
    aspect_ratio_buckets: bool                      # each image at the nearest bucket of ~height x width pixels
    batch_size: int
    dataloader_num_workers: int
    precision: str | None                           # one of contract.PRECISIONS; None: by accelerator
    learning_rate: float
    lora_rank: int
    lora_alpha: float
    use_gradient_checkpointing: bool
    cache_latents: bool
    lr_scheduler: str                               # one of contract.LR_SCHEDULERS
    lr_warmup_steps: int
    max_grad_norm: float                            # 0: no clipping (the original trainer's behaviour)
    lora_dropout: float
    ema_decay: float                                # 0: no EMA; else the exported LoRA is the EMA
    pretrained_lora_path: str | None                # a LoRA file or a lorakube output folder to start from
    accumulate_grad_batches: int
    training_strategy: str                          # one of contract.STRATEGIES
    output_formats: tuple[str, ...]
    validation_prompts: tuple[str, ...]
    validation_every_n_steps: int                   # 0: only the final before/after grid
    validation_inference_steps: int
    num_nodes: int | None                           # None: from the environment
    devices: int | None
    accelerator: str
    rendezvous_timeout: float
    modelscope_model_id: str | None
    modelscope_access_token: str | None
    # The dataset (README "Data formats"); defaults keep the original behaviour.
    dataset_format: str = "auto"                    # one of contract.DATASET_FORMATS
    caption_dropout: float = 0.0
    default_caption: str | None = None              # None: an image without a caption is an error
    max_image_pixels: int = contract.DEFAULT_MAX_IMAGE_PIXELS
    # kohya's caption habits (data.arrange_tags); off by default.
    shuffle_caption: bool = False
    keep_tokens: int = 0                            # the first N comma-separated tags stay in place
    caption_tag_dropout: float = 0.0
    caption_extension: str = contract.DEFAULT_CAPTION_EXTENSION
    keep_tokens_separator: str = ""                 # "": none; else the tags before it stay in place
    caption_prefix: str = ""                        # added to every caption, never shuffled or dropped
    caption_suffix: str = ""
    # Speed and memory options (speed.py); each off by default.
    compile_blocks: bool = False
    fused_adamw: bool = False
    sdpa_backend: str = "default"
    channels_last: bool = False
    base_weights: str = "auto"
    # What training feeds the guidance embedding (contract.GUIDANCE_EMBEDDING_FAMILIES); None: no embedding.
    guidance_scale: float | None = None

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: what progress, checkpoints and resume count."""
        return self.steps_per_epoch * self.max_epochs

    def epoch_of_step(self, step: int) -> int:
        """The (0-based) epoch of optimizer step `step` (1-based); an epoch holds whole steps."""
        return (step - 1) // self.steps_per_epoch

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        # Never write a secret into an artifact.
        body["modelscope_access_token"] = None if self.modelscope_access_token is None else "***"
        return body


DEFAULT_VALIDATION_PROMPT = "a photo of a cat sitting on a wooden table"


def _comma_list(value: str | Sequence[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(item.strip() for item in items if item.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=contract.TRAINER_COMMAND,
        description="Train a LoRA for a text-to-image diffusion model (FLUX, SD3, Kolors, Hunyuan-DiT).",
    )
    flags = contract.TRAINING_FLAGS
    p.add_argument("--config", help="YAML file whose keys are these flag names (flags given here override it)")
    p.add_argument(contract.FLAG_PREFLIGHT, action="store_true",
                   help="only run the preflight checks (output and checkpoint writable, model readable, every "
                        "dataset record and image header sound, GPUs visible, rank 0's name resolves), then exit 0 "
                        "or the failed check's code")
    p.add_argument(contract.FLAG_MODEL_FAMILY, choices=contract.FAMILIES)
    p.add_argument(contract.FLAG_MODEL_PATH, help="local folder holding the diffusers pipeline")
    p.add_argument(contract.FLAG_DATASET_PATH, help="folder with train/ images and train/metadata.csv, or another "
                                                   f"layout of {contract.FLAG_DATASET_FORMAT}")
    p.add_argument(contract.FLAG_DATASET_FORMAT, default="auto", choices=contract.DATASET_FORMATS,
                   help="csv: metadata.csv (file_name,text); jsonl: metadata.jsonl (Hugging Face imagefolder); "
                        "txt: images with same-name .txt captions; kohya: <repeats>_<name> folders of those; "
                        "auto (default): whichever the folder holds")
    p.add_argument(contract.FLAG_CAPTION_DROPOUT, type=float, default=0.0,
                   help="probability in [0, 1) of training a sample on the empty caption (fixed per seed and step)")
    p.add_argument(contract.FLAG_DEFAULT_CAPTION, default=None,
                   help="caption of images that have none (an empty string allowed); default: such an image "
                        "is a dataset error")
    p.add_argument(contract.FLAG_SHUFFLE_CAPTION, action="store_true",
                   help="shuffle each sample's comma-separated tags (fixed per seed and step)")
    p.add_argument(contract.FLAG_KEEP_TOKENS, type=int, default=0,
                   help=f"the first N tags stay in place and are never dropped (with {contract.FLAG_SHUFFLE_CAPTION} "
                        f"or {contract.FLAG_CAPTION_TAG_DROPOUT})")
    # kohya's name for the same thing is accepted too.
    p.add_argument(contract.FLAG_CAPTION_TAG_DROPOUT, "--caption_tag_dropout_rate", dest="caption_tag_dropout",
                   type=float, default=0.0,
                   help="probability in [0, 1) of leaving out each tag of a sample's caption (fixed per seed and step)")
    p.add_argument(contract.FLAG_KEEP_TOKENS_SEPARATOR, default="",
                   help=f"in a caption holding this (e.g. |||), the tags before it stay in place and are never "
                        f"dropped instead of the first {contract.FLAG_KEEP_TOKENS}, as do those after a second one "
                        f"(at the end); it is taken out of the caption")
    p.add_argument(contract.FLAG_CAPTION_PREFIX, default="",
                   help="text put before every caption (joined with a space), never shuffled or dropped tag by tag")
    p.add_argument(contract.FLAG_CAPTION_SUFFIX, default="",
                   help="text put after every caption (joined with a space), never shuffled or dropped tag by tag")
    p.add_argument(contract.FLAG_CAPTION_EXTENSION, default=contract.DEFAULT_CAPTION_EXTENSION,
                   help="ending of the caption file beside each image in the txt and kohya formats, e.g. .caption "
                        f"(default {contract.DEFAULT_CAPTION_EXTENSION})")
    p.add_argument(contract.FLAG_MAX_IMAGE_PIXELS, type=int, default=contract.DEFAULT_MAX_IMAGE_PIXELS,
                   help="larger images (width x height) are refused before training, as decompression bombs")
    p.add_argument(contract.FLAG_OUTPUT_PATH, help="where the LoRA and its artifacts go")
    p.add_argument(contract.FLAG_CHECKPOINT_DIR, help=f"default: <output_path>/{contract.DEFAULT_CHECKPOINT_SUBDIR}")
    p.add_argument(contract.FLAG_RESUME, default=RESUME_AUTO,
                   help="auto (newest complete checkpoint, if any), never, or a checkpoint folder")
    p.add_argument(flags["checkpointEverySteps"], type=int, default=100, help="0 disables checkpoints")
    p.add_argument("--keep_last_checkpoints", type=int, default=3)
    p.add_argument(flags["seed"], type=int, default=42)
    p.add_argument(flags["loraTargetModules"], default=None, help="comma-separated; default: the family's")
    p.add_argument(flags["stepsPerEpoch"], type=int, default=500, help=contract.STEPS_PER_EPOCH_MEANING)
    p.add_argument(flags["maxEpochs"], type=int, default=1)
    p.add_argument(flags["height"], type=int, default=1024)
    p.add_argument(flags["width"], type=int, default=1024)
    p.add_argument(flags["centerCrop"], action="store_true")
    p.add_argument(flags["randomFlip"], action="store_true")
    p.add_argument(flags["aspectRatioBuckets"], action="store_true",
                   help="train each image at the aspect-ratio bucket nearest its own shape, of about "
                        "height x width pixels, instead of cropping every image to height x width; "
                        "each batch holds one bucket")
    p.add_argument(flags["batchSize"], type=int, default=1)
    p.add_argument(flags["dataloaderNumWorkers"], type=int, default=0)
    p.add_argument(flags["precision"], default=None, choices=contract.PRECISIONS + tuple(PRECISION_ALIASES),
                   help="default: 16-mixed on GPU (the original's default), 32 on CPU")
    p.add_argument(flags["learningRate"], type=float, default=1e-4)
    p.add_argument(flags["loraRank"], type=int, default=4)
    p.add_argument(flags["loraAlpha"], type=float, default=4.0)
    p.add_argument(flags["gradientCheckpointing"], action="store_true")
    p.add_argument(flags["cacheLatents"], action="store_true",
                   help=f"encode images and captions once, then train without the encoders "
                        f"(needs {flags['centerCrop']})")
    p.add_argument(flags["lrScheduler"], default="constant", choices=contract.LR_SCHEDULERS,
                   help="how the learning rate moves over the run after the warm-up (constant: the original's)")
    p.add_argument(flags["lrWarmupSteps"], type=int, default=0,
                   help="optimizer steps over which the learning rate ramps up linearly from lr/steps to lr")
    p.add_argument(flags["maxGradNorm"], type=float, default=0.0,
                   help="clip the LoRA gradients' global L2 norm to this; 0 disables clipping")
    p.add_argument(flags["loraDropout"], type=float, default=0.0,
                   help="dropout probability on the LoRA branch's input during training (0 to <1)")
    p.add_argument(flags["emaDecay"], type=float, default=0.0,
                   help="keep an exponential moving average of the LoRA weights with this decay per step "
                        "(e.g. 0.999) and export it as the LoRA; 0 disables it")
    p.add_argument(flags["guidanceScale"], type=float, default=None,
                   help=f"value fed to the transformer's guidance embedding while training, for the guidance-"
                        f"distilled families ({', '.join(contract.GUIDANCE_EMBEDDING_FAMILIES)}); default "
                        f"{contract.DEFAULT_TRAINING_GUIDANCE:g} (the original trainer's). Inference still uses the "
                        f"pipeline's own guidance_scale")
    p.add_argument(contract.FLAG_PRETRAINED_LORA_PATH, default=None,
                   help=f"start from this LoRA instead of a fresh one: a diffusers-format .safetensors file or a "
                        f"folder holding {contract.ARTIFACT_LORA_DIFFUSERS} (an earlier run's output); a checkpoint "
                        f"to resume from takes precedence")
    p.add_argument(flags["accumulateGradBatches"], type=int, default=1)
    p.add_argument(flags["strategy"], default="auto", choices=contract.STRATEGIES)
    p.add_argument(contract.FLAG_OUTPUT_FORMATS, default=",".join(contract.OUTPUT_FORMATS),
                   help="comma-separated subset of " + ",".join(contract.OUTPUT_FORMATS))
    p.add_argument(flags["validationPrompts"], action="append", dest="validation_prompt", default=None,
                   help="repeat for several prompts")
    p.add_argument(flags["validationEverySteps"], type=int, default=0)
    p.add_argument("--validation_inference_steps", type=int, default=28)
    p.add_argument("--num_nodes", type=int, default=None, help=f"default: ${contract.ENV_NNODES} or 1")
    p.add_argument("--devices", type=int, default=None, help=f"default: ${contract.ENV_NPROC_PER_NODE} or 1")
    p.add_argument(contract.FLAG_ACCELERATOR, default="auto", choices=ACCELERATORS)
    p.add_argument("--rendezvous_timeout", type=float, default=None,
                   help=f"seconds; default: ${contract.ENV_RENDEZVOUS_TIMEOUT} or "
                        f"{contract.DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS}")
    p.add_argument(FLAG_MODELSCOPE_MODEL_ID, default=None)
    p.add_argument(FLAG_MODELSCOPE_ACCESS_TOKEN, default=None)
    speed = p.add_argument_group("speed and memory (README: Performance)")
    speed.add_argument("--compile_blocks", action="store_true",
                       help="torch.compile each repeated denoiser block (regional: compile time of one block)")
    speed.add_argument("--fused_adamw", action="store_true", help="torch's fused (single-kernel) AdamW")
    speed.add_argument("--sdpa_backend", default="default", choices=tuple(SDPA_BACKENDS),
                       help="attention kernels CUDA may use; default: all but cuDNN (its bf16 backward "
                            "returns NaN gradients on H100/H200 with this torch)")
    speed.add_argument("--channels_last", action="store_true",
                       help="NHWC memory layout for the UNet family (" + ",".join(CHANNELS_LAST_FAMILIES) + ")")
    speed.add_argument("--base_weights", default="auto", choices=BASE_WEIGHTS,
                       help="frozen base linear layers in 8-bit (torchao, weight-only) to fit smaller "
                            "GPUs; auto: the --precision dtype. fp8 needs a GPU; the LoRA stays full precision")
    return p


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of flag names to values")
    # Keys are flag names without the dashes; a flag's dest may differ (validation_prompt is the dest).
    known = {a.option_strings[0].lstrip("-"): a for a in parser._actions if a.option_strings}
    defaults: dict[str, Any] = {}
    for key, value in loaded.items():
        action = known.get(str(key))
        if action is None or key in ("config", "help", "preflight"):
            raise ConfigError("--config", f"unknown key {key!r} in {path}; keys are the flag names, "
                                          "e.g. learning_rate, lora_rank")
        if key == "validation_prompt" and isinstance(value, str):
            value = [value]
        if isinstance(action, argparse._StoreTrueAction) and not isinstance(value, bool):
            raise ConfigError(f"--{key}", f"must be true or false in {path}, got {value!r}")
        if action.type is not None and value is not None and not isinstance(value, list):
            try:
                value = action.type(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"--{key}", f"{value!r} in {path} is not a valid {action.type.__name__}") from exc
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"--{key}", f"{value!r} in {path} is not one of {', '.join(map(str, action.choices))}")
        defaults[action.dest] = value
    return defaults


def _require(value: Any, flag: str) -> Any:
    if value in (None, ""):
        raise ConfigError(flag, "is required (give it on the command line or in --config)")
    return value


def _positive(value: int | float, flag: str, minimum: int | float = 1) -> None:
    if value < minimum:
        raise ConfigError(flag, f"must be >= {minimum}, got {value}")


def _env_float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(name, f"environment value {raw!r} is not a number of seconds") from exc


def preflight_only(argv: Sequence[str] | None = None) -> bool:
    """Whether the command line asks for the preflight checks alone (not a training setting, so
    not in TrainConfig)."""
    return bool(build_parser().parse_known_args(argv)[0].preflight)


def parse_config(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> TrainConfig:
    """argv -> TrainConfig. Raises ConfigError (bad values) or SystemExit(2) (argparse syntax)."""
    env = dict(os.environ) if env is None else env
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    file_prompts = None
    if first.config:
        defaults = _yaml_defaults(parser, first.config)
        # An append flag would add command-line prompts to the file's; the command line replaces them.
        file_prompts = defaults.pop("validation_prompt", None)
        parser.set_defaults(**defaults)
    ns = parser.parse_args(argv)
    if ns.validation_prompt is None:
        ns.validation_prompt = file_prompts
    return _validate(ns, env)


def _validate(ns: argparse.Namespace, env: dict[str, str]) -> TrainConfig:
    flags = contract.TRAINING_FLAGS
    family = _require(ns.model_family, contract.FLAG_MODEL_FAMILY)
    model_path = _require(ns.model_path, contract.FLAG_MODEL_PATH)
    dataset_path = _require(ns.dataset_path, contract.FLAG_DATASET_PATH)
    output_path = _require(ns.output_path, contract.FLAG_OUTPUT_PATH)

    multiple = contract.SIZE_MULTIPLE[family]
    for key in ("height", "width"):
        value = getattr(ns, key)
        if value < multiple or value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple)
            raise ConfigError(flags[key], f"{value} is not a multiple of {multiple}, which {family} needs; "
                                          f"use e.g. {nearest}")
    for key, flag_key in (("steps_per_epoch", "stepsPerEpoch"), ("max_epochs", "maxEpochs"),
                          ("batch_size", "batchSize"), ("lora_rank", "loraRank"),
                          ("accumulate_grad_batches", "accumulateGradBatches")):
        _positive(getattr(ns, key), flags[flag_key])
    _positive(ns.dataloader_num_workers, flags["dataloaderNumWorkers"], 0)
    _positive(ns.checkpoint_every_n_steps, flags["checkpointEverySteps"], 0)
    _positive(ns.validation_every_n_steps, flags["validationEverySteps"], 0)
    _positive(ns.keep_last_checkpoints, "--keep_last_checkpoints")
    _positive(ns.validation_inference_steps, "--validation_inference_steps")
    if ns.cache_latents and not ns.center_crop:
        raise ConfigError(flags["cacheLatents"], f"needs {flags['centerCrop']}: a random crop differs every time "
                                                 f"and cannot be cached; add {flags['centerCrop']} or drop "
                                                 f"{flags['cacheLatents']}")
    if not 0 <= ns.caption_dropout < 1:
        raise ConfigError(contract.FLAG_CAPTION_DROPOUT, f"must be a probability in [0, 1), got {ns.caption_dropout}")
    _positive(ns.max_image_pixels, contract.FLAG_MAX_IMAGE_PIXELS)
    _check_caption_options(ns)
    if not ns.learning_rate > 0:
        raise ConfigError(flags["learningRate"], f"must be > 0, got {ns.learning_rate}")
    if not ns.lora_alpha > 0:
        raise ConfigError(flags["loraAlpha"], f"must be > 0, got {ns.lora_alpha}")
    _positive(ns.lr_warmup_steps, flags["lrWarmupSteps"], 0)
    if not ns.max_grad_norm >= 0:
        raise ConfigError(flags["maxGradNorm"], f"must be >= 0 (0 disables clipping), got {ns.max_grad_norm}")
    if not 0 <= ns.lora_dropout < 1:
        raise ConfigError(flags["loraDropout"], f"must be in [0, 1), got {ns.lora_dropout}")
    if not 0 <= ns.ema_decay < 1:
        raise ConfigError(flags["emaDecay"], f"must be in [0, 1) (0 disables the EMA; 0.999 is typical), "
                                             f"got {ns.ema_decay}")
    if ns.ema_decay and ns.training_strategy == "deepspeed_stage_3":
        raise ConfigError(flags["emaDecay"], "cannot be used with deepspeed_stage_3, which splits the LoRA weights "
                                             "across processes; use deepspeed_stage_2 or drop the EMA")

    targets = None
    if ns.lora_target_modules is not None:
        targets = _comma_list(ns.lora_target_modules)
        if not targets:
            raise ConfigError(flags["loraTargetModules"], "is empty; give module names like to_q,to_k,to_v")

    formats = _comma_list(ns.output_formats)
    unknown = [f for f in formats if f not in contract.OUTPUT_FORMATS]
    if unknown or not formats:
        raise ConfigError(contract.FLAG_OUTPUT_FORMATS,
                          f"{','.join(unknown) or 'nothing'} given; choose from {','.join(contract.OUTPUT_FORMATS)}")

    prompts = tuple(p for p in (ns.validation_prompt or []) if p.strip()) or (DEFAULT_VALIDATION_PROMPT,)

    for key in ("num_nodes", "devices"):
        if getattr(ns, key) is not None:
            _positive(getattr(ns, key), f"--{key}")
    timeout = ns.rendezvous_timeout
    if timeout is None:
        timeout = _env_float(env, contract.ENV_RENDEZVOUS_TIMEOUT, contract.DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS)
    if not timeout > 0:
        raise ConfigError("--rendezvous_timeout", f"must be > 0 seconds, got {timeout}")

    # The token comes from the flag or, under the operator, from MODELSCOPE_API_TOKEN in the Secret.
    # (The output's Secret arrives with its role prefix, storage.role_env.)
    if ns.modelscope_model_id and not (ns.modelscope_access_token
                                       or storage.role_env(env, "output").get(ENV_MODELSCOPE_TOKEN)):
        raise ConfigError(FLAG_MODELSCOPE_MODEL_ID, f"the upload needs a token: {FLAG_MODELSCOPE_ACCESS_TOKEN} or "
                          f"{ENV_MODELSCOPE_TOKEN} in the environment")
    if ns.modelscope_access_token and not ns.modelscope_model_id:
        raise ConfigError(FLAG_MODELSCOPE_ACCESS_TOKEN, f"is only used with {FLAG_MODELSCOPE_MODEL_ID}")
    # The upload runs after the whole training: find out now that it could not.
    if ns.modelscope_model_id and importlib.util.find_spec("modelscope") is None:
        raise ConfigError(FLAG_MODELSCOPE_MODEL_ID,
                          "the upload needs the `modelscope` package, which is not installed here; install it into "
                          "the image (pip install modelscope) or drop the flag")

    if ns.checkpoint_dir is None and storage.scheme(output_path) == "hf":
        raise ConfigError(contract.FLAG_CHECKPOINT_DIR, f"is required when {contract.FLAG_OUTPUT_PATH} is an hf:// repo "
                          "(checkpoints are not written to a Hub repo); give a shared volume path or s3://bucket/prefix")
    if storage.scheme(ns.checkpoint_dir or "") not in ("", *storage.REMOTE_SCHEMES):
        raise ConfigError(contract.FLAG_CHECKPOINT_DIR, f"{ns.checkpoint_dir} is not supported; checkpoints go to a "
                          "shared volume path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix")
    lora = ns.pretrained_lora_path
    if lora and not storage.is_remote(lora) and not Path(lora).exists():
        raise ConfigError(contract.FLAG_PRETRAINED_LORA_PATH,
                          f"{lora} does not exist; give a diffusers-format LoRA file or a lorakube output folder")

    _check_speed_options(ns, family)
    guidance_scale = _guidance_scale(ns.guidance_scale, family)
    checkpoint_dir = ns.checkpoint_dir or storage.join(output_path, contract.DEFAULT_CHECKPOINT_SUBDIR)
    return TrainConfig(
        model_family=family,
        model_path=str(model_path),
        dataset_path=str(dataset_path),
        output_path=str(output_path),
        checkpoint_dir=str(checkpoint_dir),
        resume=ns.resume,
        checkpoint_every_n_steps=ns.checkpoint_every_n_steps,
        keep_last_checkpoints=ns.keep_last_checkpoints,
        seed=ns.seed,
        lora_target_modules=targets,
        steps_per_epoch=ns.steps_per_epoch,
        max_epochs=ns.max_epochs,
        height=ns.height,
        width=ns.width,
        center_crop=ns.center_crop,
        random_flip=ns.random_flip,
        aspect_ratio_buckets=ns.aspect_ratio_buckets,
        batch_size=ns.batch_size,
        dataloader_num_workers=ns.dataloader_num_workers,
        precision=None if ns.precision is None else PRECISION_ALIASES.get(ns.precision, ns.precision),
        learning_rate=ns.learning_rate,
        lora_rank=ns.lora_rank,
        lora_alpha=ns.lora_alpha,
        use_gradient_checkpointing=ns.use_gradient_checkpointing,
        cache_latents=ns.cache_latents,
        lr_scheduler=ns.lr_scheduler,
        lr_warmup_steps=ns.lr_warmup_steps,
        max_grad_norm=ns.max_grad_norm,
        lora_dropout=ns.lora_dropout,
        ema_decay=ns.ema_decay,
        pretrained_lora_path=ns.pretrained_lora_path,
        accumulate_grad_batches=ns.accumulate_grad_batches,
        training_strategy=ns.training_strategy,
        output_formats=formats,
        validation_prompts=prompts,
        validation_every_n_steps=ns.validation_every_n_steps,
        validation_inference_steps=ns.validation_inference_steps,
        num_nodes=ns.num_nodes,
        devices=ns.devices,
        accelerator=ns.accelerator,
        rendezvous_timeout=timeout,
        modelscope_model_id=ns.modelscope_model_id,
        modelscope_access_token=ns.modelscope_access_token,
        dataset_format=ns.dataset_format,
        caption_dropout=ns.caption_dropout,
        default_caption=ns.default_caption,
        max_image_pixels=ns.max_image_pixels,
        shuffle_caption=ns.shuffle_caption,
        keep_tokens=ns.keep_tokens,
        caption_tag_dropout=ns.caption_tag_dropout,
        caption_extension=ns.caption_extension,
        keep_tokens_separator=ns.keep_tokens_separator,
        caption_prefix=ns.caption_prefix,
        caption_suffix=ns.caption_suffix,
        compile_blocks=ns.compile_blocks,
        fused_adamw=ns.fused_adamw,
        sdpa_backend=ns.sdpa_backend,
        channels_last=ns.channels_last,
        base_weights=ns.base_weights,
        guidance_scale=guidance_scale,
    )


def _guidance_scale(value: float | None, family: str) -> float | None:
    """--guidance_scale, resolved: the default for a family with a guidance embedding, None for the rest
    (which refuse the flag: the value would reach nothing, and the run would not be what was asked)."""
    flag = contract.TRAINING_FLAGS["guidanceScale"]
    if family not in contract.GUIDANCE_EMBEDDING_FAMILIES:
        if value is not None:
            raise ConfigError(flag, f"{family} has no guidance embedding to feed it to (only "
                                    f"{', '.join(contract.GUIDANCE_EMBEDDING_FAMILIES)} have one); drop {flag}")
        return None
    if value is None:
        return contract.DEFAULT_TRAINING_GUIDANCE
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(flag, f"must be a number > 0 (default {contract.DEFAULT_TRAINING_GUIDANCE:g}; diffusers' "
                                f"FLUX DreamBooth scripts use 3.5), got {value}")
    return value


_CAPTION_EXTENSION = re.compile(contract.CAPTION_EXTENSION_PATTERN)
_KEEP_TOKENS_SEPARATOR = re.compile(contract.KEEP_TOKENS_SEPARATOR_PATTERN)


def _check_caption_options(ns: argparse.Namespace) -> None:
    flags = contract.TRAINING_FLAGS
    shuffle, dropout = contract.FLAG_SHUFFLE_CAPTION, contract.FLAG_CAPTION_TAG_DROPOUT
    if not 0 <= ns.caption_tag_dropout < 1:
        raise ConfigError(dropout, f"must be a probability in [0, 1), got {ns.caption_tag_dropout}")
    _positive(ns.keep_tokens, contract.FLAG_KEEP_TOKENS, 0)
    if ns.keep_tokens and not (ns.shuffle_caption or ns.caption_tag_dropout):
        raise ConfigError(contract.FLAG_KEEP_TOKENS, f"only matters with {shuffle} or {dropout} (it keeps the first "
                                                     f"tags in place); add one of them or drop {contract.FLAG_KEEP_TOKENS}")
    if ns.cache_latents and (ns.shuffle_caption or ns.caption_tag_dropout):
        which = shuffle if ns.shuffle_caption else dropout
        raise ConfigError(flags["cacheLatents"], f"cannot be combined with {which}: the cache holds one text "
                                                 f"encoding per image, and {which} changes the caption every "
                                                 f"step; drop {flags['cacheLatents']} or {which}")
    separator = ns.keep_tokens_separator
    if separator and not _KEEP_TOKENS_SEPARATOR.fullmatch(separator):
        raise ConfigError(contract.FLAG_KEEP_TOKENS_SEPARATOR, f"{separator!r} cannot mark the fixed tags: it must hold "
                                                               "a character other than a comma (which separates the "
                                                               "tags) or a blank; kohya's usual one is |||")
    extension = ns.caption_extension
    if not _CAPTION_EXTENSION.match(extension or ""):
        raise ConfigError(contract.FLAG_CAPTION_EXTENSION, f"{extension!r} is not a file ending; give one such as "
                                                           f"{contract.DEFAULT_CAPTION_EXTENSION} or .caption")
    if extension.lower().endswith(contract.IMAGE_SUFFIXES):
        raise ConfigError(contract.FLAG_CAPTION_EXTENSION, f"{extension} is an image ending; caption files are text, "
                                                           f"e.g. {contract.DEFAULT_CAPTION_EXTENSION} or .caption")


def _check_speed_options(ns: argparse.Namespace, family: str) -> None:
    if ns.channels_last and family not in CHANNELS_LAST_FAMILIES:
        raise ConfigError("--channels_last", f"only changes the UNet family ({','.join(CHANNELS_LAST_FAMILIES)}); "
                                             f"{family}'s denoiser is a transformer: drop the flag")
    if ns.base_weights == "auto":
        return
    if ns.training_strategy.startswith("deepspeed"):
        raise ConfigError("--base_weights", f"{ns.base_weights} cannot be combined with {ns.training_strategy}: "
                                            "ZeRO partitions the weights it would quantize; use --training_strategy "
                                            "auto or ddp, or --base_weights auto")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("--base_weights", f"{ns.base_weights} needs the torchao package, which is not installed "
                                            "here; pip install 'lorakube[quantize]' or use --base_weights auto")
    if ns.base_weights == "fp8" and ns.accelerator == "cpu":
        raise ConfigError("--base_weights", "fp8 weights need a GPU (H100/H200/Ada or newer); on CPU use int8")

