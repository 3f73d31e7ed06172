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

from lorakube import contract

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "loratrainingjobs.lorakube.io.yaml"
CRD_NAME = f"{contract.PLURAL}.{contract.API_GROUP}"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
DELETE = object()


@pytest.fixture(scope="module")
def crd(local_cluster) -> str:
    # Server-side, like lorakube.sandbox installs it: modules sharing the session cluster then
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
    assert spec["resources"] == {"numNodes": 1, "gpusPerNode": 1}
    assert spec["output"]["formats"] == list(contract.OUTPUT_FORMATS)
    assert "checkpointUri" not in spec["output"]
    run_policy = spec["runPolicy"]
    assert run_policy["maxRestarts"] == 3
    assert run_policy["suspend"] is False
    assert run_policy["rendezvousTimeoutSeconds"] == contract.DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS
    assert run_policy["gangScheduling"] == "none"
    assert "activeDeadlineSeconds" not in run_policy
    assert set(training) == set(contract.TRAINING_FLAGS) - {"loraTargetModules", "loraAlpha",
                                                              "validationPrompts"}


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
    [("kolors", 960, 1344), ("flux", 1008, 752), ("hunyuan-dit", 64, 4096), ("sd3", 1216, 832)],
    ids=["kolors 960x1344", "flux 1008x752", "hunyuan-dit 64x4096", "sd3 1216x832"],
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


# --- bad jobs ----------------------------------------------------------------------------------

BAD_JOBS = [
    # (what is wrong, changes to the minimal job, the field the error names, words of the fix)
    ("an unknown model family is refused",
     {"spec.model.family": "sdxl"}, "spec.model.family", 'supported values: "flux", "sd3", "kolors", "hunyuan-dit"'),
    ("a flux width of 1000 is not a multiple of 16",
     {"spec.training.width": 1000}, "spec.training.width", "multiple of 16"),
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
    ("a rendezvous timeout under 10 seconds is refused",
     {"spec.runPolicy.rendezvousTimeoutSeconds": 5}, "spec.runPolicy.rendezvousTimeoutSeconds",
     "greater than or equal to 10"),
    ("an unknown field in spec.training is refused by strict field validation",
     {"spec.training.learning_rate": 0.001}, "spec.training.learning_rate", "unknown field"),
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
