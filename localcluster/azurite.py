"""An Azure Blob Storage emulator for tests: Azurite's blob service, on one address of this machine.

    server = AzuriteServer.start(state_dir)             # 127.0.0.1:<free port>, a fresh account key
    server.create_container("models")
    env = server.client_env()                           # AZURE_STORAGE_CONNECTION_STRING
    server.sas_env("models", "rl")                      # a connection string with a read+list SAS
    server.count("Blob_Download")                       # requests of that kind, from its debug log

Azure itself cannot run here; Azurite is Microsoft's emulator of its storage REST API (the same
SharedKey and SAS checks), so the tests that use it say `emulated` in their names.

It is an npm package, not a Go module: `python -m localcluster build azurite` installs it with
`npm ci` from the lock file in localcluster/npm/azurite (every package pinned by its integrity
hash), cached like the Go binaries under a key of the lock file and the node version, renamed into
place when complete. The account (name and a random key per server) reaches Azurite through its
environment (AZURITE_ACCOUNTS), never its argv, which `ps` shows.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from localcluster.build import COMPLETE_MARKER, BuildError, _exclusive, cache_root
from localcluster.processes import http_answers, stop_group, wait_until_serving
from localcluster.s3server import free_port
from localcluster.versions import AZURITE_VERSION

NPM_DIR = Path(__file__).resolve().parent / "npm" / "azurite"
ACCOUNT = "lorakube"
# Where its blob service's entry point sits in the package (what the `azurite-blob` bin runs).
BLOB_MAIN = Path("node_modules") / "azurite" / "dist" / "src" / "blob" / "main.js"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"`{name}` is not on PATH: install Node.js 20 or newer with npm and retry "
                         "`python -m localcluster build azurite`")
    return path


def install_key(node_version: str) -> str:
    """Hash of what shapes the installed tree: the lock file, package.json and the node version."""
    digest = hashlib.sha256(json.dumps({"node": node_version, "azurite": AZURITE_VERSION}).encode())
    for name in ("package.json", "package-lock.json"):
        digest.update((NPM_DIR / name).read_bytes())
    return digest.hexdigest()[:16]


def install(log: Callable[[str], None] = print) -> Path:
    """The folder holding Azurite's node_modules, installed on first use (about 2 minutes and
    360 MB on a cold npm cache), then reused until the lock file or node changes."""
    node_version = subprocess.run([_tool("node"), "--version"], capture_output=True, text=True,
                                  check=True).stdout.strip()
    key = install_key(node_version)
    final_dir = cache_root() / "npm" / f"azurite-{key}"
    with _exclusive(final_dir.with_name(f"azurite-{key}.lock")):
        if (final_dir / COMPLETE_MARKER).is_file():
            log(f"azurite up to date in {final_dir}")
            return final_dir
        staging = Path(tempfile.mkdtemp(prefix=f"azurite-{key}.partial-", dir=final_dir.parent))
        staging.chmod(0o755)
        try:
            for name in ("package.json", "package-lock.json"):
                shutil.copy(NPM_DIR / name, staging / name)
            log(f"installing azurite {AZURITE_VERSION} with npm ci ...")
            started = time.monotonic()
            # --ignore-scripts: nothing in the tree needs an install script to run (protobufjs's
            # only prints a notice), and none should run code at install time.
            result = subprocess.run([_tool("npm"), "ci", "--omit=dev", "--ignore-scripts", "--no-audit",
                                     "--no-fund", "--loglevel=error"], cwd=staging, capture_output=True, text=True)
            if result.returncode != 0 or not (staging / BLOB_MAIN).is_file():
                raise BuildError(f"npm ci of azurite {AZURITE_VERSION} failed with exit code {result.returncode}:\n"
                                 f"{(result.stderr or result.stdout)[-4000:]}\nCheck that the npm registry is "
                                 "reachable (npm config get registry) and localcluster/npm/azurite is complete.")
            seconds = time.monotonic() - started
            (staging / COMPLETE_MARKER).write_text(json.dumps({"key": key, "seconds": round(seconds, 1)}) + "\n")
            if final_dir.exists():
                shutil.rmtree(final_dir)  # a leftover without the marker
            staging.rename(final_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        log(f"installed azurite {AZURITE_VERSION} in {seconds:.1f} s into {final_dir}")
        return final_dir


@dataclass
class AzuriteServer:
    state_dir: Path
    host: str
    port: int
    account_key: str
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        # Path-style: the account is the first path segment (what Azurite and the SDK expect for an IP).
        return f"http://{self.host}:{self.port}/{ACCOUNT}"

    @property
    def debug_log(self) -> Path:
        return self.state_dir / "azurite-debug.log"

    @classmethod
    def start(cls, state_dir: Path, host: str = "127.0.0.1") -> "AzuriteServer":
        state_dir.mkdir(parents=True, exist_ok=True)
        server = cls(state_dir, host, free_port(host), base64.b64encode(secrets.token_bytes(64)).decode())
        server.restart()
        return server

    def restart(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"azurite already runs at {self.endpoint}")
        data = self.state_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "AZURITE_"))}
        env["AZURITE_ACCOUNTS"] = f"{ACCOUNT}:{self.account_key}"
        # --debug: its log has one line per request with the operation's name (what count() reads).
        command = [_tool("node"), str(install(log=lambda _: None) / BLOB_MAIN), "--blobHost", self.host,
                   "--blobPort", str(self.port), "--location", str(data), "--debug", str(self.debug_log),
                   "--disableTelemetry", "--skipApiVersionCheck", "--loose"]
        with open(self.state_dir / "azurite.out", "ab") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 60.0) -> None:
        # Any HTTP answer (an unauthenticated request gets 403) means it is serving.
        wait_until_serving(self.process, "azurite", lambda: http_answers(f"{self.endpoint}?comp=list"),
                           self.state_dir / "azurite.out", self.endpoint, timeout, interval=0.2)

    def stop(self) -> None:
        stop_group(self.process)

    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={self.account_key};"
                f"BlobEndpoint={self.endpoint};")

    def client_env(self) -> dict[str, str]:
        """What a client (the trainer, a Secret's keys) needs: one connection string."""
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}

    def sas_env(self, container: str, permission: str) -> dict[str, str]:
        """A connection string holding a container SAS with `permission` (e.g. "rl": read and list,
        no write) instead of the key: what a user with a narrower grant puts into the Secret."""
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=6)
        sas = generate_container_sas(ACCOUNT, container, account_key=self.account_key,
                                     permission=ContainerSasPermissions.from_string(permission), expiry=expiry)
        return {"AZURE_STORAGE_CONNECTION_STRING": f"BlobEndpoint={self.endpoint};SharedAccessSignature={sas}"}

    def service(self):  # -> azure.storage.blob.BlobServiceClient (imported here: localcluster needs no SDK)
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string())

    def filesystem(self):  # -> adlfs.AzureBlobFileSystem
        import adlfs

        return adlfs.AzureBlobFileSystem(connection_string=self.connection_string(), skip_instance_cache=True,
                                         use_listings_cache=False)

    def create_container(self, name: str) -> str:
        self.service().create_container(name)
        return name

    def count(self, operation: str, after: int = 0) -> int:
        """Requests of one operation (Blob_Download, BlockBlob_Upload, Container_ListBlobFlatSegment
        ...) among the dispatched requests after the first `after` (see requests())."""
        return sum(1 for name in self.requests()[after:] if name == operation)

    def requests(self) -> list[str]:
        """The operation of every request Azurite dispatched so far, in order, from its debug log."""
        if not self.debug_log.exists():
            return []
        return re.findall(r"DispatchMiddleware: Operation=(\w+)", self.debug_log.read_text(errors="replace"))
