"""The stock strategies on a real GPU (skipped without CUDA): DDP/single device and Lightning's
DeepSpeed ZeRO-1/2/3 presets exactly as the operator configures them, bf16-mixed, on the tiny
FLUX pipeline. Prints step time and peak GPU memory per strategy.

    python -m pytest -s tests/gpu/test_deepspeed_gpu.py
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakube_api import contract
from lorakube_trainer import checkpoint as ckpt
from lorakube_dev.tiny import build_tiny_pipeline

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DATASET = Path(__file__).resolve().parents[2] / "examples" / "dataset"
STEPS = 8


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline("flux", tmp_path_factory.mktemp("tiny") / "flux")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(model: Path, out: Path, strategy: str, precision: str, *extra: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "lorakube_trainer", "--model_family", "flux", "--model_path", str(model),
           "--dataset_path", str(DATASET), "--output_path", str(out), "--height", "64", "--width", "64",
           "--precision", precision, "--training_strategy", strategy, "--accelerator", "gpu", "--devices", "1",
           "--steps_per_epoch", str(STEPS), "--batch_size", "2", "--checkpoint_every_n_steps", "4",
           "--validation_inference_steps", "2", "--use_gradient_checkpointing", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = [json.loads(x) for x in (out / contract.ARTIFACT_METRICS).read_text().splitlines()]
    timings = {t["step"]: t for t in map(json.loads, (out / contract.ARTIFACT_TIMINGS).read_text().splitlines())}
    return [{**m, **timings[m["step"]]} for m in metrics]          # elapsed_s and peak memory live in timings


@pytest.mark.parametrize(("strategy", "precision"), [
    ("auto", "bf16-mixed"), ("auto", "16-mixed"),
    ("deepspeed_stage_1", "bf16-mixed"), ("deepspeed_stage_2", "bf16-mixed"), ("deepspeed_stage_3", "bf16-mixed"),
])
def test_stock_strategy_trains_and_writes_one_lora(strategy: str, precision: str, tiny_flux: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    metrics = _train(tiny_flux, out, strategy, precision)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["loss"] == m["loss"] for m in metrics)                      # no NaN
    lora = load_file(str(out / contract.ARTIFACT_LORA_DIFFUSERS))           # one gathered file
    assert lora and all(v.numel() > 0 and torch.isfinite(v.float()).all() for v in lora.values())
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)   # B moved from its zero init
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(metrics, metrics[1:])]
    print(f"\n[{strategy} {precision}] median step {statistics.median(times) * 1000:.1f} ms, "
          f"peak GPU memory {metrics[-1]['gpu_max_memory_mb']:.1f} MiB, final loss {metrics[-1]['loss']:.4f}, "
          f"device {torch.cuda.get_device_name(0)}")


@pytest.mark.parametrize("strategy", ["auto", "deepspeed_stage_2"])
def test_resume_on_gpu_continues_from_the_checkpoint(strategy: str, tiny_flux: Path, tmp_path: Path) -> None:
    """A finished run extended by one epoch resumes from its last checkpoint (16-mixed: the grad
    scaler's state travels too; DeepSpeed: LoRA, step, RNG and data position)."""
    out = tmp_path / "out"
    precision = "16-mixed" if strategy == "auto" else "bf16-mixed"
    _train(tiny_flux, out, strategy, precision)
    metrics = _train(tiny_flux, out, strategy, precision, "--max_epochs", "2")
    assert [m["step"] for m in metrics] == list(range(1, 2 * STEPS + 1))     # 1..8 kept, 9..16 new
    folder = out / contract.DEFAULT_CHECKPOINT_SUBDIR / contract.checkpoint_dir_name(2 * STEPS)
    state = torch.load(folder / ckpt.STATE_FILE, weights_only=False)
    assert state["step"] == 2 * STEPS
    if strategy == "auto":
        assert state["grad_scaler"] is not None and state["optimizer"]["state"]
