"""The LoRATrainingJob CRD on a real kube-apiserver: good jobs are accepted with their defaults
filled in, bad jobs are refused by `kubectl apply` with a message that names the field and the fix,
and `kubectl explain` / `kubectl get` show what a user needs."""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorakube_api import contract

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "loratrainingjobs.lorakube.io.yaml"
CRD_NAME = f"{contract.PLURAL}.{contract.API_GROUP}"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
DELETE = object()


@pytest.fixture(scope="module")
def crd(local_cluster) -> str:
    # Server-side, like lorakube_dev.sandbox installs it: modules sharing the session cluster then
    # apply the CRD as the same field manager.
    local_cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE), check=True)
    # Ready when discovery serves the new kind and the OpenAPI document that `kubectl explain`
    # reads has it (both come a little after the Established condition).
    deadline = time.monotonic() + 60
    while (local_cluster.kubectl("get", contract.SHORT_NAME, "-A").returncode != 0
           or local_cluster.kubectl("explain", f"{contract.SHORT_NAME}.spec").returncode != 0):
        if time.monotonic() > deadline:
            pytest.fail(f"kubectl does not know `{contract.SHORT_NAME}` 60 s after applying the CRD")
        time.sleep(0.5)
    return CRD_NAME


@pytest.fixture(scope="module")
def ns(local_cluster, crd):
    name = local_cluster.create_namespace()
    yield name
    local_cluster.delete_namespace(name)


def minimal_job(name: str = "minimal") -> dict[str, Any]:
    return {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": contract.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"family": "flux", "uri": "/models/flux"},
            "dataset": {"uri": "/data/product-shots"},
            "output": {"uri": "/outputs/flux-lora"},
        },
    }


def with_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """The minimal job with dotted paths set (or removed with DELETE)."""
    job = copy.deepcopy(minimal_job("case"))
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = job
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return job


def apply(local_cluster, namespace: str, documents: list[dict[str, Any]] | str, *flags: str):
    text = documents if isinstance(documents, str) else yaml.safe_dump_all(documents)
    return local_cluster.kubectl("apply", "-n", namespace, "-f", "-", *flags, input=text)


def applied_objects(stdout: str) -> list[dict[str, Any]]:
    out = json.loads(stdout)
    return out["items"] if out.get("kind") == "List" else [out]


def test_crd_with_every_cel_rule_is_accepted_and_established(local_cluster, crd):
    # The API server refuses a CRD whose rules' estimated CEL cost is over budget (the fixture
    # applied it with check=True); this says what a user sees after `kubectl apply -f crds/`.
    conditions = {c["type"]: c for c in local_cluster.get_json("crd", crd)["status"]["conditions"]}
    assert conditions["Established"]["status"] == "True"
    assert conditions["NamesAccepted"]["status"] == "True"
    assert "NonStructuralSchema" not in conditions


# --- good jobs ---------------------------------------------------------------------------------

def test_minimal_job_is_stored_with_every_default_filled_in(local_cluster, ns):
    apply(local_cluster, ns, [minimal_job()]).check_returncode()
    spec = local_cluster.get_json(contract.SHORT_NAME, "minimal", namespace=ns)["spec"]

    training = spec["training"]
    assert training["loraRank"] == 16
    assert training["learningRate"] == pytest.approx(1e-4)
    assert training["precision"] == "bf16-mixed"
    assert training["strategy"] == "auto"
    assert (training["height"], training["width"]) == (1024, 1024)
    assert training["gradientCheckpointing"] is True
    assert training["checkpointEverySteps"] == 100
    assert "loraAlpha" not in training, "loraAlpha stays unset so the trainer uses loraRank"
    assert spec["resources"] == {"numNodes": 1, "gpusPerNode": 1, "shmSize": "8Gi"}
    assert spec["output"]["formats"] == list(contract.OUTPUT_FORMATS)
    assert "checkpointUri" not in spec["output"]
    run_policy = spec["runPolicy"]
    assert run_policy["maxRestarts"] == 3
    assert run_policy["suspend"] is False
    assert run_policy["rendezvousTimeoutSeconds"] == contract.DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS
    assert run_policy["terminationGracePeriodSeconds"] == contract.DEFAULT_TERMINATION_GRACE_SECONDS
    assert run_policy["gangScheduling"] == "none"
    assert "activeDeadlineSeconds" not in run_policy
    # guidanceScale stays unset too: the trainer's default applies to the families that have one.
    assert set(training) == set(contract.TRAINING_FLAGS) - {"loraTargetModules", "loraAlpha",
                                                              "validationPrompts", "guidanceScale"}
    assert spec["dataset"] == {"uri": "/data/product-shots", "format": "auto", "captionDropout": 0,
                               "maxImagePixels": contract.DEFAULT_MAX_IMAGE_PIXELS, "shuffleCaption": False,
                               "keepTokens": 0, "captionTagDropout": 0,
                               "captionExtension": contract.DEFAULT_CAPTION_EXTENSION}


def test_a_guidance_scale_for_flux2_dev_is_accepted(local_cluster, ns):
    job = with_changes({"spec.model.family": "flux2-dev", "spec.training.guidanceScale": 3.5})
    result = apply(local_cluster, ns, [job], "--dry-run=server")
    assert result.returncode == 0, result.stderr


