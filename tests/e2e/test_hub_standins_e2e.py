"""A job through the operator whose model comes from a Hugging Face Hub repo and whose LoRA goes to
another Hub repo and to ModelScope, against loopback STAND-INS of both (localcluster/hub_standins.py,
on the node bridge's address, which only the host and its pods reach), tokens from a Secret."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from localcluster.hub_standins import HfHubStandIn, ModelScopeStandIn
from lorakube_api import contract
from lorakube_dev import sandbox
from localcluster.node.hostregistry import GATEWAY

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

BRIDGE_ADDRESS = str(GATEWAY)     # the host as pods of the process node see it (node/README.md)
JOB_TIMEOUT = 600
HF_TOKEN = "hf_e2e_standin_token_77aa"
MS_TOKEN = "ms-e2e-standin-token-31bc"


@pytest.fixture
def bridge_hubs(local_cluster):
    # The bridge exists while the node runs, hence the local_cluster fixture first.
    hub, modelscope = HfHubStandIn(token=HF_TOKEN, host=BRIDGE_ADDRESS), ModelScopeStandIn(token=MS_TOKEN,
                                                                                            host=BRIDGE_ADDRESS)
    try:
        yield hub, modelscope
    finally:
        hub.stop()
        modelscope.stop()


# One training through the operator (about a minute here, more on a busy machine): slow tier.
@pytest.mark.slow
def test_hub_standins_model_from_hf_lora_to_hf_and_modelscope_through_the_operator(
        local_cluster, job_namespace, data_dir, start_operator, bridge_hubs):
    hub, modelscope = bridge_hubs
    sha = hub.put_folder("org/tiny-flux", data_dir / "model")
    hub.create_repo("org/cats-lora")
    modelscope.create_repo("org/cats-lora")

    secret = {**hub.env(), **modelscope.env()}
    secret.pop("HF_HUB_OFFLINE")
    local_cluster.kubectl("apply", "-n", job_namespace, "-f", "-", check=True, input=json.dumps(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hub-tokens"},
         "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()}}))

    name = "hubjob"
    job = sandbox.quickstart_job(data_dir, name, training={"stepsPerEpoch": 2, "checkpointEverySteps": 2})
    spec = job["spec"]
    ref = {"name": "hub-tokens"}
    spec["model"].update(uri=f"hf://org/tiny-flux@{sha}", secretRef=ref)
    spec["output"].update(uri="hf://org/cats-lora/run", checkpointUri=f"/data/output/{name}/checkpoints",
                          secretRef=ref, modelscopeModelId="org/cats-lora")
    spec["resources"]["numNodes"] = 1
    # The quickstart keeps the Hub off for its local model; this job reads one from the Hub.
    spec["resources"]["env"] = [e for e in spec["resources"]["env"] if e["name"] != "HF_HUB_OFFLINE"] + [
        {"name": "HF_HUB_OFFLINE", "value": "0"}, {"name": "LORAKUBE_CACHE_DIR", "value": "/cache"},
        {"name": "MODELSCOPE_CACHE", "value": "/cache/modelscope"}, {"name": "MODELSCOPE_HOME", "value": "/cache/ms-home"},
        {"name": "HF_HUB_DISABLE_XET", "value": "1"}]
    spec["resources"]["volumes"].append({"name": "cache", "emptyDir": {}})
    spec["resources"]["volumeMounts"].append({"name": "cache", "mountPath": "/cache"})

    start_operator()
    sandbox.apply_job(local_cluster.cluster.kubectl, job_namespace, job)
    final = sandbox.follow(local_cluster.cluster.kubectl, job_namespace, name, JOB_TIMEOUT, interval=0.5)
    status = final["status"]
    pods = json.loads(local_cluster.kubectl("get", "pods", "-n", job_namespace, "-o", "json", check=True).stdout)
    logs = {p["metadata"]["name"]: local_cluster.kubectl("logs", p["metadata"]["name"], "-n", job_namespace).stdout
            for p in pods["items"]}
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1) + "\n".join(v[-3000:] for v in logs.values())

    # The model came from the stand-in at the pinned commit.
    assert any(f"/org/tiny-flux/resolve/{sha}/model_index.json" in path for path in hub.downloads())

    # status.artifacts: the files in the Hub repo and on ModelScope, their sha256 and sizes the
    # uploaded bytes' own, the manifest among them.
    in_hub, on_modelscope = hub.files("org/cats-lora"), modelscope.files("org/cats-lora")
    manifest = json.loads(in_hub[f"run/{contract.ARTIFACT_MANIFEST}"])
    listed = {a["uri"]: a for a in status["artifacts"]}
    expected = {*manifest["files"], contract.ARTIFACT_MANIFEST}
    assert {u for u in listed if u.startswith("hf://")} == {f"hf://org/cats-lora/run/{f}" for f in expected}
    assert {u for u in listed if u.startswith("modelscope://")} == {f"modelscope://org/cats-lora/{f}" for f in expected}
    for uri, entry in listed.items():
        body = in_hub[f"run/{uri.rsplit('/', 1)[-1]}"] if uri.startswith("hf://") else on_modelscope[uri.rsplit("/", 1)[-1]]
        assert (hashlib.sha256(body).hexdigest(), len(body)) == (entry["sha256"], entry["bytes"]), uri
    assert modelscope.created == []

    # The tokens reached the pod only by reference and appear in no log, Event, status or artifact.
    container = pods["items"][0]["spec"]["containers"][0]
    # One Secret for the model and the output, each under its section's prefix (storage.role_env).
    assert container["envFrom"] == [{"prefix": contract.SECRET_ENV_PREFIXES[role], "secretRef": ref}
                                    for role in ("model", "output")]
    assert "--modelscope_access_token" not in json.dumps(container)
    events = local_cluster.kubectl("get", "events", "-n", job_namespace, "-o", "json", check=True).stdout
    for token in (HF_TOKEN, MS_TOKEN):
        for where, text in (*logs.items(), ("events", events), ("status", json.dumps(status)),
                            ("pods", json.dumps(pods)), ("job", json.dumps(final))):
            assert token not in text, where
        for body in [*in_hub.values(), *on_modelscope.values()]:
            assert token.encode() not in body
