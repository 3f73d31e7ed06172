"""The process node's pure parts: kubelet's env expansion, downward API, DNS records, status."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

from localcluster.node import NodeSpec, cleanup, hostregistry, hostsfile, launch, podspec
from localcluster.node.runtime import exit_from_returncode
from localcluster.node.status import ContainerRun, PodRun


@pytest.mark.parametrize(("text", "expected"), [
    ("$(A)-$(B)", "1-2"),
    ("$(MISSING) stays", "$(MISSING) stays"),
    ("$$(A) is escaped", "$(A) is escaped"),
    ("unterminated $(A", "unterminated $(A"),
    ("cost: $5", "cost: $5"),
    ("trailing $", "trailing $"),
])
def test_expand_follows_kubelet_rules(text: str, expected: str) -> None:
    assert podspec.expand(text, {"A": "1", "B": "2"}) == expected


POD = {
    "metadata": {"name": "job-node-0", "namespace": "ml", "uid": "u-1",
                 "labels": {"job": "j"}, "annotations": {"lorakube.io/attempt": "2"}},
    "spec": {"nodeName": "localnode-0", "serviceAccountName": "trainer",
             "hostname": "job-node-0", "subdomain": "job"},
    "status": {"podIP": "10.250.0.7", "phase": "Running"},
}


def test_env_resolves_fields_configmaps_and_expands_in_order() -> None:
    container = {"name": "main", "env": [
        {"name": "RANK_HOST", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "ATTEMPT", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['lorakube.io/attempt']"}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "BUCKET", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "bucket"}}},
        {"name": "URI", "value": "s3://$(BUCKET)/$(RANK_HOST)"},
        {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
    ]}

    env = podspec.container_env(
        POD, container, {"PATH": "/bin"},
        lookup_value=lambda kind, name, key: {"bucket": "b"}.get(key) if name == "cfg" else None,
        lookup_map=lambda kind, name: None, node_allocatable={"cpu": "8"})

    assert env["RANK_HOST"] == "job-node-0" and env["ATTEMPT"] == "2"
    assert env["IP"] == "10.250.0.7" and env["URI"] == "s3://b/job-node-0"
    assert env["CPUS"] == "8" and env["PATH"] == "/bin"


def test_missing_configmap_key_waits_and_bad_field_path_names_the_field() -> None:
    missing = {"name": "main", "env": [{"name": "X", "valueFrom": {
        "configMapKeyRef": {"name": "cfg", "key": "nope"}}}]}
    with pytest.raises(podspec.NotReadyYet, match="nope"):
        podspec.container_env(POD, missing, {}, lambda *a: None, lambda *a: None, {})
    with pytest.raises(podspec.PodSpecError, match="spec.hostIPz"):
        podspec.field_value(POD, "spec.hostIPz")


def test_a_container_without_command_is_refused_with_the_fix() -> None:
    with pytest.raises(podspec.PodSpecError, match="set command"):
        podspec.container_argv({"name": "main", "args": ["--x"]}, {})


@pytest.mark.parametrize(("text", "value"), [("500m", Decimal("0.5")), ("32Gi", 32 * 2**30),
                                             ("2", 2), ("1e3", 1000)])
def test_quantities(text: str, value: Decimal | int) -> None:
    assert podspec.parse_quantity(text) == value


def test_resource_field_rounds_up_in_divisor_units() -> None:
    container = {"resources": {"limits": {"memory": "1536Mi"}}}
    ref = {"resource": "limits.memory", "divisor": "1Gi"}
    assert podspec.resource_value(container, ref, {}) == "2"
    with pytest.raises(podspec.PodSpecError, match="invalid resource quantity"):
        podspec.parse_quantity("lots")


def _pod(name: str, ip: str, labels: dict[str, str], ready: bool = False,
         phase: str = "Running", **spec: str) -> dict:
    return {"metadata": {"name": name, "namespace": "ml", "labels": labels},
            "spec": spec,
            "status": {"podIP": ip, "phase": phase,
                       "conditions": [{"type": "Ready", "status": str(ready)}]}}


SERVICE = {"metadata": {"name": "job", "namespace": "ml"},
           "spec": {"clusterIP": "None", "selector": {"job": "j"},
                    "publishNotReadyAddresses": True}}


def test_headless_service_gives_pod_and_service_records_including_not_ready() -> None:
    pods = [_pod("job-node-0", "10.250.0.2", {"job": "j"}, hostname="job-node-0", subdomain="job"),
            _pod("job-node-1", "10.250.0.3", {"job": "j"}, hostname="job-node-1", subdomain="job"),
            _pod("done", "10.250.0.4", {"job": "j"}, phase="Succeeded"),
            _pod("other", "10.250.0.5", {"job": "k"})]

    records = hostsfile.records(pods, [SERVICE])

    assert {(r.name, r.ip) for r in records} == {
        ("job", "10.250.0.2"), ("job", "10.250.0.3"),
        ("job-node-0.job", "10.250.0.2"), ("job-node-1.job", "10.250.0.3")}


def test_not_ready_pods_are_hidden_without_publish_not_ready_and_clusterip_is_skipped() -> None:
    strict = {**SERVICE, "spec": {**SERVICE["spec"], "publishNotReadyAddresses": False}}
    normal = {**SERVICE, "spec": {**SERVICE["spec"], "clusterIP": "10.96.0.9"}}
    pods = [_pod("a", "10.250.0.2", {"job": "j"}, ready=False),
            _pod("b", "10.250.0.3", {"job": "j"}, ready=True)]

    assert [r.ip for r in hostsfile.records(pods, [strict])] == ["10.250.0.3"]
    assert hostsfile.records(pods, [normal]) == []


def test_hosts_file_lists_every_name_form_and_short_names_only_in_the_namespace() -> None:
    record = hostsfile.Record("ml", "job-node-0.job", "10.250.0.2")

    text = hostsfile.render(POD, "10.250.0.7", [record])

    assert "10.250.0.7\tjob-node-0.job.ml.svc.cluster.local job-node-0.job.ml.svc job-node-0" in text
    assert ("10.250.0.2\tjob-node-0.job.ml.svc.cluster.local job-node-0.job.ml.svc "
            "job-node-0.job.ml job-node-0.job") in text
    assert hostsfile.names_for(record, "other") == [
        "job-node-0.job.ml.svc.cluster.local", "job-node-0.job.ml.svc", "job-node-0.job.ml"]


def test_write_in_place_keeps_the_inode(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    hostsfile.write_in_place(path, "a much longer first version\n")
    inode = path.stat().st_ino

    assert hostsfile.write_in_place(path, "short\n") is True
    assert hostsfile.write_in_place(path, "short\n") is False
    assert path.read_text() == "short\n" and path.stat().st_ino == inode


def test_pod_phase_and_status_follow_the_containers() -> None:
    run = PodRun(uid="u", namespace="ml", name="p", pod_ip="10.250.0.2", host_ip="10.250.0.1",
                 sandbox_ready=True)
    init = ContainerRun("init", "img", init=True)
    main = ContainerRun("main", "img", init=False)
    run.containers = [init, main]
    assert run.phase() == "Pending"

    init.terminate(0, "Completed")
    main.state, main.started_at = "running", "2026-01-01T00:00:00Z"
    status = run.to_status()
    assert status["phase"] == "Running"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"

    main.terminate(137, "Error")
    status = run.to_status()
    assert status["phase"] == "Failed"
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    assert "exited with code 137" in status["message"]


def test_signals_become_128_plus_signal() -> None:
    assert exit_from_returncode(-15).code == 143
    assert exit_from_returncode(3).code == 3


def test_node_flag_parsing() -> None:
    assert NodeSpec.from_arg("n0:2:4:8Gi") == NodeSpec("n0", cpu="4", memory="8Gi", gpus=2)
    assert NodeSpec.from_arg("n1") == NodeSpec("n1")
    assert NodeSpec.from_arg("n1::4") == NodeSpec("n1", cpu="4")
    assert NodeSpec.from_arg("n1:1::16Gi") == NodeSpec("n1", memory="16Gi", gpus=1)
    assert NodeSpec.from_arg(NodeSpec("n2", gpus=1).to_arg()) == NodeSpec("n2", gpus=1)
    with pytest.raises(ValueError, match="gpus must be an integer"):
        NodeSpec.from_arg("n0:x")
    assert NodeSpec.from_arg("n3::::600") == NodeSpec("n3", pods=600)
    assert NodeSpec.from_arg("n3::::600").resources()["pods"] == "600"
    assert NodeSpec("n4").resources()["pods"] == "110"  # kubelet's default
    assert NodeSpec.from_arg(NodeSpec("n5", pods=900).to_arg()) == NodeSpec("n5", pods=900)
    with pytest.raises(ValueError, match="pods must be a positive integer"):
        NodeSpec.from_arg("n0:0:8:32Gi:0")


def test_mountinfo_mount_points_decode_escapes() -> None:
    text = ("36 35 98:0 / / rw - ext4 /dev/root rw\n"
            "37 36 98:0 /srv/my\\040data /data\\040set rw,relatime - ext4 /dev/root rw\n")
    assert cleanup.mountinfo_mount_points(text) == {"/", "/data set"}


def test_a_created_path_is_busy_with_a_mount_at_or_below_it_only() -> None:
    mounted = {"/", "/proc", "/data/x"}
    assert cleanup.is_busy("/data", mounted) and cleanup.is_busy("/data/x", mounted)
    assert not cleanup.is_busy("/data/x2", mounted) and not cleanup.is_busy("/dat", mounted)


def test_launcher_notes_only_what_it_creates_on_the_host(tmp_path: Path) -> None:
    (tmp_path / "exists").mkdir()
    targets = [str(tmp_path / "exists" / "a" / "b"), str(tmp_path / "vol"),
               str(tmp_path / "vol" / "inside")]
    assert launch._missing_on_host(targets) == sorted([
        str(tmp_path / "exists" / "a"), str(tmp_path / "exists" / "a" / "b"),
        str(tmp_path / "vol")])  # vol/inside is made inside the volume mounted at vol


def test_a_freed_pod_ip_cannot_be_taken_while_its_devices_are_being_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Device names derive from the IP: if another daemon got the IP before the old pod's
    # devices were gone, removing "the old ones" would take the new pod's down.
    run = tmp_path / "run"
    monkeypatch.setattr(hostregistry, "RUN_DIR", run)
    monkeypatch.setattr(hostregistry, "DAEMONS_DIR", run / "node-daemons")
    monkeypatch.setattr(hostregistry, "IPAM_FILE", run / "pod-ips.json")
    monkeypatch.setattr(hostregistry, "IPAM_LOCK", run / "pod-ips.lock")
    stopping, starting = tmp_path / "a", tmp_path / "b"
    ip = hostregistry.allocate_ip(stopping, "uid-1")
    taken: list[str] = []
    other = threading.Thread(target=lambda: taken.append(hostregistry.allocate_ip(starting, "u2")))

    def remove_devices(ips: list[str]) -> None:
        other.start()
        time.sleep(0.3)
        assert ips == [ip] and taken == [], "the IP was handed out before its devices were gone"

    assert hostregistry.release_owner(stopping, remove_devices) == [ip]
    other.join(timeout=5)
    assert taken == [ip]  # lowest free: the same address, now safely


def test_a_pods_mac_follows_its_ip_so_a_reused_ip_keeps_the_arp_entries_right() -> None:
    from localcluster.node.network import pod_net_for

    first, again, other = pod_net_for("10.250.0.2"), pod_net_for("10.250.0.2"), pod_net_for("10.250.0.3")
    assert first.mac == again.mac == "0a:58:0a:fa:00:02" and other.mac != first.mac
    octet = int(first.mac.split(":")[0], 16)
    assert octet & 0b10 and not octet & 0b1          # locally administered, unicast
