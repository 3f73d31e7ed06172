"""A newer family through the operator: a FLUX.2 klein job applied as a user would, run by the real
trainer in a process-node pod, leaving LoRA files that diffusers and ComfyUI name the FLUX.2 way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from lorakube_api import contract
from lorakube_dev import sandbox

# A whole job (pod start, trainer import, Qwen3 prompts, validation with guidance) takes about a
# minute on two cores, so it is in the slow tier.
pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

JOB_TIMEOUT = 600
FAMILY = "flux2-klein"


@pytest.fixture(scope="module")
def flux2_klein_model(data_dir: Path) -> str:
    """The tiny FLUX.2 klein pipeline next to the tiny FLUX one, under the folder the pods mount at /data."""
    folder = data_dir / f"model-{FAMILY}"
    if not (folder / "model_index.json").is_file():
        subprocess.run([sys.executable, "-m", "lorakube_dev.tiny", "--family", FAMILY, "--out", str(folder)],
                       check=True, capture_output=True, text=True)
    return f"/data/{folder.name}"


def test_a_flux2_klein_job_succeeds_with_flux2_lora_files(local_cluster, job_namespace, data_dir, flux2_klein_model,
                                                          start_operator):
    start_operator()
    name = "klein"
    job = sandbox.quickstart_job(
        data_dir, name,
        model={"family": FAMILY, "uri": flux2_klein_model},
        training={"stepsPerEpoch": 2, "checkpointEverySteps": 2, "validationPrompts": ["a red circle"]},
        resources={"numNodes": 1},
        output={"uri": f"/data/output/{name}", "formats": ["diffusers", "comfyui"]},
    )
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)
    final = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, name, JOB_TIMEOUT, interval=0.5)
    status = final["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == 2

    out = data_dir / "output" / name
    with safe_open(str(out / contract.ARTIFACT_LORA_DIFFUSERS), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert metadata["lorakube_family"] == FAMILY
    assert "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight" in keys
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    with safe_open(str(out / contract.ARTIFACT_LORA_COMFYUI), "pt") as f:
        comfy = set(f.keys())
    assert {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_single_blocks_0_linear1.alpha",
            "lora_unet_double_blocks_0_txt_mlp_2.lora_up.weight"} <= comfy
    published = {Path(a["uri"]).name for a in status["artifacts"]}
    assert {contract.ARTIFACT_LORA_DIFFUSERS, contract.ARTIFACT_LORA_COMFYUI, contract.ARTIFACT_VALIDATION_GRID} <= published
