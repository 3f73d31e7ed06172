"""A BoringModel-style Family for testing the general trainer without diffusers models.

A real (tiny) pipeline object with a conv "VAE", a byte-embedding "text encoder" and a small
denoiser with named linear layers for LoRA; rectified-flow loss with one timestep per sample drawn
from torch's global RNG, exactly as the Family contract asks. It also records what the trainer did
to it (gradient checkpointing, batch shapes) so tests can assert that flags took effect.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakube_trainer.families.base import Family
from lorakube_trainer.files import save_safetensors

LATENT = 4
HIDDEN = 16


class ToyDenoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(LATENT, HIDDEN)
        self.to_q = nn.Linear(HIDDEN, HIDDEN)
        self.to_k = nn.Linear(HIDDEN, HIDDEN)
        self.to_out = nn.Linear(HIDDEN, LATENT)
        self.gradient_checkpointing = False
        self.checkpoint_calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_in.weight.dtype

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_q(x) * torch.sigmoid(self.to_k(x))

    def forward(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        x = self.proj_in(latents.flatten(2).transpose(1, 2)) + text[:, None, :] + t[:, None, None]
        if self.gradient_checkpointing and self.training:
            self.checkpoint_calls += 1
            x = checkpoint(self._block, x, use_reentrant=False)
        else:
            x = self._block(x)
        return self.to_out(x).transpose(1, 2).reshape(b, c, h, w)


class ToyPipe:
    def __init__(self) -> None:
        self.vae = nn.Conv2d(3, LATENT, kernel_size=8, stride=8)
        self.text_encoder = nn.Embedding(256, HIDDEN)
        self.denoiser = ToyDenoiser()

    @property
    def components(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "denoiser": self.denoiser}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v for n, m in self.components.items() for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, m in self.components.items():
            m.load_state_dict({k[len(n) + 1:]: v for k, v in state.items() if k.startswith(n + ".")})


def save_toy_model(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(ToyPipe().state_dict(), str(folder / "toy.safetensors"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipe"}))
    return folder


class ToyFamily(Family):
    name = "flux"                   # reuses flux's contract entries (size multiple 16)
    denoiser_attr = "denoiser"
    default_lora_targets = ("to_q", "to_k")
    size_multiple = 16

    def __init__(self) -> None:
        self.batch_shapes: list[tuple[int, ...]] = []
        self.prompts_seen: list[str] = []
        self.gc_enabled = False
        self.training_guidance: float | None = None     # what --guidance_scale set (the toy has no embedding)

    def load_pipeline(self, model_path: str | Path, dtype: torch.dtype) -> ToyPipe:
        pipe = ToyPipe()
        pipe.load_state_dict(load_file(str(Path(model_path) / "toy.safetensors")))
        for m in pipe.components.values():
            m.to(dtype).requires_grad_(False).eval()
        return pipe

    def encode_prompts(self, pipe: ToyPipe, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        self.prompts_seen.extend(prompts)
        ids = [torch.tensor(list(p.encode()[:32]) or [0], device=device) for p in prompts]
        return {"text": torch.stack([pipe.text_encoder(i).mean(0) for i in ids])}

    def encode_images(self, pipe: ToyPipe, pixels: torch.Tensor) -> torch.Tensor:
        self.batch_shapes.append(tuple(pixels.shape))
        return pipe.vae(pixels.to(pipe.vae.weight.dtype))

    def training_loss(self, pipe: ToyPipe, denoiser: nn.Module, latents: torch.Tensor,
                      cond: dict[str, torch.Tensor]) -> torch.Tensor:
        b = latents.shape[0]
        t = torch.rand(b, device=latents.device)                     # one timestep per sample
        noise = torch.randn_like(latents, dtype=torch.float32)
        x0 = latents.float()
        noisy = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        dtype = denoiser.dtype
        pred = denoiser(noisy.to(dtype), t.to(dtype), cond["text"].to(dtype))
        return torch.nn.functional.mse_loss(pred.float(), noise - x0)

    def add_lora(self, denoiser: nn.Module, rank: int, alpha: float, targets: list[str],
                 dropout: float = 0.0) -> None:
        missing = [t for t in targets if not hasattr(denoiser, t)]
        if missing:
            raise ValueError(f"--lora_target_modules: {missing} match no layer")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                           init_lora_weights="gaussian", lora_dropout=dropout), denoiser)
        for name, p in denoiser.named_parameters():
            p.requires_grad_(".lora_" in name)

    def set_training_guidance(self, scale: float, denoiser: nn.Module) -> None:
        self.training_guidance = scale

    def enable_gradient_checkpointing(self, denoiser: nn.Module) -> None:
        self.gc_enabled = True
        denoiser.gradient_checkpointing = True

    def lora_state_dict(self, denoiser: nn.Module) -> dict[str, torch.Tensor]:
        return dict(get_peft_model_state_dict(denoiser))

    def set_lora_state_dict(self, denoiser: nn.Module, state: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(denoiser, state)

    def save_diffusers_lora(self, state: dict[str, torch.Tensor], path: Path, rank: int, alpha: float) -> None:
        # The trainer's writer, as the real families use it (mode, atomic rename, stable bytes).
        save_safetensors({f"denoiser.{k}": v for k, v in state.items()}, path,
                         {"lora_rank": str(rank), "lora_alpha": f"{alpha:g}"})

    def read_diffusers_lora(self, path: Path) -> tuple[dict[str, torch.Tensor], int, float]:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        if "lora_rank" not in meta or any(not k.startswith("denoiser.") for k in tensors):
            raise ValueError(f"{path} is not a toy LoRA")
        state = {k[len("denoiser."):]: v for k, v in tensors.items()}
        return state, int(meta["lora_rank"]), float(meta["lora_alpha"])

    def to_comfyui(self, state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state.items():
            module = "lora_toy_" + key.split(".lora_")[0].replace(".", "_")
            out[f"{module}.{'lora_down' if '.lora_A.' in key else 'lora_up'}.weight"] = value
            out[f"{module}.alpha"] = torch.tensor(float(alpha))
        return out

    def load_lora_into_pipeline(self, pipe: ToyPipe, path: Path) -> None:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        state = {k[len("denoiser."):]: v for k, v in load_file(str(path)).items()}
        targets = sorted({k.split(".")[0] for k in state})
        self.add_lora(pipe.denoiser, int(meta["lora_rank"]), float(meta["lora_alpha"]), targets)
        self.set_lora_state_dict(pipe.denoiser, state)

    def generate(self, pipe: ToyPipe, prompt: str, seed: int, height: int, width: int, steps: int) -> Image.Image:
        g = torch.Generator().manual_seed(seed)
        dtype = pipe.denoiser.dtype
        x = torch.randn(1, LATENT, height // 8, width // 8, generator=g).to(dtype)
        text = self.encode_prompts(pipe, [prompt], torch.device("cpu"))["text"].to(dtype)
        for i in range(steps):
            t = torch.full((1,), 1 - i / steps, dtype=dtype)
            x = x - pipe.denoiser(x, t, text) / steps
        rgb = torch.nn.functional.interpolate(x[:, :3].float(), scale_factor=8)[0]
        arr = ((rgb.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
        return Image.fromarray(np.ascontiguousarray(arr))
