"""The operator's pod watch is filtered by the API server: pods that are not ours never reach it.

Before the fix Kopf watched every pod of the cluster and dropped the others client-side (each of
them cost the operator a decode and an index lookup, and memory on a busy cluster).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from lorakube_api import contract
from lorakube_dev import sandbox

pytestmark = pytest.mark.cluster

UNRELATED = 15


@pytest.fixture
def operator_kubeconfig(local_cluster) -> Path:
    sandbox.install(local_cluster.cluster.kubectl, "lorakube-e2e-setup")
    token = sandbox.operator_token(local_cluster.cluster.kubectl)
    return local_cluster.kubeconfig_for_token(token, user="lorakube-operator")


def pending_pod(name: str, labels: dict[str, str]) -> dict:
    # Never scheduled: only the watch events matter here.
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"nodeSelector": {"lorakube.io/test": "nowhere"},
                     "containers": [{"name": "c", "image": "lorakube/none:never"}]}}


def test_the_operator_receives_only_its_own_pods(local_cluster, operator_kubeconfig, new_namespace, tmp_path):
    operator = sandbox.OperatorProcess(operator_kubeconfig, tmp_path / "operator.log",
                                       args=["--all-namespaces", "--verbose"]).start()
    try:
        unrelated = [pending_pod(f"unrelated-{i}", {"app": "someone-else"}) for i in range(UNRELATED)]
        # Labelled as ours but for another manager: also filtered by the server.
        unrelated.append(pending_pod("other-manager", {contract.LABEL_MANAGED_BY: "helm",
                                                       contract.LABEL_JOB_NAME: "x"}))
        local_cluster.kubectl("apply", "-n", new_namespace, "-f", "-",
                              input=yaml.safe_dump_all(unrelated), check=True)
        ours = pending_pod("x-node-0", {contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
                                        contract.LABEL_JOB_NAME: "x", contract.LABEL_RANK: "0",
                                        contract.LABEL_ATTEMPT: "1"})
        local_cluster.kubectl("apply", "-n", new_namespace, "-f", "-", input=yaml.safe_dump(ours), check=True)

        # Watch events arrive in resourceVersion order: once our pod (created last) has arrived,
        # any unrelated pod the watch carried would have arrived before it.
        deadline = time.monotonic() + 60
        while f"pod {new_namespace}/x-node-0 received" not in operator.log_text():
            assert operator.running, operator.log_text()[-3000:]
            assert time.monotonic() < deadline, "the operator never received its own pod"
            time.sleep(0.2)
        received = re.findall(rf"pod {re.escape(new_namespace)}/(\S+) received", operator.log_text())
        assert set(received) == {"x-node-0"}, f"the watch delivered pods that are not ours: {received}"
    finally:
        operator.stop()
        print(operator.log_text()[-3000:])
