"""The operator's own HTTP endpoints: /metrics (Prometheus), /healthz (liveness), /readyz.

A plain threaded stdlib server, started before leader election so every replica answers, and
run on its own threads so a busy (or stuck) Kopf loop cannot keep it from saying so.
"""

from __future__ import annotations

import http.server
import ipaddress
import logging
import socket
import threading
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from lorakube.health import Health

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "0.0.0.0:8080"
DISABLED = ("", "off")


class AddressError(ValueError):
    """--http-address is not HOST:PORT (or off); the message names the flag and the fix."""


def parse_address(value: str) -> tuple[str, int] | None:
    """`HOST:PORT` ([v6]:PORT for IPv6; an empty host means every interface) -> (host, port);
    None for "" or "off" (no server)."""
    text = value.strip()
    if text.lower() in DISABLED:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise AddressError(f"{value!r} is not HOST:PORT (e.g. {DEFAULT_ADDRESS}, 127.0.0.1:9090, [::]:8080), "
                           f"nor 'off'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise AddressError(f"{value!r}: {host!r} in brackets is not an IPv6 address") from exc
    elif ":" in host:
        raise AddressError(f"{value!r}: write an IPv6 host in brackets, e.g. [::]:8080")
    return host or "0.0.0.0", int(port_text)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], health: Health, registry: CollectorRegistry) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.health = health
        self.registry = registry


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept"))
            self._send(200, encoder(self.server.registry), content_type)
        elif path in ("/healthz", "/livez"):
            verdict = self.server.health.liveness()
            self._send(verdict.http_status, f"{verdict.reason}\n".encode())
        elif path == "/readyz":
            verdict = self.server.health.readiness()
            self._send(verdict.http_status, f"{verdict.reason}\n".encode())
        else:
            self._send(404, b"not found: the operator serves /metrics, /healthz and /readyz\n")

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        # Probes and scrapes arrive every few seconds; they are not worth a log line each.
        log.debug("%s %s", self.address_string(), format % args)


class HttpServer:
    """The running server; `address` is what it really listens on (port 0 picks a free one)."""

    def __init__(self, host: str, port: int, health: Health, registry: CollectorRegistry) -> None:
        self._server = _Server((host, port), health, registry)
        self._thread = threading.Thread(target=self._server.serve_forever, name="lorakube-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
