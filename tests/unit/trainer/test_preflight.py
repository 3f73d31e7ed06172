"""Preflight, the trainer's first stage: each check on its own, then `lorakube-train --preflight` in a
subprocess per failing check (its exit code, its one line on stdout and as the log's last line), and
that no check leaves a file behind or imports torch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lorakube_api import contract
from lorakube_trainer import preflight
from lorakube_trainer.config import parse_config
from lorakube_trainer.distributed import Topology

EXAMPLE_DATASET = Path(__file__).resolve().parents[3] / "examples" / "dataset"


def model_folder(root: Path, class_name: str = "FluxPipeline") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return root


def dataset_folder(root: Path) -> Path:
    shutil.copytree(EXAMPLE_DATASET, root)
    return root


@pytest.fixture
def good(tmp_path: Path) -> dict[str, Path]:
    return {"model": model_folder(tmp_path / "model"), "dataset": dataset_folder(tmp_path / "dataset"),
            "output": tmp_path / "out" / "job"}


def cfg_for(paths: dict[str, Path], *extra: str, family: str = "flux"):
    return parse_config(["--model_family", family, "--model_path", str(paths["model"]), "--dataset_path",
                         str(paths["dataset"]), "--output_path", str(paths["output"]), "--height", "64", "--width",
                         "64", *extra], env={})


def one_node(devices: int = 1) -> Topology:
    return Topology(1, devices, 0, None, None, torchrun=False)


def raised(check) -> preflight.PreflightFailed:
    with pytest.raises(preflight.PreflightFailed) as exc:
        check()
    return exc.value


# --- each check -------------------------------------------------------------------------------

def test_every_check_passes_on_good_inputs_and_leaves_nothing_behind(good, tmp_path):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    preflight.run(cfg_for(good), one_node())
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not good["output"].exists(), "preflight must not create the output folder"


def test_an_existing_output_folder_gets_no_probe_file_left_in_it(good):
    good["output"].mkdir(parents=True)
    (good["output"] / "keep.txt").write_text("x")
    preflight.check_writable_folder(good["output"], contract.EXIT_PREFLIGHT_OUTPUT, "output not writable")
    assert [p.name for p in good["output"].iterdir()] == ["keep.txt"]


def test_an_output_under_a_file_is_not_writable(tmp_path):
    (tmp_path / "f").write_text("x")
    exc = raised(lambda: preflight.check_writable_folder(tmp_path / "f" / "out", contract.EXIT_PREFLIGHT_OUTPUT,
                                                         "output not writable"))
    assert exc.code == contract.EXIT_PREFLIGHT_OUTPUT
    assert str(exc) == f"PreflightFailed: output not writable: {tmp_path / 'f' / 'out'} ({tmp_path / 'f'} is a file, " \
                       f"not a folder)"


def test_an_output_on_a_filesystem_that_refuses_new_files_is_not_writable():
    # /proc refuses new entries to root too: the probe file, not the permission bits, finds it.
    exc = raised(lambda: preflight.check_writable_folder("/proc/lorakube-out", contract.EXIT_PREFLIGHT_CHECKPOINT,
                                                         "checkpoint not writable"))
    assert exc.code == contract.EXIT_PREFLIGHT_CHECKPOINT
    assert str(exc).startswith("PreflightFailed: checkpoint not writable: /proc/lorakube-out (")
    assert "to be created in /proc" in str(exc)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_folder_without_write_permission_is_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    exc = raised(lambda: preflight.check_writable_folder(locked / "out", contract.EXIT_PREFLIGHT_OUTPUT,
                                                         "output not writable"))
    assert "(Permission denied" in str(exc)


@pytest.mark.parametrize(("make", "words"), [
    (lambda root: root, "does not exist"),
    (lambda root: (root.mkdir(), root)[1], "has no model_index.json"),
    (lambda root: (root.mkdir(), (root / "model_index.json").write_text("[1, 2"), root)[2], "is not a JSON object"),
])
def test_a_model_folder_that_is_not_a_pipeline_fails_the_model_check(good, tmp_path, make, words):
    paths = {**good, "model": make(tmp_path / "m")}
    exc = raised(lambda: preflight.check_model(cfg_for(paths)))
    assert exc.code == contract.EXIT_PREFLIGHT_MODEL
    assert str(exc).startswith(f"PreflightFailed: model not usable: {tmp_path / 'm'} (")
    assert words in str(exc)


def test_a_model_of_another_family_fails_the_model_check(good):
    exc = raised(lambda: preflight.check_model(cfg_for(good, family="sd3")))
    assert exc.code == contract.EXIT_PREFLIGHT_MODEL
    assert "holds a FluxPipeline (flux model), but --model_family is sd3" in str(exc)


def test_an_unknown_pipeline_class_passes_as_diffusers_would_try_it(good, tmp_path):
    preflight.check_model(cfg_for({**good, "model": model_folder(tmp_path / "custom", "MyPipeline")}))


def test_a_dataset_without_metadata_fails_the_dataset_check(good, tmp_path):
    (tmp_path / "empty").mkdir()
    exc = raised(lambda: preflight.check_dataset(cfg_for({**good, "dataset": tmp_path / "empty"})))
    assert exc.code == contract.EXIT_PREFLIGHT_DATASET
    empty = tmp_path / "empty"
    assert str(exc).startswith(f"PreflightFailed: dataset not readable: {empty} (no dataset in {empty}: "
                               f"expected one of: {empty / 'train' / 'metadata.csv'}")


def test_a_metadata_file_that_cannot_be_read_fails_the_dataset_check(good):
    metadata = good["dataset"] / "train" / "metadata.csv"
    metadata.unlink()
    metadata.mkdir()        # a folder where the file should be: is_file() says no, as for a missing file
    exc = raised(lambda: preflight.check_dataset(cfg_for(good, "--dataset_format", "csv")))
    assert exc.code == contract.EXIT_PREFLIGHT_DATASET
    # Auto-detection then reads the images beside it as image + .txt pairs, and names what is missing.
    exc = raised(lambda: preflight.check_dataset(cfg_for(good)))
    assert exc.code == contract.EXIT_DATASET_ERROR
    assert str(exc).startswith("PreflightFailed: dataset: blue_square.png: no caption file blue_square.txt beside "
                               "it (no metadata.csv or metadata.jsonl found")


def test_gpus_are_not_counted_for_cpu_jobs_or_when_torch_may_choose(good):
    never = lambda: pytest.fail("counted GPUs for a job that asked for none")  # noqa: E731
    preflight.check_gpus(cfg_for(good, "--accelerator", "cpu"), one_node(4), visible=never)
    preflight.check_gpus(cfg_for(good), one_node(4), visible=never)


def test_fewer_gpus_than_gpus_per_node_fails_the_gpu_check_without_a_gpu(good):
    """Fake: the device listing (no GPU here); the real listing is read in the next test."""
    cfg = cfg_for(good, "--accelerator", "gpu")
    preflight.check_gpus(cfg, one_node(2), visible=lambda: (2, "/dev/nvidia0, /dev/nvidia1"))
    exc = raised(lambda: preflight.check_gpus(cfg, one_node(4), visible=lambda: (2, "/dev/nvidia0, /dev/nvidia1")))
    assert exc.code == contract.EXIT_PREFLIGHT_GPUS
    assert str(exc) == "PreflightFailed: GPUs not visible: 4 expected (gpusPerNode), 2 visible " \
                       "(/dev/nvidia0, /dev/nvidia1)"


def test_visible_gpus_counts_device_nodes_not_control_nodes(tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-caps", "null"):
        (tmp_path / name).touch()
    assert preflight.visible_gpus(tmp_path, smi=lambda: 0) == (2, "/dev/nvidia0, /dev/nvidia1")
    (tmp_path / "empty").mkdir()
    assert preflight.visible_gpus(tmp_path / "empty", smi=lambda: 3) == (3, "nvidia-smi -L")
    assert preflight.visible_gpus(tmp_path / "empty", smi=lambda: 0)[0] == 0


def test_one_node_needs_no_master_and_a_resolvable_master_passes():
    preflight.check_master(one_node(), resolve=lambda _: pytest.fail("resolved a master for one node"))
    preflight.check_master(Topology(2, 1, 1, "localhost", 29500, torchrun=False))


def test_a_master_that_never_resolves_fails_after_the_bounded_wait():
    now = [0.0]
    calls = []

    def resolve(addr: str) -> None:
        calls.append(addr)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    topology = Topology(2, 1, 1, "job-node-0.job.ns.svc", 29500, torchrun=False)
    exc = raised(lambda: preflight.check_master(topology, 5, resolve=resolve, clock=lambda: now[0],
                                                sleep=lambda s: now.__setitem__(0, now[0] + s)))
    assert exc.code == contract.EXIT_PREFLIGHT_MASTER
    assert str(exc) == "PreflightFailed: master not resolvable: job-node-0.job.ns.svc (Name or service not known; " \
                       "waited 5 s)"
    assert len(calls) == 6      # at 0, 1, ..., 5 s: a record that lags a few seconds is still found


def test_a_master_that_resolves_late_passes():
    now = [0.0]

    def resolve(addr: str) -> None:
        if now[0] < 3:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    preflight.check_master(Topology(2, 1, 0, "late", 29500, torchrun=False), 30, resolve=resolve,
                           clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert now[0] == 3


def test_the_checks_run_cheap_first_and_stop_at_the_first_failure(good, tmp_path):
    (tmp_path / "f").write_text("x")
    cfg = cfg_for({"model": tmp_path / "no-model", "dataset": tmp_path / "no-data", "output": tmp_path / "f" / "o"})
    assert [c.name for c in preflight.checks(cfg, one_node())] == [
        "output", "checkpoint", "model", "dataset", "gpus", "master"]
    assert raised(lambda: preflight.run(cfg, one_node())).code == contract.EXIT_PREFLIGHT_OUTPUT


def test_a_remote_output_is_checked_on_node_zero_only(tmp_path):
    # Only rank 0 writes the output; the other pods may not hold its Secret (builders.py).
    cfg = cfg_for({"model": tmp_path, "dataset": tmp_path, "output": "s3://loras/cats"},
                  "--checkpoint_dir", str(tmp_path / "ckpt"))
    rank_of = {rank: [c.name for c in preflight.checks(cfg, Topology(2, 1, rank, "m", 29500, torchrun=False))]
               for rank in (0, 1)}
    assert rank_of[0][:2] == ["output", "checkpoint"] and rank_of[1][0] == "checkpoint", rank_of


def test_every_preflight_code_is_its_own_and_fits_a_shell_exit_status():
    codes = list(contract.PREFLIGHT_EXIT_CODES)
    others = {contract.EXIT_OK, contract.EXIT_USER_ERROR, contract.EXIT_INVALID_ARGS, contract.EXIT_OUT_OF_MEMORY,
              contract.EXIT_DATASET_ERROR, contract.EXIT_RETRYABLE}
    assert len(set(codes)) == 6 and not set(codes) & others
    assert all(1 <= code <= 125 for code in codes)       # 126/127: the shell's own; >= 128: signals
    assert contract.PREFLIGHT_RETRYABLE_EXIT_CODES == {contract.EXIT_PREFLIGHT_MASTER}


# --- lorakube-train --preflight in a subprocess --------------------------------------------------

def run_trainer(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # The pod's view: the operator always sets the processes per node (so torch never counts GPUs).
    full_env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "WORLD_SIZE")}
    full_env.update({"NPROC_PER_NODE": "1", **(env or {})})
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "lorakube_trainer", *args],
                          capture_output=True, text=True, env=full_env, timeout=60)


def argv_for(paths: dict[str, Path], *extra: str) -> list[str]:
    return ["--preflight", "--model_family", "flux", "--model_path", str(paths["model"]), "--dataset_path",
            str(paths["dataset"]), "--output_path", str(paths["output"]), "--height", "64", "--width", "64", *extra]


def imported_torch(stderr: str) -> bool:
    return any(line.rstrip().endswith("| torch") for line in stderr.splitlines())


def test_the_preflight_command_passes_on_good_inputs_without_importing_torch(good):
    done = run_trainer(argv_for(good))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.strip() == "preflight: every check passed"
    assert not imported_torch(done.stderr)
    assert not good["output"].exists()


@pytest.mark.parametrize("case", ["output", "checkpoint", "model", "dataset", "gpus", "master"])
def test_each_failing_check_exits_with_its_code_and_one_line(good, tmp_path, case):
    (tmp_path / "f").write_text("in the way")
    paths, extra, env = dict(good), [], {}
    if case == "output":
        paths["output"] = tmp_path / "f" / "out"
        line = f"PreflightFailed: output not writable: {tmp_path / 'f' / 'out'} ({tmp_path / 'f'} is a file"
    elif case == "checkpoint":
        extra = ["--checkpoint_dir", "/proc/lorakube-ckpt"]
        line = "PreflightFailed: checkpoint not writable: /proc/lorakube-ckpt ("
    elif case == "model":
        paths["model"] = tmp_path / "no-model"
        line = f"PreflightFailed: model not usable: {tmp_path / 'no-model'} (--model_path"
    elif case == "dataset":
        paths["dataset"] = tmp_path / "no-data"
        line = f"PreflightFailed: dataset not readable: {tmp_path / 'no-data'} (no folder {tmp_path / 'no-data'})"
    elif case == "gpus":
        # No GPU on this machine: a job that asks for 8 sees fewer (0 here, or fewer than 8 anywhere).
        extra, env = ["--accelerator", "gpu"], {"NPROC_PER_NODE": "8"}
        line = "PreflightFailed: GPUs not visible: 8 expected (gpusPerNode), "
    else:
        extra = ["--rendezvous_timeout", "1"]
        env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "lorakube-no-such-host.invalid", "MASTER_PORT": "29500"}
        line = "PreflightFailed: master not resolvable: lorakube-no-such-host.invalid ("
    done = run_trainer(argv_for(paths, *extra), env)
    code = {"output": contract.EXIT_PREFLIGHT_OUTPUT, "checkpoint": contract.EXIT_PREFLIGHT_CHECKPOINT,
            "model": contract.EXIT_PREFLIGHT_MODEL, "dataset": contract.EXIT_PREFLIGHT_DATASET,
            "gpus": contract.EXIT_PREFLIGHT_GPUS, "master": contract.EXIT_PREFLIGHT_MASTER}[case]
    assert done.returncode == code, done.stdout + done.stderr[-3000:]
    assert contract.PREFLIGHT_EXIT_CODES[code] == case
    assert done.stdout.count("\n") == 1 and done.stdout.startswith(line), done.stdout
    # The last line of the log (the termination message under FallbackToLogsOnError) names it too.
    log = [line for line in done.stderr.strip().splitlines() if not line.startswith("import time:")]
    assert log[-1] == f"lorakube-train: error: {done.stdout.strip()}"
    assert not imported_torch(done.stderr)
    assert not good["output"].exists()