def test_kohya_caption_habits_are_accepted(local_cluster, ns):
    job = with_changes({"spec.dataset.shuffleCaption": True, "spec.dataset.keepTokens": 1,
                        "spec.dataset.captionTagDropout": 0.1, "spec.dataset.captionExtension": ".caption",
                        "spec.dataset.keepTokensSeparator": "|||", "spec.dataset.captionPrefix": "sks style,",
                        "spec.dataset.captionSuffix": ", high quality"})
    result = apply(local_cluster, ns, [job], "--dry-run=server")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_by_the_api_server(local_cluster, ns, example):
    result = apply(local_cluster, ns, example.read_text(), "--dry-run=server", "-o", "json")
    assert result.returncode == 0, result.stderr
    jobs = [o for o in applied_objects(result.stdout) if o["kind"] == contract.KIND]
    assert jobs, f"{example.name} holds no {contract.KIND}"
    for job in jobs:
        # Defaults were applied on top of what the example sets.
        assert job["spec"]["runPolicy"]["startupDeadlineSeconds"] >= 1
        assert job["spec"]["training"]["maxEpochs"] >= 1


@pytest.mark.parametrize(
    "family, height, width",
    [("kolors", 960, 1344), ("flux", 1008, 752), ("hunyuan-dit", 64, 4096), ("sd3", 1216, 832),
     ("z-image", 1168, 880), ("qwen-image", 1328, 1328), ("flux2-dev", 1248, 832)],
    ids=["kolors 960x1344", "flux 1008x752", "hunyuan-dit 64x4096", "sd3 1216x832", "z-image 1168x880",
         "qwen-image 1328x1328", "flux2-dev 1248x832"],
)
def test_sizes_on_the_family_multiple_are_accepted(local_cluster, ns, family, height, width):
    job = with_changes({"spec.model.family": family, "spec.training.height": height,
                        "spec.training.width": width})
    result = apply(local_cluster, ns, [job], "--dry-run=server")
    assert result.returncode == 0, result.stderr


def test_gpu_limit_equal_to_gpus_per_node_is_accepted(local_cluster, ns):
    job = with_changes({"spec.resources": {"gpusPerNode": 4, "resources": {
        "limits": {"nvidia.com/gpu": 4, "memory": "64Gi"}, "requests": {"nvidia.com/gpu": "4", "cpu": "500m"}}}})
    result = apply(local_cluster, ns, [job], "--dry-run=server")
    assert result.returncode == 0, result.stderr


def test_cpu_only_job_with_ddp_is_accepted(local_cluster, ns):
    job = with_changes({"spec.resources": {"numNodes": 2, "gpusPerNode": 0},
                        "spec.training.strategy": "ddp"})
    result = apply(local_cluster, ns, [job], "--dry-run=server")
    assert result.returncode == 0, result.stderr


def test_hub_modelscope_and_archive_uris_are_accepted(local_cluster, ns):
    job = with_changes({"spec.model.uri": "modelscope://MusePublic/FLUX.1-dev@master",
                        "spec.dataset.uri": "https://data.example.com/cats.tar.gz#sha256=" + "0" * 64,
                        "spec.output.uri": "hf://me/cats-lora@main/run-1",
                        "spec.output.checkpointUri": "s3://ckpt/cats",
                        "spec.output.modelscopeModelId": "me/cats-lora"})
    result = apply(local_cluster, ns, [job], "--dry-run=server")
    assert result.returncode == 0, result.stderr


def test_google_and_azure_object_storage_uris_are_accepted(local_cluster, ns):
    job = with_changes({"spec.model.uri": "gs://models/flux", "spec.model.pretrainedLoraUri": "az://loras/cats-v1",
                        "spec.dataset.uri": "az://datasets/cats", "spec.output.uri": "az://loras/cats-v2",
                        "spec.output.checkpointUri": "gs://ckpt/cats"})
    result = apply(local_cluster, ns, [job], "--dry-run=server")
    assert result.returncode == 0, result.stderr


# --- bad jobs ----------------------------------------------------------------------------------

