"""One pod, two local processes (what gpusPerNode: 2 runs, on CPUs with gloo): whichever local rank
fails, the pod exits with that rank's code and its last log line names the rank and the reason."""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_multiprocess import (EXAMPLE_DATASET, PROCESS_TIMEOUT, base_env, finish, flags, free_port,  # noqa: F401
                               start, tiny_flux)

from lorakube_api import contract
from lorakube_trainer.data import epoch_order, load_records

SEED = 11
STEPS_PER_EPOCH = 3          # flags() default; batch size 1, two ranks


def one_pod_two_processes(model: Path, tmp: Path, name: str, *extra: str, dataset: Path = EXAMPLE_DATASET):
    env = base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NODE_RANK="0", NNODES="1",
                   NPROC_PER_NODE="2", WORLD_SIZE="2", PROBE_DIR=str(tmp / f"probe-{name}"))
    args = flags(model, tmp / f"out-{name}", "--seed", str(SEED))
    args[args.index("--dataset_path") + 1] = str(dataset)
    log = tmp / f"{name}.log"
    started = time.monotonic()
    code = finish(start([*extra, *args], env, log))
    return code, log.read_text(), time.monotonic() - started


def dataset_whose_corrupt_image_only_local_rank_1_reads(tmp: Path) -> tuple[Path, str]:
    """A copy of the example dataset in which the record local rank 1 draws first is a JPEG whose
    Huffman table is garbage: its header and end marker pass the upfront check (load_records, in
    preflight), decoding it fails in the loader."""
    dataset = tmp / "dataset"
    shutil.copytree(EXAMPLE_DATASET, dataset)
    records = load_records(dataset)
    # data.ShardSampler: rank r reads positions r, r + W, ... of the epoch's global order.
    order = epoch_order(SEED, 0, len(records), STEPS_PER_EPOCH * 1 * 2)
    victim = int(order[1])
    assert victim not in [int(i) for i in order[0::2]], "local rank 0 must never read the corrupt image"
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    table = data.find(b"\xff\xc4")            # DHT: PIL's header parser skips it, libjpeg decodes with it
    data[table + 5:table + 21] = b"\xff" * 16
    records[victim].path.write_bytes(bytes(data))
    load_records(dataset)       # still passes the upfront check
    return dataset, records[victim].path.name


def test_a_dataset_error_on_local_rank_1_is_the_pods_exit_code(tiny_flux: Path, tmp_path: Path) -> None:
    dataset, bad_image = dataset_whose_corrupt_image_only_local_rank_1_reads(tmp_path)
    code, log, seconds = one_pod_two_processes(tiny_flux, tmp_path, "corrupt", dataset=dataset)
    # Not 137: Lightning's launcher used to SIGKILL the main process when a child failed.
    assert code == contract.EXIT_DATASET_ERROR, log[-4000:]
    last = log.strip().splitlines()[-1]
    assert "local rank 1 (global rank 1) exited with code 65" in last and bad_image in last, log[-4000:]
    assert "cannot decode image" in last
    # The pod's preflight read every image header once; the two ranks only listed the records.
    assert log.count("images (headers checked by preflight)") == 2, log[-4000:]
    # Local rank 0 did not wait for the (30 minute) collective timeout: it either noticed the lost
    # peer itself (75, outranked by the dataset error) or the launcher stopped it.
    rank0 = [line for line in log.splitlines() if line.startswith("lorakube-train: local rank 0 (global rank 0)")]
    assert len(rank0) == 1 and ("exited with code 75" in rank0[0] or "stopped by the launcher" in rank0[0]), log[-4000:]
    assert seconds < PROCESS_TIMEOUT


# The slow tier: the dataset-error test above proves the launcher carries a rank's code to the pod,
# and tests/unit/operator/test_failures.py the OutOfMemory rule; this one the CLI's OOM mapping.
@pytest.mark.slow
def test_a_fake_cuda_oom_on_local_rank_1_exits_with_the_oom_code_and_a_hint(tiny_flux: Path, tmp_path: Path) -> None:
    """torch.OutOfMemoryError is raised by a test callback (no GPU here), in the real training loop."""
    code, log, _ = one_pod_two_processes(tiny_flux, tmp_path, "oom", "--fake-cuda-oom-on-rank", "1")
    assert code == contract.EXIT_OUT_OF_MEMORY, log[-4000:]
    last = log.strip().splitlines()[-1]
    assert "local rank 1 (global rank 1) exited with code 3: CUDA out of memory (CUDA out of memory." in last
    for hint in ("--batch_size", "spec.training.batchSize", "--use_gradient_checkpointing",
                 "--training_strategy deepspeed_stage_2 or deepspeed_stage_3", "spec.training.strategy"):
        assert hint in last, last
