"""The operator–trainer contract: everything both sides must agree on, in one place.

The operator (no torch) and the trainer (no kopf) both import this module, so a change to an env
name, a flag, an exit code, the progress schema or the checkpoint/artifact layout shows up on both
sides at once. Keep it dependency-free (standard library only).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from typing import Any

API_GROUP = "lorakube.io"
API_VERSION = "v1alpha1"
KIND = "LoRATrainingJob"
PLURAL = "loratrainingjobs"
SHORT_NAME = "ltj"

# --- Model families ---------------------------------------------------------------------------

FAMILIES = ("flux", "sd3", "kolors", "hunyuan-dit", "flux2-klein", "z-image", "qwen-image", "flux2-dev")

# Pixel multiple each family needs for height/width: VAE downsampling (8) times the denoiser's
# patch/packing factor (2 for the DiTs and FLUX's 2x2 latent packing; 8 for Kolors' UNet, whose
# three down-blocks halve the latent three times).
SIZE_MULTIPLE = {"flux": 16, "sd3": 16, "hunyuan-dit": 16, "kolors": 64, "flux2-klein": 16, "z-image": 16,
                 "qwen-image": 16, "flux2-dev": 16}

PRECISIONS = ("32", "16", "16-mixed", "bf16-mixed")
STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")
OUTPUT_FORMATS = ("diffusers", "comfyui")

# --- Exit codes -------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_USER_ERROR = 1          # generic user/config error: fail the job at once
EXIT_INVALID_ARGS = 2        # bad CLI/config values (argparse's own code)
EXIT_OUT_OF_MEMORY = 3       # CUDA out of memory: fail at once, the same settings run out again
EXIT_DATASET_ERROR = 65      # EX_DATAERR: the dataset is malformed (names the file/row)
# The trainer's line for EXIT_DATASET_ERROR reads "<prefix>: <file or row>: <problem>", which the
# operator quotes into the job's condition (reason InvalidDataset).
DATASET_ERROR_PREFIX = "dataset"
EXIT_RETRYABLE = 75          # EX_TEMPFAIL: rendezvous/NCCL timeout, transient storage: retry the gang

# Preflight, the trainer's first stage (before torch loads, before any training time): one code
# per failed check, the job's condition reason PREFLIGHT_FAILED, its message the trainer's one line
# "PreflightFailed: <check>: <what> (<why>)". Only the master's DNS name is retried (a headless
# Service's records may lag behind the pod); the rest fail the job at once.
PREFLIGHT_FAILED = "PreflightFailed"
EXIT_PREFLIGHT_MODEL = 80        # model folder missing, unreadable, or not a pipeline of the family
EXIT_PREFLIGHT_DATASET = 81      # no readable metadata.csv where the dataset should be
EXIT_PREFLIGHT_OUTPUT = 82       # the output folder cannot take new files
EXIT_PREFLIGHT_CHECKPOINT = 83   # the checkpoint folder cannot take new files
EXIT_PREFLIGHT_GPUS = 84         # fewer GPUs visible than gpusPerNode
EXIT_PREFLIGHT_MASTER = 85       # rank 0's DNS name does not resolve (retryable)
PREFLIGHT_EXIT_CODES = {
    EXIT_PREFLIGHT_MODEL: "model", EXIT_PREFLIGHT_DATASET: "dataset", EXIT_PREFLIGHT_OUTPUT: "output",
    EXIT_PREFLIGHT_CHECKPOINT: "checkpoint", EXIT_PREFLIGHT_GPUS: "gpus", EXIT_PREFLIGHT_MASTER: "master",
}
PREFLIGHT_RETRYABLE_EXIT_CODES = frozenset({EXIT_PREFLIGHT_MASTER})

# --- Environment the operator injects into every pod ------------------------------------------

ENV_MASTER_ADDR = "MASTER_ADDR"
ENV_MASTER_PORT = "MASTER_PORT"
ENV_WORLD_SIZE = "WORLD_SIZE"            # nodes x processes per node
ENV_NODE_RANK = "NODE_RANK"
ENV_NNODES = "NNODES"
ENV_NPROC_PER_NODE = "NPROC_PER_NODE"
# torchrun reads its options from PET_<OPTION> variables.
ENV_PET = {
    "PET_MASTER_ADDR": ENV_MASTER_ADDR,
    "PET_MASTER_PORT": ENV_MASTER_PORT,
    "PET_NNODES": ENV_NNODES,
    "PET_NODE_RANK": ENV_NODE_RANK,
    "PET_NPROC_PER_NODE": ENV_NPROC_PER_NODE,
}
ENV_JOB_NAME = "LORAKUBE_JOB_NAME"
ENV_JOB_NAMESPACE = "LORAKUBE_JOB_NAMESPACE"
ENV_JOB_UID = "LORAKUBE_JOB_UID"
ENV_ATTEMPT = "LORAKUBE_ATTEMPT"
ENV_POD_NAME = "LORAKUBE_POD_NAME"
# Seconds the trainer waits for rank 0 to resolve and accept TCP (and for the process group to
# form) before exiting with EXIT_RETRYABLE.
ENV_RENDEZVOUS_TIMEOUT = "LORAKUBE_RENDEZVOUS_TIMEOUT_SECONDS"
DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS = 300
# "1" makes rank 0 patch status.progress of its own job through the API server (in-cluster
# ServiceAccount token); anything else keeps progress on stdout only.
ENV_REPORT_PROGRESS = "LORAKUBE_REPORT_PROGRESS"
# Minimum seconds between two status.progress patches.
ENV_PROGRESS_INTERVAL = "LORAKUBE_PROGRESS_INTERVAL_SECONDS"
DEFAULT_PROGRESS_INTERVAL_SECONDS = 5.0
# The pod's terminationGracePeriodSeconds (spec.runPolicy.terminationGracePeriodSeconds): after a
# SIGTERM the trainer finishes its step and checkpoints only while this much time is left, and
# exits at once (143) otherwise. Unset: Kubernetes' own default grace period.
ENV_TERMINATION_GRACE = "LORAKUBE_TERMINATION_GRACE_SECONDS"
DEFAULT_TERMINATION_GRACE_SECONDS = 120     # one LoRA step + one checkpoint write + margin
KUBERNETES_DEFAULT_GRACE_SECONDS = 30

DEFAULT_MASTER_PORT = 29500

# Credentials per URI: the Secret of spec.model/dataset/output.secretRef reaches the trainer as
# envFrom with its section's prefix (AWS_ACCESS_KEY_ID of the output's Secret becomes
# LORAKUBE_OUTPUT_AWS_ACCESS_KEY_ID), so two Secrets with the same keys never collide. The trainer
# reads a section's URIs with that section's variables (storage.role_env); the checkpoint location
# is the output's. Unprefixed variables (spec.resources.env, an instance role) remain the fallback.
STORAGE_ROLES = ("model", "dataset", "output")
SECRET_ENV_PREFIXES = {role: f"LORAKUBE_{role.upper()}_" for role in STORAGE_ROLES}

# Rank 0 serves its live training metrics (step, loss, samples/s, GPU memory) in the Prometheus
# text format at http://<pod>:TRAINER_METRICS_PORT/metrics; the operator declares the port on rank
# 0's container under TRAINER_METRICS_PORT_NAME so a PodMonitor can find it. ENV_METRICS_PORT
# (not injected by the operator; a job may set it in spec.resources.env): "0" or "off" serves
# nothing, another number moves the server (the declared port then stays 9400).
TRAINER_METRICS_PORT = 9400
TRAINER_METRICS_PORT_NAME = "metrics"
ENV_METRICS_PORT = "LORAKUBE_METRICS_PORT"

# Env a job's spec.resources.env may not set: what the operator injects above, and what the
# launchers (Lightning, torchrun/torch.distributed.elastic) derive per process from it. A user
# RANK or LOCAL_RANK in the pod env would make every process of a pod claim the same rank.
RESERVED_ENV_NAMES = frozenset(
    {
        ENV_MASTER_ADDR, ENV_MASTER_PORT, ENV_WORLD_SIZE, ENV_NODE_RANK, ENV_NNODES, ENV_NPROC_PER_NODE,
        *ENV_PET,
        ENV_JOB_NAME, ENV_JOB_NAMESPACE, ENV_JOB_UID, ENV_ATTEMPT, ENV_POD_NAME,
        ENV_RENDEZVOUS_TIMEOUT, ENV_REPORT_PROGRESS, ENV_TERMINATION_GRACE,
        "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
    }
)
# Whole families: torchelastic's agent sets TORCHELASTIC_RUN_ID, TORCHELASTIC_RESTART_COUNT, ...
RESERVED_ENV_PREFIXES = ("TORCHELASTIC_",)


def is_reserved_env(name: str) -> bool:
    return name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)

# --- Labels and names -------------------------------------------------------------------------

LABEL_JOB_NAME = "lorakube.io/job-name"
LABEL_RANK = "lorakube.io/rank"
LABEL_ATTEMPT = "lorakube.io/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "lorakube"
TRAINER_CONTAINER = "trainer"

# Pod names are <job>-node-<rank>; hostnames and Service names are DNS labels (<= 63 chars).
MAX_JOB_NAME_LENGTH = 63 - len("-node-") - 3   # room for ranks up to 999


def pod_name(job: str, rank: int) -> str:
    return f"{job}-node-{rank}"


def master_addr(job: str, namespace: str) -> str:
    """Rank 0's stable DNS name through the job's headless Service."""
    return f"{pod_name(job, 0)}.{job}.{namespace}.svc"


# --- Trainer CLI: spec.training (camelCase) -> trainer flag ----------------------------------
# The original framework's flags keep their names; the operator derives args from this table.

TRAINING_FLAGS: dict[str, str] = {
    "loraTargetModules": "--lora_target_modules",
    "stepsPerEpoch": "--steps_per_epoch",
    "height": "--height",
    "width": "--width",
    "centerCrop": "--center_crop",
    "randomFlip": "--random_flip",
    "batchSize": "--batch_size",
    "dataloaderNumWorkers": "--dataloader_num_workers",
    "precision": "--precision",
    "learningRate": "--learning_rate",
    "loraRank": "--lora_rank",
    "loraAlpha": "--lora_alpha",
    "gradientCheckpointing": "--use_gradient_checkpointing",
    "accumulateGradBatches": "--accumulate_grad_batches",
    "strategy": "--training_strategy",
    "maxEpochs": "--max_epochs",
    "seed": "--seed",
    "checkpointEverySteps": "--checkpoint_every_n_steps",
    "validationPrompts": "--validation_prompt",       # repeated once per prompt
    "validationEverySteps": "--validation_every_n_steps",
    "cacheLatents": "--cache_latents",
    "lrScheduler": "--lr_scheduler",
    "lrWarmupSteps": "--lr_warmup_steps",
    "maxGradNorm": "--max_grad_norm",
    "loraDropout": "--lora_dropout",
    "emaDecay": "--ema_decay",
    "aspectRatioBuckets": "--aspect_ratio_buckets",
    "guidanceScale": "--guidance_scale",
}
# How the learning rate moves over the run (--lr_scheduler): constant is the original trainer's.
# Each first ramps up linearly over --lr_warmup_steps (0: no warm-up).
LR_SCHEDULERS = ("constant", "linear", "cosine")
# The families whose transformer has a guidance embedding (guidance-distilled: FLUX.1-dev, FLUX.2 dev).
# Training feeds it --guidance_scale (spec.training.guidanceScale), DEFAULT_TRAINING_GUIDANCE unless set,
# as the original trainer did; every other family refuses the flag, having nothing to feed it to.
GUIDANCE_EMBEDDING_FAMILIES = ("flux", "flux2-dev")
DEFAULT_TRAINING_GUIDANCE = 1.0

# Boolean flags are store_true switches: present when true, absent when false.
BOOLEAN_TRAINING_FLAGS = frozenset({"centerCrop", "randomFlip", "gradientCheckpointing", "cacheLatents",
                                    "aspectRatioBuckets"})

# What stepsPerEpoch / --steps_per_epoch counts, word for word in the CRD's description (kubectl
# explain) and in `lorakube-train --help`; a unit test holds both to this text. Optimizer steps,
# because every other step count a user sees (progress, checkpointEverySteps,
# validationEverySteps) counts them, and they do not change when nodes are added.
STEPS_PER_EPOCH_MEANING = (
    "Optimizer steps per epoch, counted once for the whole job (all processes step together), the "
    "unit of progress totalSteps: a run makes steps per epoch x max epochs optimizer steps, and each "
    "step draws batch size x accumulate grad batches samples on every process (one per GPU), so an "
    "epoch uses steps per epoch x accumulate grad batches x batch size x processes samples."
)

# --- Progress ---------------------------------------------------------------------------------

PROGRESS_EVENT = "progress"


@dataclasses.dataclass(frozen=True)
class Progress:
    """What rank 0 reports: the body of status.progress and of a JSON line on stdout."""

    step: int
    totalSteps: int
    epoch: int
    loss: float | None
    samplesPerSecond: float | None
    etaSeconds: float | None
    updatedAt: str

    def to_status(self) -> dict[str, Any]:
        """The body of status.progress, sent as a JSON merge patch: a value that does not apply now
        (no loss yet, no rate or ETA before a second step) is an explicit null, which deletes what
        an earlier report left, so a restarted attempt never shows the last attempt's speed or ETA."""
        body = dataclasses.asdict(self)
        # The CRD stores loss as a string so `kubectl get` can print it and so that a NaN loss
        # survives JSON (which has no NaN).
        body["loss"] = None if self.loss is None else f"{self.loss:.6g}"
        body["samplesPerSecond"] = (
            None if self.samplesPerSecond is None else round(self.samplesPerSecond, 3)
        )
        body["etaSeconds"] = None if self.etaSeconds is None else int(self.etaSeconds)
        # The Progress printer column reads this (CRD columns cannot join two fields); sent with
        # the progress itself, so a progress patch costs the operator no status write.
        body["text"] = f"{self.step}/{self.totalSteps}"
        return body

    def to_json_line(self) -> str:
        # A log line deletes nothing: values that do not apply are left out.
        known = {k: v for k, v in self.to_status().items() if v is not None}
        return json.dumps({"event": PROGRESS_EVENT, **known}, sort_keys=True)


