"""The process node starts pods concurrently: a pod whose setup is slow does not hold back the
pods created after it.

A pod's setup is made slow with real parts: its ServiceAccount token (the projected volume that
admission adds to every pod) comes from the TokenRequest API, and a validating admission webhook
served by this test holds that one ServiceAccount's TokenRequest until the test releases it.
A node that sets sandboxes and volumes up one at a time in its loop waits there, and none of
the other pods starts until the webhook gives up (then this test fails).
"""

from __future__ import annotations

import base64
import http.server
import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from localcluster import certs
from localcluster.pytest_plugin import wait_for

pytestmark = pytest.mark.cluster

SLOW_ACCOUNT = "slow-start"
PROBE_ACCOUNT = "webhook-probe"
# Below the webhook's timeoutSeconds (30, the API's maximum) and the node's API read timeout,
# so a hold always ends with an answer.
HOLD_SECONDS = 25.0
FAST_PODS = 6


class TokenRequestGate:
    """An HTTPS admission webhook on 127.0.0.1 that holds TokenRequests for SLOW_ACCOUNT."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ca = certs.KeyPair(directory / "ca.crt", directory / "ca.key")
        ca_key, ca_cert = certs._make_ca(ca, "process-node-test-webhook-ca")
        serving = certs.KeyPair(directory / "tls.crt", directory / "tls.key")
        certs._issue(serving, ca_key, ca_cert,
                     x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "webhook")]),
                     server=True, ips=("127.0.0.1",))
        self.ca_pem = ca.cert.read_bytes()
        self.held = threading.Event()       # the slow account's TokenRequest arrived
        self.release = threading.Event()    # let it through
        self.expired = threading.Event()    # the hold ran out before the release
        self.probed = threading.Event()     # the apiserver calls us at all
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request = review["request"]
                if request.get("name") == PROBE_ACCOUNT:
                    gate.probed.set()
                if request.get("name") == SLOW_ACCOUNT and not gate.release.is_set():
                    gate.held.set()
                    if not gate.release.wait(HOLD_SECONDS):
                        gate.expired.set()
                body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                   "response": {"uid": request["uid"], "allowed": True}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass  # the apiserver's calls are this test's business only

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(serving.cert, serving.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def configuration(self, name: str, namespace: str) -> dict[str, Any]:
        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{
                "name": "hold-token-requests.localcluster.test",
                "clientConfig": {"url": f"https://127.0.0.1:{self.port}/",
                                 "caBundle": base64.b64encode(self.ca_pem).decode()},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                           "resources": ["serviceaccounts/token"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 30,
            }],
        }

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def token_gate(local_cluster: Any, new_namespace: str, tmp_path: Path) -> Iterator[TokenRequestGate]:
    gate = TokenRequestGate(tmp_path / "webhook")
    name = f"hold-token-requests-{new_namespace}"
    for account in (SLOW_ACCOUNT, PROBE_ACCOUNT):
        local_cluster.kubectl("create", "serviceaccount", account, "-n", new_namespace, check=True)
    local_cluster.apply(gate.configuration(name, new_namespace))
    try:
        # The apiserver picks a new webhook configuration up within a moment: ask for tokens
        # until one reaches the webhook.
        wait_for("the admission webhook to be called", lambda: local_cluster.kubectl(
            "create", "token", PROBE_ACCOUNT, "-n", new_namespace).returncode == 0
            and gate.probed.is_set(), timeout=30)
        yield gate
    finally:
        gate.release.set()
        local_cluster.kubectl("delete", "validatingwebhookconfiguration", name, "--ignore-not-found")
        gate.stop()


def sleeper(name: str, service_account: str = "default") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                     "serviceAccountName": service_account,
                     "containers": [{"name": "main", "image": "busybox",
                                     "command": ["sleep", "3600"]}]}}


def phases(cluster: Any, namespace: str) -> dict[str, str]:
    items = cluster.get_json("pods", namespace=namespace)["items"]
    return {p["metadata"]["name"]: p.get("status", {}).get("phase", "") for p in items}


def test_pods_created_together_run_while_one_pod_is_slow_to_set_up(
        local_cluster: Any, new_namespace: str, token_gate: TokenRequestGate) -> None:
    local_cluster.apply(sleeper("slow", SLOW_ACCOUNT), namespace=new_namespace)
    assert token_gate.held.wait(60), "the slow pod's TokenRequest never reached the webhook"

    started = time.monotonic()
    fast = [f"fast-{index}" for index in range(FAST_PODS)]
    local_cluster.apply([sleeper(name) for name in fast], namespace=new_namespace)
    wait_for(f"all {FAST_PODS} pods created together to be Running", lambda: all(
        phases(local_cluster, new_namespace).get(name) == "Running" for name in fast),
        timeout=90)
    took = time.monotonic() - started

    # They ran while the slow pod's setup was still waiting, not after it gave up.
    assert not token_gate.expired.is_set(), (
        f"the {FAST_PODS} pods reached Running only after the slow pod's setup ({took:.0f} s): "
        "the node set pods up one at a time")
    assert phases(local_cluster, new_namespace)["slow"] == "Pending"

    token_gate.release.set()
    wait_for("the slow pod to be Running once its token is issued",
             lambda: phases(local_cluster, new_namespace)["slow"] == "Running", timeout=60)
