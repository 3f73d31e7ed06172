"""lorakube's training step against a bare PyTorch loop doing the same math, on CPU (issue #12, 4).

Both train the same tiny FLUX model (lorakube_dev.tiny) on the same one-image dataset: lorakube
through `lorakube_trainer.train.run` (Lightning, its callbacks, the data loader reading and resizing
the image), the bare loop with the batch prepared once and a plain
`loss.backward(); opt.step(); opt.zero_grad()` around the same family loss. The ratio of their
per-step times is the framework's overhead (goal: <= 1.10).

Per step means the median time between the ends of consecutive steps after a warmup, as CPU time
of this process (what the step costs, which other processes on a shared host barely change) and as
wall time; each figure is the median over --repeats runs, lorakube and the bare loop interleaved.
The ratio is of the CPU times.

    python bench/cpu_overhead.py                 # 1 and 2 threads, caching off and on
    python bench/cpu_overhead.py --steps 20 --repeats 1 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import machine, median, one_image_dataset, quiet, table

FAMILY = "flux"
SIZE = 64
RANK = 4


Times = tuple[list[float], list[float]]       # (CPU seconds, wall seconds) per step


def per_step(ends: list[tuple[float, float]], warmup: int) -> Times:
    kept = ends[warmup:]
    return ([b[0] - a[0] for a, b in zip(kept, kept[1:])], [b[1] - a[1] for a, b in zip(kept, kept[1:])])


def now() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def lorakube_step_times(model: Path, data: Path, out: Path, steps: int, warmup: int, cache: bool) -> Times:
    import lightning.pytorch as pl

    from lorakube_api import contract
    from lorakube_trainer import train
    from lorakube_trainer.config import parse_config

    ends: list[tuple[float, float]] = []

    class StepEnds(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            ends.append(now())

    argv = ["--model_family", FAMILY, "--model_path", str(model), "--dataset_path", str(data),
            "--output_path", str(out), "--height", str(SIZE), "--width", str(SIZE), "--precision", "32",
            "--steps_per_epoch", str(warmup + steps), "--checkpoint_every_n_steps", "0", "--center_crop",
            "--lora_rank", str(RANK), "--lora_alpha", str(RANK), "--validation_inference_steps", "1",
            "--output_formats", "diffusers", "--accelerator", "cpu", *(["--cache_latents"] if cache else [])]
    cfg = parse_config(argv, env={})
    # No metrics port, and progress lines rarely enough that they do not bury the table.
    env = {contract.ENV_METRICS_PORT: "off", contract.ENV_PROGRESS_INTERVAL: "3600"}
    train.run(cfg, env=env, extra_callbacks=[StepEnds()])
    return per_step(ends, warmup)


def bare_step_times(model: Path, data: Path, steps: int, warmup: int, cache: bool) -> Times:
    """The same model, LoRA, loss and AdamW as lorakube, nothing else: no framework, no data loader."""
    import numpy as np
    import torch
    from PIL import Image

    from lorakube_trainer.data import resize_and_crop
    from lorakube_trainer.families import get_family

    family = get_family(FAMILY)
    torch.manual_seed(42)
    pipe = family.load_pipeline(model, torch.float32)
    denoiser = family.denoiser(pipe)
    family.add_lora(denoiser, RANK, RANK, list(family.default_lora_targets))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    denoiser.train()
    with Image.open(data / "train" / "img.png") as img:
        pixels = resize_and_crop(img, SIZE, SIZE, True, False, np.random.default_rng(0))[None]
    text = ["a red circle on a dark background"]
    cpu = torch.device("cpu")

    def encode() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            return family.encode_images(pipe, pixels).contiguous(), family.encode_prompts(pipe, text, cpu)

    cached = encode() if cache else None
    ends: list[tuple[float, float]] = []
    for _ in range(warmup + steps + 1):
        latents, cond = cached if cached is not None else encode()
        loss = family.training_loss(pipe, denoiser, latents, cond)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ends.append(now())
    return per_step(ends, warmup)


def measure(args: argparse.Namespace) -> list[list[object]]:
    import torch

    from lorakube_dev.tiny import build_tiny_pipeline

    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_pipeline(FAMILY, root / "model")
        data = one_image_dataset(root / "data")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for cache in (False, True):
                ours: list[Times] = []
                bare: list[Times] = []
                for r in range(args.repeats):
                    ours.append(lorakube_step_times(model, data, root / f"out-{threads}-{cache}-{r}",
                                                    args.steps, args.warmup, cache))
                    bare.append(bare_step_times(model, data, args.steps, args.warmup, cache))
                cpu_ours, cpu_bare = (median([median(t[0]) for t in runs]) * 1e3 for runs in (ours, bare))
                wall_ours, wall_bare = (median([median(t[1]) for t in runs]) * 1e3 for runs in (ours, bare))
                rows.append(["on" if cache else "off", threads, f"{cpu_ours:.2f}", f"{cpu_bare:.2f}",
                             f"{cpu_ours - cpu_bare:+.2f}", f"{cpu_ours / cpu_bare:.2f}",
                             f"{wall_ours:.1f} / {wall_bare:.1f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing starts")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (the median is printed)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    quiet()
    rows = measure(args)
    print(f"## CPU overhead: lorakube's step vs a bare PyTorch loop ({FAMILY} tiny model, {SIZE}x{SIZE}, "
          f"batch 1, rank {RANK}, fp32)")
    print(f"machine: {machine()}; median step over {args.steps} steps, median of {args.repeats} runs")
    print()
    print(table(["caching", "threads", "lorakube CPU ms/step", "bare loop CPU ms/step", "overhead ms", "ratio",
                 "wall ms/step (lorakube / bare)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
