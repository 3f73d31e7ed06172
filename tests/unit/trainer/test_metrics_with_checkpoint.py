"""metrics.jsonl and timings.jsonl travel with a checkpoint (artifacts.py): saved up to its step,
restored on resume over whatever the resuming node's output folder holds. The run across two
nodes through a real S3 server: tests/integration/trainer/test_s3_storage.py."""

from __future__ import annotations

import json
from pathlib import Path

from lorakube_api import contract
from lorakube_trainer.artifacts import restore_metrics_from_checkpoint, save_metrics_with_checkpoint


def _write(path: Path, steps: list[int], torn: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"step": s, "loss": 0.1 * s}) + "\n" for s in steps)
    path.write_text(lines + ('{"step": 9, "lo' if torn else ""))


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_checkpoint_takes_the_lines_up_to_its_step(tmp_path):
    output, folder = tmp_path / "out", tmp_path / "step-000000004"
    folder.mkdir()
    _write(output / contract.ARTIFACT_METRICS, [1, 2, 3, 4, 5], torn=True)
    _write(output / contract.ARTIFACT_TIMINGS, [1, 2, 3, 4])
    assert save_metrics_with_checkpoint(output, folder, 4) == [contract.ARTIFACT_METRICS, contract.ARTIFACT_TIMINGS]
    assert _steps(folder / contract.ARTIFACT_METRICS) == [1, 2, 3, 4]
    assert _steps(folder / contract.ARTIFACT_TIMINGS) == [1, 2, 3, 4]
    # Before the first metric line there is nothing to carry.
    empty = tmp_path / "step-000000000"
    empty.mkdir()
    assert save_metrics_with_checkpoint(tmp_path / "fresh", empty, 0) == [] and list(empty.iterdir()) == []


def test_resume_restores_the_checkpoints_lines_over_the_output_folders(tmp_path):
    folder = tmp_path / "step-000000004"
    _write(folder / contract.ARTIFACT_METRICS, [1, 2, 3, 4])
    # Another node: no output folder yet.
    fresh = tmp_path / "node-b"
    assert restore_metrics_from_checkpoint(folder, fresh, 4) == [contract.ARTIFACT_METRICS]
    assert _steps(fresh / contract.ARTIFACT_METRICS) == [1, 2, 3, 4]
    # A node that ran past the checkpoint (step 5 is run again) or only some of the steps.
    for held in ([1, 2, 3, 4, 5, 6], [1, 2]):
        _write(tmp_path / "node-a" / contract.ARTIFACT_METRICS, held)
        restore_metrics_from_checkpoint(folder, tmp_path / "node-a", 4)
        assert _steps(tmp_path / "node-a" / contract.ARTIFACT_METRICS) == [1, 2, 3, 4]
    # A checkpoint without metric lines (written by an older trainer) leaves the output's alone.
    old = tmp_path / "old-step"
    old.mkdir()
    assert restore_metrics_from_checkpoint(old, tmp_path / "node-a", 4) == []
    assert _steps(tmp_path / "node-a" / contract.ARTIFACT_METRICS) == [1, 2, 3, 4]
