"""The Service and pods built for a job: names, labels, env per rank, argv, security, owners."""

from __future__ import annotations

import re

import pytest

from lorakube import builders
from lorakube_api import contract
from lorakube.spec import InvalidSpec, JobRef, parse_job

from ltj_fixtures import UID

JOB = JobRef(name="cats", namespace="team-a", uid=UID)
CONFIG = builders.OperatorConfig(trainer_image="example/trainer:1", image_pull_policy="IfNotPresent")


def env_of(pod):
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


@pytest.fixture
def job(job_spec):
    return parse_job("cats", job_spec)


def test_service_is_headless_and_publishes_not_ready_addresses():
    svc = builders.build_service(JOB)
    assert svc["metadata"]["name"] == "cats"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {contract.LABEL_JOB_NAME: "cats"}
    assert [p["port"] for p in svc["spec"]["ports"]] == [contract.DEFAULT_MASTER_PORT]
    assert svc["metadata"]["ownerReferences"] == [JOB.owner_reference()]


def test_pods_have_stable_names_hostnames_and_labels(job):
    pods = builders.build_pods(job, JOB, attempt=2, config=CONFIG)
    assert [p["metadata"]["name"] for p in pods] == ["cats-node-0", "cats-node-1", "cats-node-2"]
    second = pods[1]
    assert second["spec"]["hostname"] == "cats-node-1"
    assert second["spec"]["subdomain"] == "cats"
    assert second["spec"]["restartPolicy"] == "Never"
    assert second["metadata"]["labels"] == {
        contract.LABEL_JOB_NAME: "cats", contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
        contract.LABEL_RANK: "1", contract.LABEL_ATTEMPT: "2",
    }


def test_only_rank_0_declares_the_trainer_metrics_port(job):
    def ports(rank):
        return {p["name"]: p["containerPort"]
                for p in builders.build_pod(job, JOB, 1, rank, CONFIG)["spec"]["containers"][0]["ports"]}

    assert ports(0) == {"rendezvous": contract.DEFAULT_MASTER_PORT, "metrics": contract.TRAINER_METRICS_PORT}
    assert ports(1) == {"rendezvous": contract.DEFAULT_MASTER_PORT}
    assert contract.ENV_METRICS_PORT not in env_of(builders.build_pod(job, JOB, 1, 0, CONFIG)), \
        "the trainer's default port is the declared one: nothing to inject"


def test_owner_reference_makes_the_job_the_controller(job):
    (owner,) = builders.build_pod(job, JOB, 1, 0, CONFIG)["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "lorakube.io/v1alpha1", "kind": "LoRATrainingJob", "name": "cats",
                     "uid": UID, "controller": True, "blockOwnerDeletion": True}


def test_rendezvous_env_for_rank_0_and_rank_1_of_three(job):
    rank0 = env_of(builders.build_pod(job, JOB, 1, 0, CONFIG))
    rank1 = env_of(builders.build_pod(job, JOB, 1, 1, CONFIG))
    for env in (rank0, rank1):
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "cats-node-0.cats.team-a.svc"
        assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "29500"
        assert env["WORLD_SIZE"] == "3"
        assert env["NNODES"] == env["PET_NNODES"] == "3"
        assert env["NPROC_PER_NODE"] == env["PET_NPROC_PER_NODE"] == "1"
        assert env[contract.ENV_JOB_NAME] == "cats" and env[contract.ENV_JOB_NAMESPACE] == "team-a"
        assert env[contract.ENV_ATTEMPT] == "1"
        assert env[contract.ENV_RENDEZVOUS_TIMEOUT] == "300"
        assert env["HF_HUB_OFFLINE"] == "1"  # the user's env follows ours
    assert rank0["NODE_RANK"] == rank0["PET_NODE_RANK"] == "0"
    assert rank1["NODE_RANK"] == rank1["PET_NODE_RANK"] == "1"
    assert rank0[contract.ENV_POD_NAME] == "cats-node-0" and rank1[contract.ENV_POD_NAME] == "cats-node-1"
    assert rank0[contract.ENV_REPORT_PROGRESS] == "1"
    assert contract.ENV_REPORT_PROGRESS not in rank1


