"""A real S3 server for tests: versitygw with its POSIX backend, on one address of this machine.

    server = S3Server.start(state_dir)                  # 127.0.0.1:<free port>, fresh root keys
    server.create_bucket("models")
    env = server.client_env()                           # AWS_* + LORAKUBE_S3_ADDRESSING_STYLE=path
    server.stop(); server.restart()                     # same address, same data (outage tests)
    server.count("GetObject")                           # requests of that kind, from its access log

Pods of the local cluster reach the host only at the node bridge's address (10.250.0.1, see
node/README.md), so an e2e test starts it with host="10.250.0.1": that address exists only while
the node runs and is not reachable from outside this machine, unlike 0.0.0.0.

The root credentials are generated per server and handed to versitygw through its environment
(never its argv, which `ps` shows). The binary comes from `python -m localcluster build s3`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from localcluster.build import build
from localcluster.processes import http_ok, stop_group, wait_until_serving
from localcluster.versions import s3_targets

HEALTH_PATH = "/health"
REGION = "us-east-1"


def versitygw_binary() -> Path:
    return build(log=lambda _: None, build_targets=s3_targets()).path("versitygw")


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    state_dir: Path
    host: str
    port: int
    access_key: str
    secret_key: str
    read_only: bool = False
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def root(self) -> Path:
        return self.state_dir / "data"

    @property
    def access_log(self) -> Path:
        return self.state_dir / "access.log"

    @classmethod
    def start(cls, state_dir: Path, host: str = "127.0.0.1", read_only: bool = False) -> "S3Server":
        state_dir.mkdir(parents=True, exist_ok=True)
        server = cls(state_dir, host, free_port(host), "lk" + secrets.token_hex(8), secrets.token_urlsafe(30),
                     read_only)
        server.restart()
        return server

    def sibling(self, state_dir: Path, read_only: bool) -> "S3Server":
        """A second gateway over the same data and keys, e.g. one that refuses every write."""
        state_dir.mkdir(parents=True, exist_ok=True)
        other = S3Server(state_dir, self.host, free_port(self.host), self.access_key, self.secret_key, read_only)
        other._start_over(self.root, self.state_dir / "meta")
        return other

    def restart(self) -> None:
        self._start_over(self.root, self.state_dir / "meta")

    def _start_over(self, root: Path, meta: Path) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"versitygw already runs at {self.endpoint}")
        root.mkdir(parents=True, exist_ok=True)
        meta.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VGW_", "ROOT_"))}
        env.update(ROOT_ACCESS_KEY_ID=self.access_key, ROOT_SECRET_ACCESS_KEY=self.secret_key)
        command = [str(versitygw_binary()), "--port", f"{self.host}:{self.port}", "--region", REGION,
                   "--access-log", str(self.access_log), "--health", HEALTH_PATH, "--quiet"]
        if self.read_only:
            command.append("--readonly")
        # The sidecar keeps object metadata in plain files: no need for user xattrs on the test disk.
        command += ["posix", "--sidecar", str(meta), str(root)]
        with open(self.state_dir / "versitygw.out", "ab") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 30.0) -> None:
        wait_until_serving(self.process, "versitygw", lambda: http_ok(self.endpoint + HEALTH_PATH),
                           self.state_dir / "versitygw.out", self.endpoint + HEALTH_PATH, timeout)

    def stop(self) -> None:
        stop_group(self.process)

    def client_env(self) -> dict[str, str]:
        """What a client (the trainer, a Secret plus the job's s3 settings) needs to reach it."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "LORAKUBE_S3_ADDRESSING_STYLE": "path",
        }

    def filesystem(self, region: str | None = REGION):  # -> s3fs.S3FileSystem (imported here: localcluster needs no s3fs)
        import s3fs

        client = {"endpoint_url": self.endpoint} | ({"region_name": region} if region else {})
        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, skip_instance_cache=True,
                                 use_listings_cache=False, client_kwargs=client,
                                 config_kwargs={"s3": {"addressing_style": "path"}})

    def create_bucket(self, name: str) -> str:
        # No region: s3fs would send it as LocationConstraint, which us-east-1 must not be.
        self.filesystem(region=None).mkdir(name)
        return f"s3://{name}"

    def requests(self) -> list[dict]:
        """The access log's records (one JSON object or one text line per request)."""
        if not self.access_log.is_file():
            return []
        records = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"line": line})
        return records

    def count(self, operation: str) -> int:
        """How many requests of one S3 operation (e.g. GetObject) the server answered so far."""
        return sum(1 for record in self.requests() if operation in json.dumps(record))

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)
