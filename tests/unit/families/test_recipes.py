"""The objectives' maths against closed forms and against diffusers' own schedulers."""

from __future__ import annotations

import contextlib
import json
import math
import types

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from lorakube_dev import tiny
from lorakube_trainer.families import flux, flux2, get_family, hunyuan_dit, kolors, qwen_image, recipes, sd3


def test_flow_interpolation_runs_from_data_to_noise_and_target_is_its_derivative():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.equal(recipes.flow_interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.allclose(recipes.flow_interpolate(x0, noise, torch.ones(3)), noise)
    s, ds = torch.full((3,), 0.3), 1e-3
    numeric = (recipes.flow_interpolate(x0, noise, s + ds) - recipes.flow_interpolate(x0, noise, s)) / ds
    assert torch.allclose(numeric, recipes.flow_target(x0, noise), atol=1e-2)


def test_flow_interpolation_uses_each_samples_own_sigma():
    x0, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    out = recipes.flow_interpolate(x0, noise, torch.tensor([0.25, 0.75]))
    assert out[0].unique().item() == 0.25 and out[1].unique().item() == 0.75


def test_static_shift_matches_the_sd3_scheduler_grid():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    grid = recipes.shifted_sigma_grid(sched.config, image_seq_len=4096, n=1000)
    assert torch.allclose(grid.float(), sched.sigmas[:1000].float(), atol=1e-6)
    assert recipes.shift_sigmas_static(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)
    assert grid[0].item() == pytest.approx(1.0)


def test_dynamic_shift_matches_flux_inference_schedule_at_the_same_resolution():
    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **config)
    seq_len = 64 * 64   # a 1024 px image: 128x128 latents, 2x2 packed
    mu = recipes.dynamic_shift_mu(seq_len, 256, 4096, 0.5, 1.15)
    assert mu == pytest.approx(1.15)
    # e^1.15 ~ 3.16: the static shift kohya recommends for FLUX at 1024 px.
    assert math.exp(mu) == pytest.approx(3.158, abs=1e-3)
    sched.set_timesteps(num_inference_steps=1000, mu=mu)
    grid = recipes.shifted_sigma_grid(sched.config, seq_len, 1000)
    assert torch.allclose(grid.float(), sched.sigmas[:1000].float(), atol=1e-5)
    smaller = recipes.shifted_sigma_grid(sched.config, 16 * 16, 1000)
    assert (smaller <= grid + 1e-12).all(), "fewer image tokens must shift less towards noise"


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform"])
def test_one_sigma_per_sample_from_the_grid(sampling):
    recipe = recipes.FlowMatchingRecipe(sampling=sampling)
    grid = recipes.shifted_sigma_grid({"shift": 3.0}, 1024, 1000)
    torch.manual_seed(0)
    pairs = [recipes.sample_flow_sigmas(grid, 2, recipe, torch.device("cpu")) for _ in range(200)]
    assert sum(int(p[0] != p[1]) for p in pairs) >= 190
    values = torch.cat(pairs)
    assert values.min() >= grid.min().item() - 1e-7 and values.max() <= 1.0
    assert torch.isin(values.double(), grid.float().double()).all()


def test_logit_normal_concentrates_on_the_middle_of_the_grid():
    torch.manual_seed(0)
    idx = recipes.sample_grid_indices(20000, 1000, recipes.FlowMatchingRecipe(), torch.device("cpu")).float()
    assert abs(idx.mean().item() - 500) < 15
    middle = ((idx > 250) & (idx < 750)).float().mean().item()
    assert middle > 0.6   # uniform would give 0.5


def test_flow_sampling_draws_from_the_global_rng():
    recipe = recipes.FlowMatchingRecipe()
    grid = recipes.flow_base_sigmas(1000)
    torch.manual_seed(7)
    a = recipes.sample_flow_sigmas(grid, 4, recipe, torch.device("cpu"))
    torch.manual_seed(7)
    b = recipes.sample_flow_sigmas(grid, 4, recipe, torch.device("cpu"))
    assert torch.equal(a, b)


