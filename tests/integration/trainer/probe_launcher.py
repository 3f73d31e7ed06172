"""Test-only entry point: `lorakube-train` plus a probe that records, per rank, which dataset
records the rank trained on and a hash of its final LoRA (written to $PROBE_DIR/rank-<r>.json).

    python probe_launcher.py [--test-strategy cpu-deepspeed-N] [--crash-after-step N]
                             [--fake-cuda-oom-on-rank R] [--sleep-per-step S] <lorakube-train flags>

`--test-strategy` swaps in CPUDeepSpeedStrategyForTests, since Lightning's stock DeepSpeed
strategy refuses CPUs; `--crash-after-step` makes every rank fail right after that optimizer step
(and its checkpoint), like a gang losing a node; `--fake-cuda-oom-on-rank` makes global rank R
raise torch.OutOfMemoryError (what CUDA raises; there is no GPU here) in its first training batch;
`--sleep-per-step` makes every step last S seconds longer (inside the step, so a signal sent by a
test usually lands in the middle of one).
Each rank also touches $PROBE_DIR/rank-<r>.training when its first batch starts. Everything else
is the real CLI, exit codes included; with several processes per pod the trainer's own launcher
starts this script again for each local rank, with the same arguments.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lorakube_trainer import cli, train
from lorakube_trainer.strategies import StrategyPlan


class Probe(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.indices = out, []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.indices:
            (self.out / f"rank-{trainer.global_rank}.training").touch()
        self.indices.append([int(i) for i in batch["index"]])

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        state = pl_module.lora_state()          # gathered under ZeRO-3 (every rank calls it)
        digest = hashlib.sha256()
        for key in sorted(state):
            digest.update(key.encode() + state[key].numpy().tobytes())
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "indices": self.indices,
                  "lora_sha256": digest.hexdigest(), "lora_tensors": len(state),
                  "strategy": type(trainer.strategy).__name__,
                  "cluster_env": type(getattr(trainer.strategy, "cluster_environment", None)).__name__}
        (self.out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(record))


class CrashAfter(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if pl_module.absolute_step == self.step:
            raise RuntimeError(f"simulated failure after step {self.step}")


class FakeCudaOutOfMemory(pl.Callback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_rank == self.rank:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 1 has a total "
                                         "capacity of 79.19 GiB of which 3.12 GiB is free. (faked by the test)")


class SlowSteps(pl.Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_start(self, *args: Any) -> None:
        time.sleep(self.seconds)


def main() -> None:
    argv = sys.argv[1:]
    factory = train.build_strategy
    if argv[:1] == ["--test-strategy"]:
        stage = int(argv[1].rsplit("-", 1)[1])
        argv = argv[2:]
        from lorakube_trainer.testing import CPUDeepSpeedStrategyForTests

        def factory(plan: StrategyPlan) -> CPUDeepSpeedStrategyForTests:
            return CPUDeepSpeedStrategyForTests(stage=stage, process_group_backend="gloo")

    callbacks: list[pl.Callback] = []
    if argv[:1] == ["--crash-after-step"]:
        callbacks.append(CrashAfter(int(argv[1])))
        argv = argv[2:]
    if argv[:1] == ["--fake-cuda-oom-on-rank"]:
        callbacks.append(FakeCudaOutOfMemory(int(argv[1])))
        argv = argv[2:]
    if argv[:1] == ["--sleep-per-step"]:
        callbacks.append(SlowSteps(float(argv[1])))
        argv = argv[2:]
    out = Path(os.environ["PROBE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    callbacks.append(Probe(out))
    train.run = functools.partial(train.run, strategy_factory=factory, extra_callbacks=callbacks)
    torch.set_num_threads(1)
    sys.exit(cli.run_cli(argv))


if __name__ == "__main__":
    main()
