"""Pure pieces of the Kueue install: its own build set and cache key, the manager's
Configuration, and the webhooks pointed at the host process (tests/e2e/test_kueue_e2e.py runs it)."""

from __future__ import annotations

import base64

import pytest
import yaml

from localcluster import build, kueue, versions


def test_kueue_is_a_set_of_its_own_whose_module_does_not_move_the_control_planes_key(tmp_path, monkeypatch):
    (target,) = versions.kueue_targets()
    assert target.package == "sigs.k8s.io/kueue/cmd/kueue" and target.module_dir == "kueue"
    assert f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={versions.KUEUE_VERSION}" in target.ldflags
    assert "kueue" not in {t.name for t in versions.targets()}
    core, kueue_key = build.cache_key("go1.26.8"), build.cache_key("go1.26.8", versions.kueue_targets())
    assert core != kueue_key
    # Editing Kueue's go.mod changes only Kueue's key.
    fake = tmp_path / "go"
    for module in ("etcd", "k8s", "kueue"):
        (fake / module).mkdir(parents=True)
        for name in ("go.mod", "go.sum"):
            (fake / module / name).write_bytes((build.GO_DIR / module / name).read_bytes())
    monkeypatch.setattr(build, "GO_DIR", fake)
    assert build.cache_key("go1.26.8") == core
    (fake / "kueue" / "go.mod").write_text("module changed\n")
    assert build.cache_key("go1.26.8") == core
    assert build.cache_key("go1.26.8", versions.kueue_targets()) != kueue_key


def test_the_manager_configuration_manages_only_labelled_namespaces_without_cert_rotation(tmp_path):
    config = kueue.manager_configuration(9443, 8081, tmp_path)
    key, value = kueue.MANAGED_LABEL
    assert config["integrations"] == {"frameworks": ["pod"]}
    assert config["managedJobsNamespaceSelector"] == {"matchLabels": {key: value}}
    assert config["internalCertManagement"] == {"enable": False}
    assert config["webhook"] == {"host": "127.0.0.1", "port": 9443, "certDir": str(tmp_path)}
    assert config["leaderElection"] == {"leaderElect": False}


@pytest.fixture(scope="module")
def module_dir():
    # Kueue's module as the build downloads it (the Go module cache; the proxy on a fresh machine).
    return kueue.module_dir()


def test_webhooks_call_the_host_process_and_only_for_what_is_served(module_dir):
    hooks = kueue.webhook_configurations(module_dir, 19443, b"PEM")
    assert {h["kind"] for h in hooks} == {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
    paths = set()
    for configuration in hooks:
        assert configuration["metadata"]["name"].startswith("kueue-")
        for hook in configuration["webhooks"]:
            url = hook["clientConfig"]["url"]
            assert url.startswith("https://127.0.0.1:19443/")
            assert base64.b64decode(hook["clientConfig"]["caBundle"]) == b"PEM"
            paths.add(url.split(":19443")[1])
            if url.endswith("-v1-pod"):
                key, value = kueue.MANAGED_LABEL
                assert hook["namespaceSelector"] == {"matchLabels": {key: value}}
    assert {"/mutate--v1-pod", "/validate--v1-pod", "/mutate-kueue-x-k8s-io-v1beta2-workload",
            "/validate-kueue-x-k8s-io-v1beta2-clusterqueue"} <= paths
    # Frameworks that are off (batch Jobs, JobSets, ...) must not be hooked: 404 + Fail would block them.
    assert not any("batch-v1-job" in p or "jobset" in p for p in paths)


def test_crds_come_from_the_module_and_include_workloads(module_dir):
    names = {d["metadata"]["name"] for d in kueue.crd_documents(module_dir)}
    assert {"workloads.kueue.x-k8s.io", "clusterqueues.kueue.x-k8s.io", "localqueues.kueue.x-k8s.io",
            "resourceflavors.kueue.x-k8s.io", "workloadpriorityclasses.kueue.x-k8s.io"} <= names


def test_queue_objects_fit_the_quota_given():
    flavor, cluster_queue, local_queue = kueue.queue_objects("cq", "team", "ns-a", {"cpu": "1", "memory": "2Gi"})
    assert flavor["kind"] == "ResourceFlavor"
    group = cluster_queue["spec"]["resourceGroups"][0]
    assert group["coveredResources"] == ["cpu", "memory"]
    assert group["flavors"][0]["resources"] == [{"name": "cpu", "nominalQuota": "1"},
                                                {"name": "memory", "nominalQuota": "2Gi"}]
    assert local_queue["metadata"] == {"name": "team", "namespace": "ns-a"}
    assert local_queue["spec"] == {"clusterQueue": "cq"}
    yaml.safe_dump_all([flavor, cluster_queue, local_queue])