def test_bell_weighting_has_mean_one_and_zero_weight_at_pure_noise():
    recipe = recipes.FlowMatchingRecipe(weighting="bell")
    grid = recipes.flow_base_sigmas(1000).float()
    w = recipes.flow_loss_weights(grid, recipe)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-4)
    assert w[0].item() == pytest.approx(0.0, abs=1e-6)          # σ = 1
    assert w.argmax().item() == pytest.approx(500, abs=2)       # t = 500
    assert torch.equal(recipes.flow_loss_weights(grid, recipes.FlowMatchingRecipe()), torch.ones(1000))


def test_family_recipe_constants():
    assert flux.RECIPE.guidance == 1.0
    assert sd3.RECIPE.guidance is None
    assert (kolors.RECIPE.prediction, kolors.RECIPE.num_train_timesteps) == ("epsilon", 1100)
    assert (hunyuan_dit.RECIPE.prediction, hunyuan_dit.RECIPE.num_train_timesteps) == ("v_prediction", 1000)


def test_validation_sampling_arguments_per_family():
    assert get_family("flux").generate_kwargs() == {"guidance_scale": 3.5, "max_sequence_length": 512}
    assert get_family("sd3").generate_kwargs() == {"guidance_scale": 5.0, "max_sequence_length": 77}
    assert get_family("kolors").generate_kwargs() == {"guidance_scale": 5.0}
    assert get_family("hunyuan-dit").generate_kwargs() == {"guidance_scale": 5.0, "use_resolution_binning": False}


@pytest.mark.parametrize(
    "recipe, end",
    [(kolors.RECIPE, 0.014), (hunyuan_dit.RECIPE, 0.03)],
    ids=["kolors", "hunyuan-dit"],
)
def test_beta_schedule_endpoints_and_agreement_with_diffusers(recipe, end):
    betas = recipes.ddpm_betas(recipe)
    assert len(betas) == recipe.num_train_timesteps
    assert betas[0].item() == pytest.approx(0.00085)
    assert betas[-1].item() == pytest.approx(end)
    ref = DDPMScheduler(
        num_train_timesteps=recipe.num_train_timesteps, beta_start=recipe.beta_start, beta_end=recipe.beta_end,
        beta_schedule="scaled_linear",
    )
    assert torch.allclose(recipes.ddpm_alphas_cumprod(recipe).float(), ref.alphas_cumprod, rtol=1e-5)


def test_ddpm_noising_and_targets_match_closed_form_and_diffusers():
    recipe = hunyuan_dit.RECIPE
    ac = recipes.ddpm_alphas_cumprod(recipe)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.03, beta_schedule="scaled_linear")
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    noisy = recipes.ddpm_add_noise(x0, noise, ac, t)
    a = ac[900].item()
    assert torch.allclose(noisy[1], math.sqrt(a) * x0[1] + math.sqrt(1 - a) * noise[1], atol=1e-5)
    assert torch.allclose(noisy, ref.add_noise(x0, noise, t), atol=1e-5)
    v = recipes.ddpm_target(x0, noise, ac, t, "v_prediction")
    assert torch.allclose(v[1], math.sqrt(a) * noise[1] - math.sqrt(1 - a) * x0[1], atol=1e-5)
    assert torch.allclose(v, ref.get_velocity(x0, noise, t), atol=1e-5)
    assert torch.equal(recipes.ddpm_target(x0, noise, ac, t, "epsilon"), noise)


def test_one_ddpm_timestep_per_sample():
    torch.manual_seed(0)
    pairs = [recipes.sample_ddpm_timesteps(2, kolors.RECIPE, torch.device("cpu")) for _ in range(200)]
    assert sum(int(p[0] != p[1]) for p in pairs) >= 195
    allt = torch.cat(pairs)
    assert allt.min() >= 0 and allt.max() <= 1099 and allt.max() > 1000


