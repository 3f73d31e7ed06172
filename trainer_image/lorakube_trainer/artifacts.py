"""What rank 0 leaves under --output_path, with names from lorakube.contract.

Order matters: the LoRA files (each checked by loading it into a fresh pipeline), the training
config, metrics, the validation grid and the model card first; manifest.json (sha256 + bytes of
each) last and atomically, so a reader that finds the manifest finds every file it lists.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from lorakube import contract

from .checkpoint import sha256_file
from .families.base import Family


class ArtifactCheckError(RuntimeError):
    """A written LoRA file did not load back correctly."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """metrics.jsonl, one JSON object per optimizer step. On resume, lines past the resumed step
    (written by the interrupted attempt after its last checkpoint) are dropped, since those steps
    run again."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    continue            # a line cut short by the interruption
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


def save_comfyui(family: Family, state: dict[str, torch.Tensor], path: Path, rank: int, alpha: float) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in family.to_comfyui(state, rank, alpha).items()}
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
                                            "ss_base_model_family": family.name})


_ADAPTER_SEGMENT = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")


def loaded_lora_tensors(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA parameters of a pipeline's denoiser keyed like peft's state dict (adapter name dropped)."""
    return {_ADAPTER_SEGMENT.sub(r".\1.weight", name): p.detach()
            for name, p in denoiser.named_parameters() if _ADAPTER_SEGMENT.search(name)}


def check_loaded(family: Family, pipe: Any, state: dict[str, torch.Tensor], path: Path) -> None:
    """After family.load_lora_into_pipeline(pipe, path): every trained tensor is in the denoiser, equal."""
    loaded = loaded_lora_tensors(family.denoiser(pipe))
    prefix = f"{family.denoiser_attr}."
    missing, different = [], []
    for key, tensor in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        got = loaded.get(name)
        if got is None:
            missing.append(name)
        elif not torch.allclose(got.float().cpu(), tensor.float().cpu(), rtol=1e-2, atol=1e-3):
            different.append(name)
    if missing or different:
        raise ArtifactCheckError(
            f"{path.name} did not load back into a fresh {family.name} pipeline: "
            f"{len(missing)} tensor(s) missing (e.g. {missing[:3]}), {len(different)} different (e.g. {different[:3]})"
        )


def check_comfyui(path: Path, state: dict[str, torch.Tensor], alpha: float) -> None:
    """The ComfyUI/kohya file: down/up pairs with an alpha each, holding every trained value."""
    tensors = load_file(str(path))
    downs = {k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")}
    ups = {k[: -len(".lora_up.weight")] for k in tensors if k.endswith(".lora_up.weight")}
    alphas = {k[: -len(".alpha")]: v for k, v in tensors.items() if k.endswith(".alpha")}
    problems = []
    if not downs or downs != ups:
        problems.append("lora_down/lora_up keys do not pair up")
    if set(alphas) != downs:
        problems.append("some modules lack an alpha")
    if any(abs(float(v) - alpha) > 1e-6 for v in alphas.values()):
        problems.append(f"alpha differs from {alpha:g}")
    # Fused layouts (FLUX's qkv) concatenate tensors, so compare totals rather than key by key.
    trained = sum(v.numel() for v in state.values())
    exported = sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha"))
    if exported < trained:
        problems.append(f"holds {exported} values, fewer than the {trained} trained")
    if any(not torch.isfinite(v.float()).all() for v in tensors.values()):
        problems.append("contains NaN/inf")
    if problems:
        raise ArtifactCheckError(f"{path.name}: " + "; ".join(problems))


def write_json(path: Path, body: Any) -> None:
    atomic_write_text(path, json.dumps(body, indent=2, sort_keys=True, default=str) + "\n")


def write_model_card(path: Path, *, family: str, model_path: str, rank: int, alpha: float, steps: int,
                     targets: Iterable[str], prompts: Iterable[str], formats: Iterable[str]) -> None:
    lines = [
        f"# LoRA for {family}",
        "",
        f"Trained with lorakube on `{Path(model_path).name}` for {steps} optimizer steps.",
        "",
        f"- rank {rank}, alpha {alpha:g} (scale alpha/rank = {alpha / rank:g})",
        f"- target modules: {', '.join(targets)}",
        f"- validation prompts: {'; '.join(prompts)}",
        "",
        "## Files",
    ]
    if "diffusers" in formats:
        lines += [f"- `{contract.ARTIFACT_LORA_DIFFUSERS}`: diffusers/peft keys; "
                  "`pipe.load_lora_weights(folder)` (alpha in the file's metadata)"]
    if "comfyui" in formats:
        lines += [f"- `{contract.ARTIFACT_LORA_COMFYUI}`: kohya/ComfyUI keys with a per-module alpha; "
                  "put it in ComfyUI's `models/loras`"]
    lines += [f"- `{contract.ARTIFACT_VALIDATION_GRID}`: top row base model, bottom row with this LoRA (same seed)",
              f"- `{contract.ARTIFACT_MANIFEST}`: sha256 and size of every file", ""]
    atomic_write_text(path, "\n".join(lines))


def write_manifest(output: Path, names: Iterable[str]) -> dict[str, Any]:
    files = {}
    for name in sorted(set(names)):
        path = output / name
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    body = {"files": files}
    write_json(output / contract.ARTIFACT_MANIFEST, body)
    return body


def upload_to_modelscope(output: Path, model_id: str, token: str, names: Iterable[str]) -> None:
    """Push the final files (not the checkpoints) to a ModelScope model repo."""
    try:
        from modelscope.hub.api import HubApi
    except ImportError as exc:
        raise RuntimeError("--modelscope_model_id needs the `modelscope` package, which is not installed in this "
                           "image; pip install modelscope or drop the flag") from exc
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in names:
            shutil.copy2(output / name, folder / name)
        (folder / "configuration.json").write_text(
            json.dumps({"framework": "Pytorch", "task": "text-to-image-synthesis"}))
        api = HubApi()
        api.login(token)
        api.push_model(model_id=model_id, model_dir=str(folder))
