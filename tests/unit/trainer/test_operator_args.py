"""The operator's side of the contract meets this parser: every example job's trainer args (as
lorakube.builders derives them) parse into a config that says what the job YAML says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorakube import builders
from lorakube_api import contract
from lorakube.spec import parse_job
from lorakube_trainer.config import parse_config

EXAMPLES = sorted((Path(__file__).resolve().parents[3] / "examples").glob("*.yaml"))


def _jobs() -> list[tuple[str, dict]]:
    jobs = []
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == contract.KIND:
                jobs.append((f"{path.name}:{doc['metadata']['name']}", doc))
    return jobs


@pytest.mark.parametrize(("label", "doc"), _jobs(), ids=[label for label, _ in _jobs()])
def test_operator_args_parse_into_the_jobs_settings(label: str, doc: dict) -> None:
    spec = parse_job(doc["metadata"]["name"], doc["spec"])
    cfg = parse_config(builders.trainer_args(spec), env={})
    training = doc["spec"].get("training", {})
    assert cfg.model_family == doc["spec"]["model"]["family"] and cfg.resume == "auto"
    for key in ("height", "width", "batchSize", "loraRank", "stepsPerEpoch", "maxEpochs", "seed",
                "accumulateGradBatches"):
        if key in training:
            attr = {"batchSize": "batch_size", "loraRank": "lora_rank", "stepsPerEpoch": "steps_per_epoch",
                    "maxEpochs": "max_epochs", "accumulateGradBatches": "accumulate_grad_batches"}.get(key, key)
            assert getattr(cfg, attr) == training[key], key
    if "learningRate" in training:
        assert cfg.learning_rate == pytest.approx(training["learningRate"])
    if "strategy" in training:
        assert cfg.training_strategy == training["strategy"]
    if "validationPrompts" in training:
        assert cfg.validation_prompts == tuple(training["validationPrompts"])
    assert cfg.center_crop == bool(training.get("centerCrop")) and cfg.random_flip == bool(training.get("randomFlip"))


def test_dataset_options_reach_the_trainer_only_when_set() -> None:
    """spec.dataset's reading options become the trainer's flags (a caption may be empty or start
    with a dash); a job that sets none runs the original command line."""
    doc = {"model": {"family": "flux", "uri": "/m"}, "output": {"uri": "/o"},
           "dataset": {"uri": "/d", "format": "kohya", "captionDropout": 0.05, "defaultCaption": "-",
                       "maxImagePixels": 4096 * 4096}}
    cfg = parse_config(builders.trainer_args(parse_job("cats", doc)), env={})
    assert (cfg.dataset_format, cfg.caption_dropout, cfg.default_caption, cfg.max_image_pixels) == (
        "kohya", 0.05, "-", 4096 * 4096)
    doc["dataset"] = {"uri": "/d", "defaultCaption": ""}
    args = builders.trainer_args(parse_job("cats", doc))
    assert parse_config(args, env={}).default_caption == ""
    doc["dataset"] = {"uri": "/d"}
    args = builders.trainer_args(parse_job("cats", doc))
    assert not {contract.FLAG_DATASET_FORMAT, contract.FLAG_CAPTION_DROPOUT, contract.FLAG_MAX_IMAGE_PIXELS} & set(args)
    assert not any(a.startswith(contract.FLAG_DEFAULT_CAPTION) for a in args)
    cfg = parse_config(args, env={})
    assert (cfg.dataset_format, cfg.caption_dropout, cfg.default_caption) == ("auto", 0.0, None)


def test_guidance_scale_reaches_the_trainers_config() -> None:
    doc = {"model": {"family": "flux", "uri": "/m"}, "output": {"uri": "/o"}, "dataset": {"uri": "/d"},
           "training": {"guidanceScale": 3.5}}
    assert parse_config(builders.trainer_args(parse_job("cats", doc)), env={}).guidance_scale == 3.5
    del doc["training"]["guidanceScale"]
    assert parse_config(builders.trainer_args(parse_job("cats", doc)), env={}).guidance_scale == 1.0


def test_caption_tag_options_reach_the_trainer_only_when_set() -> None:
    """spec.dataset's kohya caption habits become --shuffle_caption, --keep_tokens,
    --caption_tag_dropout and --caption_extension; unset, none of them is on the command line."""
    doc = {"model": {"family": "flux", "uri": "/m"}, "output": {"uri": "/o"},
           "dataset": {"uri": "/d", "shuffleCaption": True, "keepTokens": 2, "captionTagDropout": 0.15,
                       "captionExtension": ".caption"}}
    cfg = parse_config(builders.trainer_args(parse_job("cats", doc)), env={})
    assert (cfg.shuffle_caption, cfg.keep_tokens, cfg.caption_tag_dropout, cfg.caption_extension) == (
        True, 2, 0.15, ".caption")
    doc["dataset"] = {"uri": "/d", "captionTagDropout": 0.5}
    cfg = parse_config(builders.trainer_args(parse_job("cats", doc)), env={})
    assert (cfg.shuffle_caption, cfg.keep_tokens, cfg.caption_tag_dropout) == (False, 0, 0.5)
    # Fixed text, which may start with a dash or hold spaces, arrives as written; unset, no flag at all.
    doc["dataset"] = {"uri": "/d", "keepTokensSeparator": "|||", "captionPrefix": "-sks style,",
                      "captionSuffix": ", high quality"}
    cfg = parse_config(builders.trainer_args(parse_job("cats", doc)), env={})
    assert (cfg.keep_tokens_separator, cfg.caption_prefix, cfg.caption_suffix) == ("|||", "-sks style,", ", high quality")
    doc["dataset"] = {"uri": "/d"}
    args = builders.trainer_args(parse_job("cats", doc))
    assert not [a for a in args if a.startswith(("--keep_tokens_separator", "--caption_prefix", "--caption_suffix"))]
    doc["dataset"] = {"uri": "/d", "shuffleCaption": False, "keepTokens": 0, "captionTagDropout": 0,
                      "captionExtension": ".txt"}                      # the CRD's defaults, as stored
    args = builders.trainer_args(parse_job("cats", doc))
    assert not {contract.FLAG_SHUFFLE_CAPTION, contract.FLAG_KEEP_TOKENS, contract.FLAG_CAPTION_TAG_DROPOUT,
                contract.FLAG_CAPTION_EXTENSION} & set(args)
    cfg = parse_config(args, env={})
    assert (cfg.shuffle_caption, cfg.keep_tokens, cfg.caption_tag_dropout, cfg.caption_extension) == (
        False, 0, 0.0, contract.DEFAULT_CAPTION_EXTENSION)