BAD_JOBS = [
    # (what is wrong, changes to the minimal job, the field the error names, words of the fix)
    ("an unknown model family is refused",
     {"spec.model.family": "sdxl"}, "spec.model.family", 'supported values: "flux", "sd3", "kolors", "hunyuan-dit"'),
    ("a flux width of 1000 is not a multiple of 16",
     {"spec.training.width": 1000}, "spec.training.width", "multiple of 16"),
    ("a z-image height of 1000 is not a multiple of 16",
     {"spec.model.family": "z-image", "spec.training.height": 1000}, "spec.training.height", "multiple of 16"),
    ("a qwen-image width of 1000 is not a multiple of 16",
     {"spec.model.family": "qwen-image", "spec.training.width": 1000}, "spec.training.width", "multiple of 16"),
    ("a flux2-dev width of 1000 is not a multiple of 16",
     {"spec.model.family": "flux2-dev", "spec.training.width": 1000}, "spec.training.width", "multiple of 16"),
    ("a kolors width of 1000 is not a multiple of 64",
     {"spec.model.family": "kolors", "spec.training.width": 1000}, "spec.training.width", "multiple of 64"),
    ("a kolors height of 1008 is a multiple of 16 but not of 64",
     {"spec.model.family": "kolors", "spec.training.height": 1008}, "spec.training.height", "such as 1024, 960"),
    ("a height above 4096 is out of range",
     {"spec.training.height": 8192}, "spec.training.height", "less than or equal to 4096"),
    ("a name longer than 54 characters is refused",
     {"metadata.name": "f" * 55}, "metadata.name", "at most 54 characters"),
    ("a name with uppercase letters is refused",
     {"metadata.name": "Flux-Job"}, "metadata.name", "lowercase"),
    ("a name with dots is refused because it names a Service",
     {"metadata.name": "flux.job"}, "metadata.name", "no dots"),
    ("a name starting with a digit is refused",
     {"metadata.name": "1flux"}, "metadata.name", "start with a letter"),
    ("zero nodes are refused",
     {"spec.resources.numNodes": 0}, "spec.resources.numNodes", "greater than or equal to 1"),
    ("a thousand nodes are refused",
     {"spec.resources.numNodes": 1000}, "spec.resources.numNodes", "less than or equal to 256"),
    ("a batch size of 0 is refused",
     {"spec.training.batchSize": 0}, "spec.training.batchSize", "greater than or equal to 1"),
    ("a learning rate of 0 is refused",
     {"spec.training.learningRate": 0}, "spec.training.learningRate", "greater than 0"),
    ("a learning rate above 1 is refused",
     {"spec.training.learningRate": 3}, "spec.training.learningRate", "less than or equal to 1"),
    ("a negative seed is refused",
     {"spec.training.seed": -1}, "spec.training.seed", "greater than or equal to 0"),
    ("a rank given as a string is a type error",
     {"spec.training.loraRank": "16"}, "spec.training.loraRank", "must be of type integer"),
    ("a loraAlpha of 0 is refused",
     {"spec.training.loraAlpha": 0}, "spec.training.loraAlpha", "greater than 0"),
    ("an unknown precision is refused",
     {"spec.training.precision": "fp16"}, "spec.training.precision", '"bf16-mixed"'),
    ("an unquoted precision is a type error",
     {"spec.training.precision": 16}, "spec.training.precision", "must be of type string"),
    ("an unknown strategy is refused",
     {"spec.training.strategy": "fsdp"}, "spec.training.strategy", '"deepspeed_stage_3"'),
    ("deepspeed without GPUs is refused",
     {"spec.training.strategy": "deepspeed_stage_2", "spec.resources.gpusPerNode": 0},
     "spec.resources.gpusPerNode", "set gpusPerNode to 1 or more"),
    ("fp16 without GPUs is refused",
     {"spec.training.precision": "16-mixed", "spec.resources.gpusPerNode": 0},
     "spec.training.precision", 'use precision "32" or "bf16-mixed" for CPU runs'),
    ("cached latents with random crops are refused",
     {"spec.training.cacheLatents": True, "spec.training.centerCrop": False},
     "spec.training.cacheLatents", "set centerCrop to true"),
    ("an EMA under ZeRO-3 is refused",
     {"spec.training.emaDecay": 0.999, "spec.training.strategy": "deepspeed_stage_3",
      "spec.resources.gpusPerNode": 1},
     "spec.training.emaDecay", "use strategy deepspeed_stage_2 or set emaDecay to 0"),
    ("a guidance scale of 0 is refused",
     {"spec.training.guidanceScale": 0}, "spec.training.guidanceScale", "greater than 0"),
    ("a guidance scale for a family without a guidance embedding is refused",
     {"spec.model.family": "sd3", "spec.training.guidanceScale": 3.5},
     "spec.training.guidanceScale", "sd3 has no guidance embedding to feed it to"),
    ("a pretrained LoRA on a relative path is refused",
     {"spec.model.pretrainedLoraUri": "loras/cats"}, "spec.model.pretrainedLoraUri", "absolute path"),
    ("an nvidia.com/gpu limit that contradicts gpusPerNode is refused",
     {"spec.resources": {"gpusPerNode": 4, "resources": {"limits": {"nvidia.com/gpu": 8}}}},
     "spec.resources.resources.limits", "set gpusPerNode to the number of GPUs per pod"),
    ("a memory request that is not a quantity is refused",
     {"spec.resources.resources": {"requests": {"memory": "lots"}}},
     "spec.resources.resources.requests", "such as 8, 500m or 64Gi"),
    ("a missing model uri is refused",
     {"spec.model.uri": DELETE}, "spec.model.uri", "Required value"),
    ("a relative model path is refused",
     {"spec.model.uri": "models/flux"}, "spec.model.uri", "absolute path"),
    ("a dataset uri with a mistyped scheme is refused",
     {"spec.dataset.uri": "s3:/bucket/set"}, "spec.dataset.uri", "s3://bucket/prefix"),
    ("a missing dataset is refused",
     {"spec.dataset": DELETE}, "spec.dataset", "Required value"),
    ("a caption tag dropout of 1 is refused",
     {"spec.dataset.captionTagDropout": 1}, "spec.dataset.captionTagDropout", "should be less than 1"),
    ("keepTokens without shuffled or dropped tags is refused",
     {"spec.dataset.keepTokens": 2}, "spec.dataset.keepTokens", "set one of them or keepTokens to 0"),
    ("a caption extension without its dot is refused",
     {"spec.dataset.captionExtension": "caption"}, "spec.dataset.captionExtension", "should match"),
    ("an image ending as the caption extension is refused",
     {"spec.dataset.captionExtension": ".PNG"}, "spec.dataset.captionExtension", "caption files are text"),
    ("a comma as the keep-tokens separator is refused",
     {"spec.dataset.keepTokensSeparator": ","}, "spec.dataset.keepTokensSeparator", "should match"),
    ("a caption prefix past 1024 characters is refused",
     {"spec.dataset.captionPrefix": "x" * 1025}, "spec.dataset.captionPrefix", "Too long"),
    ("cached text encodings with shuffled tags are refused",
     {"spec.dataset.shuffleCaption": True, "spec.training.cacheLatents": True, "spec.training.centerCrop": True},
     "spec.training.cacheLatents", "set cacheLatents to false or drop them"),
    ("a missing output uri is refused",
     {"spec.output.uri": DELETE}, "spec.output.uri", "Required value"),
    ("an empty formats list is refused",
     {"spec.output.formats": []}, "spec.output.formats", "should have at least 1 items"),
    ("a duplicate format is refused",
     {"spec.output.formats": ["diffusers", "diffusers"]}, "spec.output.formats[1]", 'Duplicate value: "diffusers"'),
    ("an unknown format is refused",
     {"spec.output.formats": ["diffusers", "onnx"]}, "spec.output.formats[1]", 'supported values: "diffusers", "comfyui"'),
    ("seventeen validation prompts are too many",
     {"spec.training.validationPrompts": [f"prompt {i}" for i in range(17)]},
     "spec.training.validationPrompts", "must have at most 16 items"),
    ("validation every N steps without prompts is refused",
     {"spec.training.validationEverySteps": 100}, "spec.training.validationPrompts", "add at least one prompt"),
    ("an env entry overriding MASTER_ADDR is refused",
     {"spec.resources.env": [{"name": "MASTER_ADDR", "value": "10.0.0.1"}]},
     "spec.resources.env[0].name", "remove it"),
    ("two env entries with the same name are refused",
     {"spec.resources.env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "NCCL_DEBUG", "value": "WARN"}]},
     "spec.resources.env[1]", "Duplicate value"),
    ("an env entry with both value and valueFrom is refused",
     {"spec.resources.env": [{"name": "HF_TOKEN", "value": "x",
                              "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}}]},
     "spec.resources.env[0]", "not both"),
    ("a model on an unknown scheme is refused",
     {"spec.model.uri": "ftp://models/flux"}, "spec.model.uri", "modelscope://owner/name"),
    ("checkpoints on the Hugging Face Hub are refused",
     {"spec.output.checkpointUri": "hf://org/ckpt"}, "spec.output.checkpointUri", "shared mounted volume"),
    ("a ModelScope id without an owner is refused",
     {"spec.output.modelscopeModelId": "flux-lora"}, "spec.output.modelscopeModelId", "owner/name"),
    ("a relative mountPath is refused",
     {"spec.resources.volumeMounts": [{"name": "data", "mountPath": "data"}]},
     "spec.resources.volumeMounts[0].mountPath", "absolute path"),
    ("an unknown gang scheduler is refused",
     {"spec.runPolicy.gangScheduling": "slurm"}, "spec.runPolicy.gangScheduling", '"kueue"'),
    ("a negative maxRestarts is refused",
     {"spec.runPolicy.maxRestarts": -1}, "spec.runPolicy.maxRestarts", "greater than or equal to 0"),
    ("a failure rule without any condition is refused",
     {"spec.runPolicy.failureRules": [{"name": "Anything", "action": "Fail"}]},
     "spec.runPolicy.failureRules", "at least one of onExitCodes, onPodReasons, onMessagePattern"),
    ("a failure rule with an unknown action is refused",
     {"spec.runPolicy.failureRules": [{"name": "Nccl", "action": "Retry", "onExitCodes": [1]}]},
     "spec.runPolicy.failureRules[0].action", '"RestartWithoutCounting"'),
    ("a rendezvous timeout under 10 seconds is refused",
     {"spec.runPolicy.rendezvousTimeoutSeconds": 5}, "spec.runPolicy.rendezvousTimeoutSeconds",
     "greater than or equal to 10"),
    ("an unknown field in spec.training is refused by strict field validation",
     {"spec.training.learning_rate": 0.001}, "spec.training.learning_rate", "unknown field"),
    # Per-process ranks the launcher derives (issue #7 item 10): one pod-wide value would give
    # every process of the pod the same rank.
    *[(f"an env entry overriding {name} is refused",
       {"spec.resources.env": [{"name": name, "value": "0"}]}, "spec.resources.env[0].name",
       f"spec.resources.env {name} is set by the operator")
      for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT",
                   contract.ENV_TERMINATION_GRACE)],
    ("a volume named like the operator's own is refused",
     {"spec.resources.volumes": [{"name": "lorakube-shm", "emptyDir": {}}]},
     "spec.resources.volumes[0].name", "rename the volume"),
    ("a shmSize that is not a quantity is refused",
     {"spec.resources.shmSize": "lots"}, "spec.resources.shmSize", "positive quantity such as 8Gi"),
    ("a shmSize of zero is refused",
     {"spec.resources.shmSize": "0"}, "spec.resources.shmSize", "positive quantity"),
    # Size caps (issue #7 item 19): refused at apply, naming the field, instead of every pod
    # creation failing later with a message as long as the value.
    ("a 40,000-character toleration value is refused",
     {"spec.resources.tolerations": [{"key": "spot", "operator": "Equal", "value": "v" * 40000,
                                      "effect": "NoSchedule"}]},
     "spec.resources.tolerations[0].value", "may not be more than 63"),
    ("a toleration key longer than a label key is refused",
     {"spec.resources.tolerations": [{"key": "k" * 318, "operator": "Exists"}]},
     "spec.resources.tolerations[0].key", "may not be more than 317"),
    ("an unknown toleration effect is refused",
     {"spec.resources.tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoRun"}]},
     "spec.resources.tolerations[0].effect", '"PreferNoSchedule"'),
    ("an unknown toleration operator is refused",
     {"spec.resources.tolerations": [{"key": "spot", "operator": "In"}]},
     "spec.resources.tolerations[0].operator", '"Exists"'),
    ("sixty-five tolerations are too many",
     {"spec.resources.tolerations": [{"key": f"t{i}", "operator": "Exists"} for i in range(65)]},
     "spec.resources.tolerations", "must have at most 64 items"),
    ("a nodeSelector key longer than a label key is refused",
     {"spec.resources.nodeSelector": {"k" * 400: "x"}}, "spec.resources.nodeSelector",
     "shorten it to the node label's key"),
    ("a nodeSelector value longer than a label value is refused",
     {"spec.resources.nodeSelector": {"gpu": "v" * 64}}, "spec.resources.nodeSelector.gpu",
     "may not be more than 63"),
    ("an env value over 32 KiB is refused",
     {"spec.resources.env": [{"name": "BIG", "value": "v" * 40000}]},
     "spec.resources.env[0].value", "may not be more than 32768"),
    ("an env name over 256 characters is refused",
     {"spec.resources.env": [{"name": "N" * 300, "value": "1"}]},
     "spec.resources.env[0].name", "may not be more than 256"),
    ("129 env entries are too many",
     {"spec.resources.env": [{"name": f"V{i}", "value": "1"} for i in range(129)]},
     "spec.resources.env", "must have at most 128 items"),
    ("an env secret key longer than an object name is refused",
     {"spec.resources.env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "k" * 300}}}]},
     "spec.resources.env[0].valueFrom.secretKeyRef.key", "may not be more than 253"),
    ("an env valueFrom with two sources is refused",
     {"spec.resources.env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "t"},
                                                               "configMapKeyRef": {"name": "cfg", "key": "t"}}}]},
     "spec.resources.env[0].valueFrom", "must have at most 1 item"),
    ("a 40,000-character node affinity value is refused",
     {"spec.resources.affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
         "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z" * 40000]}]}]}}}},
     "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
     ".matchExpressions[0].values[0]", "may not be more than 63"),
    ("an unknown node affinity operator is refused",
     {"spec.resources.affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
         {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "Near"}]}}]}}},
     "spec.resources.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].preference"
     ".matchExpressions[0].operator", '"DoesNotExist"'),
    ("a pod anti-affinity topologyKey longer than a label key is refused",
     {"spec.resources.affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
         {"topologyKey": "t" * 400}]}}},
     "spec.resources.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey",
     "may not be more than 317"),
    ("sixty-five volumes are too many",
     {"spec.resources.volumes": [{"name": f"v{i}", "emptyDir": {}} for i in range(65)]},
     "spec.resources.volumes", "must have at most 64 items"),
]


