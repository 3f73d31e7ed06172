"""The LoRATrainingJob spec as typed, frozen values, parsed once at the edge.

The CRD schema is the first line of validation and the API server fills its defaults, so a stored
job normally has every field. The parser still tolerates absent fields (a job stored before a
default was added, or a test fixture) by falling back to the same defaults, and it checks what
only the operator can know (supported URI schemes, names the operator reserves). Anything wrong
raises `InvalidSpec` naming the field and the fix; the reconciler turns that into a `Failed`
condition with reason `InvalidSpec` instead of crashing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from lorakube_api import contract
from lorakube.queueing import QUEUE_NAME_LABEL, QueueSpec, queue_from_labels

# URI schemes each field accepts (the trainer's locations.py has the same table): local paths
# (a mounted volume), object storage s3://, gs:// and az:// (storage.py), hf:// Hub repos (hubs.py),
# modelscope:// model repos (modelscope_repos.py) and https:// archives (archives.py). Checkpoints are
# rewritten and pruned every few steps, which a Hub repo (a commit per write) is not made for.
_LOCAL = "local path"
_S3 = "s3://"
_GS = "gs://"
_AZ = "az://"
_HF = "hf://"
_MODELSCOPE = "modelscope://"
_HTTPS = "https://"
SUPPORTED_SCHEMES = {
    "spec.model.uri": (_LOCAL, _S3, _GS, _AZ, _HF, _MODELSCOPE, _HTTPS),
    "spec.model.pretrainedLoraUri": (_LOCAL, _S3, _GS, _AZ),
    "spec.dataset.uri": (_LOCAL, _S3, _GS, _AZ, _HF, _MODELSCOPE, _HTTPS),
    "spec.output.uri": (_LOCAL, _S3, _GS, _AZ, _HF),
    "spec.output.checkpointUri": (_LOCAL, _S3, _GS, _AZ),
}
# hf://[datasets/]<org>/<name>[@<revision>][/<path>], the path syntax of huggingface_hub's HfFileSystem.
_MODELSCOPE_URI = re.compile(r"^modelscope://[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[^/@]+)?(/[^@]*)?$")
_HF_URI = re.compile(r"^hf://(datasets/)?[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[^/@]+)?(/[^@]*)?$")

# The API names four gang-scheduling modes; the operator implements plain pods and Kueue so far.
SUPPORTED_GANG_SCHEDULING = ("none", "kueue")

# Volumes the operator adds to every pod are named with this prefix, so a user volume cannot
# collide with them (the CRD refuses such names too).
OPERATOR_VOLUME_PREFIX = "lorakube-"
# Size limit of the Memory-backed emptyDir at /dev/shm (spec.resources.shmSize's default): a cap,
# not a reservation; the pages written count against the pod's memory.
DEFAULT_SHM_SIZE = "8Gi"

_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_CAPTION_EXTENSION = re.compile(contract.CAPTION_EXTENSION_PATTERN)
_KEEP_TOKENS_SEPARATOR = re.compile(contract.KEEP_TOKENS_SEPARATOR_PATTERN)
_URI_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class InvalidSpec(ValueError):
    """The job cannot run as written; `field` says where, the message says how to fix it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: str
    uri: str
    secret_name: str | None = None
    pretrained_lora_uri: str | None = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    uri: str
    secret_name: str | None = None
    format: str = "auto"                    # one of contract.DATASET_FORMATS
    caption_dropout: float = 0.0
    default_caption: str | None = None      # "" is a caption too: train without one
    max_image_pixels: int = contract.DEFAULT_MAX_IMAGE_PIXELS
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_tag_dropout: float = 0.0
    caption_extension: str = contract.DEFAULT_CAPTION_EXTENSION
    keep_tokens_separator: str = ""         # "": none
    caption_prefix: str = ""
    caption_suffix: str = ""


