"""Pure pieces of localcluster: version stamping, cache keys, PKI, component flags, daemons."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from localcluster import build, versions
from localcluster import cluster as cluster_mod
from localcluster.certs import generate_pki
from localcluster.cluster import ClusterError, LocalCluster, default_nodes
from localcluster.controlplane import (
    CONTROLLERS, Layout, Ports, apiserver_args, controller_manager_args, etcd_args,
    scheduler_args,
)
from localcluster.processes import (
    DaemonRecord, free_loopback_ports, is_running, port_in_use, start_daemon, stop_daemon,
)


def test_kubernetes_ldflags_stamp_server_and_client_with_the_same_version():
    flags = versions.kubernetes_ldflags("v1.36.3")
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {package}.gitVersion=v1.36.3" in flags
        assert f"-X {package}.gitMajor=1" in flags
        assert f"-X {package}.gitMinor=36" in flags


def test_helm_defaults_to_the_cluster_kubernetes_minor():
    flags = versions.helm_ldflags("v3.22.0", "v1.36.3")
    assert "-X helm.sh/helm/v3/internal/version.version=v3.22.0" in flags
    assert "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=36" in flags


def test_cache_key_changes_with_toolchain_and_pins():
    base = build.cache_key("go1.26.8")
    assert base == build.cache_key("go1.26.8")
    assert base != build.cache_key("go1.26.9")
    targets = versions.targets()
    bumped = tuple(
        t if t.name != "helm" else versions.GoTarget(t.name, t.package, None, "v3.21.4", t.ldflags)
        for t in targets
    )
    assert base != build.cache_key("go1.26.8", bumped)


def test_binaries_cache_honours_lorakube_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKUBE_CACHE", str(tmp_path))
    assert build.binaries_dir("abc") == tmp_path / "bin" / "abc"


def test_tools_modules_are_committed_with_checksums():
    for module in ("k8s", "etcd", "kueue"):
        assert (build.GO_DIR / module / "go.mod").is_file()
        assert (build.GO_DIR / module / "go.sum").stat().st_size > 0


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_pki_serving_cert_names_every_way_a_client_reaches_the_apiserver(tmp_path):
    pki = generate_pki(tmp_path)
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    serving = x509.load_pem_x509_certificate(pki.apiserver.cert.read_bytes())
    serving.verify_directly_issued_by(ca)
    san = _san(serving)
    assert set(san.get_values_for_type(x509.DNSName)) >= {
        "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    }
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.250.0.1")} <= set(
        san.get_values_for_type(x509.IPAddress))


def test_pki_admin_is_in_system_masters_and_keys_are_private(tmp_path):
    pki = generate_pki(tmp_path)
    admin = x509.load_pem_x509_certificate(pki.admin.cert.read_bytes())
    assert admin.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lorakube-admin"
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    for key in tmp_path.glob("*.key"):
        assert key.stat().st_mode & 0o077 == 0, key


def test_component_flags_bind_loopback_and_enable_rbac(tmp_path):
    pki = generate_pki(tmp_path / "pki")
    layout, ports = Layout(tmp_path), Ports(1, 2, 3, 4, 5)
    api = apiserver_args(Path("kube-apiserver"), layout, ports, pki)
    assert "--bind-address=127.0.0.1" in api
    assert "--authorization-mode=Node,RBAC" in api
    assert "--service-cluster-ip-range=10.96.0.0/16" in api
    assert "--etcd-servers=http://127.0.0.1:1" in api
    kcm = controller_manager_args(Path("kcm"), layout, ports, pki)
    assert "--leader-elect=false" in kcm and "--bind-address=127.0.0.1" in kcm
    assert {"garbage-collector-controller", "namespace-controller",
            "serviceaccount-controller"} <= set(CONTROLLERS)
    assert "--leader-elect=false" in scheduler_args(Path("sched"), layout, ports)
    assert all("0.0.0.0" not in arg for arg in api + kcm + etcd_args(Path("etcd"), layout, ports))


def test_daemon_outlives_nothing_after_stop(tmp_path):
    record = start_daemon("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                          tmp_path / "sleeper.log", tmp_path / "pids")
    assert is_running(record)
    assert DaemonRecord.load(tmp_path / "pids" / "sleeper.json") == record
    stop_daemon(record)
    assert not is_running(record)
    assert not Path(f"/proc/{record.pid}").exists()


def test_a_reused_pid_is_not_mistaken_for_the_daemon(tmp_path):
    record = start_daemon("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                          tmp_path / "sleeper.log", tmp_path / "pids")
    try:
        impostor = DaemonRecord("sleeper", record.pid, record.start_time + 1, record.log)
        assert not is_running(impostor)
        stop_daemon(impostor)  # must not signal the stranger
        assert is_running(record)
    finally:
        stop_daemon(record)


def test_free_ports_are_distinct_and_detected_when_listening():
    ports = free_loopback_ports(5)
    assert len(set(ports)) == 5
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", ports[0]))
        listener.listen()
        assert port_in_use(ports[0])
    assert not port_in_use(ports[0])


def test_missing_go_toolchain_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(build.BuildError, match=r"install Go 1\.26"):
        build.go_version()


def test_up_refuses_to_wipe_a_directory_it_did_not_create(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ClusterError, match="refusing to wipe"):
        LocalCluster(tmp_path, nodes=[], log=lambda _: None).up()
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_status_of_an_empty_state_dir_is_not_up(tmp_path):
    status = LocalCluster(tmp_path, nodes=[]).status()
    assert not status.up and "no cluster" in status.describe()


def test_the_node_gets_the_image_defaults_unless_the_caller_sets_them(monkeypatch, tmp_path):
    # `localcluster up` and the demo pass no node_path/node_env: the node's own defaults (this
    # venv's bin first on PATH, HF_HUB_OFFLINE & co. from this environment) must then apply.
    seen = []

    def fake_start(kubeconfig, state_dir, nodes, path_prefix=None, *, env=None, **_):
        seen.append((path_prefix, env))
        return os.getpid()

    monkeypatch.setattr(cluster_mod, "start_node_daemon", fake_start)
    LocalCluster(tmp_path, log=lambda _: None)._start_node(default_nodes())
    LocalCluster(tmp_path, log=lambda _: None, node_path=[Path("/opt/image/bin")],
                 node_env={"A": "1"})._start_node(default_nodes())
    assert seen == [(None, None), ([Path("/opt/image/bin")], {"A": "1"})]