@pytest.mark.parametrize("changes, field, fix", [case[1:] for case in BAD_JOBS],
                         ids=[case[0] for case in BAD_JOBS])
def test_bad_job_is_rejected_naming_the_field(local_cluster, ns, changes, field, fix):
    # `kubectl apply` as a user runs it (strict field validation is kubectl's default); the
    # server-side dry run goes through the same decoding, defaulting and validation as a write.
    result = apply(local_cluster, ns, [with_changes(changes)], "--dry-run=server")
    assert result.returncode != 0, f"accepted: {changes}"
    assert field in result.stderr, result.stderr
    assert fix in result.stderr, result.stderr


def test_capped_fields_at_their_limit_are_accepted(local_cluster, ns):
    # The caps are Kubernetes' own: a job at every limit is still a valid job.
    job = with_changes({
        "spec.resources.tolerations": [{"key": f"{'p' * 253}/{'n' * 63}", "operator": "Equal",
                                        "value": "v" * 63, "effect": "NoExecute", "tolerationSeconds": 30}]
        + [{"key": f"t{i}", "operator": "Exists"} for i in range(63)],
        "spec.resources.nodeSelector": {f"{'p' * 253}/{'n' * 63}": "v" * 63},
        "spec.resources.env": [{"name": "BIG", "value": "v" * 32768},
                               {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                               {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory",
                                                                                   "divisor": "1Mi"}}}],
        "spec.resources.shmSize": "64Gi",
        "spec.resources.affinity": {
            "nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "preference": {"matchFields": [
                    {"key": "metadata.name", "operator": "NotIn", "values": ["n" * 63]}]}}]},
            "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname", "namespaces": ["team-a"],
                    "matchLabelKeys": ["lorakube.io/attempt"],
                    "labelSelector": {"matchLabels": {"lorakube.io/job-name": "other"},
                                      "matchExpressions": [{"key": "tier", "operator": "Exists"}]},
                    "namespaceSelector": {}}}]}},
    })
    result = apply(local_cluster, ns, [job], "--dry-run=server")
    assert result.returncode == 0, result.stderr


