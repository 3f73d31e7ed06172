"""A run whose model, dataset, output or checkpoints live in object storage (storage.py).

`localize` turns such a config into one with local folders only, which the rest of the trainer
works on unchanged: inputs staged into the node's cache, the output and the checkpoint folder as
local working folders. The checkpoint callback and the artifact writer then call back here to
publish what they wrote:

    <checkpoint URI>/step-000000120/<files>          uploaded by the rank that wrote them
    <checkpoint URI>/step-000000120/COMPLETE.json    uploaded last, by rank 0

A prefix without COMPLETE.json is never resumed from (an upload cut short), exactly like a local
folder without its marker. Each location is accessed with its role's credentials (storage.role_env):
the model's and the dataset's for the inputs, the output's for the output and the checkpoints. Resume fetches the newest complete step into the local folder, where
checkpoint.resolve_resume verifies every file's sha256 against the marker as for a local run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from lorakube_api import contract

from . import hubs, input_cache, locations, staging, storage
from .config import RESUME_AUTO, TrainConfig

log = logging.getLogger(__name__)


def _output_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    return storage.role_env(env, "output")


# Set by the pod's first process once it staged the inputs (cli.py), to its own process id: that
# process (training itself) and the local ranks it starts do not report the staging again. A pid
# and not "1", so that a value from the job's env (another process's) never counts.
ENV_INPUTS_STAGED = "LORAKUBE_INPUTS_STAGED_BY"


def inputs_staged_by_this_pod(env: Mapping[str, str]) -> bool:
    return env.get(ENV_INPUTS_STAGED) in (str(os.getpid()), str(os.getppid()))


# What stage_inputs stages: (staging report's input name, config field, whose Secret it reads).
# A pretrained LoRA in a bucket (an earlier run's output) is read with the model's Secret.
_STAGED = (("model", "model_path", "model"), ("dataset", "dataset_path", "dataset"),
           ("pretrainedLora", "pretrained_lora_path", "model"))


def stage_inputs(cfg: TrainConfig, env: Mapping[str, str] | None = None, report: bool = False) -> dict[str, str]:
    """Stage the remote model, dataset and pretrained LoRA into the node's cache: {"model_path":
    folder, ...}. With `report` (rank 0's pod) each input's bytes are reported (staging.py, the
    job's Staging phase)."""
    inputs = [(name, field, role, getattr(cfg, field)) for name, field, role in _STAGED
              if getattr(cfg, field) and locations.is_remote_input(getattr(cfg, field))]
    reporter = staging.reporter_from_env(env) if report and inputs else None
    folders = {}
    for index, (name, field, role, uri) in enumerate(inputs):
        if reporter is not None:
            reporter.begin(name, uri)
        folder = locations.stage_input(uri, storage.role_env(env, role),
                                       on_bytes=None if reporter is None else reporter.on_bytes)
        if reporter is not None:
            reporter.end(input_cache.entry_bytes(folder), complete=index == len(inputs) - 1)
        folders[field] = str(folder)
    return folders


def localize(cfg: TrainConfig, env: Mapping[str, str] | None = None, node_rank: int = 0,
             report_staging: bool = False) -> tuple[TrainConfig, storage.Locations]:
    """The same config with every remote location replaced by a local folder, and the URIs given.
    Only node 0 writes the output (artifacts, metrics): the other nodes never read it, and their pods
    get the output's Secret only when the checkpoints are remote too. With `report_staging` (rank 0)
    the staging of the inputs is reported (staging.py)."""
    where = storage.Locations(
        model=cfg.model_path if locations.is_remote_input(cfg.model_path) else "",
        dataset=cfg.dataset_path if locations.is_remote_input(cfg.dataset_path) else "",
        output=cfg.output_path if locations.is_remote_output(cfg.output_path) else "",
        checkpoints=cfg.checkpoint_dir if storage.is_remote(cfg.checkpoint_dir) else "",
    )
    # The inputs, a pretrained LoRA in a bucket among them (an earlier run's output).
    changes = stage_inputs(cfg, env, report_staging)
    if not where.any:
        return dataclasses.replace(cfg, **changes), where
    if where.output and locations.is_hub(where.output):
        # A Hub repo takes the artifacts at the end only (hubs.py): a working folder that is not
        # registered as a bucket prefix, so no metrics are published there with the checkpoints.
        changes["output_path"] = str(hubs.work_folder(where.output, env))
    elif where.output:
        local_output = storage.work_folder("outputs", where.output, env)
        changes["output_path"] = str(local_output)
        if cfg.resume == RESUME_AUTO and node_rank == 0:
            fetch_metrics(where.output, local_output, _output_env(env))
    if where.checkpoints:
        local = storage.work_folder("checkpoints", where.checkpoints, env)
        changes["checkpoint_dir"] = str(local)
        if cfg.resume == RESUME_AUTO:
            fetch_latest_checkpoint(where.checkpoints, local, _output_env(env))
    return dataclasses.replace(cfg, **changes), where


def _remote_steps(uri: str, env: Mapping[str, str] | None) -> list[int]:
    steps = []
    for name in storage.list_remote(uri, env):
        suffix = name[len(contract.CHECKPOINT_DIR_PREFIX):]
        if name.startswith(contract.CHECKPOINT_DIR_PREFIX) and suffix.isdigit():
            steps.append(int(suffix))
    return sorted(steps, reverse=True)


def _complete_steps(uri: str, env: Mapping[str, str] | None) -> list[int]:
    return [step for step in _remote_steps(uri, env)
            if storage.exists(storage.join(uri, contract.checkpoint_dir_name(step), contract.CHECKPOINT_COMPLETE_MARKER),
                              env)]


def fetch_latest_checkpoint(uri: str, local_root: Path, env: Mapping[str, str] | None = None) -> int | None:
    """Copy the newest complete checkpoint under `uri` into `local_root` (if not there already)."""
    from . import checkpoint as ckpt

    steps = _complete_steps(uri, env)
    if not steps:
        log.info("no complete checkpoint under %s: starting from step 0", uri)
        return None
    step = steps[0]
    name = contract.checkpoint_dir_name(step)
    folder = local_root / name
    with storage._locked(local_root / f".{name}.lock"):
        if ckpt.read_marker(folder) is None:
            prefix = storage.join(uri, name)
            marker = json.loads(storage.read_text(storage.join(prefix, contract.CHECKPOINT_COMPLETE_MARKER), env))
            partial = ckpt.prepare_tmp(local_root, step)
            storage.download_files(prefix, partial, sorted(marker["files"]), env)
            (partial / contract.CHECKPOINT_COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
            if ckpt.read_marker(partial) is None:
                raise ckpt.CheckpointError(f"{prefix} does not match its {contract.CHECKPOINT_COMPLETE_MARKER} "
                                           "(a file's sha256 differs); delete that prefix to resume from an older one")
            if folder.exists():
                import shutil

                shutil.rmtree(folder)
            partial.rename(folder)
    log.info("fetched checkpoint %s from %s", name, uri)
    # Older local copies would be picked by nobody (the newest wins) but take disk space.
    for old_step, old in ckpt.list_checkpoints(local_root):
        if old_step != step:
            import shutil

            shutil.rmtree(old, ignore_errors=True)
    return step


def publish_rank_files(local_root: Path, tmp: Path, step: int, names: Iterable[str]) -> None:
    """A rank whose node does not see rank 0's folder uploads its own per-rank files."""
    uri = storage.remote_of(local_root)
    assert uri is not None
    storage.upload_rank_files(tmp, storage.join(uri, contract.checkpoint_dir_name(step)), names, _output_env())


def collect_rank_files(local_root: Path, tmp: Path, step: int, world_size: int) -> None:
    """Rank 0, before finalizing: fetch the per-rank files the other nodes uploaded."""
    from . import checkpoint as ckpt

    uri = storage.remote_of(local_root)
    assert uri is not None
    prefix = storage.join(uri, contract.checkpoint_dir_name(step))
    env = _output_env()
    present = set(storage.list_remote(prefix, env))
    wanted = [name for rank in range(world_size) for name in (ckpt.rng_file(rank), ckpt.optimizer_file(rank))
              if name in present and not (tmp / name).exists()]
    storage.download_files(prefix, tmp, wanted, env)


METRICS_FILES = (contract.ARTIFACT_METRICS, contract.ARTIFACT_TIMINGS)


def fetch_metrics(uri: str, local_output: Path, env: Mapping[str, str] | None = None) -> None:
    """The metrics an earlier attempt uploaded with its checkpoints (another node's working folder):
    MetricsWriter then keeps the lines up to the resumed step, as with a local output folder."""
    present = set(storage.list_remote(uri, env))
    wanted = [name for name in METRICS_FILES if name in present and not (local_output / name).exists()]
    storage.download_files(uri, local_output, wanted, env)


def publish_metrics(local_output: Path) -> None:
    """Rank 0, with each checkpoint: metrics so far, so that a resume elsewhere keeps the earlier lines.
    Not an artifact yet: only manifest.json says which files are final."""
    uri = storage.remote_of(local_output)
    if uri is None:
        return
    present = [name for name in METRICS_FILES if (local_output / name).is_file()]
    storage.upload_rank_files(local_output, uri, present, _output_env())


def publish_checkpoint(local_root: Path, folder: Path, keep: int) -> None:
    """Rank 0, after checkpoint.finalize: upload, then prune the bucket as the local folder is pruned."""
    uri = storage.remote_of(local_root)
    assert uri is not None
    env = _output_env()
    storage.upload_checkpoint(folder, storage.join(uri, folder.name), env)
    log.info("checkpoint %s uploaded to %s", folder.name, uri)
    for step in _complete_steps(uri, env)[keep:]:
        storage.remove_prefix(storage.join(uri, contract.checkpoint_dir_name(step)),
                              first=contract.CHECKPOINT_COMPLETE_MARKER, env=env)


def publish_artifacts(local: Path, uri: str, manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Upload every file the manifest lists, each verified (HEAD size + sha256 read back), then the
    manifest. Returns what may be reported as artifacts: only objects that were verified."""
    if locations.is_hub(uri):
        return hubs.publish_artifacts(local, uri, [*manifest["files"], contract.ARTIFACT_MANIFEST], _output_env())
    fs = storage.filesystem(_output_env(), uri)
    verified: dict[str, dict[str, Any]] = {}
    for name, entry in sorted(manifest["files"].items()):
        storage.upload_verified(fs, local / name, storage.join(uri, name), entry["sha256"])
        verified[name] = dict(entry)
    from .checkpoint import sha256_file

    manifest_file = local / contract.ARTIFACT_MANIFEST
    digest = sha256_file(manifest_file)
    storage.upload_verified(fs, manifest_file, storage.join(uri, manifest_file.name), digest)
    verified[manifest_file.name] = {"sha256": digest, "bytes": manifest_file.stat().st_size}
    log.info("uploaded %d artifacts to %s", len(verified), uri)
    return verified


def public_config(cfg_json: Mapping[str, Any], where: storage.Locations) -> dict[str, Any]:
    """training_config.json shows the URIs the user gave, not this node's working folders."""
    body = dict(cfg_json)
    for key, uri in (("model_path", where.model), ("dataset_path", where.dataset), ("output_path", where.output),
                     ("checkpoint_dir", where.checkpoints)):
        if uri:
            body[key] = uri
    return body