# --- Staging (status.progress.staging) ------------------------------------------------------
# A model or dataset URI that is not a local path is staged: rank 0 downloads it into its node's
# cache before training and reports the bytes under status.progress.staging; the operator shows
# the job as Staging (not Running) from the moment all pods run until rank 0 reports the current
# attempt's inputs complete. Staging reports are throttled to one per STAGING_REPORT_INTERVAL_SECONDS
# (plus the first and the last of each input).

STAGING_EVENT = "staging"
STAGING_REPORT_INTERVAL_SECONDS = 2.0
# The condition reason when staging showed no progress for spec.runPolicy.stagingProgressDeadlineSeconds
# (no new report: the first of an input, bytes, the last): the operator restarts the gang.
STAGING_STALLED = "StagingStalled"
# pretrainedLora: spec.model.pretrainedLoraUri (--pretrained_lora_path) in a bucket, staged like the model.
STAGED_INPUTS = ("model", "dataset", "pretrainedLora")


def is_staged_uri(uri: str | None) -> bool:
    """Any URI with a scheme (s3://, hf://, https:// ...): local paths and volumes are used in place."""
    return bool(uri) and "://" in str(uri)


def uri_for_display(uri: str) -> str:
    """The URI without user info, query or fragment, so that no credential reaches status or logs."""
    head, sep, rest = str(uri).partition("://")
    if not sep:
        return str(uri)
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    authority, slash, path = rest.partition("/")
    return f"{head}://{authority.rsplit('@', 1)[-1]}{slash}{path}"


