"""A throw-away PKI for one local cluster, generated with `cryptography`.

Everything is ECDSA P-256 with a short lifetime: the cluster lives as long as a test session or a
demo, and a fresh state directory gets fresh keys, so nothing here is worth protecting for long.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from localcluster.node.hostregistry import GATEWAY

# The pod network's gateway: the process node forwards pods' API traffic arriving there to the
# apiserver, so in-cluster clients verify the serving cert against this address.
POD_NETWORK_GATEWAY = str(GATEWAY)
# First address of --service-cluster-ip-range: the `kubernetes` Service's ClusterIP.
KUBERNETES_SERVICE_IP = "10.96.0.1"
APISERVER_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
APISERVER_IPS = ("127.0.0.1", POD_NETWORK_GATEWAY, KUBERNETES_SERVICE_IP)
VALIDITY = dt.timedelta(days=30)
FRONT_PROXY_CLIENT = "front-proxy-client"


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPKI:
    """Files the control-plane components are started with."""

    ca: KeyPair
    apiserver: KeyPair
    admin: KeyPair
    controller_manager: KeyPair
    scheduler: KeyPair
    apiserver_kubelet_client: KeyPair
    front_proxy_ca: KeyPair
    front_proxy_client: KeyPair
    service_account_key: Path
    service_account_pub: Path


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def with_validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    # Back-dated a little so a clock step between processes does not make a cert "not yet valid".
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY)


def _make_ca(pair: KeyPair, common_name: str
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    name = _name(common_name)
    builder = (
        with_validity(x509.CertificateBuilder())
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = builder.sign(key, hashes.SHA256())
    write_cert(pair.cert, cert)
    write_key(pair.key, key)
    return key, cert


def _issue(
    pair: KeyPair,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    *,
    server: bool = False,
    client: bool = False,
    dns_names: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
) -> None:
    key = new_key()
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    builder = (
        with_validity(x509.CertificateBuilder())
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if dns_names or ips:
        alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    write_cert(pair.cert, builder.sign(ca_key, hashes.SHA256()))
    write_key(pair.key, key)


def _service_account_keys(key_path: Path, pub_path: Path) -> None:
    # Signs ServiceAccount tokens (TokenRequest and legacy); the apiserver verifies with the public half.
    key = new_key()
    write_key(key_path, key)
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def pki_paths(directory: Path) -> ClusterPKI:
    """Where generate_pki puts each file; also how a later process finds them again."""

    def pair(stem: str) -> KeyPair:
        return KeyPair(directory / f"{stem}.crt", directory / f"{stem}.key")

    return ClusterPKI(
        ca=pair("ca"),
        apiserver=pair("apiserver"),
        admin=pair("admin"),
        controller_manager=pair("controller-manager"),
        scheduler=pair("scheduler"),
        apiserver_kubelet_client=pair("apiserver-kubelet-client"),
        front_proxy_ca=pair("front-proxy-ca"),
        front_proxy_client=pair("front-proxy-client"),
        service_account_key=directory / "sa.key",
        service_account_pub=directory / "sa.pub",
    )


def generate_pki(directory: Path) -> ClusterPKI:
    """Write a CA and every cert/key the control plane needs into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = pki_paths(directory)
    ca_key, ca_cert = _make_ca(paths.ca, "lorakube-localcluster-ca")

    def client(pair: KeyPair, user: str, group: str | None = None) -> None:
        _issue(pair, ca_key, ca_cert, _name(user, group), client=True)

    _issue(
        paths.apiserver, ca_key, ca_cert, _name("kube-apiserver"),
        server=True, dns_names=APISERVER_DNS_NAMES, ips=APISERVER_IPS,
    )
    # system:masters bypasses RBAC: the admin is the cluster owner; tests use SA tokens for RBAC.
    client(paths.admin, "lorakube-admin", "system:masters")
    # The identities the bootstrap RBAC policy grants the controller manager and scheduler.
    client(paths.controller_manager, "system:kube-controller-manager")
    client(paths.scheduler, "system:kube-scheduler")
    # What the apiserver presents to the node's kubelet endpoint for `kubectl logs`.
    client(paths.apiserver_kubelet_client, "kube-apiserver-kubelet-client")
    # A separate CA for the aggregation layer, as kubeadm does: a client cert of the main CA must
    # not be able to assert arbitrary users through the request-header path.
    proxy_ca_key, proxy_ca_cert = _make_ca(paths.front_proxy_ca, "lorakube-front-proxy-ca")
    _issue(paths.front_proxy_client, proxy_ca_key, proxy_ca_cert, _name(FRONT_PROXY_CLIENT),
           client=True)
    _service_account_keys(paths.service_account_key, paths.service_account_pub)
    return paths
