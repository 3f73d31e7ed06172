"""What the families share: loading and freezing a pipeline, peft LoRA injection, state dicts,
the diffusers-layout file, VAE encoding. Each family module adds only what differs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import torch

from lorakube_api.contract import SIZE_MULTIPLE

from ..files import save_safetensors
# PIPELINE_FAMILIES is re-exported: it lives with the torch-free folder check preflight runs too.
from ..pipeline_folder import PIPELINE_FAMILIES, ModelFolderMissing, check_pipeline_folder  # noqa: F401
from . import lora_keys
from .base import Family


def freeze_pipeline(pipe: Any) -> None:
    """Every component frozen and in eval mode; LoRA layers added later are the only trainables."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.eval()


def target_regex(targets: list[str]) -> str:
    """One regular expression (peft matches a string target with re.fullmatch) for a list of targets
    under peft's rule for lists, a module path that equals a target or ends with "." + target, where
    a "*" segment stands for any one path segment (a block index): `single_transformer_blocks.*.proj_out`
    names those layers without the top-level proj_out."""
    def one(target: str) -> str:
        return r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in target.split("."))

    return rf"(?:.*\.)?(?:{'|'.join(one(t) for t in targets)})"


def _linear_names(denoiser: torch.nn.Module) -> list[str]:
    return [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)]


def unmatched_targets(denoiser: torch.nn.Module, targets: list[str]) -> list[str]:
    names = _linear_names(denoiser)
    return [t for t in targets if not any(re.fullmatch(target_regex([t]), n) for n in names)]


def linear_layer_patterns(denoiser: torch.nn.Module) -> list[str]:
    """Every linear layer's path with block indices as "*": the targets a user can choose from."""
    return sorted({re.sub(r"(?<=\.)\d+(?=\.)", "*", n) for n in _linear_names(denoiser)})


def make_lora_config(rank: int, alpha: float, targets: list[str], dropout: float = 0.0) -> Any:
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"--lora_rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"--lora_alpha must be > 0, got {alpha}")
    # init_lora_weights=True: peft's default (Kaiming-uniform A, zero B), so the adapter starts as
    # an exact no-op and step 0 reproduces the base model.
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_regex(list(targets)), init_lora_weights=True,
                      lora_dropout=dropout)


def avoid_cudnn_attention_backward() -> None:
    """Route training attention away from cuDNN's SDPA kernels (flash / memory-efficient instead).

    With torch 2.11+ on H100/H200, cuDNN's SDPA backward returns NaN gradients for some shapes
    while its forward is fine (pytorch/pytorch#196678; huggingface/trl#7181 sees it on 2.13). The
    tiny FLUX model hits it on an H200 in bf16: finite loss, NaN LoRA gradients after one step,
    and `ScaledDotProductCudnnAttentionBackward0` is the op that anomaly mode names. The switch is
    process-wide on purpose: gradient checkpointing recomputes attention during backward, outside
    any context manager around the forward, and must pick the same kernel. No-op without CUDA.
    """
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def mark_only_lora_trainable(denoiser: torch.nn.Module) -> None:
    """LoRA tensors trainable and in fp32 (AdamW on bf16/fp16 weights loses small updates; peft
    casts activations to the LoRA dtype and back), everything else frozen."""
    for name, param in denoiser.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        param.requires_grad_(is_lora)
        if is_lora and param.dtype != torch.float32:
            param.data = param.data.float()