def test_loss_is_fp32_even_for_bf16_predictions():
    pred = torch.randn(2, 4, 4, 4).to(torch.bfloat16)
    loss = recipes.weighted_mse(pred, torch.zeros(2, 4, 4, 4), torch.tensor([1.0, 0.0]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(pred[0].float().pow(2).mean().item() / 2, rel=1e-6)


def test_flux_pack_unpack_round_trip_and_agree_with_the_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 12)
    packed = flux.pack_latents(latents)
    assert packed.shape == (2, 4 * 6, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert torch.equal(flux.unpack_latents(packed, 8, 12), latents)
    assert torch.equal(flux.unpack_latents(packed, 8, 12), FluxPipeline._unpack_latents(packed, 64, 96, 8))
    ids = flux.latent_image_ids(8, 12, torch.device("cpu"), torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 4, 6, torch.device("cpu"), torch.float32))


# --- FLUX.2 klein and dev: one recipe, checked against each pipeline ----------------------------

FLUX2 = ["flux2-klein", "flux2-dev"]


def _flux2_pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, get_family(name).pipeline_class_name)


@pytest.mark.parametrize("module", ["pipeline_flux2_klein", "pipeline_flux2"])
@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 4301, 16384])
@pytest.mark.parametrize("steps", [4, 28, 50])
def test_flux2_empirical_mu_is_the_pipelines(seq_len, steps, module):
    import importlib

    compute_empirical_mu = importlib.import_module(f"diffusers.pipelines.flux2.{module}").compute_empirical_mu
    assert recipes.flux2_empirical_mu(seq_len, steps) == pytest.approx(compute_empirical_mu(seq_len, steps), abs=1e-9)


@pytest.mark.parametrize("name", FLUX2)
@pytest.mark.parametrize("seq_len", [16, 4096])     # the tiny 64 px batch, and a 1024 px image (64x64 tokens)
def test_flux2_sigma_grid_is_the_schedulers_at_the_pipelines_default_steps(tiny_models, seq_len, name):
    import inspect

    from diffusers import FlowMatchEulerDiscreteScheduler

    family = get_family(name)
    # Both pipelines default to 50 steps, the count the training grid takes μ at.
    assert inspect.signature(_flux2_pipeline_class(name).__call__).parameters["num_inference_steps"].default == \
        flux2.SHIFT_STEPS
    config = json.loads((tiny_models[name] / "scheduler" / "scheduler_config.json").read_text())
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    # What the pipeline does, with 1000 steps on the grid and μ of its default 50 steps.
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, 1000), mu=recipes.flux2_empirical_mu(seq_len, flux2.SHIFT_STEPS))
    grid = family.sigma_grid(None, seq_len)
    assert torch.allclose(grid.float(), sched.sigmas[:1000].float(), atol=1e-6)
    if seq_len == 4096:   # μ ≈ 2.02 at 1024 px: far more high-noise draws than FLUX.1's 1.15
        assert recipes.flux2_empirical_mu(seq_len, 50) == pytest.approx(2.02, abs=0.01)