def test_the_bad_job_table_is_big_enough():
    assert len(BAD_JOBS) >= 20
    assert len({case[0] for case in BAD_JOBS}) == len(BAD_JOBS)


def test_unknown_field_is_dropped_without_strict_validation(local_cluster, ns):
    job = with_changes({"metadata.name": "pruned", "spec.training.learning_rate": 0.001})
    strict = apply(local_cluster, ns, [job], "--validate=strict")
    assert strict.returncode != 0
    assert 'unknown field "spec.training.learning_rate"' in strict.stderr

    # Without strict validation the structural schema prunes the field silently: the job runs
    # with the default learning rate. That is why strict is the default and the way to apply.
    loose = apply(local_cluster, ns, [job], "--validate=false")
    assert loose.returncode == 0, loose.stderr
    training = local_cluster.get_json(contract.SHORT_NAME, "pruned", namespace=ns)["spec"]["training"]
    assert "learning_rate" not in training
    assert training["learningRate"] == pytest.approx(1e-4)


# --- changing a stored job (issue #7 item 7) -----------------------------------------------------

def patch_spec(local_cluster, namespace: str, name: str, spec: dict[str, Any]):
    """A merge patch of the spec, as `kubectl patch` sends it (an update of the stored job)."""
    return local_cluster.kubectl("patch", contract.SHORT_NAME, name, "-n", namespace, "--type=merge",
                                 "-p", json.dumps({"spec": spec}))