def test_the_grace_period_reaches_the_pod_and_the_trainer(job, job_spec):
    pod = builders.build_pod(job, JOB, 1, 1, CONFIG)
    assert pod["spec"]["terminationGracePeriodSeconds"] == contract.DEFAULT_TERMINATION_GRACE_SECONDS == 120
    assert env_of(pod)[contract.ENV_TERMINATION_GRACE] == "120"
    job_spec["runPolicy"]["terminationGracePeriodSeconds"] = 45
    pod = builders.build_pod(parse_job("cats", job_spec), JOB, 1, 0, CONFIG)
    assert pod["spec"]["terminationGracePeriodSeconds"] == 45
    assert env_of(pod)[contract.ENV_TERMINATION_GRACE] == "45"


def test_world_size_counts_processes_not_pods(job_spec):
    job_spec["resources"].update(numNodes=2, gpusPerNode=4)
    env = env_of(builders.build_pod(parse_job("cats", job_spec), JOB, 1, 1, CONFIG))
    assert env["WORLD_SIZE"] == "8" and env["NPROC_PER_NODE"] == "4" and env["NNODES"] == "2"


def test_trainer_command_is_an_argv_list_derived_from_the_spec(job):
    container = builders.build_pod(job, JOB, 1, 0, CONFIG)["spec"]["containers"][0]
    assert container["command"] == ["lorakube-train"]
    args = container["args"]
    assert all(isinstance(a, str) for a in args)

    def value(flag):
        return args[args.index(flag) + 1]

    assert value("--model_family") == "flux"
    assert value("--model_path") == "/data/models/tiny-flux"
    assert value("--dataset_path") == "/data/datasets/cats"
    assert value("--output_path") == "/data/out/cats-lora"
    assert value("--checkpoint_dir") == "/data/out/cats-lora/checkpoints"
    assert value("--output_formats") == "diffusers,comfyui"
    assert value("--resume") == "auto"
    assert value("--steps_per_epoch") == "8"
    assert value("--learning_rate") == "0.0001"
    assert value("--precision") == "32"
    assert value("--training_strategy") == "ddp"
    assert value("--seed") == "7"
    assert value("--lora_alpha") == "4.0"  # unset loraAlpha defaults to the rank
    assert value("--accelerator") == "cpu"  # gpusPerNode 0
    # booleans are switches: present when true, absent when false
    assert "--center_crop" in args and "--use_gradient_checkpointing" in args
    assert "--random_flip" not in args and "--cache_latents" not in args
    # one flag per validation prompt, prompt text passed verbatim (no shell anywhere)
    prompts = [args[i + 1] for i, a in enumerate(args) if a == "--validation_prompt"]
    assert prompts == ["a cat on a mat", "a dog in fog"]
    assert "--lora_target_modules" not in args  # unset: the trainer uses the family's default


def test_cached_latents_become_the_trainer_switch(job_spec):
    job_spec["training"].update(cacheLatents=True, centerCrop=True)
    container = builders.build_pod(parse_job("cats", job_spec), JOB, 1, 0, CONFIG)["spec"]["containers"][0]
    args = container["command"] + container.get("args", [])
    assert "--cache_latents" in args and "--center_crop" in args


def test_lora_targets_are_comma_joined_and_gpu_jobs_ask_for_gpus(job_spec):
    job_spec["training"]["loraTargetModules"] = ["to_q", "to_k"]
    job_spec["training"]["loraAlpha"] = 8
    job_spec["resources"]["gpusPerNode"] = 2
    args = builders.trainer_args(parse_job("cats", job_spec))
    assert args[args.index("--lora_target_modules") + 1] == "to_q,to_k"
    assert args[args.index("--lora_alpha") + 1] == "8.0"
    # Never a silent fall back to CPU: the trainer's preflight fails when the GPUs are not visible.
    assert args[args.index("--accelerator") + 1] == "gpu"