def test_flux2_loss_target_is_the_velocity_the_schedulers_euler_step_integrates(tiny_models):
    """x_t and the target as training builds them: one scheduler step with the target as model output
    lands on the interpolant at the next σ, so predicting the target is exactly what sampling needs."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = json.loads((tiny_models["flux2-klein"] / "scheduler" / "scheduler_config.json").read_text())
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=recipes.flux2_empirical_mu(16, 8))
    x0, noise = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    for i in (0, 3, 6):
        sigma, following = sched.sigmas[i], sched.sigmas[i + 1]
        x_t = recipes.flow_interpolate(x0, noise, sigma.view(1))
        sched._step_index = i
        stepped = sched.step(recipes.flow_target(x0, noise), sched.timesteps[i], x_t, return_dict=False)[0]
        assert torch.allclose(stepped, recipes.flow_interpolate(x0, noise, following.view(1)), atol=1e-5)
        assert torch.allclose(sched.scale_noise(x0, sched.timesteps[i : i + 1], noise), x_t, atol=1e-5)


@pytest.mark.parametrize("name", FLUX2)
def test_flux2_patchify_pack_and_ids_agree_with_the_pipeline(name):
    Flux2KleinPipeline = _flux2_pipeline_class(name)      # klein's or dev's: the same static helpers
    latents = torch.randn(2, 8, 8, 12)
    patches = flux2.patchify(latents)
    assert torch.equal(patches, Flux2KleinPipeline._patchify_latents(latents))
    assert torch.equal(flux2.unpatchify(patches), latents)
    assert torch.equal(flux2.unpatchify(patches), Flux2KleinPipeline._unpatchify_latents(patches))
    tokens = flux2.pack(patches)
    assert tokens.shape == (2, 4 * 6, 32) and torch.equal(tokens, Flux2KleinPipeline._pack_latents(patches))
    ids = flux2.image_ids(4, 6, torch.device("cpu"))
    assert torch.equal(ids, Flux2KleinPipeline._prepare_latent_ids(patches)[0])
    assert torch.equal(flux2.unpack(tokens, 4, 6), Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids[None].expand(2, -1, -1)))
    text = torch.zeros(2, 7, 48)
    assert torch.equal(flux2.text_ids(7, torch.device("cpu")), Flux2KleinPipeline._prepare_text_ids(text)[0])


@pytest.mark.parametrize("name", FLUX2)
def test_flux2_latents_are_the_pipelines_batch_normalised_patches(tiny_models, example_batch, name):
    family = get_family(name)
    pipe = family.load_pipeline(tiny_models[name], torch.float32)
    pixels, _ = example_batch
    ours = family.encode_images(pipe, pixels)
    assert ours.shape == (2, pipe.vae.config.latent_channels, 8, 8)
    reference = pipe._encode_vae_image(pixels, generator=None)      # what image conditioning feeds the model
    assert torch.allclose(flux2.patchify(ours), reference, atol=1e-5)


def test_flux2_recipe_and_sampling_arguments():
    family = get_family("flux2-klein")
    assert flux2.RECIPE.guidance is None and flux2.RECIPE.sampling == "logit_normal"
    assert family.generate_kwargs() == {"guidance_scale": 4.0, "max_sequence_length": 512}
    dev = get_family("flux2-dev")
    assert flux2.DEV_RECIPE.guidance == flux.RECIPE.guidance == 1.0 and flux2.DEV_RECIPE.sampling == "logit_normal"
    # Flux2Pipeline's own defaults: guidance_scale 4.0 (into the embedding), 512 tokens.
    import inspect

    from diffusers import Flux2Pipeline

    defaults = inspect.signature(Flux2Pipeline.__call__).parameters
    assert dev.generate_kwargs() == {"guidance_scale": defaults["guidance_scale"].default,
                                     "max_sequence_length": defaults["max_sequence_length"].default}
    assert tuple(defaults["text_encoder_out_layers"].default) == flux2.DEV_TEXT_LAYERS


def test_flux2_dev_prompts_are_the_pipelines_mistral_embeddings(tiny_models):
    """Mistral 3 after the pipeline's system message, hidden states 10/20/30 stacked per token: what
    Flux2Pipeline.encode_prompt gives with its defaults, and not what the prompt alone would give."""
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE

    family = get_family("flux2-dev")
    pipe = family.load_pipeline(tiny_models["flux2-dev"], torch.float32)
    prompts = ["a red circle", "a blue square"]
    ours = family.encode_prompts(pipe, prompts, torch.device("cpu"))["prompt_embeds"]
    reference, _ = pipe.encode_prompt(prompts, device=torch.device("cpu"))
    assert ours.shape == (2, 512, 3 * pipe.text_encoder.config.text_config.hidden_size)
    assert torch.equal(ours, reference)
    rendered = pipe.tokenizer.decode(pipe.tokenizer.apply_chat_template(
        [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
          {"role": "user", "content": [{"type": "text", "text": prompts[0]}]}]], tokenize=True, return_dict=True,
    )["input_ids"][0])
    assert rendered == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]{prompts[0]}[/INST]"
    no_system = pipe._get_mistral_3_small_prompt_embeds(pipe.text_encoder, pipe.tokenizer, prompts, system_message="",
                                                        hidden_states_layers=flux2.DEV_TEXT_LAYERS)
    assert not torch.allclose(no_system, ours)


def _guidance_fed(family, pipe, denoiser, example_batch) -> torch.Tensor | None:
    """What one training step hands the transformer as its `guidance` argument."""
    pixels, captions = example_batch
    latents, cond = family.encode_images(pipe, pixels), family.encode_prompts(pipe, captions, torch.device("cpu"))
    seen = []
    hook = denoiser.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["guidance"]),
                                              with_kwargs=True)
    with torch.no_grad():
        family.training_loss(pipe, denoiser, latents, cond)
    hook.remove()
    (fed,) = seen
    return fed


@pytest.mark.parametrize("name, guidance", [("flux2-klein", None), ("flux2-dev", 1.0), ("flux", 1.0)])
def test_the_guidance_embedding_gets_the_recipes_value(tiny_models, example_batch, name, guidance):
    """dev's transformers (FLUX.1 and FLUX.2) have a guidance embedding and training feeds it the recipe's
    value per sample, in fp32; klein's has none and gets None, as its pipeline passes."""
    family = get_family(name)
    pipe = family.load_pipeline(tiny_models[name], torch.float32)
    denoiser = family.denoiser(pipe)
    assert denoiser.config.guidance_embeds is (guidance is not None)
    fed = _guidance_fed(family, pipe, denoiser, example_batch)
    if guidance is None:
        assert fed is None
    else:
        assert fed.dtype == torch.float32 and torch.equal(fed, torch.full((example_batch[0].shape[0],), guidance))


