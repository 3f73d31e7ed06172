"""Trainer step time, peak memory and MFU at real model size, next to the diffusers DreamBooth-LoRA way.

For each family the real denoiser config (bench/configs.py; random weights) at its native size
(1024x1024), LoRA rank 16 on the family's default targets, batch 1, bf16. Two ways to train it,
in the same process and on the same batch:

* lorakube: the trainer's own LoRAModule (families/*, module.py, speed.py) driven by Lightning
  with the trainer's Trainer arguments and step callbacks (train.trainer_kwargs), one variant per
  row: gradient checkpointing, cached latents and text embeddings (the encoders freed from the GPU,
  as --cache_latents does, or kept there), and each speed/memory flag of speed.py.
* peer: the step as diffusers' train_dreambooth_lora_* examples write it: the denoiser in bf16,
  `add_adapter(LoraConfig(..., init_lora_weights="gaussian"))` (so the LoRA is bf16 too), no
  autocast, a plain torch AdamW loop; the loss is the family's (the same maths).

Each lorakube row's ratio is against the peer row with the same caching and checkpointing.
Seconds per step: median after --warmup steps (synchronised). Peak: torch.cuda.max_memory_allocated
over the variant, weights included. MFU: the denoiser's forward+backward FLOPs (counted once per
family with torch's FlopCounterMode, recomputation not counted) per second over the card's dense
bf16 peak.

    python bench/trainer_gpu.py                       # a GPU: all families, all variants
    python bench/trainer_gpu.py --families flux --variants cached,cached+gc
    python bench/trainer_gpu.py --tiny                # CPU: the tiny models, the same code paths
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import configs
from benchlib import machine, quiet, table

RANK = 16
PROMPT = "a red circle on a dark background"
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendor's datasheets; the first name
# fragment found in torch.cuda.get_device_name() wins.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.0),
)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    way: str = "lorakube"           # or "peer"
    cached: bool = True
    gc: bool = False
    keep_encoders: bool = False     # cached, but the encoders stay on the accelerator
    flags: tuple[str, ...] = ()     # lorakube trainer flags (speed.py)
    only: tuple[str, ...] = ()      # families it applies to (empty: all)
    gpu_only: bool = False

    def peer_name(self) -> str:
        """The peer row a lorakube row is compared with: the same caching and checkpointing."""
        return "peer " + ("cached" if self.cached else "uncached") + ("+gc" if self.gc else "")


VARIANTS = [
    Variant("peer cached", "peer"), Variant("peer cached+gc", "peer", gc=True),
    Variant("peer uncached", "peer", cached=False), Variant("peer uncached+gc", "peer", cached=False, gc=True),
    Variant("cached"), Variant("cached+gc", gc=True),
    Variant("uncached", cached=False), Variant("uncached+gc", cached=False, gc=True),
    Variant("cached, encoders kept on device", keep_encoders=True),
    Variant("cached+compile", flags=("--compile_blocks",)),
    Variant("cached+fused AdamW", flags=("--fused_adamw",)),
    Variant("cached+sdpa all (cuDNN on)", flags=("--sdpa_backend", "all")),
    Variant("cached+sdpa flash", flags=("--sdpa_backend", "flash")),
    Variant("cached+sdpa efficient", flags=("--sdpa_backend", "efficient")),
    Variant("cached+sdpa cudnn", flags=("--sdpa_backend", "cudnn")),
    Variant("cached+channels_last", flags=("--channels_last",), only=("kolors",)),
    Variant("cached+gc+int8 base", gc=True, flags=("--base_weights", "int8")),
    Variant("cached+gc+fp8 base", gc=True, flags=("--base_weights", "fp8"), gpu_only=True),
]


@dataclasses.dataclass
class Result:
    seconds: float | None = None
    peak_gb: float | None = None
    note: str = ""


# --- building ---------------------------------------------------------------------------------

@contextlib.contextmanager
def default_dtype(dtype: Any) -> Any:
    import torch

    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


class Models:
    """One family's pipeline parts: the tiny pipeline as loaded from disk (--tiny), or real-size
    encoders and VAE (built once per family) with a fresh real-size denoiser per variant."""

    def __init__(self, family_name: str, tiny: bool, device: Any, dtype: Any, workdir: Path) -> None:
        from lorakube_dev.tiny import build_tiny_pipeline
        from lorakube_trainer.families import get_family

        self.family, self.tiny, self.device, self.dtype = get_family(family_name), tiny, device, dtype
        self.tiny_path = build_tiny_pipeline(family_name, workdir / family_name)
        # Tokenizers and scheduler always come from the tiny pipeline (see configs.py).
        self.base = self.family.load_pipeline(self.tiny_path, dtype)
        self.encoders: dict[str, Any] = {}
        if not tiny:
            import torch

            with torch.device(device), default_dtype(dtype):
                self.encoders["vae"] = configs.build_vae(family_name).eval().requires_grad_(False)
                for name, build in configs.TEXT_ENCODERS[family_name].items():
                    self.encoders[name] = build().eval().requires_grad_(False)
        else:
            self.encoders = {k: v for k, v in self.base.components.items()
                             if isinstance(v, torch_module()) and k != self.family.denoiser_attr}
        for module in self.encoders.values():
            module.to(device)

    def pipeline(self, with_text_encoders: bool) -> Any:
        """A pipeline with a fresh denoiser (LoRA, compilation and quantization change it in place)."""
        import torch

        if self.tiny:
            denoiser = self.family.load_pipeline(self.tiny_path, self.dtype).components[self.family.denoiser_attr]
        else:
            with torch.device(self.device), default_dtype(self.dtype):
                denoiser = configs.build_denoiser(self.family.name)
        denoiser.to(self.device).requires_grad_(False).eval()
        components = dict(self.base.components)
        components[self.family.denoiser_attr] = denoiser
        for name, module in self.encoders.items():
            components[name] = module if (with_text_encoders or name == "vae") else None
        pipe = type(self.base)(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def torch_module() -> type:
    import torch

    return torch.nn.Module


def first_batch(models: Models, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(uncached batch, cached batch) for one random image and the prompt, collated (batch 1)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    pipe = models.pipeline(with_text_encoders=True)
    with torch.no_grad():
        latents = models.family.encode_images(pipe, pixels.to(models.device, models.dtype)).contiguous()
        cond = models.family.encode_prompts(pipe, [PROMPT], models.device)
    del pipe
    return {"pixels": pixels, "text": [PROMPT]}, {"latents": latents, "cond": cond}


# --- the two ways of training ------------------------------------------------------------------

def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def lorakube_run(models: Models, variant: Variant, batch: dict[str, Any], steps: int, warmup: int,
                 size: int, workdir: Path) -> list[float]:
    import lightning.pytorch as pl
    import torch

    from lorakube_trainer.callbacks import ResumeCallback, StepCallback
    from lorakube_trainer.config import parse_config
    from lorakube_trainer.distributed import plan_topology
    from lorakube_trainer.module import LoRAModule
    from lorakube_trainer.train import trainer_kwargs

    on_gpu = models.device.type == "cuda"
    argv = ["--model_family", models.family.name, "--model_path", str(models.tiny_path), "--dataset_path", "-",
            "--output_path", str(workdir), "--height", str(size), "--width", str(size),
            "--precision", "bf16-mixed", "--lora_rank", str(RANK), "--lora_alpha", str(RANK),
            "--steps_per_epoch", str(steps + warmup + 1), "--checkpoint_every_n_steps", "0",
            "--accelerator", "gpu" if on_gpu else "cpu", "--devices", "1", "--num_nodes", "1", *variant.flags,
            *(["--use_gradient_checkpointing"] if variant.gc else [])]
    cfg = parse_config(argv, env={})
    pipe = models.pipeline(with_text_encoders=not variant.cached or variant.keep_encoders)
    module = LoRAModule(models.family, pipe, cfg, list(models.family.default_lora_targets), models.dtype)
    ends: list[float] = []

    class StepEnds(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            sync(models.device)
            ends.append(time.perf_counter())

    one = ({"latents": batch["latents"][0].cpu(), "cond": {k: v[0].cpu() for k, v in batch["cond"].items()}}
           if variant.cached else {"pixels": batch["pixels"][0], "text": batch["text"][0]})
    loader = torch.utils.data.DataLoader([one] * (steps + warmup + 1), batch_size=1)
    trainer = pl.Trainer(**trainer_kwargs(cfg, plan_topology(cfg, {}), on_gpu, steps + warmup + 1),
                         callbacks=[ResumeCallback(cfg, None), StepCallback(cfg, None, None), StepEnds()])
    trainer.fit(module, train_dataloaders=loader)
    del trainer, module, pipe
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]


def peer_run(models: Models, variant: Variant, batch: dict[str, Any], steps: int, warmup: int) -> list[float]:
    """diffusers' DreamBooth-LoRA step: bf16 denoiser and bf16 LoRA from add_adapter, no autocast,
    loss.backward(); optimizer.step(); optimizer.zero_grad()."""
    import torch
    from peft import LoraConfig

    from lorakube_trainer.families.common import target_regex

    family = models.family
    pipe = models.pipeline(with_text_encoders=not variant.cached)
    denoiser = family.denoiser(pipe)
    targets = target_regex(list(family.default_lora_targets))
    config = LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=targets)
    # denoiser.add_adapter(config), as the examples do; Hunyuan-DiT's model class has no add_adapter,
    # so peft's inject_adapter_in_model plus the fp32-timestep hook the family's loss needs.
    family._inject(denoiser, config)
    if variant.gc:
        family.enable_gradient_checkpointing(denoiser)
    denoiser.train()
    params = [p for n, p in denoiser.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    device = models.device
    ends: list[float] = []
    for _ in range(steps + warmup + 1):
        if variant.cached:
            latents, cond = batch["latents"], batch["cond"]
        else:
            with torch.no_grad():
                latents = family.encode_images(pipe, batch["pixels"].to(device, models.dtype)).contiguous()
                cond = family.encode_prompts(pipe, batch["text"], device)
        loss = family.training_loss(pipe, denoiser, latents, cond)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        ends.append(time.perf_counter())
    del optimizer, denoiser, pipe
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]


def step_flops(models: Models, batch: dict[str, Any]) -> float:
    """The denoiser's forward + backward FLOPs for one cached step with rank-16 LoRA (no checkpointing)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    pipe = models.pipeline(with_text_encoders=False)
    denoiser = models.family.denoiser(pipe)
    models.family.add_lora(denoiser, RANK, RANK, list(models.family.default_lora_targets))
    denoiser.train()
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(models.device.type, dtype=models.dtype):
        models.family.training_loss(pipe, denoiser, batch["latents"], batch["cond"]).backward()
    del denoiser, pipe
    return float(counter.get_total_flops())


