"""The trainer image (trainer_image/Dockerfile), run as its own user: a real 2-step CPU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from imagelib import REPO_ROOT, ImageContainer, assert_import_fails

from lorakube_api import contract

pytestmark = pytest.mark.images

TRAINER_UID = 10001


def test_trainer_image_config_runs_the_trainer_as_non_root(trainer_image: ImageContainer) -> None:
    assert trainer_image.user == str(TRAINER_UID)
    assert trainer_image.entrypoint == ["lorakube-train"]
    env = dict(item.split("=", 1) for item in trainer_image.config["Env"])
    # Hugging Face caches must land in the user's writable home, not in / (read-only for it).
    assert env["HOME"] == "/home/trainer"
    assert env["HF_HOME"].startswith("/home/trainer/")


@pytest.mark.parametrize("module", ["lorakube", "kopf", "lorakube_dev", "localcluster"])
def test_trainer_image_carries_no_operator_and_no_devtools(trainer_image: ImageContainer, module: str) -> None:
    assert_import_fails(trainer_image, module)


def test_trainer_image_trains_tiny_flux_as_its_user(trainer_image: ImageContainer, tmp_path: Path) -> None:
    model = tmp_path / "tiny-flux"
    subprocess.run([sys.executable, "-m", "lorakube_dev.tiny", "--family", "flux", "--out", str(model)],
                   check=True, capture_output=True, timeout=300)
    # Some files are saved through temp files (mode 0600, owned by root); a model volume is readable
    # by the pod's user, so open it up the way a read-only model mount would be.
    for path in [model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    out = tmp_path / "out"
    out.mkdir()
    # Like an emptyDir: writable by whichever uid the pod runs as; the image decides which.
    out.chmod(0o777)

    result = trainer_image.run(
        [*trainer_image.entrypoint, "--model_family", "flux", "--model_path", "/model",
         "--dataset_path", "/data", "--output_path", "/out", "--height", "64", "--width", "64",
         "--steps_per_epoch", "2", "--max_epochs", "1", "--precision", "32", "--accelerator", "cpu",
         "--validation_inference_steps", "2"],
        volumes=[(model, "/model", "ro"), (REPO_ROOT / "examples" / "dataset", "/data", "ro"), (out, "/out", "rw")],
        env={"HF_HUB_OFFLINE": "1"},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    lora = out / contract.ARTIFACT_LORA_DIFFUSERS
    assert lora.is_file() and lora.stat().st_size > 0, sorted(p.name for p in out.iterdir())
    assert lora.stat().st_uid == TRAINER_UID
    # The run really made the 2 steps asked for, as the trainer's own metrics file records them.
    steps = [json.loads(line)["step"] for line in (out / contract.ARTIFACT_METRICS).read_text().splitlines()]
    assert max(steps) == 2
    manifest = json.loads((out / contract.ARTIFACT_MANIFEST).read_text())
    assert contract.ARTIFACT_LORA_DIFFUSERS in json.dumps(manifest)