@pytest.mark.parametrize("name", ["flux", "flux2-dev"])
def test_guidance_scale_reaches_the_transformer_from_the_command_line(tiny_models, example_batch, tmp_path, name):
    """--guidance_scale 3.5 -> the config -> the module the trainer builds -> the transformer's `guidance`
    argument at every training step; the default (no flag) stays 1.0, and other family objects keep it."""
    from lorakube_trainer.config import parse_config
    from lorakube_trainer.train import _build_module

    def module_for(*extra: str):
        cfg = parse_config(["--model_family", name, "--model_path", str(tiny_models[name]), "--dataset_path",
                            str(tmp_path), "--output_path", str(tmp_path / "o"), "--height", "64", "--width", "64",
                            "--precision", "32", *extra], env={})
        family = get_family(name)
        targets = family.resolve_lora_targets(family.default_lora_targets)
        return cfg, _build_module(cfg, family, targets, torch.float32, None)

    cfg, module = module_for("--guidance_scale", "3.5")
    assert cfg.guidance_scale == 3.5 and cfg.to_json()["guidance_scale"] == 3.5    # training_config.json
    fed = _guidance_fed(module.family, module.pipe, module.denoiser, example_batch)
    assert fed.dtype == torch.float32 and torch.equal(fed, torch.full((example_batch[0].shape[0],), 3.5))
    assert get_family(name).recipe.guidance == 1.0                                   # the class is untouched
    if name == "flux2-dev":
        return                  # its Mistral pipeline loads slowly; the default path is the same code as flux's
    cfg, module = module_for()
    assert cfg.guidance_scale == 1.0
    assert torch.equal(_guidance_fed(module.family, module.pipe, module.denoiser, example_batch),
                       torch.ones(example_batch[0].shape[0]))


def test_guidance_scale_is_refused_where_no_embedding_would_take_it():
    """A family without a guidance embedding refuses the value; so does a FLUX.1 transformer whose config
    has none (schnell), except the default, which it ignores as before."""
    klein = get_family("flux2-klein")
    with pytest.raises(ValueError, match="flux2-klein has no guidance embedding"):
        klein.set_training_guidance(3.5, types.SimpleNamespace(config=types.SimpleNamespace(guidance_embeds=False)))
    schnell = types.SimpleNamespace(config=types.SimpleNamespace(guidance_embeds=False))
    with pytest.raises(ValueError, match=r"this flux transformer has no guidance embedding .*FLUX.1-schnell.*3.5"):
        get_family("flux").set_training_guidance(3.5, schnell)
    family = get_family("flux")
    family.set_training_guidance(1.0, schnell)
    assert family.recipe.guidance == 1.0


