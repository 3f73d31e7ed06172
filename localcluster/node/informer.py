"""List + watch loop that survives apiserver restarts, expired resourceVersions and errors.

Events are handed to a callback (the daemon puts them on its queue); the informer keeps no
cache itself. After every (re)list the callback gets ("SYNC", items) so the consumer can
drop objects that vanished while the watch was down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .kubeapi import ApiError, KubeApi

log = logging.getLogger(__name__)

Callback = Callable[[str, Any], None]


class Informer:
    def __init__(self, api: KubeApi, path: str, callback: Callback, stop: threading.Event) -> None:
        self._api = api
        self._path = path
        self._callback = callback
        self._stop = stop
        self._thread = threading.Thread(target=self._run, name=f"informer{path}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                listing = self._api.get(self._path)
                self._callback("SYNC", listing.get("items", []))
                version = listing["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    for event in self._api.watch(self._path, version):
                        obj = event["object"]
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        if event["type"] != "BOOKMARK":
                            self._callback(event["type"], obj)
                        backoff = 0.5
            except ApiError as exc:
                if exc.status != 410:  # 410 Gone: history compacted, relist quietly
                    log.warning("watch %s: %s", self._path, exc)
                    self._stop.wait(backoff)
            except Exception as exc:  # network errors, apiserver restarts: retry, never die
                log.warning("watch %s interrupted: %s: %s", self._path, type(exc).__name__, exc)
                self._stop.wait(backoff)
            backoff = min(backoff * 2, 10.0)
