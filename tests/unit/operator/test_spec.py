"""Parsing spec into typed values, and InvalidSpec messages that name the field and the fix."""

from __future__ import annotations

import pytest

from lorakube import spec as spec_mod
from lorakube.spec import InvalidSpec, parse_job


def test_full_spec_parses_into_typed_values(job_spec):
    job = parse_job("cats", job_spec)
    assert job.model.family == "flux"
    assert job.training.validation_prompts == ("a cat on a mat", "a dog in fog")
    assert job.training.center_crop is True
    assert job.resources.num_nodes == 3 and job.resources.world_size == 3
    assert job.output.checkpoint_uri == "/data/out/cats-lora/checkpoints"
    assert job.output.formats == ("diffusers", "comfyui")
    assert job.resources.service_account_name is None     # the pods run as the job's own account


def test_defaults_are_assumed_when_the_api_server_did_not_fill_them():
    job = parse_job("cats", {"model": {"family": "sd3", "uri": "/m"}, "dataset": {"uri": "/d"},
                             "output": {"uri": "/o"}})
    assert job.training.steps_per_epoch == 500
    assert job.training.precision == "bf16-mixed"
    assert job.training.gradient_checkpointing is True
    assert job.resources.num_nodes == 1 and job.resources.gpus_per_node == 1
    assert job.run_policy.max_restarts == 3 and job.run_policy.rendezvous_timeout_seconds == 300
    assert job.run_policy.termination_grace_period_seconds == 120


def test_gpus_set_processes_per_node_and_world_size(job_spec):
    job_spec["resources"].update(numNodes=2, gpusPerNode=8)
    job = parse_job("cats", job_spec)
    assert job.resources.procs_per_node == 8 and job.resources.world_size == 16


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda s: s["model"].update(uri="ftp://host/flux"), "spec.model.uri",
         "ftp:// is not supported yet; supported: local path, s3://, gs://, az://, hf://, modelscope://, https://"),
        (lambda s: s["dataset"].update(uri="ftp://host/cats"), "spec.dataset.uri",
         "ftp:// is not supported yet; supported: local path, s3://, gs://, az://"),
        (lambda s: s["model"].update(pretrainedLoraUri="hf://me/lora"), "spec.model.pretrainedLoraUri",
         "hf:// is not supported yet; supported: local path, s3://, gs://, az://"),
        (lambda s: s["model"].update(uri="hf://FLUX.1-dev"), "spec.model.uri", "must look like hf://<org>/<name>"),
        (lambda s: s["dataset"].update(uri="https://data.example/cats.rar"), "spec.dataset.uri",
         "must name an archive of the folder ending in .tar"),
        (lambda s: s["output"].update(uri="https://data.example/out.tar"), "spec.output.uri",
         "https:// is not supported yet; supported: local path, s3://, gs://, az://, hf://"),
        (lambda s: s["output"].update(uri="hf://me/cats-lora"), "spec.output.checkpointUri",
         "is required when spec.output.uri is an hf:// repo"),
        (lambda s: s["output"].update(uri="hf://me/cats-lora", checkpointUri="hf://me/cats-ckpt"),
         "spec.output.checkpointUri", "hf:// is not supported yet; supported: local path, s3://, gs://, az://"),
        (lambda s: s["output"].update(uri="relative/out"), "spec.output.uri", "must be an absolute path"),
        (lambda s: s["model"].pop("uri"), "spec.model.uri", "is required"),
        (lambda s: s["model"].update(family="sdxl"), "spec.model.family", "one of flux, sd3, kolors, hunyuan-dit"),
        (lambda s: s["training"].update(height=100), "spec.training.height", "not a multiple of 16"),
        (lambda s: s["training"].update(learningRate=0), "spec.training.learningRate", "(0, 1]"),
        (lambda s: s["resources"].update(numNodes=0), "spec.resources.numNodes", "between 1 and 256"),
        (lambda s: s["resources"]["env"].append({"name": "MASTER_ADDR", "value": "x"}),
         "spec.resources.env[1].name", "set by the operator"),
        (lambda s: s["resources"]["env"].append({"name": "LOCAL_RANK", "value": "0"}),
         "spec.resources.env[1].name", "the process ranks"),
        (lambda s: s["resources"]["env"].append({"name": "TORCHELASTIC_RUN_ID", "value": "x"}),
         "spec.resources.env[1].name", "remove it"),
        (lambda s: s["resources"]["volumes"].append({"name": "lorakube-shm", "emptyDir": {}}),
         "spec.resources.volumes[1].name", "reserved"),
        (lambda s: s["resources"].update(shmSize="0"), "spec.resources.shmSize", "positive quantity"),
        (lambda s: s["runPolicy"].update(gangScheduling="volcano"), "spec.runPolicy.gangScheduling",
         "not supported yet"),
        (lambda s: s["runPolicy"].update(terminationGracePeriodSeconds=-1),
         "spec.runPolicy.terminationGracePeriodSeconds", "between 0 and 3600"),
        (lambda s: s["output"].update(modelscopeModelId="lora"), "spec.output.modelscopeModelId",
         "must look like owner/name"),
        (lambda s: s["output"].update(formats=["diffusers", "diffusers"]), "spec.output.formats", "repeat"),
        (lambda s: s["dataset"].update(format="webdataset"), "spec.dataset.format",
         "one of auto, csv, jsonl, txt, kohya"),
        (lambda s: s["dataset"].update(captionDropout=1), "spec.dataset.captionDropout", "probability in [0, 1)"),
        (lambda s: s["dataset"].update(defaultCaption=7), "spec.dataset.defaultCaption", "must be a string"),
        (lambda s: s["dataset"].update(maxImagePixels=0), "spec.dataset.maxImagePixels", "at least 1"),
        (lambda s: s["dataset"].update(captionTagDropout=1), "spec.dataset.captionTagDropout",
         "a number in [0, 1)"),
        (lambda s: s["dataset"].update(shuffleCaption="yes"), "spec.dataset.shuffleCaption", "true or false"),
        (lambda s: s["dataset"].update(keepTokens=-1, shuffleCaption=True), "spec.dataset.keepTokens",
         "between 0 and 1024"),
        (lambda s: s["dataset"].update(keepTokens=1), "spec.dataset.keepTokens",
         "only matters with shuffleCaption or captionTagDropout"),
        (lambda s: s["dataset"].update(captionExtension="txt"), "spec.dataset.captionExtension",
         "such as .txt or .caption, got 'txt'"),
        (lambda s: s["dataset"].update(captionExtension=".jpg"), "spec.dataset.captionExtension", "a text file"),
        (lambda s: s["dataset"].update(keepTokensSeparator=", "), "spec.dataset.keepTokensSeparator",
         "', ' cannot mark the fixed tags: it must hold a character other than a comma"),
        (lambda s: s["dataset"].update(keepTokensSeparator=" "), "spec.dataset.keepTokensSeparator",
         "kohya's usual one is |||"),
        (lambda s: s["dataset"].update(captionPrefix=["sks"]), "spec.dataset.captionPrefix", "must be a string"),
        (lambda s: s["dataset"].update(captionSuffix=1), "spec.dataset.captionSuffix", "must be a string"),
        (lambda s: (s["dataset"].update(shuffleCaption=True), s["training"].update(cacheLatents=True, centerCrop=True)),
         "spec.training.cacheLatents", "cannot be combined with spec.dataset.shuffleCaption"),
        (lambda s: (s["dataset"].update(captionTagDropout=0.1), s["training"].update(cacheLatents=True)),
         "spec.training.cacheLatents", "cannot be combined with spec.dataset.captionTagDropout"),
    ],
)
def test_invalid_spec_names_the_field(job_spec, mutate, field, words):
    mutate(job_spec)
    with pytest.raises(InvalidSpec) as caught:
        parse_job("cats", job_spec)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert words in str(caught.value)


