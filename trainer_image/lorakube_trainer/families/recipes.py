"""Training objectives as data plus the pure tensor maths behind them.

Two objectives cover the families:

* rectified flow (FLUX, FLUX.2, SD3): x_t = (1 - σ)·x0 + σ·ε, the denoiser predicts the velocity ε - x0.
  σ is drawn per sample from the *shifted* 1000-point grid the family's scheduler samples at
  inference, so training spends its steps where inference does (high noise for large images).
* DDPM (Kolors ε-prediction, Hunyuan-DiT v-prediction): x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε with a
  scaled-linear β schedule; the target is ε, or v = √ᾱ_t·ε - √(1-ᾱ_t)·x0.

Every random draw uses torch's global RNG on the latents' device (the trainer checkpoints that RNG,
which is what makes a resumed run bit-identical), and draws one timestep per sample.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

import torch

FlowSampling = Literal["logit_normal", "uniform"]
FlowWeighting = Literal["none", "bell"]
Prediction = Literal["epsilon", "v_prediction"]


@dataclasses.dataclass(frozen=True)
class FlowMatchingRecipe:
    """Rectified-flow recipe.

    sampling "logit_normal" (SD3 paper; diffusers' default for SD3) concentrates draws on mid-range
    noise levels with a uniform loss weight. DiffSynth's Lightning trainer drew the grid index
    uniformly and weighted the loss with a bell curve over t ("bell"); both are available, and the
    default is logit-normal sampling with no weighting, so the loss is a plain MSE whose value is
    comparable across steps.
    """

    num_train_timesteps: int = 1000
    sampling: FlowSampling = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting: FlowWeighting = "none"
    # FLUX.1-dev and FLUX.2 dev are guidance-distilled: while training, the guidance embedding gets
    # this (1.0 unless --guidance_scale says otherwise; inference uses ~3.5-4). None: no embedding.
    guidance: float | None = None


@dataclasses.dataclass(frozen=True)
class DDPMRecipe:
    prediction: Prediction
    beta_start: float
    beta_end: float
    num_train_timesteps: int
    beta_schedule: Literal["scaled_linear"] = "scaled_linear"


# --- rectified flow ---------------------------------------------------------------------------

def flow_base_sigmas(n: int) -> torch.Tensor:
    """The unshifted inference grid σ = 1, ..., 1/n (what FlowMatchEulerDiscreteScheduler builds)."""
    return torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)


def shift_sigmas_static(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift: σ' = s·σ / (1 + (s - 1)·σ); s > 1 moves mass towards pure noise."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def shift_sigmas_exponential(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's resolution-dependent shift: σ' = e^μ / (e^μ + (1/σ - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def dynamic_shift_mu(
    image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float
) -> float:
    """μ grows linearly with the number of image tokens (FLUX: 0.5 at 256 tokens, 1.15 at 4096)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift μ, fitted by Black Forest Labs: linear in the image token count, and below
    4300 tokens also linear in the number of sampling steps (interpolating fits at 10 and 200 steps)."""
    at_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(at_200)
    at_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    slope = (at_200 - at_10) / 190.0
    return float(at_200 + slope * (num_steps - 200))


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """The scheduler's `shift_terminal`: 1 - σ scaled so that the grid ends at σ = terminal."""
    one_minus = 1.0 - sigmas
    return 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))


def shifted_sigma_grid(scheduler_config: Mapping[str, Any], image_seq_len: int, n: int) -> torch.Tensor:
    """The σ grid the family's own scheduler config implies at this resolution.

    With `use_dynamic_shifting` (FLUX) the shift depends on the image token count exactly as at
    inference; otherwise the static `shift` of the config applies (SD3/SD3.5: 3.0). A config's
    `shift_terminal` (Qwen-Image: 0.02) then stretches the grid to end there, as set_timesteps does.
    """
    base = flow_base_sigmas(n)
    if scheduler_config.get("use_dynamic_shifting", False):
        mu = dynamic_shift_mu(
            image_seq_len,
            int(scheduler_config.get("base_image_seq_len", 256)),
            int(scheduler_config.get("max_image_seq_len", 4096)),
            float(scheduler_config.get("base_shift", 0.5)),
            float(scheduler_config.get("max_shift", 1.15)),
        )
        grid = shift_sigmas_exponential(base, mu)
    else:
        grid = shift_sigmas_static(base, float(scheduler_config.get("shift", 1.0)))
    terminal = scheduler_config.get("shift_terminal")
    return stretch_to_terminal(grid, float(terminal)) if terminal else grid