def test_the_training_knobs_and_a_pretrained_lora_reach_the_trainer(job_spec):
    job_spec["training"].update(lrScheduler="cosine", lrWarmupSteps=50, maxGradNorm=1, loraDropout=0.1,
                                emaDecay=0.999, aspectRatioBuckets=True)
    job_spec["model"]["pretrainedLoraUri"] = "s3://loras/cats-v1"
    args = builders.trainer_args(parse_job("cats", job_spec))
    pairs = dict(zip(args[::2], args[1::2]))
    assert {k: pairs[k] for k in ("--lr_scheduler", "--lr_warmup_steps", "--max_grad_norm", "--lora_dropout",
                                  "--ema_decay", "--pretrained_lora_path")} == {
        "--lr_scheduler": "cosine", "--lr_warmup_steps": "50", "--max_grad_norm": "1.0", "--lora_dropout": "0.1",
        "--ema_decay": "0.999", "--pretrained_lora_path": "s3://loras/cats-v1"}
    assert "--aspect_ratio_buckets" in args


def test_guidance_scale_reaches_the_trainer_only_when_set(job_spec):
    """Unset, the trainer's default (1.0) applies and the command line stays the original one."""
    assert "--guidance_scale" not in builders.trainer_args(parse_job("cats", job_spec))
    job_spec["model"]["family"] = "flux2-dev"
    job_spec["training"]["guidanceScale"] = 3.5
    args = builders.trainer_args(parse_job("cats", job_spec))
    assert args[args.index("--guidance_scale") + 1] == "3.5"


@pytest.mark.parametrize(("family", "value", "says"), [
    ("flux", 0, "must be a number > 0"), ("flux", -1.0, "must be a number > 0"), ("flux", True, "> 0"),
    ("flux", "high", "> 0"), ("sd3", 3.5, "sd3 has no guidance embedding to feed it to (only flux, flux2-dev have "
                                          "one); remove guidanceScale"),
    ("flux2-klein", 1.0, "flux2-klein has no guidance embedding"),
])
def test_a_bad_guidance_scale_is_invalid_naming_the_field(job_spec, family, value, says):
    job_spec["model"]["family"] = family
    job_spec["training"]["guidanceScale"] = value
    with pytest.raises(InvalidSpec, match=re.escape(says)) as err:
        parse_job("cats", job_spec)
    assert err.value.field == "spec.training.guidanceScale"


@pytest.mark.parametrize(("field", "value", "says"), [
    ("loraDropout", 1, "in [0, 1)"), ("emaDecay", -0.1, "in [0, 1)"), ("maxGradNorm", "big", ">= 0"),
    ("lrScheduler", "step", "constant"),
])
def test_a_bad_training_knob_is_invalid_naming_the_field(job_spec, field, value, says):
    job_spec["training"][field] = value
    with pytest.raises(InvalidSpec, match=re.escape(says)) as err:
        parse_job("cats", job_spec)
    assert err.value.field == f"spec.training.{field}"


def test_every_trainer_flag_the_operator_passes_is_known_to_the_contract(job):
    known = set(contract.TRAINING_FLAGS.values()) | {
        contract.FLAG_MODEL_FAMILY, contract.FLAG_MODEL_PATH, contract.FLAG_DATASET_PATH,
        contract.FLAG_OUTPUT_PATH, contract.FLAG_CHECKPOINT_DIR, contract.FLAG_OUTPUT_FORMATS,
        contract.FLAG_RESUME, contract.FLAG_ACCELERATOR, contract.FLAG_PRETRAINED_LORA_PATH}
    assert {a for a in builders.trainer_args(job) if a.startswith("--")} <= known


