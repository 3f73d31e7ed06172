"""TCP forwarder from the pod network's gateway to the apiserver on host loopback.

The in-cluster client config dials https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT;
pods cannot reach the host's 127.0.0.1, so the node listens on 10.250.0.1:6443 and splices
bytes through. TLS stays end to end (the apiserver's certificate names 10.250.0.1).
"""

from __future__ import annotations

import logging
import socket
import threading

log = logging.getLogger(__name__)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


class Forwarder:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(listen, reuse_port=False)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="apiserver-forwarder",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                break
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self._target, timeout=10)
        except OSError as exc:
            log.warning("forwarder: cannot reach apiserver at %s:%s: %s", *self._target, exc)
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
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