def sample_grid_indices(batch: int, n: int, recipe: FlowMatchingRecipe, device: torch.device) -> torch.Tensor:
    """One index into the n-point grid per sample."""
    if recipe.sampling == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, device=device) * recipe.logit_std + recipe.logit_mean)
    elif recipe.sampling == "uniform":
        u = torch.rand(batch, device=device)
    else:
        raise ValueError(f"unknown flow sampling {recipe.sampling!r}; use 'logit_normal' or 'uniform'")
    return (u * n).long().clamp_(0, n - 1)


def sample_flow_sigmas(grid: torch.Tensor, batch: int, recipe: FlowMatchingRecipe, device: torch.device) -> torch.Tensor:
    idx = sample_grid_indices(batch, grid.numel(), recipe, device)
    return grid.to(device=device, dtype=torch.float32)[idx]


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d σ: what the flow denoiser predicts."""
    return noise - x0


def flow_loss_weights(sigmas: torch.Tensor, recipe: FlowMatchingRecipe) -> torch.Tensor:
    """Per-sample loss weights. "bell": exp(-2·((t - 500)/1000)²) over t = 1000·σ, shifted so the
    grid's minimum is 0 and normalised to mean 1 over the grid (DiffSynth's weighting)."""
    if recipe.weighting == "none":
        return torch.ones_like(sigmas, dtype=torch.float32)
    if recipe.weighting == "bell":
        n = recipe.num_train_timesteps
        grid_t = flow_base_sigmas(n).to(torch.float32) * n

        def bell(t: torch.Tensor) -> torch.Tensor:
            return torch.exp(-2.0 * ((t - n / 2) / n) ** 2)

        lo = bell(grid_t).min()
        norm = (bell(grid_t) - lo).mean()
        return ((bell(sigmas.float() * n) - lo) / norm).to(torch.float32)
    raise ValueError(f"unknown flow loss weighting {recipe.weighting!r}; use 'none' or 'bell'")


# --- DDPM -------------------------------------------------------------------------------------

def ddpm_betas(recipe: DDPMRecipe) -> torch.Tensor:
    if recipe.beta_schedule != "scaled_linear":
        raise ValueError(f"unsupported beta schedule {recipe.beta_schedule!r}")
    # scaled_linear: linear in √β (the Stable Diffusion / SDXL family schedule).
    return torch.linspace(
        recipe.beta_start ** 0.5, recipe.beta_end ** 0.5, recipe.num_train_timesteps, dtype=torch.float64
    ) ** 2


def ddpm_alphas_cumprod(recipe: DDPMRecipe) -> torch.Tensor:
    return torch.cumprod(1.0 - ddpm_betas(recipe), dim=0)


def sample_ddpm_timesteps(batch: int, recipe: DDPMRecipe, device: torch.device) -> torch.Tensor:
    """One integer timestep per sample, uniform over 0 .. num_train_timesteps - 1."""
    return torch.randint(0, recipe.num_train_timesteps, (batch,), device=device)


def _coeffs(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = alphas_cumprod.to(device=like.device)[timesteps].to(torch.float32)
    shape = (-1, *([1] * (like.dim() - 1)))
    return a.sqrt().view(shape), (1.0 - a).sqrt().view(shape)


def ddpm_add_noise(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    sa, s1a = _coeffs(alphas_cumprod, timesteps, x0)
    return (sa * x0.float() + s1a * noise.float()).to(x0.dtype)


def ddpm_target(
    x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction: Prediction
) -> torch.Tensor:
    if prediction == "epsilon":
        return noise.float()
    if prediction == "v_prediction":
        sa, s1a = _coeffs(alphas_cumprod, timesteps, x0)
        return sa * noise.float() - s1a * x0.float()
    raise ValueError(f"unknown prediction type {prediction!r}")


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32: per-sample means, optionally weighted, then the batch mean."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()