def _size_text(done: int, total: int | None) -> str:
    """`12.5/340.2 MiB`: both in the unit of the total (the Progress column is 32 characters)."""
    scale = total if total else done
    unit, div = next(((u, float(d)) for u, d in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
                      if scale >= d), ("B", 1.0))
    fmt = (lambda n: str(int(n))) if div == 1.0 else (lambda n: f"{n / div:.1f}")
    return f"{fmt(done)}/{fmt(total)} {unit}" if total is not None else f"{fmt(done)} {unit}"


@dataclasses.dataclass(frozen=True)
class Staging:
    """What rank 0 reports while it stages its inputs: the body of status.progress.staging (plus
    progress.text for the Progress column) and of a JSON line on stdout."""

    attempt: int
    input: str                 # one of STAGED_INPUTS
    uri: str                   # shown as uri_for_display gives it
    bytesDone: int
    bytesTotal: int | None     # None until the listing is known
    cached: bool               # this input was in the node's cache: nothing was downloaded
    complete: bool             # every input of this attempt is staged: training starts now
    updatedAt: str

    def to_status(self) -> dict[str, Any]:
        """The merge patch of status.progress."""
        body = dataclasses.asdict(self)
        body["uri"] = uri_for_display(self.uri)
        return {"staging": body, "text": f"{self.input} {_size_text(self.bytesDone, self.bytesTotal)}"[:32]}

    def to_json_line(self) -> str:
        body = {k: v for k, v in self.to_status()["staging"].items() if v is not None}
        return json.dumps({"event": STAGING_EVENT, **body}, sort_keys=True)


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- Checkpoints (under the checkpoint dir, which survives pod restarts) ----------------------
#   <checkpoint_dir>/step-000000120/trainable.safetensors   LoRA (trainable) tensors only
#   <checkpoint_dir>/step-000000120/state.pt                optimizer, LR scheduler, step, RNG, data position
#   <checkpoint_dir>/step-000000120/COMPLETE.json           written last: {"step":..., "files": {name: sha256}}
# A directory without a valid COMPLETE.json is a half-written checkpoint and is never resumed from.