# --- measuring ---------------------------------------------------------------------------------

def release(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()


def measure(run: Callable[[], list[float]], device: Any) -> Result:
    import torch

    from lorakube_trainer import speed

    release(device)
    saved = speed.sdpa_flags()          # a variant's --sdpa_backend is process-wide
    try:
        times = run()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return Result(statistics.median(times), peak)
    except torch.OutOfMemoryError:
        return Result(note="out of memory")
    finally:
        speed.set_sdpa_flags(saved)
        release(device)


def peak_tflops(device: Any) -> tuple[str, float | None]:
    import torch

    if device.type != "cuda":
        return "CPU (no GPU)", None
    name = torch.cuda.get_device_name(device)
    for fragment, tflops in BF16_PEAK_TFLOPS:
        if fragment in name:
            return name, tflops
    return name, None


def fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def run_family(name: str, args: argparse.Namespace, device: Any, peak: float | None, workdir: Path) -> list[list[str]]:
    import torch

    dtype = torch.bfloat16
    size = 64 if args.tiny else configs.NATIVE_SIZE[name]
    models = Models(name, args.tiny, device, dtype, workdir)
    batch_uncached, batch_cached = first_batch(models, size)
    flops = step_flops(models, batch_cached)
    release(device)
    results: dict[str, Result] = {}
    rows: list[list[str]] = []
    for variant in [v for v in VARIANTS if v.name in args.variants]:
        if variant.only and name not in variant.only:
            continue
        if variant.gpu_only and device.type != "cuda":
            results[variant.name] = Result(note="needs a GPU")
        else:
            batch = batch_cached if variant.cached else batch_uncached
            if variant.way == "peer":
                run = lambda v=variant, b=batch: peer_run(models, v, b, args.steps, args.warmup)  # noqa: E731
            else:
                run = lambda v=variant, b=batch: lorakube_run(models, v, b, args.steps, args.warmup, size,  # noqa: E731
                                                             workdir / "out")
            results[variant.name] = measure(run, device)
        got = results[variant.name]
        peer = results.get(variant.peer_name()) if variant.way == "lorakube" else None
        time_ratio = (got.seconds / peer.seconds if peer and peer.seconds and got.seconds else None)
        mem_ratio = (got.peak_gb / peer.peak_gb if peer and peer.peak_gb and got.peak_gb else None)
        mfu = flops / got.seconds / (peak * 1e12) if (peak and got.seconds) else None
        rows.append([name, variant.name, fmt(got.seconds, ".3f", got.note or "n/a"),
                     fmt(got.peak_gb, ".1f", "n/a" if device.type == "cuda" else "n/a (CPU)"),
                     fmt(None if mfu is None else 100 * mfu, ".1f"), fmt(time_ratio, ".2f", "-"),
                     fmt(mem_ratio, ".2f", "-")])
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    del models
    release(device)
    return rows


def config_check() -> list[list[str]]:
    """Every real config builds (on the meta device: no memory) with the published parameter count."""
    import torch

    rows = []
    with torch.device("meta"):
        for name in configs.DENOISERS:
            params = sum(p.numel() for p in configs.build_denoiser(name).parameters()) / 1e9
            rows.append([name, configs.DENOISERS[name][0], f"{params:.2f}", f"{configs.PUBLISHED_PARAMS_B[name]}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny models on CPU (a check that the script runs)")
    parser.add_argument("--families", default="flux,sd3,kolors,hunyuan-dit")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                        help="comma-separated row names (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; 1 with --tiny)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    args.variants = {v.strip() for v in args.variants.split(",")}
    unknown = args.variants - {v.name for v in VARIANTS}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {[v.name for v in VARIANTS]}")
    quiet()
    import torch

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        parser.error("no GPU here: the real-size run needs one; --tiny runs the tiny models on CPU")
    card, peak = peak_tflops(device)
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [f.strip() for f in args.families.split(",")]:
            rows += run_family(name, args, device, peak, Path(tmp))
    size = "64x64 (tiny models)" if args.tiny else "1024x1024"
    print(f"## Trainer step at {'tiny' if args.tiny else 'real'} size: lorakube vs the diffusers DreamBooth-LoRA step")
    print(f"device: {card}{f' (bf16 peak {peak:.0f} TFLOP/s)' if peak else ''}; host: {machine()}; {size}, "
          f"batch 1, LoRA rank {RANK}, bf16; median of {args.steps} steps after {args.warmup}")
    print()
    print(table(["family", "variant", "s/step", "peak GB", "MFU %", "time vs peer", "memory vs peer"], rows))
    print()
    print("Real denoiser configs (bench/configs.py), built on the meta device:")
    print()
    print(table(["family", "class", "parameters (B)", "published (B)"], config_check()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
