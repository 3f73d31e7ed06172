"""A user's check of the diffusers-layout file: in a new Python process that never imported lorakube,
load the pipeline with plain diffusers, load the LoRA file the way the model card says, and generate.
No warning about keys may appear, and the image must change. One process checks a group of families:
the newer ones (FLUX.2 klein and dev, Z-Image, Qwen-Image, and `sd3` whose tiny model is SD3.5-medium-shaped) in
`make test`, the original ones in the slow tier (a process per group keeps the cost to one interpreter start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakube_trainer.families import FAMILY_NAMES, get_family

NEWER = ("flux2-klein", "sd3", "z-image", "qwen-image", "flux2-dev")
GROUPS = [
    pytest.param(NEWER, id="newer"),
    pytest.param(tuple(n for n in FAMILY_NAMES if n not in NEWER), id="original", marks=pytest.mark.slow),
]

RANK, ALPHA = 4, 8.0

# Runs in the fresh process: argv[1] is a JSON list of [family, model folder, LoRA file].
USER_SCRIPT = r"""
import importlib.util, inspect, json, logging, sys, warnings
from pathlib import Path
import numpy as np, torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

records = []
class Collect(logging.Handler):
    def emit(self, record):
        records.append(f"{record.name}: {record.getMessage()}")
diffusers_logging.get_logger("diffusers").addHandler(Collect(level=logging.WARNING))
logging.getLogger("peft").addHandler(Collect(level=logging.WARNING))

def image(pipe):
    generator = torch.Generator("cpu").manual_seed(1)
    kwargs = dict(prompt="a red circle", height=64, width=64, num_inference_steps=2, generator=generator,
                  output_type="np")
    if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
        kwargs["use_resolution_binning"] = False
    return pipe(**kwargs).images[0]

import time
out = {}
for family, model, lora in json.loads(sys.argv[1]):
    started = time.perf_counter()
    records.clear()
    # FLUX.2 dev's tokenizer is a Pixtral processor, which transformers builds only with torchvision;
    # without it, the model card's way: no processor, its tokenizer set on the pipeline.
    index = json.loads((Path(model) / "model_index.json").read_text())
    plain_tokenizer = index.get("tokenizer", [None, None])[1] == "PixtralProcessor" and \
        importlib.util.find_spec("torchvision") is None
    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float32,
                                             **({"tokenizer": None} if plain_tokenizer else {}))
    if plain_tokenizer:
        from transformers import AutoTokenizer
        pipe.tokenizer = AutoTokenizer.from_pretrained(str(Path(model) / "tokenizer"))
    pipe.set_progress_bar_config(disable=True)
    base = image(pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if hasattr(pipe, "load_lora_weights"):
            pipe.load_lora_weights(lora)
            how = "load_lora_weights"
        else:   # Hunyuan-DiT: diffusers has no loader; the model card's peft recipe
            from safetensors import safe_open
            from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
            with safe_open(lora, framework="pt") as f:
                meta = json.loads(f.metadata()["lora_adapter_metadata"])
                state = {k[len("transformer."):]: f.get_tensor(k) for k in f.keys()}
            config = LoraConfig(**{k[len("transformer."):]: v for k, v in meta.items()})
            inject_adapter_in_model(config, pipe.transformer)
            set_peft_model_state_dict(pipe.transformer, state)
            how = "peft"
    with_lora = image(pipe)
    out[family] = {
        "how": how,
        "pipeline": type(pipe).__name__,
        "messages": records + [str(w.message) for w in caught],
        "changed": float(np.abs(with_lora - base).max()),
        "seconds": round(time.perf_counter() - started, 2),
    }
print("RESULT " + json.dumps(out))
"""


def _lora_file(name: str, model: Path, out: Path) -> Path:
    """The family's diffusers-layout file for a LoRA with non-zero weights (as after training)."""
    family = get_family(name)
    denoiser = family.denoiser(family.load_pipeline(model, torch.float32))
    family.add_lora(denoiser, RANK, ALPHA, list(family.default_lora_targets))
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in family.lora_state_dict(denoiser).items()}
    path = out / name / "pytorch_lora_weights.safetensors"
    family.save_diffusers_lora(state, path, RANK, ALPHA)
    return path


@pytest.mark.parametrize("names", GROUPS)
def test_lora_loads_in_a_fresh_process_without_key_warnings_and_changes_the_image(tiny_models, tmp_path, names):
    jobs = [[name, str(tiny_models[name]), str(_lora_file(name, tiny_models[name], tmp_path))] for name in names]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    proc = subprocess.run([sys.executable, "-c", USER_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert set(result) == set(names)
    print({name: seen["seconds"] for name, seen in result.items()})
    for name, seen in result.items():
        assert seen["pipeline"] == get_family(name).pipeline_class_name, name
        # diffusers notes that the file has no text-encoder part (none was trained); anything else about
        # keys or LoRA would mean the file does not fit the model.
        key_messages = [m for m in seen["messages"] if ("key" in m.lower() or "lora" in m.lower())
                        and "No LoRA keys associated to" not in m]
        assert key_messages == [], (name, key_messages)
        assert seen["changed"] > 1e-4, (name, seen)
        assert seen["how"] == ("peft" if name == "hunyuan-dit" else "load_lora_weights"), name