CHECKPOINT_DIR_PREFIX = "step-"
CHECKPOINT_COMPLETE_MARKER = "COMPLETE.json"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_DIR_PREFIX}{step:09d}"


# --- Artifacts (under the output path) --------------------------------------------------------

ARTIFACT_LORA_DIFFUSERS = "pytorch_lora_weights.safetensors"   # diffusers/peft keys, alpha stored
ARTIFACT_LORA_COMFYUI = "lora_comfyui.safetensors"             # kohya/ComfyUI keys + per-module alpha
ARTIFACT_TRAINING_CONFIG = "training_config.json"
ARTIFACT_METRICS = "metrics.jsonl"                             # step, epoch, loss, lr: reproducible
# Wall-clock seconds and GPU memory per step. They differ between two runs of one spec, so they stay
# out of metrics.jsonl and the manifest, which are byte-identical when a run reproduces.
ARTIFACT_TIMINGS = "timings.jsonl"
ARTIFACT_VALIDATION_GRID = "validation_grid.png"               # base vs base+LoRA, same seed
ARTIFACT_MODEL_CARD = "README.md"                              # what was trained, on what, how to load it
ARTIFACT_MANIFEST = "manifest.json"                             # sha256 + bytes per file, written last

# --- Trainer CLI flags that are not in spec.training ------------------------------------------
# spec.model.family -> --model_family, spec.model.uri -> --model_path, spec.dataset.uri ->
# --dataset_path, spec.output.uri -> --output_path, spec.output.checkpointUri -> --checkpoint_dir,
# spec.output.formats -> --output_formats (comma-separated), always --resume auto.
FLAG_MODEL_FAMILY = "--model_family"
FLAG_MODEL_PATH = "--model_path"
FLAG_DATASET_PATH = "--dataset_path"
FLAG_OUTPUT_PATH = "--output_path"
FLAG_CHECKPOINT_DIR = "--checkpoint_dir"
FLAG_OUTPUT_FORMATS = "--output_formats"
FLAG_RESUME = "--resume"
# A LoRA to start from instead of a fresh one (the original's flag); spec.model.pretrainedLoraUri.
FLAG_PRETRAINED_LORA_PATH = "--pretrained_lora_path"
# spec.dataset.format -> --dataset_format, .captionDropout -> --caption_dropout, .defaultCaption ->
# --default_caption (an empty string too), .maxImagePixels -> --max_image_pixels (README "Data formats").
FLAG_DATASET_FORMAT = "--dataset_format"
FLAG_CAPTION_DROPOUT = "--caption_dropout"
FLAG_DEFAULT_CAPTION = "--default_caption"
FLAG_MAX_IMAGE_PIXELS = "--max_image_pixels"
DATASET_FORMATS = ("auto", "csv", "jsonl", "txt", "kohya")
# kohya's caption habits (README "Data formats"): .shuffleCaption -> --shuffle_caption, .keepTokens ->
# --keep_tokens, .captionTagDropout -> --caption_tag_dropout (kohya's caption_tag_dropout_rate),
# .captionExtension -> --caption_extension (the txt and kohya formats' caption files),
# .keepTokensSeparator -> --keep_tokens_separator, .captionPrefix -> --caption_prefix, .captionSuffix ->
# --caption_suffix (passed as one argument with "=": a prefix may start with "-").
FLAG_SHUFFLE_CAPTION = "--shuffle_caption"
FLAG_KEEP_TOKENS = "--keep_tokens"
FLAG_CAPTION_TAG_DROPOUT = "--caption_tag_dropout"
FLAG_CAPTION_EXTENSION = "--caption_extension"
FLAG_KEEP_TOKENS_SEPARATOR = "--keep_tokens_separator"
FLAG_CAPTION_PREFIX = "--caption_prefix"
FLAG_CAPTION_SUFFIX = "--caption_suffix"
# A keep-tokens separator has a character that is neither a comma (which separates tags) nor blank;
# the CRD's keepTokensSeparator pattern is this one.
KEEP_TOKENS_SEPARATOR_PATTERN = r"^[^,]*[^,\s][^,]*$"
DEFAULT_CAPTION_EXTENSION = ".txt"
# One or more dot-led parts (.txt, .caption, .en.txt); the CRD's captionExtension pattern is this one.
CAPTION_EXTENSION_PATTERN = r"^(\.[A-Za-z0-9_-]+)+$"
# The image files the txt and kohya formats read (a caption extension must not be one of them).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Pillow's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS): larger images are refused.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
FLAG_PREFLIGHT = "--preflight"   # run the preflight checks only, exit 0 or the failed check's code
# spec.resources.gpusPerNode 0 -> --accelerator cpu (one CPU process per node even where GPUs show);
# more -> --accelerator gpu (never a silent fall back to CPU; preflight counts the GPUs it sees).
FLAG_ACCELERATOR = "--accelerator"
TRAINER_COMMAND = "lorakube-train"
DEFAULT_CHECKPOINT_SUBDIR = "checkpoints"   # under --output_path when --checkpoint_dir is not given
# spec.output.modelscopeModelId: the trainer also publishes the LoRA to that ModelScope model repo
# (the token comes from MODELSCOPE_API_TOKEN in the Secret, never from a flag the operator writes).
FLAG_MODELSCOPE_MODEL_ID = "--modelscope_model_id"
# An https:// model or dataset URI names an archive of the folder; these endings are extracted.
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")

# What each published file is, as status.artifacts[].format says it.
ARTIFACT_FORMATS = {
    ARTIFACT_LORA_DIFFUSERS: "diffusers",
    ARTIFACT_LORA_COMFYUI: "comfyui",
    ARTIFACT_TRAINING_CONFIG: "config",
    ARTIFACT_METRICS: "metrics",
    ARTIFACT_VALIDATION_GRID: "samples",
    ARTIFACT_MODEL_CARD: "model-card",
    ARTIFACT_MANIFEST: "manifest",
}


def artifacts_status(output_uri: str, files: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """status.artifacts from a manifest's {name: {sha256, bytes}}: one entry per file, sorted by name."""
    base = output_uri.rstrip("/")
    return [{"uri": f"{base}/{name}", "sha256": entry["sha256"], "bytes": entry["bytes"],
             "format": ARTIFACT_FORMATS.get(name, "other")}
            for name, entry in sorted(files.items())]
