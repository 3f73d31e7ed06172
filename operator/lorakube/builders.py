"""Pure builders: (spec, job, attempt, rank) -> the Service and Pod manifests the job needs.

Nothing here talks to the API or reads the clock, so the desired state is a function of its
inputs and every field is unit-tested. Names, labels, env names and flags come from
`lorakube_api.contract`, the module the trainer imports too.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from lorakube import nodes, queueing, rbac
from lorakube_api import contract
from lorakube.spec import OPERATOR_VOLUME_PREFIX, JobRef, JobSpec

GPU_RESOURCE = "nvidia.com/gpu"
# The non-root identity the trainer image runs as (trainer_image/Dockerfile creates uid 10001).
TRAINER_UID = 10001
MASTER_PORT_NAME = "rendezvous"
# A container runtime gives /dev/shm 64 MiB; NCCL's shared-memory transport and DataLoader
# workers (which pass batches through shared memory) fail with "Bus error" or "No space left"
# beyond that, so every pod mounts a Memory-backed emptyDir there.
SHM_VOLUME = f"{OPERATOR_VOLUME_PREFIX}shm"
SHM_PATH = "/dev/shm"


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide defaults a job may leave out."""

    trainer_image: str = "lorakube/trainer:latest"
    image_pull_policy: str = "IfNotPresent"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorConfig:
        env = dict(os.environ) if env is None else env
        default = cls()
        return cls(
            trainer_image=env.get("LORAKUBE_TRAINER_IMAGE") or default.trainer_image,
            image_pull_policy=env.get("LORAKUBE_TRAINER_IMAGE_PULL_POLICY") or default.image_pull_policy,
        )


def job_labels(job: JobRef) -> dict[str, str]:
    return {contract.LABEL_JOB_NAME: job.name, contract.LABEL_MANAGED_BY: contract.MANAGED_BY}


def pod_labels(job: JobRef, attempt: int, rank: int) -> dict[str, str]:
    return {**job_labels(job), contract.LABEL_RANK: str(rank), contract.LABEL_ATTEMPT: str(attempt)}


def build_service(job: JobRef) -> dict[str, Any]:
    """The headless Service that gives every pod the DNS name <pod>.<job>.<ns>.svc.

    publishNotReadyAddresses: ranks look each other up while still starting, before any
    readiness, so the records must exist as soon as the pods have IPs.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": job.name,
            "namespace": job.namespace,
            "labels": job_labels(job),
            "ownerReferences": [job.owner_reference()],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {contract.LABEL_JOB_NAME: job.name},
            "ports": [
                {
                    "name": MASTER_PORT_NAME,
                    "port": contract.DEFAULT_MASTER_PORT,
                    "targetPort": contract.DEFAULT_MASTER_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def rendezvous_env(spec: JobSpec, job: JobRef, attempt: int, rank: int) -> list[dict[str, Any]]:
    """The env every rank gets (DESIGN §4): torch's MASTER_*/WORLD_SIZE, torchrun's PET_* twins,
    and who the pod is (job, namespace, attempt)."""
    res = spec.resources
    values = {
        contract.ENV_MASTER_ADDR: contract.master_addr(job.name, job.namespace),
        contract.ENV_MASTER_PORT: str(contract.DEFAULT_MASTER_PORT),
        contract.ENV_WORLD_SIZE: str(res.world_size),
        contract.ENV_NODE_RANK: str(rank),
        contract.ENV_NNODES: str(res.num_nodes),
        contract.ENV_NPROC_PER_NODE: str(res.procs_per_node),
    }
    values.update({pet: values[plain] for pet, plain in contract.ENV_PET.items()})
    values.update(
        {
            contract.ENV_JOB_NAME: job.name,
            contract.ENV_JOB_NAMESPACE: job.namespace,
            contract.ENV_JOB_UID: job.uid,
            contract.ENV_ATTEMPT: str(attempt),
            contract.ENV_POD_NAME: contract.pod_name(job.name, rank),
            contract.ENV_RENDEZVOUS_TIMEOUT: str(spec.run_policy.rendezvous_timeout_seconds),
            contract.ENV_TERMINATION_GRACE: str(spec.run_policy.termination_grace_period_seconds),
            # Logs reach `kubectl logs` (and lastFailure.logTail) as they are written.
            "PYTHONUNBUFFERED": "1",
        }
    )
    if rank == 0:
        values[contract.ENV_REPORT_PROGRESS] = "1"
    return [{"name": name, "value": value} for name, value in values.items()]


def _format_flag_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form: 0.0001, 3e-05
    return str(value)


def trainer_args(spec: JobSpec) -> list[str]:
    """The trainer's argv after the command, derived only from the spec (no shell involved)."""
    args = [
        contract.FLAG_MODEL_FAMILY, spec.model.family,
        contract.FLAG_MODEL_PATH, spec.model.uri,
        contract.FLAG_DATASET_PATH, spec.dataset.uri,
        contract.FLAG_OUTPUT_PATH, spec.output.uri,
        contract.FLAG_CHECKPOINT_DIR, spec.output.checkpoint_uri,
        contract.FLAG_OUTPUT_FORMATS, ",".join(spec.output.formats),
        contract.FLAG_RESUME, "auto",
    ]
    if spec.output.modelscope_model_id:
        args += [contract.FLAG_MODELSCOPE_MODEL_ID, spec.output.modelscope_model_id]
    if spec.model.pretrained_lora_uri:
        args += [contract.FLAG_PRETRAINED_LORA_PATH, spec.model.pretrained_lora_uri]
    args += [contract.FLAG_ACCELERATOR, "cpu" if spec.resources.gpus_per_node == 0 else "gpu"]
    args += dataset_args(spec)
    values = spec.training.by_key()
    # The API's loraAlpha defaults to the rank (scale 1.0); the trainer's own default differs.
    if values["loraAlpha"] is None:
        values["loraAlpha"] = float(spec.training.lora_rank)
    for key, flag in contract.TRAINING_FLAGS.items():
        value = values[key]
        if key in contract.BOOLEAN_TRAINING_FLAGS:
            if value:
                args.append(flag)
        elif key == "validationPrompts":
            for prompt in value:
                args += [flag, prompt]
        elif key == "loraTargetModules":
            if value:
                args += [flag, ",".join(value)]
        elif value is not None:
            args += [flag, _format_flag_value(value)]
    return args


