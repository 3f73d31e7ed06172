"""Preflight: the trainer's first stage, before torch loads and before any training time is spent.

Each check finds one way a pod would otherwise fail minutes later (after the image pull, the
model load, the rendezvous) and names it in one line, `PreflightFailed: <check>: <what> (<why>)`,
with its own exit code (contract.EXIT_PREFLIGHT_*), so the job's condition says which input is wrong.
Cheap local checks run first; the master's DNS name, the only one that may need to wait, runs last.

Why a stage of `lorakube-train` and not an init container: the same process goes on to train, so
a pod starts Python once and reads the image once; the exit code and termination message take the
path every other trainer failure takes (the operator classifies them with one rule table, and the
local process node, which has no init containers of its own to report apart, shows them the same);
and the launcher of several local ranks runs it once per pod before it starts them. The same
checks run alone with `lorakube-train --preflight`.

Nothing is left behind: the write checks create and remove one probe file in the nearest folder
that exists, never the output folder itself nor anything in it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from lorakube_api import contract

from . import locations, storage
from .config import TrainConfig
from .dataset_layout import ENV_DATASET_CHECKED, DatasetError, find_dataset, load_records
from .distributed import Topology
from .pipeline_folder import ModelFolderError, check_pipeline_folder

# Rank 0's DNS name may lag behind its pod by a few seconds (the headless Service's endpoints are
# written after the pod gets an IP): wait this long at most before giving up (retryable).
DNS_WAIT_SECONDS = 30.0
DEV_DIR = Path("/dev")
_GPU_NODE = re.compile(r"nvidia\d+")


class PreflightFailed(Exception):
    """One failed check: its exit code and the one line the job's condition quotes."""

    def __init__(self, code: int, check: str, detail: str) -> None:
        super().__init__(f"{contract.PREFLIGHT_FAILED}: {check}: {detail}")
        self.code = code
        self.check = check


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_writable_folder(path: str | Path, code: int, check: str, role: str = "output") -> None:
    """The folder can take new files: it exists, or its nearest existing parent lets this process
    create it. A probe file is created and removed, which catches what permission bits do not show
    (read-only mounts, root-squashed NFS); the folder itself is not created."""
    if locations.is_remote_output(str(path)):
        check_remote(str(path), code, check, write=True, role=role)
        return
    target = Path(path).absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightFailed(code, check, f"{target} ({existing} is a file, not a folder)")
    where = "" if existing == target else f", to be created in {existing}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".lorakube-preflight-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PreflightFailed(code, check, f"{target} ({_reason(exc)}{where}; uid {os.getuid()})") from exc


def check_remote(uri: str, code: int, check: str, write: bool, role: str) -> None:
    """Remote locations (locations.py): s3:// inputs list at least one object, s3:// outputs take a
    probe object (put, then deleted), so a bucket that refuses writes fails here with the URI named;
    hf:// resolves the revision (and needs HF_TOKEN to write); https:// archives answer a HEAD. Each
    with its role's credentials (storage.role_env), as training will use them."""
    env = storage.role_env(None, role)
    try:
        if write:
            locations.check_writable(uri, env)
        else:
            locations.check_readable(uri, env)
    except storage.StorageError as exc:
        raise PreflightFailed(code, check, f"{uri} ({exc})") from exc


def check_output(cfg: TrainConfig) -> None:
    check_writable_folder(cfg.output_path, contract.EXIT_PREFLIGHT_OUTPUT, "output not writable")
    check_modelscope(cfg)


def check_modelscope(cfg: TrainConfig) -> None:
    """--modelscope_model_id: the repo exists and a token is there, before any training time is spent."""
    if not cfg.modelscope_model_id:
        return
    from . import modelscope_repos

    try:
        modelscope_repos.check_publishable(cfg.modelscope_model_id, cfg.modelscope_access_token,
                                           storage.role_env(None, "output"))
    except storage.StorageError as exc:
        raise PreflightFailed(contract.EXIT_PREFLIGHT_OUTPUT, "ModelScope repo not writable",
                              f"{modelscope_repos.model_uri(cfg.modelscope_model_id)} ({exc})") from exc


