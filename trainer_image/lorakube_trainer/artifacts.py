"""What rank 0 leaves under --output_path, with names from lorakube_api.contract.

Order matters: the LoRA files (each checked by loading it into a fresh pipeline), the training
config, metrics, the validation grid and the model card first; manifest.json (sha256 + bytes of
each) last and atomically, so a reader that finds the manifest finds every file it lists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file

from lorakube_api import contract

from .checkpoint import sha256_file
from .families.base import Family
from .files import atomic_write_text, save_safetensors


class ArtifactCheckError(RuntimeError):
    """A written LoRA file did not load back correctly."""


# Fields of a step record that measure the machine rather than the training: they go to
# timings.jsonl, so that metrics.jsonl (and the manifest hashing it) is the same in a rerun.
WALL_CLOCK_FIELDS = ("elapsed_s", "gpu_max_memory_mb")


class MetricsWriter:
    """metrics.jsonl (step, epoch, loss, lr) and timings.jsonl (step + WALL_CLOCK_FIELDS), one JSON
    object per optimizer step each. On resume, lines past the resumed step (written by the
    interrupted attempt after its last checkpoint) are dropped, since those steps run again."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.timings_path = path.with_name(contract.ARTIFACT_TIMINGS)
        path.parent.mkdir(parents=True, exist_ok=True)
        for file in (self.path, self.timings_path):
            _truncate_after(file, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        timings = {k: record[k] for k in WALL_CLOCK_FIELDS if k in record}
        metrics = {k: v for k, v in record.items() if k not in timings}
        for file, body in ((self.path, metrics), (self.timings_path, {"step": record["step"], **timings})):
            with file.open("a") as fh:
                fh.write(json.dumps(body, sort_keys=True) + "\n")


def _lines_upto(path: Path, step: int) -> list[str]:
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue            # a line cut short by the interruption
    return kept


def _truncate_after(path: Path, step: int) -> None:
    atomic_write_text(path, "".join(f"{line}\n" for line in _lines_upto(path, step)))


METRICS_FILES = (contract.ARTIFACT_METRICS, contract.ARTIFACT_TIMINGS)


def save_metrics_with_checkpoint(output: Path, folder: Path, step: int) -> list[str]:
    """Rank 0, into the checkpoint of `step` (before its marker, which then hashes them): the metric
    lines of steps 1..`step` from `output`. A checkpoint in a bucket is resumed on any node, whose
    output folder may not hold the earlier lines (a node-local folder, a Hub repo's working folder)."""
    names = []
    for name in METRICS_FILES:
        if (output / name).is_file():
            atomic_write_text(folder / name, "".join(f"{line}\n" for line in _lines_upto(output / name, step)))
            names.append(name)
    return names


def restore_metrics_from_checkpoint(folder: Path, output: Path, step: int) -> list[str]:
    """Rank 0, on resume: the checkpoint's metric lines (steps 1..`step`, as that run wrote them)
    replace the output's, which may lack them (another node's folder) or hold steps past the
    checkpoint (run again now); a checkpoint without them leaves the output's as they are."""
    restored = []
    for name in METRICS_FILES:
        if (folder / name).is_file():
            output.mkdir(parents=True, exist_ok=True)
            atomic_write_text(output / name, "".join(f"{line}\n" for line in _lines_upto(folder / name, step)))
            restored.append(name)
    return restored


def save_comfyui(family: Family, state: dict[str, torch.Tensor], path: Path, rank: int, alpha: float) -> None:
    save_safetensors(family.to_comfyui(state, rank, alpha), path,
                     {"ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
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


def write_model_card(path: Path, *, family: Family, model_path: str, rank: int, alpha: float, steps: int,
                     targets: Iterable[str], prompts: Iterable[str], formats: Iterable[str],
                     guidance: float | None = None) -> None:
    formats = tuple(formats)
    # Said only where there is a guidance embedding: a user who compares LoRAs needs it, and the value
    # used at inference is another (the pipeline's guidance_scale).
    trained_with_guidance = [] if guidance is None else [
        f"- guidance embedding fed {guidance:g} while training ({contract.TRAINING_FLAGS['guidanceScale']}); "
        "generate with the pipeline's own guidance_scale"]
    lines = [
        f"# LoRA for {family.name}",
        "",
        f"Trained with lorakube on `{Path(model_path).name}` for {steps} optimizer steps.",
        "",
        f"- rank {rank}, alpha {alpha:g} (scale alpha/rank = {alpha / rank:g})",
        f"- target modules: {', '.join(targets)}",
        *trained_with_guidance,
        f"- validation prompts: {'; '.join(prompts)}",
        "",
        "## Which file where",
        "",
        *_files_section(family, rank, alpha, formats),
        f"- `{contract.ARTIFACT_VALIDATION_GRID}`: top row base model, bottom row with this LoRA (same seed)",
        f"- `{contract.ARTIFACT_MANIFEST}`: sha256 and size of every file",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _files_section(family: Family, rank: int, alpha: float, formats: tuple[str, ...]) -> list[str]:
    diffusers, comfyui = contract.ARTIFACT_LORA_DIFFUSERS, contract.ARTIFACT_LORA_COMFYUI
    for_comfyui = (f"use `{comfyui}` there" if "comfyui" in formats else
                   f"this run wrote no `{comfyui}` (add comfyui to the output formats to get one)")
    lines = []
    if "diffusers" in formats:
        lines.append(f"- `{diffusers}` (diffusers/peft keys) for diffusers: {family.diffusers_loading}.")
        if not family.comfyui_reads_diffusers_keys:
            lines.append(f"  ComfyUI does not recognise its keys and applies nothing from it: {for_comfyui}.")
        elif alpha != rank:
            lines.append(f"  ComfyUI loads its keys but not its alpha (kept only in the file's metadata), so it applies "
                         f"the LoRA at scale 1 instead of alpha/rank = {alpha / rank:g}: {for_comfyui}.")
        else:
            lines.append(f"  ComfyUI loads its keys but not its alpha (kept only in the file's metadata); with alpha = "
                         f"rank the scale happens to be right, but {for_comfyui}.")
    if "comfyui" in formats:
        lines.append(f"- `{comfyui}` (kohya/ComfyUI keys, a per-module alpha) for ComfyUI and kohya-based tools: "
                     "put it in ComfyUI's `models/loras`.")
    return lines


def write_manifest(output: Path, names: Iterable[str]) -> dict[str, Any]:
    files = {}
    for name in sorted(set(names)):
        path = output / name
        files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    body = {"files": files}
    write_json(output / contract.ARTIFACT_MANIFEST, body)
    return body
