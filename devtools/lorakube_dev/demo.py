"""`lorakube-dev demo`: the whole product on one machine, in one command.

Brings up a local cluster (real kube-apiserver, controllers, a process node), builds the tiny FLUX
model, installs the CRD and RBAC, starts the operator under its ServiceAccount's token, applies
examples/quickstart.yaml (a 2-node CPU job), shows phase and progress until the job ends, prints
where the LoRA and the sample image are, and tears the cluster down unless --keep is given.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lorakube import status as st
from lorakube_api import contract
from lorakube_dev import sandbox

JOB_NAMESPACE = "lorakube-demo"
JOB_NAME = "quickstart"


def default_state_dir() -> Path:
    from localcluster.build import cache_root

    return cache_root() / "demo"


def _say(text: str) -> None:
    print(f"[lorakube-dev demo] {text}", flush=True)


def _show(status: dict) -> None:
    progress = status.get("progress") or {}
    loss = f", loss {progress['loss']}" if progress.get("loss") else ""
    _say(f"phase {status.get('phase') or '-'}, nodes {status.get('readyNodes') or '-'}, "
         f"step {progress.get('text') or '-'}{loss}, attempt {status.get('attempt') or '-'}")


def run(state_dir: str | Path | None = None, keep: bool = False, timeout: float = 900.0) -> int:
    from localcluster import kubeconfig as kubeconfig_mod
    from localcluster.cluster import ClusterError, LocalCluster

    state = Path(state_dir) if state_dir else default_state_dir()
    data_dir = state / "data"
    cluster = LocalCluster(state / "cluster", log=_say)
    operator = None
    started = time.monotonic()
    try:
        cluster.up()
        sandbox.prepare_data(data_dir, log=_say)
        kubectl = cluster.kubectl
        sandbox.install(kubectl, JOB_NAMESPACE)
        token = sandbox.operator_token(kubectl)
        operator_kubeconfig = kubeconfig_mod.write_for_token(
            state / "operator.kubeconfig", cluster.server, cluster.ca_file, sandbox.OPERATOR_SERVICE_ACCOUNT, token)
        operator = sandbox.OperatorProcess(operator_kubeconfig, state / "operator.log").start()
        _say(f"operator running as {sandbox.OPERATOR_NAMESPACE}/{sandbox.OPERATOR_SERVICE_ACCOUNT} "
             f"(log: {state / 'operator.log'}; metrics: {operator.http_url}/metrics)")
        # A fresh run each time: an earlier demo's job and checkpoints would make this one resume.
        kubectl("delete", contract.SHORT_NAME, JOB_NAME, "-n", JOB_NAMESPACE, "--ignore-not-found", "--wait=true")
        shutil.rmtree(data_dir / "output" / JOB_NAME, ignore_errors=True)
        job = sandbox.quickstart_job(data_dir, JOB_NAME)
        sandbox.apply_job(kubectl, JOB_NAMESPACE, job)
        _say(f"applied examples/quickstart.yaml as {JOB_NAMESPACE}/{JOB_NAME}")
        body = sandbox.follow(kubectl, JOB_NAMESPACE, JOB_NAME, timeout, on_change=_show, interval=0.5)
        print(kubectl("get", contract.SHORT_NAME, "-n", JOB_NAMESPACE).stdout, flush=True)
        status = body.get("status") or {}
        output = data_dir / "output" / JOB_NAME
        if status.get("phase") != st.SUCCEEDED_PHASE:
            failure = status.get("lastFailure") or {}
            _say(f"the job failed: {failure.get('message') or status.get('conditions')}")
            if failure.get("logTail"):
                print(failure["logTail"], flush=True)
            return 1
        _say(f"done in {time.monotonic() - started:.0f}s")
        _say(f"LoRA (diffusers/peft keys): {output / contract.ARTIFACT_LORA_DIFFUSERS}")
        _say(f"LoRA (ComfyUI/kohya keys):  {output / contract.ARTIFACT_LORA_COMFYUI}")
        _say(f"validation images:          {output / contract.ARTIFACT_VALIDATION_GRID}")
        return 0
    except (sandbox.SandboxError, ClusterError) as exc:
        _say(f"error: {exc}")
        return 2
    finally:
        if keep and operator is not None and operator.running:
            _say(f"left the cluster and the operator up (--keep): export KUBECONFIG={cluster.kubeconfig}; "
                 f"stop them with: kill {operator.process.pid}; "
                 f"python -m localcluster down --state-dir {cluster.state_dir}")
        else:
            if operator is not None:
                operator.stop()
            if not keep:
                cluster.down()