def dataset_args(spec: JobSpec) -> list[str]:
    """spec.dataset's reading options, each only when it differs from the trainer's default (which
    the CRD's default equals), so a job that sets none runs the original command line."""
    dataset, args = spec.dataset, []
    if dataset.format != "auto":
        args += [contract.FLAG_DATASET_FORMAT, dataset.format]
    if dataset.caption_dropout:
        args += [contract.FLAG_CAPTION_DROPOUT, _format_flag_value(dataset.caption_dropout)]
    if dataset.default_caption is not None:
        # One argument with "=": a caption may start with "-" or be empty.
        args.append(f"{contract.FLAG_DEFAULT_CAPTION}={dataset.default_caption}")
    if dataset.max_image_pixels != contract.DEFAULT_MAX_IMAGE_PIXELS:
        args += [contract.FLAG_MAX_IMAGE_PIXELS, str(dataset.max_image_pixels)]
    if dataset.shuffle_caption:
        args.append(contract.FLAG_SHUFFLE_CAPTION)
    if dataset.keep_tokens:
        args += [contract.FLAG_KEEP_TOKENS, str(dataset.keep_tokens)]
    if dataset.caption_tag_dropout:
        args += [contract.FLAG_CAPTION_TAG_DROPOUT, _format_flag_value(dataset.caption_tag_dropout)]
    if dataset.caption_extension != contract.DEFAULT_CAPTION_EXTENSION:
        args += [contract.FLAG_CAPTION_EXTENSION, dataset.caption_extension]
    # One argument each, with "=": any of them may start with "-".
    for flag, value in ((contract.FLAG_KEEP_TOKENS_SEPARATOR, dataset.keep_tokens_separator),
                        (contract.FLAG_CAPTION_PREFIX, dataset.caption_prefix),
                        (contract.FLAG_CAPTION_SUFFIX, dataset.caption_suffix)):
        if value:
            args.append(f"{flag}={value}")
    return args


def container_resources(spec: JobSpec) -> dict[str, Any]:
    """The user's requests/limits plus one `nvidia.com/gpu` per process in limits (extended
    resources default their request to the limit)."""
    resources = copy.deepcopy(dict(spec.resources.container_resources))
    if spec.resources.gpus_per_node > 0:
        resources.setdefault("limits", {})[GPU_RESOURCE] = spec.resources.gpus_per_node
        requests = resources.get("requests")
        if requests and GPU_RESOURCE in requests:
            requests[GPU_RESOURCE] = spec.resources.gpus_per_node
    return resources