def test_kolors_needs_multiples_of_64(job_spec):
    job_spec["model"]["family"] = "kolors"
    job_spec["training"].update(height=96, width=64)
    with pytest.raises(InvalidSpec, match="spec.training.height: 96 is not a multiple of 64.*use 64"):
        parse_job("cats", job_spec)


@pytest.mark.parametrize("name", ["Cats", "9lives", "cats-", "a" * 55])
def test_job_name_must_fit_pod_hostnames(job_spec, name):
    with pytest.raises(InvalidSpec) as caught:
        parse_job(name, job_spec)
    assert caught.value.field == "metadata.name"


def test_longest_allowed_name_is_accepted(job_spec):
    parse_job("a" * spec_mod.contract.MAX_JOB_NAME_LENGTH, job_spec)


def test_hub_and_archive_uris_are_accepted(job_spec):
    job_spec["model"]["uri"] = "hf://black-forest-labs/FLUX.1-dev@0ef5fff789c832c5c7f4e127f94c8b54bbcced44"
    job_spec["dataset"]["uri"] = "https://data.example/sets/cats.tar.gz#sha256=" + "a" * 64
    job_spec["output"].update(uri="hf://me/cats-lora@main/run-1", checkpointUri="s3://ckpt/cats")
    job = parse_job("cats", job_spec)
    assert job.model.uri.startswith("hf://black-forest-labs/FLUX.1-dev@")
    assert job.output.uri == "hf://me/cats-lora@main/run-1" and job.output.checkpoint_uri == "s3://ckpt/cats"
    job_spec["dataset"]["uri"] = "hf://datasets/me/cats@v1/train"
    assert parse_job("cats", job_spec).dataset.uri == "hf://datasets/me/cats@v1/train"
    job_spec["model"]["uri"] = "modelscope://MusePublic/FLUX.1-dev@master"
    assert parse_job("cats", job_spec).model.uri == "modelscope://MusePublic/FLUX.1-dev@master"
    job_spec["model"]["uri"] = "modelscope://FLUX.1-dev"
    with pytest.raises(InvalidSpec, match="must look like modelscope://<owner>/<name>"):
        parse_job("cats", job_spec)


def test_modelscope_model_id_becomes_the_trainer_flag_and_never_a_token(job_spec):
    from lorakube.builders import trainer_args

    job_spec["output"]["modelscopeModelId"] = "me/cats-lora"
    args = trainer_args(parse_job("cats", job_spec))
    assert args[args.index("--modelscope_model_id") + 1] == "me/cats-lora"
    assert "--modelscope_access_token" not in args
