"""Pure pieces of the training-operator peer: its own build set and cache key, the PyTorchJob
manifest the operator benchmark applies, the CRD read from the module, and the private /tmp the
controller runs with (tests/integration/test_training_operator.py runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from localcluster import build, training_operator, versions


def test_a_set_of_its_own_whose_module_does_not_move_the_control_planes_key(tmp_path, monkeypatch):
    (target,) = versions.training_operator_targets()
    assert target.package == "github.com/kubeflow/training-operator/cmd/training-operator.v1"
    assert (target.module_dir, target.version) == ("training-operator", "v1.8.1")
    assert versions.TARGET_SETS["training-operator"] is versions.training_operator_targets
    core = build.cache_key("go1.26.8")
    peer_key = build.cache_key("go1.26.8", versions.training_operator_targets())
    assert core != peer_key
    fake = tmp_path / "go"
    for module in ("etcd", "k8s", "training-operator"):
        (fake / module).mkdir(parents=True)
        for name in ("go.mod", "go.sum"):
            (fake / module / name).write_bytes((build.GO_DIR / module / name).read_bytes())
    monkeypatch.setattr(build, "GO_DIR", fake)
    assert build.cache_key("go1.26.8") == core
    (fake / "training-operator" / "go.mod").write_text("module changed\n")
    assert build.cache_key("go1.26.8") == core
    assert build.cache_key("go1.26.8", versions.training_operator_targets()) != peer_key


def test_pytorchjob_manifest_is_workers_only_with_the_command() -> None:
    job = training_operator.pytorchjob_manifest("j", "ns", 4, "img:1", ("sh", "-c", "true"))
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["metadata"] == {"name": "j", "namespace": "ns"}
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert list(replicas) == ["Worker"]  # no Master: no init container waiting on nslookup
    worker = replicas["Worker"]
    assert (worker["replicas"], worker["restartPolicy"]) == (4, "OnFailure")
    (container,) = worker["template"]["spec"]["containers"]
    assert container == {"name": "pytorch", "image": "img:1", "command": ["sh", "-c", "true"]}
    exit_code = training_operator.pytorchjob_manifest("j", "ns", 1, "i", ["x"], restart_policy="ExitCode")
    assert exit_code["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "ExitCode"
    with pytest.raises(ValueError, match="workers: 0"):
        training_operator.pytorchjob_manifest("j", "ns", 0, "i", ["x"])


def test_the_controller_sees_its_certificate_in_a_private_tmp(tmp_path: Path) -> None:
    argv = training_operator._private_tmp_argv(tmp_path, ["/bin/training-operator", "--x"])
    assert argv[0] == "unshare" and {"--mount", "private"} <= set(argv)
    script = argv[argv.index("-c") + 1]
    assert f"mount -t tmpfs -o size=4m,mode=0700 tmpfs \"{tmp_path / 'tmp-layer'}\"" in script
    assert f"{tmp_path / 'tmp-layer'}/upper/k8s-webhook-server/serving-certs/" in script
    assert "lowerdir=/tmp" in script and script.endswith('exec "$@"')
    assert argv[-2:] == ["/bin/training-operator", "--x"]


def test_the_crd_comes_from_the_module_without_its_placeholder_status() -> None:
    # The module as the build downloads it (the Go module cache; the proxy on a fresh machine).
    document = training_operator.crd_document(training_operator.module_dir())
    assert document["kind"] == "CustomResourceDefinition"
    assert document["metadata"]["name"] == training_operator.CRD_NAME
    assert "status" not in document
    assert [v["name"] for v in document["spec"]["versions"]] == ["v1"]
