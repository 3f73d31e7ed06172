"""Two ranks (two OS processes over gloo, as two pods) with gradient accumulation 2.

- What --steps_per_epoch means (contract.STEPS_PER_EPOCH_MEANING): optimizer steps of the whole
  job; the loaders really fetch steps x accumulation x batch size samples on every rank per epoch,
  and progress totalSteps is steps per epoch x epochs.
- DeepSpeed ZeRO-2 and ZeRO-3 at world size 2 (partitioned gradients / parameters, the gather
  before saving) save the LoRA the DDP run saves, from the same seed and data.

One DDP run serves both. ZeRO runs through CPUDeepSpeedStrategyForTests (lorakube_trainer.testing):
DeepSpeed's own engine on its CPU accelerator with gloo; only Lightning's CUDA-only guards are
skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakube_api import contract
from lorakube_trainer import checkpoint as ckpt
from test_multiprocess import base_env, finish, flags, free_port, tiny_flux  # noqa: F401 (tiny_flux: fixture)

HERE = Path(__file__).parent
LAUNCHER = HERE / "yield_launcher.py"

STEPS_PER_EPOCH, ACCUMULATE, BATCH, EPOCHS, RANKS = 2, 2, 1, 2, 2
# DeepSpeed builds its CPU shared-memory op on first use (cached afterwards), before rank 0
# listens: give rank 1 time to wait for it on a busy machine.
RENDEZVOUS_S = "300"


@dataclass
class Run:
    folder: Path
    codes: list[int]
    logs: list[str]

    def probe(self, rank: int) -> dict:
        return json.loads((self.folder / "probe" / f"rank-{rank}.json").read_text())

    def yields(self, rank: int) -> list[dict]:
        lines = (self.folder / "probe" / f"yields-rank-{rank}.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    @property
    def out(self) -> Path:
        return self.folder / "out0"

    @property
    def checkpoints(self) -> Path:
        return self.folder / "ck"

    def lora(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / contract.ARTIFACT_LORA_DIFFUSERS))

    def progress(self) -> list[dict]:
        lines = [line for line in self.logs[0].splitlines() if line.startswith("{")]
        return [p for p in map(json.loads, lines) if p.get("event") == contract.PROGRESS_EVENT]

    def metrics(self) -> list[dict]:
        return [json.loads(x) for x in (self.out / contract.ARTIFACT_METRICS).read_text().splitlines()]


def train_two_ranks(model: Path, folder: Path, *launcher_args: str) -> Run:
    port, procs, logs = free_port(), [], []
    for rank in range(RANKS):
        env = base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(rank), NNODES=str(RANKS),
                       NPROC_PER_NODE="1", WORLD_SIZE=str(RANKS), PROBE_DIR=str(folder / "probe"),
                       **{contract.ENV_RENDEZVOUS_TIMEOUT: RENDEZVOUS_S})
        args = [*launcher_args, *flags(model, folder / f"out{rank}", "--checkpoint_dir", str(folder / "ck"),
                                       "--steps_per_epoch", str(STEPS_PER_EPOCH), "--max_epochs", str(EPOCHS),
                                       "--accumulate_grad_batches", str(ACCUMULATE), "--batch_size", str(BATCH),
                                       "--checkpoint_every_n_steps", str(STEPS_PER_EPOCH),
                                       "--learning_rate", "0.001", "--output_formats", "diffusers")]
        log = folder / f"rank{rank}.log"
        logs.append(log)
        with log.open("w") as fh:
            procs.append(subprocess.Popen([sys.executable, str(LAUNCHER), *args], env=env, stdout=fh,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    codes = [finish(p) for p in procs]
    return Run(folder, codes, [log.read_text() for log in logs])


def assert_ok(run: Run) -> None:
    assert run.codes == [0] * RANKS, "\n".join(log[-4000:] for log in run.logs)


@pytest.fixture(scope="module")
def ddp_run(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = train_two_ranks(tiny_flux, tmp_path_factory.mktemp("ddp"))
    assert_ok(run)
    return run


def test_steps_per_epoch_counts_optimizer_steps_of_the_whole_job(ddp_run: Run) -> None:
    total_steps = STEPS_PER_EPOCH * EPOCHS
    per_rank_samples = STEPS_PER_EPOCH * ACCUMULATE * BATCH * EPOCHS

    # What the loaders really fetched: steps x accumulation x batch per rank and epoch, disjoint
    # between the ranks, together exactly the epoch's global order once.
    yields = [ddp_run.yields(rank) for rank in range(RANKS)]
    assert [len(y) for y in yields] == [per_rank_samples] * RANKS
    for epoch in range(EPOCHS):
        positions = sorted(s["position"] for y in yields for s in y if s["epoch"] == epoch)
        assert positions == list(range(STEPS_PER_EPOCH * ACCUMULATE * BATCH * RANKS))
    # ... and every fetched sample was trained on (nothing fetched and dropped).
    for rank in range(RANKS):
        trained = [i for batch in ddp_run.probe(rank)["indices"] for i in batch]
        assert trained == [s["index"] for s in yields[rank]]

    # Progress and metrics count optimizer steps: steps per epoch x epochs.
    progress = ddp_run.progress()
    assert progress and {p["totalSteps"] for p in progress} == {total_steps}
    assert progress[-1]["step"] == total_steps
    metrics = ddp_run.metrics()
    assert [m["step"] for m in metrics] == list(range(1, total_steps + 1))
    assert [m["epoch"] for m in metrics] == [(s - 1) // STEPS_PER_EPOCH for s in range(1, total_steps + 1)]
    assert json.loads((ddp_run.out / contract.ARTIFACT_TRAINING_CONFIG).read_text())["steps_done"] == total_steps

    # The checkpoint after epoch 0 resumes at the start of epoch 1.
    first = ckpt.load(ddp_run.checkpoints / contract.checkpoint_dir_name(STEPS_PER_EPOCH))
    assert first.state["data_position"] == {"epoch": 1, "batch_in_epoch": 0}


# ZeRO-3 (gathers partitioned parameters) in `make test`; ZeRO-2 in the slow tier.
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_deepspeed_zero_on_two_ranks_saves_the_lora_ddp_saves(stage: int, ddp_run: Run, tiny_flux: Path,
                                                              tmp_path: Path) -> None:
    zero = train_two_ranks(tiny_flux, tmp_path, "--test-strategy", f"cpu-deepspeed-{stage}")
    assert_ok(zero)
    assert {zero.probe(rank)["strategy"] for rank in range(RANKS)} == {"CPUDeepSpeedStrategyForTests"}
    # Same seed, same samples on each rank, same steps.
    for rank in range(RANKS):
        assert zero.probe(rank)["indices"] == ddp_run.probe(rank)["indices"]
    assert [m["step"] for m in zero.metrics()] == [m["step"] for m in ddp_run.metrics()]
    # Every rank ends with the same full LoRA (gathered under ZeRO-3), and so does the saved file.
    assert zero.probe(0)["lora_sha256"] == zero.probe(1)["lora_sha256"]

    expected, saved = ddp_run.lora(), zero.lora()
    assert saved.keys() == expected.keys()
    moved = [k for k, v in expected.items() if "lora_B" in k and v.abs().max() > 1e-4]
    assert moved, "the LoRA did not train: the comparison would prove nothing"
    for key in expected:
        # fp32 on both sides; ZeRO reduces in another order, so allow rounding, far below one
        # step's update (learning rate 1e-3).
        torch.testing.assert_close(saved[key], expected[key], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, k=key: f"{k}: {m}")

    # The last checkpoint's LoRA (gathered for the checkpoint) is the same, plus each rank's
    # ZeRO optimizer partition.
    last = ckpt.find_latest_complete(zero.checkpoints)
    assert last is not None and ckpt.read_marker(last)["step"] == STEPS_PER_EPOCH * EPOCHS
    trainable = load_file(str(last / ckpt.TRAINABLE_FILE))
    reference = load_file(str(ckpt.find_latest_complete(ddp_run.checkpoints) / ckpt.TRAINABLE_FILE))
    assert trainable.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(trainable[key], reference[key], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, k=key: f"{k}: {m}")
    assert all((last / ckpt.optimizer_file(rank)).is_file() for rank in range(RANKS))
