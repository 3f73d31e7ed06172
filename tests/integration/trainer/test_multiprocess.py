"""Several OS processes = several pods: the operator's env alone makes them one gloo job; a missing
peer ends within the rendezvous timeout with EXIT_RETRYABLE; ZeRO through the CPU test strategy."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakube_api import contract
from lorakube_trainer import checkpoint as ckpt
from lorakube_dev.tiny import build_tiny_pipeline

HERE = Path(__file__).parent
EXAMPLE_DATASET = HERE.parents[2] / "examples" / "dataset"
LAUNCHER = HERE / "probe_launcher.py"
PROCESS_TIMEOUT = 240


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline("flux", tmp_path_factory.mktemp("tiny") / "flux")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def flags(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_family", "flux", "--model_path", str(model), "--dataset_path", str(EXAMPLE_DATASET),
            "--output_path", str(out), "--height", "32", "--width", "32", "--precision", "32",
            "--steps_per_epoch", "3", "--batch_size", "1", "--random_flip", "--checkpoint_every_n_steps", "3",
            "--validation_inference_steps", "2", "--accelerator", "cpu", *extra]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = log.open("w")
    # Own process group, so a hung run can be killed with everything it started.
    return subprocess.Popen([sys.executable, str(LAUNCHER), *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = PROCESS_TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def test_two_pods_train_together_over_gloo(tiny_flux: Path, tmp_path: Path) -> None:
    port, shared_ckpt = free_port(), tmp_path / "shared-checkpoints"
    procs, logs = [], []
    for rank in (0, 1):
        env = base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(rank), NNODES="2",
                       NPROC_PER_NODE="1", WORLD_SIZE="2", PROBE_DIR=str(tmp_path / "probe"),
                       **{contract.ENV_RENDEZVOUS_TIMEOUT: "60"})
        logs.append(tmp_path / f"rank{rank}.log")
        procs.append(start(flags(tiny_flux, tmp_path / f"out{rank}", "--checkpoint_dir", str(shared_ckpt)),
                           env, logs[-1]))
    codes = [finish(p) for p in procs]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    probes = _probes(tmp_path / "probe", 2)
    assert [p["world_size"] for p in probes] == [2, 2]
    assert {p["cluster_env"] for p in probes} == {"LightningEnvironment"}
    # Each rank drew its own shard: 3 batches each, 6 distinct positions of a shuffled pass over 5
    # images, so the two ranks' record lists differ.
    assert all(len(p["indices"]) == 3 for p in probes)
    assert probes[0]["indices"] != probes[1]["indices"]
    # Gradients were all-reduced: both ranks end with the same LoRA.
    assert probes[0]["lora_sha256"] == probes[1]["lora_sha256"]

    # Only rank 0 writes the artifacts (and progress lines).
    manifest = json.loads((tmp_path / "out0" / contract.ARTIFACT_MANIFEST).read_text())
    assert contract.ARTIFACT_LORA_DIFFUSERS in manifest["files"]
    assert not (tmp_path / "out1").exists() or not any((tmp_path / "out1").iterdir())
    assert '"event": "progress"' in logs[0].read_text() and '"event": "progress"' not in logs[1].read_text()
    # The checkpoint holds both ranks' RNG files, published once by rank 0.
    folder = ckpt.find_latest_complete(shared_ckpt)
    assert folder is not None and ckpt.read_marker(folder)["step"] == 3
    assert (folder / ckpt.rng_file(0)).is_file() and (folder / ckpt.rng_file(1)).is_file()
    assert load_file(str(tmp_path / "out0" / contract.ARTIFACT_LORA_DIFFUSERS))


def _probes(folder: Path, ranks: int) -> list[dict]:
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(ranks)]


def _two_pods(tiny_flux: Path, tmp_path: Path, name: str, *extra: str) -> list[int]:
    port, procs, logs = free_port(), [], []
    for rank in (0, 1):
        env = base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(rank), NNODES="2",
                       NPROC_PER_NODE="1", WORLD_SIZE="2", PROBE_DIR=str(tmp_path / f"probe-{name}"),
                       **{contract.ENV_RENDEZVOUS_TIMEOUT: "60"})
        logs.append(tmp_path / f"{name}-rank{rank}.log")
        args = [*extra, *flags(tiny_flux, tmp_path / f"{name}-out{rank}",
                               "--checkpoint_dir", str(tmp_path / f"{name}-ck"),
                               "--max_epochs", "2", "--checkpoint_every_n_steps", "2")]
        procs.append(start(args, env, logs[-1]))
    return [finish(p) for p in procs]


@pytest.mark.slow  # make test keeps exact resume in the unit tier and across a gang restart in tests/e2e
def test_a_restarted_gang_resumes_bit_identically(tiny_flux: Path, tmp_path: Path) -> None:
    assert _two_pods(tiny_flux, tmp_path, "whole") == [0, 0]
    codes = _two_pods(tiny_flux, tmp_path, "cut", "--crash-after-step", "3")   # last checkpoint: step 2
    assert all(code != 0 for code in codes)
    assert _two_pods(tiny_flux, tmp_path, "cut") == [0, 0]                     # the gang's next attempt
    whole, resumed = _probes(tmp_path / "probe-whole", 2), _probes(tmp_path / "probe-cut", 2)
    assert whole[0]["lora_sha256"] == whole[1]["lora_sha256"] == resumed[0]["lora_sha256"] == resumed[1]["lora_sha256"]
    # The resumed attempt drew exactly the samples the uninterrupted run drew after step 2.
    for rank in (0, 1):
        assert resumed[rank]["indices"] == whole[rank]["indices"][2:]


@pytest.mark.slow  # costlier variant; the two-pod gloo run stays in make test
def test_two_pods_sd3_with_gradient_checkpointing(tmp_path: Path) -> None:
    """SD3's last block computes add_q_proj but discards its output (context_pre_only): its LoRA
    gets an exactly-zero gradient, which DDP must still all-reduce without complaint."""
    model = build_tiny_pipeline("sd3", tmp_path / "sd3")
    port, procs, logs = free_port(), [], []
    for rank in (0, 1):
        env = base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(rank), NNODES="2",
                       NPROC_PER_NODE="1", WORLD_SIZE="2", PROBE_DIR=str(tmp_path / "probe"))
        logs.append(tmp_path / f"rank{rank}.log")
        args = flags(model, tmp_path / f"out{rank}", "--checkpoint_dir", str(tmp_path / "ck"),
                     "--use_gradient_checkpointing")
        args[args.index("flux")] = "sd3"
        procs.append(start(args, env, logs[-1]))
    codes = [finish(p) for p in procs]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    probes = _probes(tmp_path / "probe", 2)
    assert probes[0]["lora_sha256"] == probes[1]["lora_sha256"]


@pytest.mark.slow  # costlier variant; the two-pod gloo run stays in make test
def test_torchrun_launch_needs_no_other_settings(tiny_flux: Path, tmp_path: Path) -> None:
    port, procs, logs = free_port(), [], []
    for node in (0, 1):
        logs.append(tmp_path / f"node{node}.log")
        torchrun = ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", str(LAUNCHER)]
        fh = logs[-1].open("w")
        procs.append(subprocess.Popen(
            [sys.executable, *torchrun, *flags(tiny_flux, tmp_path / f"out{node}",
                                               "--checkpoint_dir", str(tmp_path / "ck"))],
            env=base_env(PROBE_DIR=str(tmp_path / "probe")), stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True))
    codes = [finish(p) for p in procs]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    probes = _probes(tmp_path / "probe", 2)
    assert {p["cluster_env"] for p in probes} == {"TorchElasticEnvironment"}
    assert [p["world_size"] for p in probes] == [2, 2]
    assert probes[0]["lora_sha256"] == probes[1]["lora_sha256"]
    assert probes[0]["indices"] != probes[1]["indices"]


# slow: ~38 s; `make test` keeps two local ranks in one pod through the local-rank-1 exit-code test (test_exit_codes.py)
@pytest.mark.slow
def test_one_pod_with_two_processes_the_trainer_launches_both_local_ranks(tiny_flux: Path, tmp_path: Path) -> None:
    env = base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NODE_RANK="0", NNODES="1",
                   NPROC_PER_NODE="2", WORLD_SIZE="2", PROBE_DIR=str(tmp_path / "probe"))
    proc = start(flags(tiny_flux, tmp_path / "out"), env, tmp_path / "pod.log")
    assert finish(proc) == 0, (tmp_path / "pod.log").read_text()[-3000:]
    probes = _probes(tmp_path / "probe", 2)
    assert [p["world_size"] for p in probes] == [2, 2]
    # LOCAL_RANK set by lorakube-train's launcher: Lightning sees externally launched processes.
    assert {p["cluster_env"] for p in probes} == {"LightningEnvironment"}
    assert probes[0]["lora_sha256"] == probes[1]["lora_sha256"]
    assert probes[0]["indices"] != probes[1]["indices"]
    assert (tmp_path / "out" / contract.ARTIFACT_MANIFEST).is_file()


def test_a_missing_rank0_ends_with_the_retryable_code_within_the_timeout(tiny_flux: Path, tmp_path: Path) -> None:
    env = base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NODE_RANK="1", NNODES="2",
                   NPROC_PER_NODE="1", WORLD_SIZE="2", PROBE_DIR=str(tmp_path / "probe"),
                   **{contract.ENV_RENDEZVOUS_TIMEOUT: "3"})
    started = time.monotonic()
    proc = start(flags(tiny_flux, tmp_path / "out"), env, tmp_path / "rank1.log")
    code = finish(proc, timeout=120)
    log = (tmp_path / "rank1.log").read_text()
    assert code == contract.EXIT_RETRYABLE, log[-3000:]
    assert "not reachable within 3 s" in log
    assert time.monotonic() - started < 3 + 60            # imports and model load, plus the 3 s


@pytest.mark.slow
def test_a_missing_peer_of_rank0_ends_with_the_retryable_code(tiny_flux: Path, tmp_path: Path) -> None:
    env = base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NODE_RANK="0", NNODES="2",
                   NPROC_PER_NODE="1", WORLD_SIZE="2", PROBE_DIR=str(tmp_path / "probe"),
                   **{contract.ENV_RENDEZVOUS_TIMEOUT: "4"})
    proc = start(flags(tiny_flux, tmp_path / "out"), env, tmp_path / "rank0.log")
    code = finish(proc, timeout=120)
    assert code == contract.EXIT_RETRYABLE, (tmp_path / "rank0.log").read_text()[-3000:]


# Three trainer runs per stage (about 30 s each): the slow tier. `make test` keeps DeepSpeed on two
# ranks against DDP (test_two_rank_accumulation.py) and DDP's bit-identical resume.
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_restores_the_zero_optimizer_bit_identically(stage: int, tiny_flux: Path,
                                                                      tmp_path: Path) -> None:
    def train(name: str, *extra: str) -> int:
        env = base_env(PROBE_DIR=str(tmp_path / f"probe-{name}"), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()))
        args = ["--test-strategy", f"cpu-deepspeed-{stage}", *extra,
                *flags(tiny_flux, tmp_path / name, "--training_strategy", f"deepspeed_stage_{stage}",
                       "--max_epochs", "2", "--checkpoint_every_n_steps", "2", "--output_formats", "diffusers")]
        return finish(start(args, env, tmp_path / f"{name}.log"))

    assert train("whole") == 0, (tmp_path / "whole.log").read_text()[-3000:]
    assert train("cut", "--crash-after-step", "3") != 0
    folder = ckpt.find_latest_complete(tmp_path / "cut" / contract.DEFAULT_CHECKPOINT_SUBDIR)
    assert (folder / ckpt.optimizer_file(0)).is_file()
    assert train("cut") == 0, (tmp_path / "cut.log").read_text()[-3000:]
    assert "moments restart" not in (tmp_path / "cut.log").read_text()
    whole = json.loads((tmp_path / "probe-whole" / "rank-0.json").read_text())
    resumed = json.loads((tmp_path / "probe-cut" / "rank-0.json").read_text())
    assert resumed["lora_sha256"] == whole["lora_sha256"]
    assert resumed["indices"] == whole["indices"][2:]
