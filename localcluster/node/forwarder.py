"""TCP forwarder from the pod network's gateway to the apiserver on host loopback.

The in-cluster client config dials https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT;
pods cannot reach the host's 127.0.0.1, so the node listens on 10.250.0.1:6443 and splices
bytes through. TLS stays end to end (the apiserver's certificate names 10.250.0.1).

Several daemons (clusters) may share the host: only one can own the listener, so the target
is chosen per connection from the pod's source IP (hostregistry knows which daemon, and so
which apiserver, owns it), and every daemon retries binding on its tick so the listener
survives the daemon that held it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Route = Callable[[str], "tuple[str, int] | None"]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    # A reset connection simply ends the pump; either way both halves are shut down.
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
        with contextlib.suppress(OSError):
            sock.shutdown(how)


class Forwarder:
    def __init__(self, listen: tuple[str, int], route: Route) -> None:
        self._listen = listen
        self._route = route
        self._listener: socket.socket | None = None
        self._closed = threading.Event()

    def try_listen(self) -> None:
        """Bind the gateway port unless this daemon (or another) already serves it."""
        if self._listener is not None or self._closed.is_set():
            return
        try:
            listener = socket.create_server(self._listen)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return  # another daemon on this host serves it, for our pods too
            raise
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), name="apiserver-forwarder",
                         daemon=True).start()
        log.info("forwarding %s:%d to the pods' apiservers", *self._listen)

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                client, peer = listener.accept()
            except OSError:
                break
            threading.Thread(target=self._serve, args=(client, peer[0]), daemon=True).start()

    def _serve(self, client: socket.socket, peer_ip: str) -> None:
        target = self._route(peer_ip)
        if target is None:
            log.warning("forwarder: %s is not a pod of any running node daemon; closing", peer_ip)
            client.close()
            return
        try:
            upstream = socket.create_connection(target, timeout=10)
        except OSError as exc:
            log.warning("forwarder: cannot reach apiserver at %s:%s: %s", *target, exc)
            client.close()
            return
        upstream.settimeout(None)
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        client.close()
        upstream.close()

    def stop(self) -> None:
        self._closed.set()
        if self._listener is None:
            return
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