def pod_security_context() -> dict[str, Any]:
    """What Pod Security `restricted` asks of a pod: non-root, RuntimeDefault seccomp."""
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        # Without it kubelet chowns every file of every volume to fsGroup at each pod start: hours
        # on a PVC holding models and checkpoints. OnRootMismatch skips a volume whose root
        # already has the right owner and mode.
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def shm_volume_and_mount(spec: JobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The /dev/shm emptyDir and its mount, unless the user mounts a volume at /dev/shm already
    (a spec written before shmSize existed keeps its own)."""
    if any(m.get("mountPath", "").rstrip("/") == SHM_PATH for m in spec.resources.volume_mounts):
        return [], []
    volume = {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}}
    return [volume], [{"name": SHM_VOLUME, "mountPath": SHM_PATH}]


def secret_env_sources(spec: JobSpec, rank: int) -> list[dict[str, Any]]:
    """The envFrom of rank `rank`: each section's Secret under its own prefix, so that two Secrets
    with the same keys never collide and the trainer reads each URI with its own section's
    credentials (contract.SECRET_ENV_PREFIXES). Every rank stages the inputs; the output's Secret goes
    to rank 0, which writes the artifacts, and to every rank only when checkpoints are remote (each
    rank uploads its own files and fetches them on resume)."""
    checkpoints_remote = not spec.output.checkpoint_uri.startswith("/")
    sources = []
    for role, name in (("model", spec.model.secret_name), ("dataset", spec.dataset.secret_name),
                       ("output", spec.output.secret_name)):
        if name and (role != "output" or rank == 0 or checkpoints_remote):
            sources.append({"prefix": contract.SECRET_ENV_PREFIXES[role], "secretRef": {"name": name}})
    return sources


def build_pod(spec: JobSpec, job: JobRef, attempt: int, rank: int, config: OperatorConfig,
              excluded_nodes: Sequence[str] = ()) -> dict[str, Any]:
    """Pod <job>-node-<rank> of `attempt`: a fixed hostname under the job's Service so that rank
    0 has a stable DNS name, restartPolicy Never because the operator restarts the whole gang.
    `excluded_nodes` (status.excludedNodes) are kept out through a required node affinity."""
    res = spec.resources
    name = contract.pod_name(job.name, rank)
    container: dict[str, Any] = {
        "name": contract.TRAINER_CONTAINER,
        "image": res.image or config.trainer_image,
        "imagePullPolicy": res.image_pull_policy or config.image_pull_policy,
        "command": [contract.TRAINER_COMMAND],
        "args": trainer_args(spec),
        "env": rendezvous_env(spec, job, attempt, rank) + copy.deepcopy(list(res.env)),
        "ports": [{"name": MASTER_PORT_NAME, "containerPort": contract.DEFAULT_MASTER_PORT, "protocol": "TCP"}],
        "resources": container_resources(spec),
        "securityContext": container_security_context(),
        # The trainer writes its last words to /dev/termination-log; when it dies before it can
        # (a signal, a crash in native code) the kubelet takes the log's tail instead, which is
        # what status.lastFailure shows and spec.runPolicy.failureRules' onMessagePattern searches.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if rank == 0:
        # Only rank 0 serves training metrics; a port declared on the other ranks would make a
        # PodMonitor scrape pods where nothing listens.
        container["ports"].append({"name": contract.TRAINER_METRICS_PORT_NAME,
                                   "containerPort": contract.TRAINER_METRICS_PORT, "protocol": "TCP"})
    secrets = secret_env_sources(spec, rank)
    if secrets:
        # Credentials for model/dataset/output URIs, by reference: no value in the pod spec.
        container["envFrom"] = secrets
    shm_volumes, shm_mounts = shm_volume_and_mount(spec)
    mounts = copy.deepcopy(list(res.volume_mounts)) + shm_mounts
    if mounts:
        container["volumeMounts"] = mounts
    pod_spec: dict[str, Any] = {
        "hostname": name,
        "subdomain": job.name,
        "restartPolicy": "Never",
        "serviceAccountName": rbac.service_account(spec, job),
        # The job's Service is headless; service-link env vars would only add noise.
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        # SIGTERM -> the trainer checkpoints the step the ranks agree on before this runs out.
        "terminationGracePeriodSeconds": spec.run_policy.termination_grace_period_seconds,
        "containers": [container],
    }
    optional = {
        "nodeSelector": dict(res.node_selector) or None,
        "tolerations": copy.deepcopy(list(res.tolerations)) or None,
        "affinity": nodes.with_exclusion(res.affinity, excluded_nodes),
        "priorityClassName": res.priority_class_name,
        "imagePullSecrets": [{"name": n} for n in res.image_pull_secrets] or None,
        "volumes": copy.deepcopy(list(res.volumes)) + shm_volumes or None,
    }
    pod_spec.update({key: value for key, value in optional.items() if value is not None})
    # Only rank 0 talks to the API (progress); see rbac.automount_token.
    automount = rbac.automount_token(spec, rank)
    if automount is not None:
        pod_spec["automountServiceAccountToken"] = automount
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": job.namespace,
        "labels": pod_labels(job, attempt, rank),
        "ownerReferences": [job.owner_reference()],
    }
    if spec.queue is not None:
        # One Kueue pod group per attempt: admitted whole or not at all (see queueing.py).
        metadata["labels"].update(queueing.pod_labels(spec.queue, job.name, attempt))
        metadata["annotations"] = queueing.pod_annotations(res.num_nodes)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def build_pods(spec: JobSpec, job: JobRef, attempt: int, config: OperatorConfig) -> list[dict[str, Any]]:
    return [build_pod(spec, job, attempt, rank, config) for rank in range(spec.resources.num_nodes)]