# --- Z-Image: its pipeline's own conventions ----------------------------------------------------

@pytest.mark.parametrize("dynamic", [False, True], ids=["static-shift", "dynamic-shift"])
@pytest.mark.parametrize("latent_hw", [(8, 8), (64, 96)])
def test_z_image_sigma_grid_is_the_pipelines_schedule(dynamic, latent_hw):
    """The pipeline sets linspace(1, 1/n, n) sigmas with mu = calculate_shift(tokens, <scheduler config>);
    the scheduler applies mu only with use_dynamic_shifting, else its static shift."""
    from types import SimpleNamespace

    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=dynamic)
    family = get_family("z-image")
    latents = torch.zeros(1, 16, *latent_hw)
    seq_len = family.image_seq_len(latents)
    assert seq_len == (latent_hw[0] // 2) * (latent_hw[1] // 2)
    mu = calculate_shift(seq_len, sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096),
                         sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=get_default_z_image_sigmas(1000), mu=mu)
    grid = family.sigma_grid(SimpleNamespace(scheduler=sched), seq_len)
    assert torch.allclose(grid.float(), sched.sigmas[:1000].float(), atol=1e-5)


class _Oracle(torch.nn.Module):
    """A Z-Image transformer stand-in that outputs exactly what the training loss asks for, x0 - ε,
    recovering ε from its input the way the pipeline builds it: x = t·x0 + (1 - t)·ε with t = 1 - σ."""

    in_channels = 16

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x, t, cap_feats, return_dict=True, **_):
        out = []
        for i, xi in enumerate(x):
            x0 = self.x0[i].unsqueeze(1)                         # (C, 1, H, W)
            eps = (xi - t[i] * x0) / (1 - t[i])
            out.append(x0 - eps)
        return (out,)


def test_z_image_loss_target_and_timestep_agree_with_the_pipelines_sampler(tiny_models):
    """The model that gets zero training loss is the one whose outputs the pipeline's own sampling
    loop turns into the clean latents: same sign of the prediction, same t = 1 - σ, same layout."""
    family = get_family("z-image")
    pipe = family.load_pipeline(tiny_models["z-image"], torch.float32)
    torch.manual_seed(0)
    x0, start = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    oracle = _Oracle(x0)
    cond = family.encode_prompts(pipe, ["a red circle"], torch.device("cpu"))
    losses = [family.training_loss(pipe, oracle, x0, cond).item() for _ in range(8)]
    assert max(losses) < 1e-8, losses
    pipe.transformer = oracle
    out = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=0.0,
               latents=start, output_type="latent").images
    assert torch.allclose(out, x0, atol=1e-4)
    # The opposite sign (the FLUX/SD3 convention) trains a model that samples away from the data.
    negated = family.flow_loss(pipe, x0, lambda noisy, s: -recipes.flow_target(x0, (noisy - (1 - s.view(-1, 1, 1, 1)) * x0)
                                                                               / s.view(-1, 1, 1, 1)))
    assert negated.item() > 1.0


# --- Qwen-Image: its pipeline's own conventions ---------------------------------------------------

def _qwen_scheduler(tiny_models) -> FlowMatchEulerDiscreteScheduler:
    config = json.loads((tiny_models["qwen-image"] / "scheduler" / "scheduler_config.json").read_text())
    return FlowMatchEulerDiscreteScheduler.from_config(config)