def check_model(cfg: TrainConfig) -> None:
    """A diffusers pipeline folder of the declared family, its model_index.json readable."""
    if locations.is_remote_input(cfg.model_path):
        check_remote(cfg.model_path, contract.EXIT_PREFLIGHT_MODEL, "model not readable", write=False, role="model")
        return
    try:
        check_pipeline_folder(cfg.model_path, cfg.model_family)
    except ModelFolderError as exc:
        raise PreflightFailed(contract.EXIT_PREFLIGHT_MODEL, "model not usable", f"{cfg.model_path} ({exc})") from exc
    try:
        os.listdir(cfg.model_path)
    except OSError as exc:
        raise PreflightFailed(contract.EXIT_PREFLIGHT_MODEL, "model not readable",
                              f"{cfg.model_path} ({_reason(exc)})") from exc


def check_dataset(cfg: TrainConfig) -> None:
    """A dataset in one of the formats (dataset_layout.py), then every record and image checked
    there: the one stage that reads the whole dataset, once per pod, before torch loads. A folder
    holding no dataset fails as "dataset not readable" (EXIT_PREFLIGHT_DATASET); a malformed one
    names the file or row (EXIT_DATASET_ERROR, as when the loader meets a bad image later).
    Remote datasets (s3://, hf://, modelscope://, https://) are checked the same way after staging,
    once per cache entry (dataset_checked.py, from cli.py and train.py)."""
    if locations.is_remote_input(cfg.dataset_path):
        check_remote(cfg.dataset_path, contract.EXIT_PREFLIGHT_DATASET, "dataset not readable", write=False,
                     role="dataset")
        return
    try:
        found = find_dataset(cfg.dataset_path, cfg.dataset_format)
    except DatasetError as exc:
        raise PreflightFailed(contract.EXIT_PREFLIGHT_DATASET, "dataset not readable",
                              f"{cfg.dataset_path} ({exc})") from exc
    try:
        if found.source.is_file():
            with found.source.open("rb") as fh:
                fh.read(1)
    except OSError as exc:
        raise PreflightFailed(contract.EXIT_PREFLIGHT_DATASET, "dataset not readable",
                              f"{found.source} ({_reason(exc)})") from exc
    try:
        load_records(cfg.dataset_path, cfg.max_image_pixels, dataset_format=cfg.dataset_format,
                     default_caption=cfg.default_caption, caption_extension=cfg.caption_extension)
    except DatasetError as exc:
        raise PreflightFailed(contract.EXIT_DATASET_ERROR, contract.DATASET_ERROR_PREFIX, str(exc)) from exc


def dataset_checked_env(cfg: TrainConfig) -> dict[str, str]:
    """What tells the training processes of this pod that check_dataset read every image already,
    so they list the records without opening each image again (once per pod, not once per rank)."""
    return {} if locations.is_remote_input(cfg.dataset_path) else {ENV_DATASET_CHECKED: cfg.dataset_path}


def expected_gpus(cfg: TrainConfig, topology: Topology) -> int:
    """GPUs this pod must see: one per local process when the job asked for GPUs (the operator
    passes --accelerator gpu for gpusPerNode > 0); none for CPU jobs or when torch may choose."""
    return topology.devices if cfg.accelerator == "gpu" else 0