class PeftFamily(Family):
    """Shared implementation; subclasses set the class constants and the model-specific methods."""

    pipeline_class_name: ClassVar[str]
    # Whether the VAE must encode in fp32 when the pipeline is loaded in fp16 (SDXL's VAE, used by
    # Kolors and Hunyuan-DiT, overflows in fp16; its config says so with force_upcast).
    vae_fp16_unsafe: ClassVar[bool] = False
    # Key prefix of the kohya/ComfyUI export (see lora_keys' module docstring).
    comfyui_prefix: ClassVar[str] = ""
    # Classifier-free guidance scale for validation images.
    inference_guidance: ClassVar[float]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.size_multiple = SIZE_MULTIPLE[cls.name]

    # --- loading ------------------------------------------------------------------------------

    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load_pipeline(self, model_path: str | Path, dtype: torch.dtype) -> Any:
        path = Path(model_path)
        try:
            check_pipeline_folder(path, self.name)
        except ModelFolderMissing as exc:
            raise FileNotFoundError(str(exc)) from exc
        pipe = self.pipeline_class().from_pretrained(str(path), dtype=dtype, **self.preloaded_components(path))
        freeze_pipeline(pipe)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def preloaded_components(self, path: Path) -> dict[str, Any]:
        """Components the family loads itself (passed to from_pretrained, which then skips them)."""
        return {}

    # --- VAE ------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior mean, shifted and scaled. The mean (not a sample) keeps latent caching
        deterministic: every rank writes bit-identical cache files."""
        vae = pipe.vae
        upcast = self.vae_fp16_unsafe and vae.dtype == torch.float16
        if upcast:
            vae.to(torch.float32)
        try:
            latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        finally:
            if upcast:
                vae.to(torch.float16)
        shift = vae.config.get("shift_factor") or 0.0
        return ((latents.float() - shift) * vae.config.scaling_factor).to(self.denoiser(pipe).dtype)

    # --- LoRA -----------------------------------------------------------------------------------

    def add_lora(self, denoiser: torch.nn.Module, rank: int, alpha: float, targets: list[str],
                 dropout: float = 0.0) -> None:
        targets = list(targets) or list(self.default_lora_targets)
        missing = unmatched_targets(denoiser, targets)
        if missing:
            original = f"the original framework's {','.join(self.original_target_names)} or " \
                if self.original_target_names else ""
            raise ValueError(
                f"--lora_target_modules: {', '.join(missing)} match no linear layer of the {self.name} "
                f"denoiser; valid names are {original}diffusers module paths or their last parts, with * for a "
                f"block index: {','.join(linear_layer_patterns(denoiser))} "
                f"(the default is {','.join(self.default_lora_targets)})"
            )
        self._inject(denoiser, make_lora_config(rank, alpha, targets, dropout))
        mark_only_lora_trainable(denoiser)
        # Adding LoRA means this process is about to train.
        avoid_cudnn_attention_backward()

    def _inject(self, denoiser: torch.nn.Module, config: Any) -> None:
        denoiser.add_adapter(config)

    def enable_gradient_checkpointing(self, denoiser: torch.nn.Module) -> None:
        denoiser.enable_gradient_checkpointing()

    def lora_state_dict(self, denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(denoiser).items()}

    def set_lora_state_dict(self, denoiser: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = set(self.lora_state_dict(denoiser))
        if set(state) != expected:
            extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
            raise ValueError(
                f"LoRA state does not fit this denoiser: unexpected {extra[:3]}, missing {missing[:3]} "
                f"(was it trained with other --lora_target_modules?)"
            )
        set_peft_model_state_dict(denoiser, state)

    # --- files ----------------------------------------------------------------------------------

    def save_diffusers_lora(self, state: dict[str, torch.Tensor], path: Path, rank: int, alpha: float) -> None:
        tensors, metadata = lora_keys.to_diffusers_layout(state, self.denoiser_attr, rank, alpha, self.name)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, Path(path), metadata)

    def read_diffusers_lora(self, path: Path) -> tuple[dict[str, torch.Tensor], int, float]:
        tensors, metadata = lora_keys.load_safetensors(Path(path))
        state, config = lora_keys.from_diffusers_layout(tensors, metadata, self.denoiser_attr)
        return state, int(config["r"]), float(config["lora_alpha"])

    def to_comfyui(self, state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
        return lora_keys.to_kohya_flat(state, self.comfyui_prefix, alpha)

    def load_lora_into_pipeline(self, pipe: Any, path: Path) -> None:
        # diffusers reads lora_adapter_metadata, so the LoraConfig (rank, alpha, targets) round-trips.
        pipe.load_lora_weights(str(path))

    # --- validation images ------------------------------------------------------------------------

    def generate(self, pipe: Any, prompt: str, seed: int, height: int, width: int, steps: int) -> Any:
        """Same seed -> same initial noise: the noise comes from a private CPU generator, so the
        trainer's global RNG stream is left untouched."""
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            return pipe(
                prompt=prompt, height=height, width=width, num_inference_steps=steps,
                generator=generator, output_type="pil", **self.generate_kwargs(),
            ).images[0]

    def generate_kwargs(self) -> dict[str, Any]:
        return {"guidance_scale": self.inference_guidance}


def latent_pixel_size(pipe: Any, latents: torch.Tensor) -> tuple[int, int]:
    """(height, width) in pixels of a latent batch."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return latents.shape[-2] * factor, latents.shape[-1] * factor