@pytest.fixture(scope="module")
def stored_job(local_cluster, ns) -> str:
    job = with_changes({"metadata.name": "stored", "spec.resources.volumes": [{"name": "data", "emptyDir": {}}],
                        "spec.resources.volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        "spec.runPolicy.activeDeadlineSeconds": 7200})
    apply(local_cluster, ns, [job]).check_returncode()
    return "stored"


IMMUTABLE_CHANGES = [
    # (what changes, merge patch of spec, words of the refusal)
    ("loraRank", {"training": {"loraRank": 32}},
     "spec.training is immutable once the job exists: a changed loraRank"),
    ("learningRate", {"training": {"learningRate": 0.001}}, "spec.training is immutable"),
    ("validation prompts", {"training": {"validationPrompts": ["a cat"]}}, "spec.training is immutable"),
    ("model family", {"model": {"family": "sd3"}}, "spec.model is immutable"),
    ("model uri", {"model": {"uri": "/models/other"}}, "spec.model is immutable"),
    ("dataset uri", {"dataset": {"uri": "/data/other"}}, "spec.dataset is immutable"),
    ("output uri", {"output": {"uri": "/outputs/other"}}, "spec.output is immutable"),
    ("a checkpointUri added", {"output": {"checkpointUri": "/checkpoints/other"}}, "spec.output is immutable"),
    ("output formats", {"output": {"formats": ["diffusers"]}}, "spec.output is immutable"),
    ("numNodes", {"resources": {"numNodes": 2}}, "spec.resources.numNodes and spec.resources.gpusPerNode"),
    ("gpusPerNode", {"resources": {"gpusPerNode": 2}}, "spec.resources.numNodes and spec.resources.gpusPerNode"),
    ("an image set", {"resources": {"image": "example/trainer:2"}}, "spec.resources (image"),
    ("container resources", {"resources": {"resources": {"limits": {"memory": "8Gi"}}}}, "spec.resources (image"),
    ("shmSize", {"resources": {"shmSize": "16Gi"}}, "spec.resources (image"),
    ("an env entry added", {"resources": {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}},
     "spec.resources (image"),
    ("a volume replaced", {"resources": {"volumes": [{"name": "data", "hostPath": {"path": "/srv"}}]}},
     "spec.resources (image"),
    ("a volume's emptyDir moved to memory",
     {"resources": {"volumes": [{"name": "data", "emptyDir": {"medium": "Memory"}}]}}, "spec.resources (image"),
    ("a volume switched to another free-form source",
     {"resources": {"volumes": [{"name": "data", "nfs": {"server": "nfs.example.com", "path": "/x"}}]}},
     "spec.resources (image"),
    ("the volumes removed", {"resources": {"volumes": None}}, "spec.resources (image"),
    ("serviceAccountName", {"resources": {"serviceAccountName": "other"}}, "spec.resources (image"),
    ("nodeSelector of a job that is not suspended", {"resources": {"nodeSelector": {"gpu": "h100"}}},
     "may change only while the job is suspended"),
    ("tolerations of a job that is not suspended",
     {"resources": {"tolerations": [{"key": "spot", "operator": "Exists"}]}},
     "may change only while the job is suspended"),
    ("gangScheduling", {"runPolicy": {"gangScheduling": "kueue"}}, "spec.runPolicy.gangScheduling is immutable"),
]


@pytest.mark.parametrize("change, words", [case[1:] for case in IMMUTABLE_CHANGES],
                         ids=[case[0] for case in IMMUTABLE_CHANGES])
def test_changing_what_is_trained_is_refused(local_cluster, ns, stored_job, change, words):
    before = local_cluster.get_json(contract.SHORT_NAME, stored_job, namespace=ns)["spec"]
    result = patch_spec(local_cluster, ns, stored_job, change)
    assert result.returncode != 0, f"accepted: {change}"
    assert words in result.stderr, result.stderr
    assert "create a new job" in result.stderr or "suspend the job first" in result.stderr, result.stderr
    assert local_cluster.get_json(contract.SHORT_NAME, stored_job, namespace=ns)["spec"] == before


MUTABLE_CHANGES = [
    ("suspend", {"runPolicy": {"suspend": True}}),
    ("resume", {"runPolicy": {"suspend": False}}),
    ("activeDeadlineSeconds", {"runPolicy": {"activeDeadlineSeconds": 86400}}),
    ("activeDeadlineSeconds removed", {"runPolicy": {"activeDeadlineSeconds": None}}),
    ("startupDeadlineSeconds", {"runPolicy": {"startupDeadlineSeconds": 1800}}),
    ("ttlSecondsAfterFinished", {"runPolicy": {"ttlSecondsAfterFinished": 3600}}),
    ("maxRestarts", {"runPolicy": {"maxRestarts": 10}}),
    ("backoffSeconds", {"runPolicy": {"backoffSeconds": 60}}),
    ("rendezvousTimeoutSeconds", {"runPolicy": {"rendezvousTimeoutSeconds": 900}}),
    ("terminationGracePeriodSeconds", {"runPolicy": {"terminationGracePeriodSeconds": 300}}),
]


@pytest.fixture(scope="module")
def tuned_job(local_cluster, ns) -> str:
    # Not stored_job: a suspension here must not let the scheduling changes above through.
    apply(local_cluster, ns, [with_changes({"metadata.name": "tuned",
                                            "spec.runPolicy.activeDeadlineSeconds": 7200})]).check_returncode()
    return "tuned"


@pytest.mark.parametrize("change", [case[1] for case in MUTABLE_CHANGES], ids=[case[0] for case in MUTABLE_CHANGES])
def test_run_policy_changes_are_accepted(local_cluster, ns, tuned_job, change):
    result = patch_spec(local_cluster, ns, tuned_job, change)
    assert result.returncode == 0, result.stderr
    stored = local_cluster.get_json(contract.SHORT_NAME, tuned_job, namespace=ns)["spec"]["runPolicy"]
    for key, value in change["runPolicy"].items():
        assert stored.get(key) == value, key


def test_scheduling_directives_change_while_suspended_as_a_queue_needs(local_cluster, ns):
    # Kueue's contract with a Job: the job waits suspended; on admission the queue writes the node
    # selector and tolerations of the capacity it chose and unsuspends, in one update.
    job = with_changes({"metadata.name": "queued", "spec.runPolicy.suspend": True})
    apply(local_cluster, ns, [job]).check_returncode()
    placement = {"nodeSelector": {"cloud.example.com/pool": "spot-h100"},
                 "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
                 "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                     "nodeSelectorTerms": [{"matchExpressions": [
                         {"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}
    admitted = patch_spec(local_cluster, ns, "queued", {"resources": placement, "runPolicy": {"suspend": False}})
    assert admitted.returncode == 0, admitted.stderr
    stored = local_cluster.get_json(contract.SHORT_NAME, "queued", namespace=ns)["spec"]
    assert {key: stored["resources"][key] for key in placement} == placement
    assert stored["runPolicy"]["suspend"] is False

    # Running again: placement is frozen until the next suspension.
    moved = patch_spec(local_cluster, ns, "queued", {"resources": {"nodeSelector": {"cloud.example.com/pool": "a100"}}})
    assert moved.returncode != 0
    assert "spec.resources.nodeSelector, tolerations and affinity may change only while the job is suspended" \
        in moved.stderr
    # Evicted by the queue: suspended, then the placement is restored.
    assert patch_spec(local_cluster, ns, "queued", {"runPolicy": {"suspend": True}}).returncode == 0
    restored = patch_spec(local_cluster, ns, "queued", {"resources": {"nodeSelector": None, "tolerations": None,
                                                                       "affinity": None}})
    assert restored.returncode == 0, restored.stderr
    assert not {"nodeSelector", "tolerations", "affinity"} & set(
        local_cluster.get_json(contract.SHORT_NAME, "queued", namespace=ns)["spec"]["resources"])
    # Even suspended, what is trained stays fixed.
    retrained = patch_spec(local_cluster, ns, "queued", {"training": {"loraRank": 64}})
    assert retrained.returncode != 0 and "spec.training is immutable" in retrained.stderr


def test_metadata_changes_are_accepted(local_cluster, ns, stored_job):
    result = local_cluster.kubectl("label", contract.SHORT_NAME, stored_job, "-n", ns, "team=vision", "--overwrite")
    assert result.returncode == 0, result.stderr


# --- status, printer columns, explain ------------------------------------------------------------

def test_status_written_like_the_operator_and_trainer_shows_in_kubectl_get(local_cluster, ns):
    apply(local_cluster, ns, [minimal_job("printed")]).check_returncode()
    progress = contract.Progress(step=120, totalSteps=500, epoch=0, loss=0.0923, samplesPerSecond=3.5,
                                 etaSeconds=380.2, updatedAt=contract.utc_now_iso()).to_status()
    status = {
        "phase": "Running", "attempt": 1, "restarts": 1, "readyNodes": "2/2",
        "observedGeneration": 1, "startTime": contract.utc_now_iso(), "progress": progress,
        "conditions": [{"type": "Running", "status": "True", "reason": "AllPodsRunning",
                        "message": "2/2 pods running", "lastTransitionTime": contract.utc_now_iso()}],
        "nodes": [{"rank": 0, "pod": "printed-node-0", "phase": "Running", "nodeName": "node-1"}],
        "lastFailure": {"pod": "printed-node-1", "exitCode": 137, "reason": "OOMKilled",
                        "message": "out of memory", "logTail": "Killed"},
        "artifacts": [{"uri": "/outputs/flux-lora/pytorch_lora_weights.safetensors",
                       "sha256": "0" * 64, "bytes": 1024, "format": "diffusers"}],
    }
    local_cluster.kubectl("patch", contract.SHORT_NAME, "printed", "-n", ns, "--subresource=status",
                          "--type=merge", "-p", json.dumps({"status": status}), check=True)
    stored = local_cluster.get_json(contract.SHORT_NAME, "printed", namespace=ns)["status"]
    assert stored == status, "the structural status schema dropped or changed a field"

    table = local_cluster.kubectl("get", contract.SHORT_NAME, "printed", "-n", ns, check=True).stdout
    header, row = table.splitlines()
    assert header.split() == ["NAME", "PHASE", "NODES", "PROGRESS", "LOSS", "ATTEMPT", "AGE"]
    assert row.split()[:6] == ["printed", "Running", "2/2", "120/500", "0.0923", "1"]
    wide = local_cluster.kubectl("get", contract.SHORT_NAME, "printed", "-n", ns, "-o", "wide", check=True)
    assert "FAMILY" in wide.stdout and "flux" in wide.stdout


def test_a_staging_job_shows_its_download_in_kubectl_get_and_keeps_every_staging_field(local_cluster, ns):
    apply(local_cluster, ns, [minimal_job("staging")]).check_returncode()
    report = contract.Staging(attempt=1, input="model", uri="s3://models/flux", bytesDone=13_107_200,
                              bytesTotal=356_725_146, cached=False, complete=False, updatedAt=contract.utc_now_iso())
    status = {"phase": "Staging", "attempt": 1, "readyNodes": "2/2", "progress": report.to_status()}
    local_cluster.kubectl("patch", contract.SHORT_NAME, "staging", "-n", ns, "--subresource=status",
                          "--type=merge", "-p", json.dumps({"status": status}), check=True)
    stored = local_cluster.get_json(contract.SHORT_NAME, "staging", namespace=ns)["status"]
    assert stored == status, "the structural status schema dropped or changed a staging field"
    row = local_cluster.kubectl("get", contract.SHORT_NAME, "staging", "-n", ns, check=True).stdout.splitlines()[1]
    assert row.split()[:5] == ["staging", "Staging", "2/2", "model", "12.5/340.2"], row


def test_status_with_an_unknown_phase_is_refused(local_cluster, ns):
    apply(local_cluster, ns, [minimal_job("phased")]).check_returncode()
    result = local_cluster.kubectl("patch", contract.SHORT_NAME, "phased", "-n", ns, "--subresource=status",
                                   "--type=merge", "-p", '{"status": {"phase": "Done"}}')
    assert result.returncode != 0
    assert "status.phase" in result.stderr and '"Succeeded"' in result.stderr


def test_jobs_are_in_the_lorakube_category_but_not_in_all(local_cluster, ns):
    apply(local_cluster, ns, [minimal_job("listed")]).check_returncode()
    assert "listed" in local_cluster.kubectl("get", "lorakube", "-n", ns, check=True).stdout
    everything = local_cluster.kubectl("get", "all", "-n", ns)
    assert "loratrainingjob" not in everything.stdout + everything.stderr


def test_explain_training_describes_every_flag(local_cluster, crd):
    out = local_cluster.kubectl("explain", "loratrainingjob.spec.training", check=True).stdout
    assert "Training hyperparameters" in out
    # FIELDS: blocks of "  <name>\t<type>", an optional "  enum: ..." line, the description.
    blocks = dict(re.findall(r"^  (\w+)\t<[^>]+>\n(?:  enum: .*\n)?((?:    .*\n)+)", out, flags=re.MULTILINE))
    assert sorted(blocks) == sorted(contract.TRAINING_FLAGS)
    for key, flag in contract.TRAINING_FLAGS.items():
        assert flag in blocks[key], f"kubectl explain does not tell {key} is the trainer's {flag}"


def test_explain_a_single_field_shows_its_description_and_type(local_cluster, crd):
    out = local_cluster.kubectl("explain", f"{contract.SHORT_NAME}.spec.training.loraRank", check=True).stdout
    assert "loraRank <integer>" in out
    assert "Rank of the LoRA matrices (--lora_rank)" in out