def _nvidia_smi_count(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """GPUs (or MIG slices) `nvidia-smi -L` lists; 0 without the tool or when it fails."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listed = run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    if listed.returncode != 0:
        return 0
    lines = [line.strip() for line in listed.stdout.splitlines()]
    migs = sum(line.startswith("MIG ") for line in lines)
    return migs or sum(line.startswith("GPU ") for line in lines)


def visible_gpus(dev: Path = DEV_DIR, smi: Callable[[], int] = _nvidia_smi_count) -> tuple[int, str]:
    """How many GPUs this container sees, without importing torch: the device nodes the NVIDIA
    runtime mounts (/dev/nvidia0, ...), or nvidia-smi where those undercount (MIG slices share one)."""
    try:
        nodes = sorted(p.name for p in dev.iterdir() if _GPU_NODE.fullmatch(p.name))
    except OSError:
        nodes = []
    if nodes:
        return len(nodes), ", ".join(f"/dev/{n}" for n in nodes)
    count = smi()
    return count, ("nvidia-smi -L" if count else "no /dev/nvidia* device, no nvidia-smi")


def check_gpus(cfg: TrainConfig, topology: Topology, visible: Callable[[], tuple[int, str]] = visible_gpus) -> None:
    expected = expected_gpus(cfg, topology)
    if expected == 0:
        return
    count, seen = visible()
    if count < expected and "nvidia-smi" not in seen:
        # Device nodes undercount MIG slices; ask nvidia-smi before failing.
        smi = _nvidia_smi_count()
        if smi > count:
            count, seen = smi, "nvidia-smi -L"
    if count < expected:
        raise PreflightFailed(contract.EXIT_PREFLIGHT_GPUS, "GPUs not visible",
                              f"{expected} expected (gpusPerNode), {count} visible ({seen})")


def check_master(topology: Topology, wait_seconds: float = DNS_WAIT_SECONDS, *,
                 resolve: Callable[[str], object] = socket.gethostbyname,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Rank 0's name resolves (on every node, rank 0's own included: it is what the others dial).

    Only DNS: rank 0 listens once its training stage starts, so a connect here would wait for a
    process that has not begun; distributed.wait_for_master waits for the port, bounded, later."""
    if topology.num_nodes <= 1 or topology.torchrun or not topology.master_addr:
        return
    addr = topology.master_addr
    deadline = clock() + wait_seconds
    while True:
        try:
            resolve(addr)
            return
        except OSError as exc:   # socket.gaierror: not (yet) in DNS
            if clock() >= deadline:
                raise PreflightFailed(contract.EXIT_PREFLIGHT_MASTER, "master not resolvable",
                                      f"{addr} ({_reason(exc)}; waited {wait_seconds:g} s)") from exc
        sleep(min(1.0, max(0.0, deadline - clock())))


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[], None]


def checks(cfg: TrainConfig, topology: Topology, dns_wait_seconds: float = DNS_WAIT_SECONDS) -> list[Check]:
    """In order: local and instant first, the one that may wait last. A remote output is checked on
    node 0 only: only rank 0 writes it, and the other pods may lack its Secret (builders.py)."""
    remote_output_elsewhere = locations.is_remote_output(cfg.output_path) and topology.node_rank != 0
    return [
        *([] if remote_output_elsewhere else [Check("output", lambda: check_output(cfg))]),
        Check("checkpoint", lambda: check_writable_folder(cfg.checkpoint_dir, contract.EXIT_PREFLIGHT_CHECKPOINT,
                                                          "checkpoint not writable")),
        Check("model", lambda: check_model(cfg)),
        Check("dataset", lambda: check_dataset(cfg)),
        Check("gpus", lambda: check_gpus(cfg, topology)),
        Check("master", lambda: check_master(topology, min(dns_wait_seconds, cfg.rendezvous_timeout))),
    ]


def run(cfg: TrainConfig, topology: Topology, *, selected: Sequence[Check] | None = None) -> None:
    """Raise PreflightFailed for the first check that fails."""
    for check in checks(cfg, topology) if selected is None else selected:
        check.run()


def skip_in(env: Mapping[str, str]) -> bool:
    """A local rank the launcher started: the launcher already ran preflight for the whole pod."""
    from .launcher import ENV_FAILURE_FILE

    return bool(env.get(ENV_FAILURE_FILE))