def _flag(key: str, default: Any = None) -> Any:
    """A training field: `key` is its camelCase name in spec.training (and in TRAINING_FLAGS)."""
    return dataclasses.field(default=default, metadata={"key": key})


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """spec.training; defaults mirror the CRD schema's."""

    lora_target_modules: tuple[str, ...] | None = _flag("loraTargetModules")
    steps_per_epoch: int = _flag("stepsPerEpoch", 500)
    height: int = _flag("height", 1024)
    width: int = _flag("width", 1024)
    center_crop: bool = _flag("centerCrop", False)
    random_flip: bool = _flag("randomFlip", False)
    batch_size: int = _flag("batchSize", 1)
    dataloader_num_workers: int = _flag("dataloaderNumWorkers", 0)
    precision: str = _flag("precision", "bf16-mixed")
    learning_rate: float = _flag("learningRate", 1e-4)
    lora_rank: int = _flag("loraRank", 16)
    lora_alpha: float | None = _flag("loraAlpha")
    gradient_checkpointing: bool = _flag("gradientCheckpointing", True)
    accumulate_grad_batches: int = _flag("accumulateGradBatches", 1)
    strategy: str = _flag("strategy", "auto")
    max_epochs: int = _flag("maxEpochs", 1)
    seed: int = _flag("seed", 0)
    checkpoint_every_steps: int = _flag("checkpointEverySteps", 100)
    validation_prompts: tuple[str, ...] = _flag("validationPrompts", ())
    validation_every_steps: int = _flag("validationEverySteps", 0)
    cache_latents: bool = _flag("cacheLatents", False)
    aspect_ratio_buckets: bool = _flag("aspectRatioBuckets", False)
    lr_scheduler: str = _flag("lrScheduler", "constant")
    lr_warmup_steps: int = _flag("lrWarmupSteps", 0)
    max_grad_norm: float = _flag("maxGradNorm", 0.0)
    lora_dropout: float = _flag("loraDropout", 0.0)
    ema_decay: float = _flag("emaDecay", 0.0)
    # None: not passed, so the trainer's default (contract.DEFAULT_TRAINING_GUIDANCE) applies.
    guidance_scale: float | None = _flag("guidanceScale")

    def by_key(self) -> dict[str, Any]:
        """camelCase key -> value, the form contract.TRAINING_FLAGS is keyed by."""
        return {f.metadata["key"]: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class ResourcesSpec:
    num_nodes: int = 1
    gpus_per_node: int = 1
    image: str | None = None
    image_pull_policy: str | None = None
    container_resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    priority_class_name: str | None = None
    # None: the pods run as the job's own ServiceAccount, which the operator creates (rbac.py).
    service_account_name: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    volumes: tuple[Mapping[str, Any], ...] = ()
    volume_mounts: tuple[Mapping[str, Any], ...] = ()
    env: tuple[Mapping[str, Any], ...] = ()
    shm_size: str = DEFAULT_SHM_SIZE

    @property
    def procs_per_node(self) -> int:
        """One process per GPU; gpusPerNode 0 means one CPU process per node."""
        return max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.procs_per_node


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    uri: str
    checkpoint_uri: str
    formats: tuple[str, ...] = contract.OUTPUT_FORMATS
    secret_name: str | None = None
    modelscope_model_id: str | None = None


@dataclasses.dataclass(frozen=True)
class RunPolicy:
    max_restarts: int = 3
    backoff_seconds: int = 10
    active_deadline_seconds: int | None = None
    startup_deadline_seconds: int = 600
    ttl_seconds_after_finished: int | None = None
    suspend: bool = False
    rendezvous_timeout_seconds: int = contract.DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS
    # Room after a SIGTERM for one step + the checkpoint the trainer writes then (shutdown.py).
    termination_grace_period_seconds: int = contract.DEFAULT_TERMINATION_GRACE_SECONDS
    gang_scheduling: str = "none"
    failure_rules: tuple[FailureRuleSpec, ...] = ()
    # A failure blamed on a node keeps the next attempts off it (nodes.py, status.excludedNodes).
    node_avoidance: bool = True
    # Staging that reports no progress this long restarts the gang (reconcile._staging_stalled).
    staging_progress_deadline_seconds: int = 600


FAILURE_ACTIONS = ("Restart", "RestartWithoutCounting", "Fail")
MAX_FAILURE_RULES = 16
_RULE_NAME = re.compile(r"^[A-Z][A-Za-z0-9]{0,63}$")


@dataclasses.dataclass(frozen=True)
class FailureRuleSpec:
    """One entry of spec.runPolicy.failureRules: every condition given must hold (an AND); the
    first rule that matches a failed pod decides, before the built-in rules."""

    name: str                                   # becomes the condition reason
    action: str                                 # one of FAILURE_ACTIONS
    on_exit_codes: tuple[int, ...] | None = None
    on_pod_reasons: tuple[str, ...] | None = None
    on_message_pattern: str | None = None       # a Python regular expression, searched


@dataclasses.dataclass(frozen=True)
class JobSpec:
    model: ModelSpec
    dataset: DatasetSpec
    training: TrainingSpec
    resources: ResourcesSpec
    output: OutputSpec
    run_policy: RunPolicy
    # Set when the job is labelled kueue.x-k8s.io/queue-name: its pods queue in Kueue.
    queue: QueueSpec | None = None


# --- parsing -----------------------------------------------------------------------------------


def parse_job(name: str, spec: Mapping[str, Any] | None, labels: Mapping[str, str] | None = None) -> JobSpec:
    """Parse and check a whole job (its spec, and the Kueue labels among `labels`); raises
    InvalidSpec for the first problem found."""
    check_job_name(name)
    spec = _section(spec, "spec")
    model = _parse_model(_section(spec.get("model"), "spec.model"))
    run_policy = _parse_run_policy(_section(spec.get("runPolicy"), "spec.runPolicy"))
    queue = queue_from_labels(labels)
    if run_policy.gang_scheduling == "kueue" and queue is None:
        raise InvalidSpec("metadata.labels", f"spec.runPolicy.gangScheduling is kueue but the job has no "
                                             f"{QUEUE_NAME_LABEL} label; add it with the name of a LocalQueue "
                                             f"in the job's namespace")
    dataset = _parse_dataset(_section(spec.get("dataset"), "spec.dataset"))
    training = _parse_training(_section(spec.get("training"), "spec.training"), model.family)
    if training.cache_latents and (dataset.shuffle_caption or dataset.caption_tag_dropout):
        which = "spec.dataset.shuffleCaption" if dataset.shuffle_caption else "spec.dataset.captionTagDropout"
        raise InvalidSpec("spec.training.cacheLatents", f"cannot be combined with {which}: the cache holds one "
                                                        f"text encoding per image, and {which} changes the caption "
                                                        "every step; set cacheLatents to false or drop it")
    return JobSpec(
        model=model,
        dataset=dataset,
        training=training,
        resources=_parse_resources(_section(spec.get("resources"), "spec.resources")),
        output=_parse_output(_section(spec.get("output"), "spec.output")),
        run_policy=run_policy,
        queue=queue,
    )


def check_job_name(name: str) -> None:
    if len(name) > contract.MAX_JOB_NAME_LENGTH:
        raise InvalidSpec(
            "metadata.name",
            f"{name!r} is {len(name)} characters; at most {contract.MAX_JOB_NAME_LENGTH} fit, because "
            "pod hostnames <name>-node-<rank> must stay within 63; choose a shorter name",
        )
    if not _DNS_1035_LABEL.match(name):
        raise InvalidSpec(
            "metadata.name",
            f"{name!r} must be a DNS-1035 label (lower-case letters, digits and '-', starting with a "
            "letter, ending with a letter or digit) because it names the job's Service",
        )


def _section(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidSpec(field, f"must be an object, got {type(value).__name__}")
    return value


def _required_str(section: Mapping[str, Any], key: str, field: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidSpec(f"{field}.{key}", "is required (a non-empty string)")
    return value


def _optional_str(section: Mapping[str, Any], key: str, field: str) -> str | None:
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidSpec(f"{field}.{key}", f"must be a string, got {type(value).__name__}")
    return value


def _int(section: Mapping[str, Any], key: str, field: str, default: int | None, lo: int | None = None,
         hi: int | None = None) -> int | None:
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{field}.{key}", f"must be an integer, got {value!r}")
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise InvalidSpec(f"{field}.{key}", f"must be {bounds}, got {value}")
    return value


def _bool(section: Mapping[str, Any], key: str, field: str, default: bool) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise InvalidSpec(f"{field}.{key}", f"must be true or false, got {value!r}")
    return value


def _enum(section: Mapping[str, Any], key: str, field: str, default: str, allowed: tuple[str, ...]) -> str:
    value = section.get(key, default)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # precision 32/16 written unquoted in YAML
    if value not in allowed:
        raise InvalidSpec(f"{field}.{key}", f"must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _str_list(section: Mapping[str, Any], key: str, field: str) -> tuple[str, ...] | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidSpec(f"{field}.{key}", "must be a list of non-empty strings")
    return tuple(value)


def _objects(section: Mapping[str, Any], key: str, field: str) -> tuple[Mapping[str, Any], ...]:
    value = section.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise InvalidSpec(f"{field}.{key}", "must be a list of objects")
    return tuple(value)


def _check_uri(uri: str, field: str) -> None:
    match = _URI_SCHEME.match(uri)
    supported = SUPPORTED_SCHEMES[field]
    if match:
        scheme = match.group(1).lower()
        if f"{scheme}://" not in supported:
            raise InvalidSpec(
                field,
                f"{scheme}:// is not supported yet; supported: {', '.join(supported)}. Put the data in "
                "a bucket or on a volume (spec.resources.volumes/volumeMounts) and give its absolute path",
            )
    elif not uri.startswith("/"):
        raise InvalidSpec(field, f"{uri!r} must be an absolute path inside the trainer container (or a URI)")
    if match and match.group(1).lower() == "hf" and not _HF_URI.match(uri):
        raise InvalidSpec(field, f"{uri!r} must look like hf://<org>/<name>[@<revision>][/<path>] "
                                 "(hf://datasets/<org>/<name>... for a dataset repo)")
    if match and match.group(1).lower() == "modelscope" and not _MODELSCOPE_URI.match(uri):
        raise InvalidSpec(field, f"{uri!r} must look like modelscope://<owner>/<name>[@<revision>][/<path>] "
                                 "(a ModelScope model repo)")
    if match and match.group(1).lower() == "https" and \
            not uri.partition("#")[0].partition("?")[0].lower().endswith(contract.ARCHIVE_SUFFIXES):
        raise InvalidSpec(field, f"{uri!r} must name an archive of the folder ending in "
                                 f"{', '.join(contract.ARCHIVE_SUFFIXES)} (optionally pinned with #sha256=<hex>)")


def _parse_model(section: Mapping[str, Any]) -> ModelSpec:
    family = _enum(section, "family", "spec.model", "", contract.FAMILIES)
    uri = _required_str(section, "uri", "spec.model")
    _check_uri(uri, "spec.model.uri")
    lora = section.get("pretrainedLoraUri")
    if lora is not None:
        lora = _required_str(section, "pretrainedLoraUri", "spec.model")
        _check_uri(lora, "spec.model.pretrainedLoraUri")
    return ModelSpec(family=family, uri=uri, secret_name=_secret_name(section, "spec.model"),
                     pretrained_lora_uri=lora)


def _parse_dataset(section: Mapping[str, Any]) -> DatasetSpec:
    f = "spec.dataset"
    uri = _required_str(section, "uri", f)
    _check_uri(uri, "spec.dataset.uri")
    dropout = section.get("captionDropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise InvalidSpec(f"{f}.captionDropout", f"must be a probability in [0, 1), got {dropout!r}")
    default_caption = section.get("defaultCaption")
    if default_caption is not None and not isinstance(default_caption, str):
        raise InvalidSpec(f"{f}.defaultCaption", f"must be a string, got {type(default_caption).__name__}")
    shuffle = _bool(section, "shuffleCaption", f, False)
    tag_dropout = _number(section, "captionTagDropout", f, 0.0, 0.0, 1.0)
    keep_tokens = _int(section, "keepTokens", f, 0, 0, 1024)
    if keep_tokens and not (shuffle or tag_dropout):
        raise InvalidSpec(f"{f}.keepTokens", "only matters with shuffleCaption or captionTagDropout (it keeps the "
                                             "first tags in place); set one of them or drop keepTokens")
    extension = section.get("captionExtension", contract.DEFAULT_CAPTION_EXTENSION)
    if not isinstance(extension, str) or not _CAPTION_EXTENSION.match(extension) \
            or extension.lower().endswith(contract.IMAGE_SUFFIXES):
        raise InvalidSpec(f"{f}.captionExtension", f"must be the ending of a text file such as .txt or .caption, "
                                                   f"got {extension!r}")
    separator = _optional_str(section, "keepTokensSeparator", f) or ""
    if separator and not _KEEP_TOKENS_SEPARATOR.fullmatch(separator):
        raise InvalidSpec(f"{f}.keepTokensSeparator", f"{separator!r} cannot mark the fixed tags: it must hold a "
                                                      "character other than a comma (which separates the tags) or "
                                                      "a blank; kohya's usual one is |||")
    return DatasetSpec(
        uri=uri,
        secret_name=_secret_name(section, f),
        format=_enum(section, "format", f, "auto", contract.DATASET_FORMATS),
        caption_dropout=float(dropout),
        default_caption=default_caption,
        max_image_pixels=_int(section, "maxImagePixels", f, contract.DEFAULT_MAX_IMAGE_PIXELS, 1),
        shuffle_caption=shuffle,
        keep_tokens=keep_tokens,
        caption_tag_dropout=tag_dropout,
        caption_extension=extension,
        keep_tokens_separator=separator,
        caption_prefix=_optional_str(section, "captionPrefix", f) or "",
        caption_suffix=_optional_str(section, "captionSuffix", f) or "",
    )


def _secret_name(section: Mapping[str, Any], field: str) -> str | None:
    ref = _section(section.get("secretRef"), f"{field}.secretRef")
    return _optional_str(ref, "name", f"{field}.secretRef") if ref else None


def _parse_training(section: Mapping[str, Any], family: str) -> TrainingSpec:
    f = "spec.training"
    defaults = TrainingSpec()
    size_multiple = contract.SIZE_MULTIPLE[family]
    sizes = {}
    for key in ("height", "width"):
        value = _int(section, key, f, getattr(defaults, key), 64, 4096)
        if value % size_multiple:
            raise InvalidSpec(
                f"{f}.{key}",
                f"{value} is not a multiple of {size_multiple}, which {family} needs; "
                f"use {value - value % size_multiple or size_multiple}",
            )
        sizes[key] = value
    learning_rate = section.get("learningRate", defaults.learning_rate)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not 0 < learning_rate <= 1:
        raise InvalidSpec(f"{f}.learningRate", f"must be a number in (0, 1], got {learning_rate!r}")
    lora_alpha = section.get("loraAlpha")
    if lora_alpha is not None and (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float))
                                   or lora_alpha <= 0):
        raise InvalidSpec(f"{f}.loraAlpha", f"must be a number > 0, got {lora_alpha!r}")
    prompts = _str_list(section, "validationPrompts", f) or ()
    if len(prompts) > 16:
        raise InvalidSpec(f"{f}.validationPrompts", f"at most 16 prompts, got {len(prompts)}")
    return TrainingSpec(
        lora_target_modules=_str_list(section, "loraTargetModules", f),
        steps_per_epoch=_int(section, "stepsPerEpoch", f, defaults.steps_per_epoch, 1),
        height=sizes["height"],
        width=sizes["width"],
        center_crop=_bool(section, "centerCrop", f, defaults.center_crop),
        random_flip=_bool(section, "randomFlip", f, defaults.random_flip),
        batch_size=_int(section, "batchSize", f, defaults.batch_size, 1, 1024),
        dataloader_num_workers=_int(section, "dataloaderNumWorkers", f, defaults.dataloader_num_workers, 0, 64),
        precision=_enum(section, "precision", f, defaults.precision, contract.PRECISIONS),
        learning_rate=float(learning_rate),
        lora_rank=_int(section, "loraRank", f, defaults.lora_rank, 1, 1024),
        lora_alpha=None if lora_alpha is None else float(lora_alpha),
        gradient_checkpointing=_bool(section, "gradientCheckpointing", f, defaults.gradient_checkpointing),
        accumulate_grad_batches=_int(section, "accumulateGradBatches", f, defaults.accumulate_grad_batches, 1, 1024),
        strategy=_enum(section, "strategy", f, defaults.strategy, contract.STRATEGIES),
        max_epochs=_int(section, "maxEpochs", f, defaults.max_epochs, 1, 10000),
        seed=_int(section, "seed", f, defaults.seed, 0),
        checkpoint_every_steps=_int(section, "checkpointEverySteps", f, defaults.checkpoint_every_steps, 0),
        validation_prompts=prompts,
        validation_every_steps=_int(section, "validationEverySteps", f, defaults.validation_every_steps, 0),
        cache_latents=_bool(section, "cacheLatents", f, defaults.cache_latents),
        aspect_ratio_buckets=_bool(section, "aspectRatioBuckets", f, defaults.aspect_ratio_buckets),
        lr_scheduler=_enum(section, "lrScheduler", f, defaults.lr_scheduler, contract.LR_SCHEDULERS),
        lr_warmup_steps=_int(section, "lrWarmupSteps", f, defaults.lr_warmup_steps, 0),
        max_grad_norm=_number(section, "maxGradNorm", f, defaults.max_grad_norm, 0.0, None),
        lora_dropout=_number(section, "loraDropout", f, defaults.lora_dropout, 0.0, 1.0),
        ema_decay=_number(section, "emaDecay", f, defaults.ema_decay, 0.0, 1.0),
        guidance_scale=_guidance_scale(section, family),
    )


def _guidance_scale(section: Mapping[str, Any], family: str) -> float | None:
    """spec.training.guidanceScale: only for a family whose transformer has a guidance embedding."""
    field = "spec.training.guidanceScale"
    value = section.get("guidanceScale")
    if value is None:
        return None
    if family not in contract.GUIDANCE_EMBEDDING_FAMILIES:
        raise InvalidSpec(field, f"{family} has no guidance embedding to feed it to (only "
                                 f"{', '.join(contract.GUIDANCE_EMBEDDING_FAMILIES)} have one); remove guidanceScale")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise InvalidSpec(field, f"must be a number > 0 (default {contract.DEFAULT_TRAINING_GUIDANCE:g}), got {value!r}")
    return float(value)


def _number(section: Mapping[str, Any], key: str, field: str, default: float, minimum: float,
            below: float | None) -> float:
    """A number >= minimum and, when `below` is given, < below (the CRD's exclusiveMaximum)."""
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum \
            or (below is not None and value >= below):
        bound = f"in [{minimum:g}, {below:g})" if below is not None else f">= {minimum:g}"
        raise InvalidSpec(f"{field}.{key}", f"must be a number {bound}, got {value!r}")
    return float(value)


def _parse_resources(section: Mapping[str, Any]) -> ResourcesSpec:
    f = "spec.resources"
    defaults = ResourcesSpec()
    env = _objects(section, "env", f)
    for index, var in enumerate(env):
        if contract.is_reserved_env(str(var.get("name", ""))):
            raise InvalidSpec(
                f"{f}.env[{index}].name",
                f"{var.get('name')} is set by the operator or the launcher for the rendezvous and the "
                "process ranks; remove it from the job",
            )
    volumes = _objects(section, "volumes", f)
    for index, volume in enumerate(volumes):
        if str(volume.get("name", "")).startswith(OPERATOR_VOLUME_PREFIX):
            raise InvalidSpec(
                f"{f}.volumes[{index}].name",
                f"names starting with {OPERATOR_VOLUME_PREFIX} are reserved for the volumes the operator "
                "adds (such as the /dev/shm emptyDir); rename the volume",
            )
    shm_size = section.get("shmSize", DEFAULT_SHM_SIZE)
    if isinstance(shm_size, bool) or not isinstance(shm_size, (str, int)) or str(shm_size) in ("", "0"):
        raise InvalidSpec(f"{f}.shmSize", f"must be a positive quantity such as 8Gi, got {shm_size!r}")
    pull_secrets = []
    for index, ref in enumerate(_objects(section, "imagePullSecrets", f)):
        pull_secrets.append(_required_str(ref, "name", f"{f}.imagePullSecrets[{index}]"))
    node_selector = _section(section.get("nodeSelector"), f"{f}.nodeSelector")
    if not all(isinstance(v, str) for v in node_selector.values()):
        raise InvalidSpec(f"{f}.nodeSelector", "values must be strings (quote numbers and booleans)")
    num_nodes = _int(section, "numNodes", f, defaults.num_nodes, 1, 256)
    return ResourcesSpec(
        num_nodes=num_nodes,
        gpus_per_node=_int(section, "gpusPerNode", f, defaults.gpus_per_node, 0, 16),
        image=_optional_str(section, "image", f),
        image_pull_policy=_optional_str(section, "imagePullPolicy", f),
        container_resources=dict(_section(section.get("resources"), f"{f}.resources")),
        node_selector=dict(node_selector),
        tolerations=_objects(section, "tolerations", f),
        affinity=dict(_section(section.get("affinity"), f"{f}.affinity")) or None,
        priority_class_name=_optional_str(section, "priorityClassName", f),
        service_account_name=_optional_str(section, "serviceAccountName", f),
        image_pull_secrets=tuple(pull_secrets),
        volumes=volumes,
        volume_mounts=_objects(section, "volumeMounts", f),
        env=env,
        shm_size=str(shm_size),
    )


def _parse_output(section: Mapping[str, Any]) -> OutputSpec:
    f = "spec.output"
    uri = _required_str(section, "uri", f)
    _check_uri(uri, f"{f}.uri")
    checkpoint_uri = _optional_str(section, "checkpointUri", f)
    if checkpoint_uri is None and uri.lower().startswith(_HF):
        raise InvalidSpec(f"{f}.checkpointUri", "is required when spec.output.uri is an hf:// repo (checkpoints "
                                                "are not written to a Hub repo); give s3://, gs:// or az:// bucket/prefix or a path "
                                                "on a shared volume")
    if checkpoint_uri is None:
        checkpoint_uri = f"{uri.rstrip('/')}/{contract.DEFAULT_CHECKPOINT_SUBDIR}"
    else:
        _check_uri(checkpoint_uri, f"{f}.checkpointUri")
    formats = section.get("formats") or list(contract.OUTPUT_FORMATS)
    if not isinstance(formats, list) or any(x not in contract.OUTPUT_FORMATS for x in formats):
        raise InvalidSpec(f"{f}.formats", f"must be a list drawn from {', '.join(contract.OUTPUT_FORMATS)}")
    if len(set(formats)) != len(formats):
        raise InvalidSpec(f"{f}.formats", "must not repeat a format")
    # The upload's token reaches the trainer as MODELSCOPE_API_TOKEN from the Secret, never as argv.
    modelscope_model_id = _optional_str(section, "modelscopeModelId", f)
    if modelscope_model_id is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                                        modelscope_model_id):
        raise InvalidSpec(f"{f}.modelscopeModelId", f"{modelscope_model_id!r} must look like owner/name")
    return OutputSpec(
        uri=uri,
        checkpoint_uri=checkpoint_uri,
        formats=tuple(formats),
        secret_name=_secret_name(section, f),
        modelscope_model_id=modelscope_model_id,
    )


def _parse_run_policy(section: Mapping[str, Any]) -> RunPolicy:
    f = "spec.runPolicy"
    d = RunPolicy()
    gang = _enum(section, "gangScheduling", f, d.gang_scheduling, ("none", "kueue", "volcano", "coscheduling"))
    if gang not in SUPPORTED_GANG_SCHEDULING:
        raise InvalidSpec(f"{f}.gangScheduling", f"{gang} is not supported yet; use none")
    return RunPolicy(
        max_restarts=_int(section, "maxRestarts", f, d.max_restarts, 0, 100),
        backoff_seconds=_int(section, "backoffSeconds", f, d.backoff_seconds, 0, 3600),
        active_deadline_seconds=_int(section, "activeDeadlineSeconds", f, None, 1),
        startup_deadline_seconds=_int(section, "startupDeadlineSeconds", f, d.startup_deadline_seconds, 1),
        ttl_seconds_after_finished=_int(section, "ttlSecondsAfterFinished", f, None, 0),
        suspend=_bool(section, "suspend", f, d.suspend),
        rendezvous_timeout_seconds=_int(section, "rendezvousTimeoutSeconds", f, d.rendezvous_timeout_seconds, 10, 3600),
        termination_grace_period_seconds=_int(section, "terminationGracePeriodSeconds", f,
                                              d.termination_grace_period_seconds, 0, 3600),
        gang_scheduling=gang,
        failure_rules=_parse_failure_rules(section, f),
        node_avoidance=_bool(section, "nodeAvoidance", f, d.node_avoidance),
        staging_progress_deadline_seconds=_int(section, "stagingProgressDeadlineSeconds", f,
                                               d.staging_progress_deadline_seconds, 10),
    )


def _parse_failure_rules(section: Mapping[str, Any], parent: str) -> tuple[FailureRuleSpec, ...]:
    rules = _objects(section, "failureRules", parent)
    if len(rules) > MAX_FAILURE_RULES:
        raise InvalidSpec(f"{parent}.failureRules", f"at most {MAX_FAILURE_RULES} rules, got {len(rules)}")
    parsed = []
    for index, rule in enumerate(rules):
        f = f"{parent}.failureRules[{index}]"
        name = _required_str(rule, "name", f)
        if not _RULE_NAME.match(name):
            raise InvalidSpec(f"{f}.name", f"{name!r} must be CamelCase letters and digits (it becomes the "
                              "condition reason), e.g. NcclTimeout")
        codes = rule.get("onExitCodes")
        if codes is not None and (not isinstance(codes, list) or not codes
                                  or not all(isinstance(c, int) and not isinstance(c, bool) and 0 < c < 256
                                             for c in codes)):
            raise InvalidSpec(f"{f}.onExitCodes", "must be a non-empty list of exit codes between 1 and 255")
        pattern = _optional_str(rule, "onMessagePattern", f)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InvalidSpec(f"{f}.onMessagePattern", f"is not a valid regular expression: {exc}") from None
        reasons = _str_list(rule, "onPodReasons", f)
        if codes is None and reasons is None and pattern is None:
            raise InvalidSpec(f, "needs at least one of onExitCodes, onPodReasons, onMessagePattern")
        parsed.append(FailureRuleSpec(
            name=name,
            action=_enum(rule, "action", f, "", FAILURE_ACTIONS),
            on_exit_codes=tuple(codes) if codes is not None else None,
            on_pod_reasons=reasons,
            on_message_pattern=pattern,
        ))
    return tuple(parsed)


@dataclasses.dataclass(frozen=True)
class JobRef:
    """The identity of a job: what owner references, labels and env are made from."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        # controller + blockOwnerDeletion: GC deletes the children with the job, and foreground
        # deletion of the job waits for them.
        return {
            "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
            "kind": contract.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