def test_security_context_is_pod_security_restricted(job):
    pod = builders.build_pod(job, JOB, 1, 0, CONFIG)
    pod_ctx = pod["spec"]["securityContext"]
    ctr_ctx = pod["spec"]["containers"][0]["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] != 0
    assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctr_ctx["allowPrivilegeEscalation"] is False
    assert ctr_ctx["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in ctr_ctx
    assert not any("hostNetwork" in k or "hostPID" in k for k in pod["spec"])


def test_pod_security_context_skips_the_recursive_chown_of_large_volumes(job):
    # Without OnRootMismatch kubelet walks every file of a PVC holding models and checkpoints at
    # every pod start to set fsGroup.
    ctx = builders.build_pod(job, JOB, 1, 0, CONFIG)["spec"]["securityContext"]
    assert ctx["fsGroupChangePolicy"] == "OnRootMismatch"
    assert ctx["fsGroup"] == builders.TRAINER_UID


def test_every_pod_mounts_a_memory_backed_dev_shm_of_the_default_size(job):
    for pod in builders.build_pods(job, JOB, 1, CONFIG):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["lorakube-shm"] == {"name": "lorakube-shm",
                                           "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
        mounts = pod["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "lorakube-shm", "mountPath": "/dev/shm"} in mounts
        assert len({m["mountPath"] for m in mounts}) == len(mounts)


def test_shm_size_comes_from_the_spec(job_spec):
    job_spec["resources"]["shmSize"] = "64Gi"
    pod = builders.build_pod(parse_job("cats", job_spec), JOB, 1, 0, CONFIG)
    (shm,) = [v for v in pod["spec"]["volumes"] if v["name"] == builders.SHM_VOLUME]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}


def test_a_job_without_volumes_still_gets_dev_shm(job_spec):
    del job_spec["resources"]["volumes"], job_spec["resources"]["volumeMounts"]
    pod = builders.build_pod(parse_job("cats", job_spec), JOB, 1, 0, CONFIG)
    assert [v["name"] for v in pod["spec"]["volumes"]] == [builders.SHM_VOLUME]
    assert pod["spec"]["containers"][0]["volumeMounts"] == [{"name": builders.SHM_VOLUME,
                                                             "mountPath": "/dev/shm"}]


def test_a_users_own_dev_shm_mount_is_kept_and_not_doubled(job_spec):
    # Jobs written before shmSize existed mount their own emptyDir there; two mounts at one path
    # would make the API server refuse the pod.
    job_spec["resources"]["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    job_spec["resources"]["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm/"})
    pod = builders.build_pod(parse_job("cats", job_spec), JOB, 1, 0, CONFIG)
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["data", "dshm"]
    assert [m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]] == ["data", "dshm"]


def test_user_scheduling_and_volumes_are_passed_through(job_spec):
    job_spec["resources"].update(
        nodeSelector={"gpu": "a100"}, tolerations=[{"key": "spot", "operator": "Exists"}],
        affinity={"nodeAffinity": {}}, priorityClassName="training", serviceAccountName="trainer-x",
        imagePullSecrets=[{"name": "regcred"}], image="my/trainer:2", imagePullPolicy="Always",
        gpusPerNode=2, resources={"requests": {"cpu": "4"}, "limits": {"memory": "32Gi"}})
    job_spec["model"]["secretRef"] = {"name": "hub"}
    pod = builders.build_pod(parse_job("cats", job_spec), JOB, 1, 0, CONFIG)
    spec = pod["spec"]
    container = spec["containers"][0]
    assert spec["nodeSelector"] == {"gpu": "a100"}
    assert spec["tolerations"] == [{"key": "spot", "operator": "Exists"}]
    assert spec["affinity"] == {"nodeAffinity": {}}
    assert spec["priorityClassName"] == "training"
    assert spec["serviceAccountName"] == "trainer-x"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["volumes"][0] == {"name": "data", "hostPath": {"path": "/srv/lorakube", "type": "Directory"}}
    assert container["volumeMounts"][0] == {"name": "data", "mountPath": "/data"}
    assert container["image"] == "my/trainer:2" and container["imagePullPolicy"] == "Always"
    assert container["resources"] == {"requests": {"cpu": "4"},
                                      "limits": {"memory": "32Gi", "nvidia.com/gpu": 2}}
    assert container["envFrom"] == [{"prefix": "LORAKUBE_MODEL_", "secretRef": {"name": "hub"}}]


def test_defaults_come_from_the_operator_config(job):
    pod = builders.build_pod(job, JOB, 1, 0, CONFIG)
    container = pod["spec"]["containers"][0]
    assert container["image"] == "example/trainer:1"
    assert pod["spec"]["serviceAccountName"] == "cats-trainer"     # the job's own, made by the operator
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert builders.OperatorConfig.from_env({"LORAKUBE_TRAINER_IMAGE": "x/y:z"}).trainer_image == "x/y:z"


def test_builders_do_not_share_mutable_state_with_the_spec(job):
    first = builders.build_pod(job, JOB, 1, 0, CONFIG)
    first["spec"]["volumes"][0]["name"] = "changed"
    first["spec"]["containers"][0]["env"][-1]["value"] = "changed"
    second = builders.build_pod(job, JOB, 1, 0, CONFIG)
    assert second["spec"]["volumes"][0]["name"] == "data"
    assert second["spec"]["containers"][0]["env"][-1]["value"] == "1"


def test_an_s3_job_passes_its_uris_and_takes_credentials_only_through_env_from(job_spec):
    job_spec["model"].update(uri="s3://models/flux", secretRef={"name": "s3-read"})
    job_spec["dataset"].update(uri="s3://datasets/cats", secretRef={"name": "s3-read"})
    job_spec["output"].update(uri="s3://loras/cats", checkpointUri="s3://ckpt/cats", secretRef={"name": "s3-write"})
    pod = builders.build_pod(parse_job("cats", job_spec), JOB, 1, 0, CONFIG)
    container = pod["spec"]["containers"][0]
    args = container["args"]
    for flag, uri in ((contract.FLAG_MODEL_PATH, "s3://models/flux"), (contract.FLAG_DATASET_PATH, "s3://datasets/cats"),
                      (contract.FLAG_OUTPUT_PATH, "s3://loras/cats"), (contract.FLAG_CHECKPOINT_DIR, "s3://ckpt/cats")):
        assert args[args.index(flag) + 1] == uri
    # Each section's Secret by reference, under its own prefix: no credential value is ever written
    # into the pod spec, and the output's AWS_ACCESS_KEY_ID cannot shadow the inputs' one.
    assert container["envFrom"] == [{"prefix": "LORAKUBE_MODEL_", "secretRef": {"name": "s3-read"}},
                                    {"prefix": "LORAKUBE_DATASET_", "secretRef": {"name": "s3-read"}},
                                    {"prefix": "LORAKUBE_OUTPUT_", "secretRef": {"name": "s3-write"}}]
    assert not [e for e in container["env"] if e["name"].startswith("AWS_")]


def test_the_output_secret_reaches_the_other_ranks_only_when_they_write_checkpoints_there(job_spec):
    job_spec["resources"]["numNodes"] = 3
    job_spec["model"].update(uri="s3://models/flux", secretRef={"name": "s3-read"})
    job_spec["output"].update(uri="s3://loras/cats", checkpointUri="/data/ckpt/cats", secretRef={"name": "s3-write"})

    def secrets_by_rank(spec):
        pods = builders.build_pods(parse_job("cats", spec), JOB, 1, CONFIG)
        return [{s["secretRef"]["name"] for s in pod["spec"]["containers"][0].get("envFrom", [])} for pod in pods]

    # Checkpoints on a volume: only rank 0 writes to the output bucket (the artifacts).
    assert secrets_by_rank(job_spec) == [{"s3-read", "s3-write"}, {"s3-read"}, {"s3-read"}]
    # Checkpoints in object storage: every rank uploads its own files and fetches them on resume.
    job_spec["output"].pop("checkpointUri")
    assert secrets_by_rank(job_spec) == [{"s3-read", "s3-write"}] * 3
    # No secretRef anywhere: no envFrom at all.
    for section in ("model", "output"):
        job_spec[section].pop("secretRef")
    assert secrets_by_rank(job_spec) == [set()] * 3