@pytest.mark.parametrize("latent_hw", [(8, 8), (8, 12), (128, 128)])   # 64 px, a 64x96 bucket, 1024 px
def test_qwen_image_sigma_grid_is_the_pipelines_schedule_at_1000_steps(tiny_models, latent_hw):
    """QwenImagePipeline sets linspace(1, 1/n, n) sigmas with mu = calculate_shift(image tokens, <scheduler
    config>); the scheduler shifts them and stretches the grid to end at shift_terminal."""
    from types import SimpleNamespace

    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    sched = _qwen_scheduler(tiny_models)
    assert (sched.config.max_shift, sched.config.max_image_seq_len, sched.config.shift_terminal) == (0.9, 8192, 0.02)
    family = get_family("qwen-image")
    seq_len = family.image_seq_len(torch.zeros(1, 16, *latent_hw))
    packed = qwen_image.pack_latents(torch.zeros(1, 16, *latent_hw))
    assert seq_len == packed.shape[1]                   # what the pipeline feeds calculate_shift
    mu = calculate_shift(seq_len, sched.config.base_image_seq_len, sched.config.max_image_seq_len,
                         sched.config.base_shift, sched.config.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, 1000), mu=mu)
    grid = family.sigma_grid(SimpleNamespace(scheduler=sched), seq_len)
    assert torch.allclose(grid.float(), sched.sigmas[:1000].float(), atol=1e-5)
    assert grid[-1].item() == pytest.approx(0.02)       # the terminal stretch: no draws below σ = 0.02
    assert grid[0].item() == pytest.approx(1.0)


def test_shift_terminal_stretch_is_the_schedulers():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, shift_terminal=0.1)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50))
    grid = recipes.shifted_sigma_grid(sched.config, 4096, 50)
    assert torch.allclose(grid.float(), sched.sigmas[:50], atol=1e-6)
    assert torch.equal(recipes.shifted_sigma_grid({"shift": 3.0}, 4096, 50),
                       recipes.shift_sigmas_static(recipes.flow_base_sigmas(50), 3.0))


class _QwenOracle(torch.nn.Module):
    """A Qwen-Image transformer stand-in that outputs exactly what the training loss asks for, the
    velocity ε - x0 in packed tokens, recovering ε from its input x = (1 - σ)·x0 + σ·ε with σ = the
    timestep it is fed; it records the RoPE shapes and text mask it gets."""

    config = types.SimpleNamespace(in_channels=64, guidance_embeds=False)

    def __init__(self, x0: torch.Tensor | None):
        super().__init__()
        self.x0 = x0
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple] = []

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def cache_context(self, name):
        return contextlib.nullcontext()

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_mask, img_shapes,
                return_dict=True, **_):
        self.seen.append((img_shapes, encoder_hidden_states.shape, encoder_hidden_states_mask))
        if self.x0 is None:                               # the identity flow: latents stay as they are
            return (torch.zeros_like(hidden_states),)
        x0 = qwen_image.pack_latents(self.x0)
        s = timestep.view(-1, 1, 1)
        eps = (hidden_states - (1 - s) * x0) / s
        return (eps - x0,)


def test_qwen_image_loss_target_timestep_and_packing_agree_with_the_pipelines_sampler(tiny_models):
    """The model that gets zero training loss is the one whose outputs the pipeline's sampling loop
    turns into the clean latents: same sign, same timestep (t/1000 = σ), same packing and img_shapes."""
    family = get_family("qwen-image")
    pipe = family.load_pipeline(tiny_models["qwen-image"], torch.float32)
    torch.manual_seed(0)
    x0, start = torch.randn(1, 16, 8, 12), torch.randn(1, 4 * 6, 64)     # packed: (H/2·W/2) tokens of 4C
    oracle = _QwenOracle(x0)
    cond = family.encode_prompts(pipe, ["a red circle"], torch.device("cpu"))
    losses = [family.training_loss(pipe, oracle, x0, cond).item() for _ in range(8)]
    assert max(losses) < 1e-8, losses
    assert oracle.seen[0][0] == [[(1, 4, 6)]]
    oracle.seen.clear()
    pipe.transformer = oracle
    out = pipe(prompt="a red circle", height=64, width=96, num_inference_steps=4, latents=start,
               true_cfg_scale=1.0, output_type="latent").images
    assert oracle.seen[0][0] == [[(1, 4, 6)]]
    assert torch.allclose(out, qwen_image.pack_latents(x0), atol=1e-4)


