"""A Google Cloud Storage emulator for tests: fake-gcs-server (its JSON API over plain HTTP, the
filesystem backend), on one address of this machine.

    server = GcsServer.start(state_dir)                 # 127.0.0.1:<free port>
    server.create_bucket("models")
    env = server.client_env()                           # STORAGE_EMULATOR_HOST
    server.count("GET", "/download/")                   # requests of that kind, from its access log

Google Cloud Storage cannot run here; fake-gcs-server answers the JSON API the client libraries use
(gcsfs included), so the tests that use it say `emulated` in their names. It checks no credentials
and has no IAM: a bucket that refuses writes cannot be made with it (the az:// tests cover a refused
write through Azurite's SAS checks; a missing bucket is what the gs:// tests refuse). The binary
comes from `python -m localcluster build gcs`.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from localcluster.build import build
from localcluster.processes import http_ok, stop_group, wait_until_serving
from localcluster.s3server import free_port
from localcluster.versions import gcs_targets


def fake_gcs_server_binary() -> Path:
    return build(log=lambda _: None, build_targets=gcs_targets()).path("fake-gcs-server")


@dataclass
class GcsServer:
    state_dir: Path
    host: str
    port: int
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def output(self) -> Path:
        return self.state_dir / "fake-gcs-server.out"

    @classmethod
    def start(cls, state_dir: Path, host: str = "127.0.0.1") -> "GcsServer":
        state_dir.mkdir(parents=True, exist_ok=True)
        server = cls(state_dir, host, free_port(host))
        server.restart()
        return server

    def restart(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"fake-gcs-server already runs at {self.endpoint}")
        root = self.state_dir / "data"
        root.mkdir(parents=True, exist_ok=True)
        # -external-url: the resumable-upload sessions it hands out point back at this address.
        command = [str(fake_gcs_server_binary()), "-scheme", "http", "-host", self.host, "-port", str(self.port),
                   "-backend", "filesystem", "-filesystem-root", str(root), "-external-url", self.endpoint,
                   "-public-host", f"{self.host}:{self.port}", "-log-level", "info"]
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_serving()

    def _wait_serving(self, timeout: float = 30.0) -> None:
        wait_until_serving(self.process, "fake-gcs-server", lambda: http_ok(f"{self.endpoint}/storage/v1/b"),
                           self.output, self.endpoint, timeout)

    def stop(self) -> None:
        stop_group(self.process)

    def client_env(self) -> dict[str, str]:
        """What a client needs to reach it: the variable Google's client libraries read."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def filesystem(self):  # -> gcsfs's GCSFileSystem (imported here: localcluster needs no gcsfs)
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(endpoint_url=self.endpoint, token="anon", skip_instance_cache=True,
                             use_listings_cache=False)

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"creating bucket {name} answered {response.status}")
        return name

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request it served so far, in order, from its access log."""
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        return re.findall(r'\\"([A-Z]+) (\S+) HTTP/[\d.]+\\"', text)

    def count(self, method: str, path_part: str, after: int = 0) -> int:
        """Requests with that method whose path contains `path_part`, after the first `after`."""
        return sum(1 for m, path in self.requests()[after:] if m == method and path_part in path)
