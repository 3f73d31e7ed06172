"""What a model folder must look like before any weights load: a diffusers pipeline folder
(model_index.json, as save_pretrained writes it) of the declared family. Torch-free, so preflight
checks it in the first second of a pod; families/common.py applies the same check when it loads."""

from __future__ import annotations

import json
from pathlib import Path

MODEL_INDEX = "model_index.json"

# diffusers pipeline class (model_index.json's _class_name) -> family, to name a mismatch.
PIPELINE_FAMILIES = {
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "KolorsPipeline": "kolors",
    "HunyuanDiTPipeline": "hunyuan-dit",
    "Flux2KleinPipeline": "flux2-klein",
    "ZImagePipeline": "z-image",
    "QwenImagePipeline": "qwen-image",
    "Flux2Pipeline": "flux2-dev",
}
FAMILY_PIPELINES = {family: cls for cls, family in PIPELINE_FAMILIES.items()}


class ModelFolderError(ValueError):
    """The model folder is missing, unreadable or not a pipeline of the declared family."""


class ModelFolderMissing(ModelFolderError, FileNotFoundError):
    """No model_index.json where the model should be."""


def check_pipeline_folder(model_path: str | Path, family: str) -> str | None:
    """Raise ModelFolderError naming the problem; return model_index.json's _class_name.

    A class name of another known family is refused; an unknown one (a custom or test pipeline)
    passes, as diffusers itself would try to load it."""
    path = Path(model_path)
    index = path / MODEL_INDEX
    if not index.is_file():
        why = "does not exist" if not path.exists() else ("is not a folder" if not path.is_dir() else
                                                          f"has no {MODEL_INDEX}")
        raise ModelFolderMissing(
            f"--model_path {str(path)!r} {why}: point it at a diffusers pipeline folder of a {family} model "
            f"(the layout save_pretrained writes)")
    try:
        found = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except OSError as exc:
        raise ModelFolderError(f"{index} cannot be read ({exc.strerror})") from exc
    except (ValueError, AttributeError) as exc:
        raise ModelFolderError(f"{index} is not a JSON object ({exc}); re-export the pipeline with "
                               f"save_pretrained") from exc
    expected = FAMILY_PIPELINES.get(family)
    if found != expected and found in PIPELINE_FAMILIES:
        raise ModelFolderError(f"--model_path {str(path)!r} holds a {found} ({PIPELINE_FAMILIES[found]} model), but "
                               f"--model_family is {family}, which needs a {expected}")
    return found