def test_qwen_image_latents_decode_through_the_pipelines_own_denormalisation(tiny_models, example_batch):
    """Our normalised (B, C, H, W) latents, packed and handed to the pipeline under an identity flow, decode
    to the image the VAE makes of its raw posterior mean: the frame dim, latents_mean/latents_std and the
    packing all match what QwenImagePipeline undoes."""
    family = get_family("qwen-image")
    pipe = family.load_pipeline(tiny_models["qwen-image"], torch.float32)
    pixels, _ = example_batch
    ours = family.encode_images(pipe, pixels[:1])
    assert ours.shape == (1, 16, 8, 8)
    with torch.no_grad():
        raw = pipe.vae.encode(pixels[:1].unsqueeze(2)).latent_dist.mode()
    assert not torch.allclose(ours, raw[:, :, 0], atol=1e-2)            # the normalisation did something
    with torch.no_grad():
        expected = pipe.vae.decode(raw, return_dict=False)[0][:, :, 0]
    pipe.transformer = _QwenOracle(None)
    decoded = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, true_cfg_scale=1.0,
                   latents=qwen_image.pack_latents(ours), output_type="pt").images
    assert torch.allclose(decoded, (expected / 2 + 0.5).clamp(0, 1), atol=1e-5)


def test_qwen_image_prompt_encoding_is_the_pipelines_and_trims_back_to_its_batch_shape(tiny_models):
    family = get_family("qwen-image")
    pipe = family.load_pipeline(tiny_models["qwen-image"], torch.float32)
    # The template's system turn and user header are exactly the 34 tokens the pipeline drops.
    template_tokens = pipe.tokenizer(tiny.QWEN_IMAGE_TEMPLATE_PREFIX)["input_ids"]
    assert len(template_tokens) == pipe.prompt_template_encode_start_idx == 34
    assert pipe.prompt_template_encode.startswith(tiny.QWEN_IMAGE_TEMPLATE_PREFIX)
    prompts = ["a red circle", "a blue square on a dark background"]
    cond = family.encode_prompts(pipe, prompts, torch.device("cpu"))
    assert cond["prompt_embeds"].shape[1] == cond["prompt_mask"].shape[1] == qwen_image.MAX_SEQUENCE_LENGTH
    embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=512)
    trimmed, trimmed_mask = qwen_image.trim_prompt(cond["prompt_embeds"], cond["prompt_mask"])
    assert torch.equal(trimmed, embeds) and torch.equal(trimmed_mask, mask.bool())
    assert not mask[0].all() and mask[1].all()          # the shorter prompt is padded and masked
    # One prompt alone: nothing padded, so no mask, as the pipeline passes it.
    single = family.encode_prompts(pipe, prompts[1:], torch.device("cpu"))
    alone, alone_mask = qwen_image.trim_prompt(single["prompt_embeds"], single["prompt_mask"])
    assert alone_mask is None and torch.allclose(alone[0], embeds[1], atol=1e-5)


def test_qwen_image_prompts_encoded_one_at_a_time_train_like_the_batchs_own_encoding(tiny_models, example_batch):
    """The latent cache stores each caption's conditioning padded to 512 on its own; collated into a batch
    and trimmed, it must give the loss the batch's own encoding (padded to its longest prompt) gives."""
    family = get_family("qwen-image")
    pipe = family.load_pipeline(tiny_models["qwen-image"], torch.float32)
    pixels, _ = example_batch
    latents = family.encode_images(pipe, pixels)
    prompts = ["a red circle", "a blue square on a dark background"]
    together = family.encode_prompts(pipe, prompts, torch.device("cpu"))
    each = [family.encode_prompts(pipe, [p], torch.device("cpu")) for p in prompts]
    collated = {k: torch.cat([c[k] for c in each]) for k in together}
    assert torch.equal(collated["prompt_mask"], together["prompt_mask"])
    losses = []
    for cond in (together, collated):
        torch.manual_seed(3)
        with torch.no_grad():
            losses.append(family.training_loss(pipe, family.denoiser(pipe), latents, cond).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_qwen_image_recipe_and_sampling_arguments():
    family = get_family("qwen-image")
    assert qwen_image.RECIPE.guidance is None and qwen_image.RECIPE.sampling == "logit_normal"
    assert family.generate_kwargs() == {"true_cfg_scale": 4.0, "negative_prompt": " ", "max_sequence_length": 512}
