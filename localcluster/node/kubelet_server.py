"""The slice of the kubelet HTTPS API that `kubectl logs` needs: /containerLogs.

The apiserver proxies `kubectl logs` to https://<node InternalIP>:<kubeletEndpoint port>/
containerLogs/{namespace}/{pod}/{container}?tailLines=&follow=&limitBytes=. Without
--kubelet-certificate-authority it does not verify the serving certificate, so a
self-signed one is enough. Callers must present a client certificate signed by the
cluster CA (the apiserver's --kubelet-client-certificate is), so pods on the pod network,
which hold tokens but no certificates, cannot read each other's logs.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from localcluster import certs

log = logging.getLogger(__name__)

LogLocator = Callable[[str, str, str, bool], "tuple[Path, Callable[[], bool]] | None"]
"""(namespace, pod, container, previous) -> (log file, is-still-running) or None if unknown;
`previous` asks for the instance before the current one of a restarted container."""


def ensure_serving_cert(cert_dir: Path, ip: str) -> tuple[Path, Path]:
    cert_path, key_path = cert_dir / "kubelet.crt", cert_dir / "kubelet.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    cert_dir.mkdir(parents=True, exist_ok=True)
    key = certs.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lorakube-process-node")])
    cert = (
        certs.with_validity(x509.CertificateBuilder()).subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address(ip)),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .sign(key, hashes.SHA256())
    )
    certs.write_key(key_path, key)
    certs.write_cert(cert_path, cert)
    return cert_path, key_path


def _tail(data: bytes, lines: int) -> bytes:
    if lines < 0:
        return data
    if lines == 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


def _handler(locate: LogLocator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
            log.debug("kubelet-api %s", format % args)

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            url = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
            if url.path == "/healthz":
                self._plain(200, b"ok")
                return
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._plain(404, b"only /containerLogs/{namespace}/{pod}/{container} is served\n")
                return
            query = urllib.parse.parse_qs(url.query)
            previous = query.get("previous", ["false"])[0] in ("true", "1")
            found = locate(parts[1], parts[2], parts[3], previous)
            if found is None and previous:  # worded as kubelet words it
                self._plain(400, f'previous terminated container "{parts[3]}" in pod '
                                 f'"{parts[2]}" not found\n'.encode())
                return
            if found is None:
                self._plain(404, f"container {parts[3]!r} of pod {parts[1]}/{parts[2]} "
                                 "is not known on this node\n".encode())
                return
            tail = int(query.get("tailLines", ["-1"])[0])
            limit = int(query.get("limitBytes", ["0"])[0])
            follow = query.get("follow", ["false"])[0] in ("true", "1")
            path, running = found
            data = path.read_bytes() if path.exists() else b""
            first = _tail(data, tail)
            if limit > 0:
                first = first[:limit]
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            if not follow:
                self.send_header("Content-Length", str(len(first)))
                self.end_headers()
                self.wfile.write(first)
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk(first)
            offset = len(data)
            try:
                while True:
                    alive = running()
                    with open(path, "rb") as f:
                        f.seek(offset)
                        more = f.read()
                    if more:
                        offset += len(more)
                        self._chunk(more)
                    elif not alive:
                        break
                    else:
                        time.sleep(0.5)
                self._chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                return

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _plain(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class _TLSServer(ThreadingHTTPServer):
    """TLS handshakes happen on the per-connection thread, so a client that stalls (or
    fails to present a certificate) never blocks the accept loop."""

    daemon_threads = True
    context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self.context.wrap_socket(request, server_side=True) as tls:
            self.RequestHandlerClass(tls, client_address, self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.info("kubelet API: connection from %s failed: %s", client_address,
                 sys.exc_info()[1])


class KubeletServer:
    def __init__(self, bind_ip: str, port: int, cert_dir: Path, locate: LogLocator,
                 client_ca_pem: bytes | None = None) -> None:
        cert, key = ensure_serving_cert(cert_dir, bind_ip)
        try:
            self._server = _TLSServer((bind_ip, port), _handler(locate))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise
            # Another node daemon on this host has the usual port; the Node object tells
            # the apiserver which one we got.
            self._server = _TLSServer((bind_ip, 0), _handler(locate))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if client_ca_pem:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=client_ca_pem.decode())
        self._server.context = context
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kubelet-api",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
