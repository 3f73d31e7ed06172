"""Every access the trainer makes to object storage: `s3://bucket/prefix` (any S3-compatible
endpoint, s3fs), `gs://bucket/prefix` (Google Cloud Storage, gcsfs) and `az://container/prefix`
(Azure Blob Storage, adlfs), all fsspec file systems with the same calls. The rest of the trainer
works on local folders only; this module maps each remote URI to one:

- inputs (model, dataset) are staged once per node into the cache folder (`LORAKUBE_CACHE_DIR`,
  default /tmp/lorakube-cache): the folder is keyed by the URI and the objects' ETags, filled in a
  temporary folder and renamed when complete (a partial download is never used), under a file lock
  (local ranks and a second job on the node wait for the first download instead of repeating it);
  input_cache.py keeps that cache under LORAKUBE_CACHE_MAX_BYTES and reports bytes to `on_bytes`;
- the output and the checkpoint folder are local working folders whose contents are uploaded:
  checkpoints objects first and COMPLETE.json last, artifacts each verified by a HEAD (size) and a
  sha256 read-back, manifest.json last.

Settings come from the environment only, so that nothing secret passes through flags, the config
or the logs. s3://: the standard AWS variables for credentials (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for a non-AWS
endpoint, AWS_REGION/AWS_DEFAULT_REGION, and LORAKUBE_S3_ADDRESSING_STYLE=path|virtual|auto.
gs://: GCS_SERVICE_ACCOUNT_JSON (a service-account key file's contents), else Application Default
Credentials (Workload Identity, GOOGLE_APPLICATION_CREDENTIALS); GOOGLE_CLOUD_PROJECT;
GCS_ENDPOINT_URL for another endpoint (Private Service Connect); STORAGE_EMULATOR_HOST for an
emulator (spoken to anonymously). az://: AZURE_STORAGE_CONNECTION_STRING, or
AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or the account
name alone for Azure's credential chain (workload identity, managed identity).
Each URI is accessed with its role's environment (role_env): the model's, the dataset's or the
output's Secret, which the operator adds under its own prefix, over the unprefixed variables.
Error messages name the URI and the failed operation, never a credential.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from lorakube_api import contract

from . import input_cache

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("s3", "gs", "az")
ENV_CACHE_DIR = "LORAKUBE_CACHE_DIR"
DEFAULT_CACHE_DIR = "/tmp/lorakube-cache"
ENV_ADDRESSING_STYLE = "LORAKUBE_S3_ADDRESSING_STYLE"
# gs:// (gcsfs): a service-account key file's JSON in one Secret key (the file a user downloads,
# pasted whole); without it, Application Default Credentials (Workload Identity on GKE).
# STORAGE_EMULATOR_HOST is the variable Google's own client libraries read for an emulator.
ENV_GCS_SERVICE_ACCOUNT = "GCS_SERVICE_ACCOUNT_JSON"
ENV_GCS_PROJECT = "GOOGLE_CLOUD_PROJECT"
ENV_GCS_EMULATOR = "STORAGE_EMULATOR_HOST"
# Another endpoint that still takes the credentials: a Private Service Connect endpoint, a proxy.
ENV_GCS_ENDPOINT = "GCS_ENDPOINT_URL"
# Objects are listed, read, written and deleted; nothing else of the project is touched.
GCS_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
# az:// (adlfs): the variables Azure's own tools read.
ENV_AZURE_CONNECTION_STRING = "AZURE_STORAGE_CONNECTION_STRING"
ENV_AZURE_ACCOUNT_NAME = "AZURE_STORAGE_ACCOUNT_NAME"
ENV_AZURE_ACCOUNT_KEY = "AZURE_STORAGE_ACCOUNT_KEY"
ENV_AZURE_SAS_TOKEN = "AZURE_STORAGE_SAS_TOKEN"
ADDRESSING_STYLES = ("auto", "path", "virtual")
STAGED_MARKER = input_cache.STAGED_MARKER
# Transient failures (a restarting endpoint, a dropped connection) are retried with exponential
# backoff; ~2 minutes in all before the upload is reported as failed.
UPLOAD_ATTEMPTS = 8
# The checks at start: a few retries for a blip, not minutes (a wrong endpoint should fail fast).
CHECK_ATTEMPTS = 4
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0

T = TypeVar("T")


class StorageError(RuntimeError):
    """A remote location could not be read or written; the message names the URI."""


def scheme(uri: str) -> str:
    head, sep, _ = str(uri).partition("://")
    return head.lower() if sep else ""


def is_remote(uri: str) -> bool:
    return scheme(uri) in REMOTE_SCHEMES


def join(uri: str, *parts: str) -> str:
    """A child location of a local path or a URI (pathlib would fold `s3://` into `s3:/`)."""
    if is_remote(uri):
        return posixpath.join(str(uri).rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def _bucket_key(uri: str) -> str:
    return str(uri).split("://", 1)[1].strip("/")


# Each group is taken whole from one source, never mixed: a role's own key id with an unprefixed
# session token would sign with a pair that does not belong together (likewise an account name with
# another account's key).
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
CREDENTIAL_GROUPS = (
    CREDENTIAL_VARIABLES,
    (ENV_GCS_SERVICE_ACCOUNT,),
    (ENV_AZURE_CONNECTION_STRING, ENV_AZURE_ACCOUNT_NAME, ENV_AZURE_ACCOUNT_KEY, ENV_AZURE_SAS_TOKEN),
)
# Values never shown in a message (the account name is not secret; the rest are).
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", ENV_GCS_SERVICE_ACCOUNT,
                    ENV_AZURE_CONNECTION_STRING, ENV_AZURE_ACCOUNT_KEY, ENV_AZURE_SAS_TOKEN)


def role_env(env: Mapping[str, str] | None, role: str) -> dict[str, str]:
    """The environment the URIs of one role (model, dataset, output; checkpoints are the output's)
    are accessed with: the role's Secret (its keys under contract.SECRET_ENV_PREFIXES[role]) over the
    unprefixed variables. Credentials come whole from the Secret when it holds any, else from the
    unprefixed ones (an older pod spec, spec.resources.env, the AWS chain); the other roles' prefixed
    variables are left out, so one role's client never holds another's secret."""
    env = os.environ if env is None else env
    prefix = contract.SECRET_ENV_PREFIXES[role]
    prefixes = tuple(contract.SECRET_ENV_PREFIXES.values())
    own = {name[len(prefix):]: value for name, value in env.items() if name.startswith(prefix) and name != prefix}
    merged = {name: value for name, value in env.items() if not name.startswith(prefixes)}
    for group in CREDENTIAL_GROUPS:
        if any(name in own for name in group):
            for name in group:
                merged.pop(name, None)
    merged.update(own)
    return merged


def settings_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """s3fs keyword arguments from the environment. Holds the credentials: never log the result."""
    style = (env.get(ENV_ADDRESSING_STYLE) or "auto").lower()
    if style not in ADDRESSING_STYLES:
        raise StorageError(f"{ENV_ADDRESSING_STYLE}={style!r} is not one of {', '.join(ADDRESSING_STYLES)}")
    client: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    # Our own backoff (retrying) wraps the calls; botocore's few quick retries stay on underneath.
    config = {"s3": {"addressing_style": style}, "retries": {"max_attempts": 2, "mode": "standard"},
              "connect_timeout": 10, "read_timeout": 120}
    settings = {"client_kwargs": client, "config_kwargs": config, "skip_instance_cache": True,
                "use_listings_cache": False}
    # The standard variables, read from the mapping given (a test or a preflight check may pass its
    # own); without them botocore's chain applies (instance profile, web identity, ...).
    for variable, keyword in (("AWS_ACCESS_KEY_ID", "key"), ("AWS_SECRET_ACCESS_KEY", "secret"),
                              ("AWS_SESSION_TOKEN", "token")):
        if env.get(variable):
            settings[keyword] = env[variable]
    return settings


def gcs_settings_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """gcsfs keyword arguments from the environment. Holds the credentials: never log the result."""
    settings: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False,
                                "requests_timeout": 120}
    emulator = env.get(ENV_GCS_EMULATOR)
    endpoint = env.get(ENV_GCS_ENDPOINT)
    credentials = _gcs_service_account(env.get(ENV_GCS_SERVICE_ACCOUNT))
    if emulator:
        # As Google's own client libraries do: an emulator is spoken to anonymously.
        settings["endpoint_url"] = emulator if "://" in emulator else f"http://{emulator}"
        settings["token"] = "anon"
    else:
        if endpoint:
            settings["endpoint_url"] = endpoint
        if credentials is not None:
            settings["token"], settings["project"] = credentials
    # Neither a key nor an emulator: gcsfs's own chain (Application Default Credentials such as
    # Workload Identity or GOOGLE_APPLICATION_CREDENTIALS, the metadata server, then anonymous for
    # public buckets).
    if env.get(ENV_GCS_PROJECT):
        settings["project"] = env[ENV_GCS_PROJECT]
    return settings


def _gcs_service_account(key: str | None) -> tuple[Any, str] | None:
    """(google-auth credentials, project) from a service-account key file's JSON, or None. Built
    here, not by gcsfs, whose fallback for a key it cannot load ends in a KeyError about a refresh
    token; messages never quote the value (it is, or was meant to be, a private key)."""
    if not key:
        return None
    problem = (f"{ENV_GCS_SERVICE_ACCOUNT} must hold a service-account key file's JSON (with client_email and "
               "private_key): put the whole file into that Secret key")
    try:
        info = json.loads(key)
    except ValueError:
        raise StorageError(problem) from None
    if not isinstance(info, dict) or "private_key" not in info or "client_email" not in info:
        raise StorageError(problem)
    from google.oauth2 import service_account

    try:
        credentials = service_account.Credentials.from_service_account_info(info, scopes=[GCS_SCOPE])
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"{ENV_GCS_SERVICE_ACCOUNT}: the key file could not be loaded ({type(exc).__name__}); "
                           "download a new JSON key of the service account") from None
    return credentials, str(info.get("project_id") or "")


def azure_settings_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """adlfs keyword arguments from the environment. Holds the credentials: never log the result."""
    # The container must exist: adlfs would otherwise probe it with a call a container-scoped SAS
    # may not make, and guess.
    settings: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False,
                                "assume_container_exists": True, "connection_timeout": 10, "read_timeout": 120}
    connection = env.get(ENV_AZURE_CONNECTION_STRING)
    account = env.get(ENV_AZURE_ACCOUNT_NAME)
    if connection:
        settings["connection_string"] = connection
    elif account:
        settings["account_name"] = account
        if env.get(ENV_AZURE_ACCOUNT_KEY):
            settings["account_key"] = env[ENV_AZURE_ACCOUNT_KEY]
        elif env.get(ENV_AZURE_SAS_TOKEN):
            settings["sas_token"] = env[ENV_AZURE_SAS_TOKEN]
        else:
            settings["anon"] = False   # DefaultAzureCredential: workload identity, managed identity, ...
    else:
        raise StorageError(f"az:// needs {ENV_AZURE_CONNECTION_STRING}, or {ENV_AZURE_ACCOUNT_NAME} (with "
                           f"{ENV_AZURE_ACCOUNT_KEY} or {ENV_AZURE_SAS_TOKEN}, or alone for workload identity) "
                           "in the Secret named by the section's secretRef")
    return settings


def filesystem(env: Mapping[str, str] | None = None, uri: str = "s3://") -> Any:
    """The fsspec file system for `uri`'s scheme, set up from `env` (the role's environment)."""
    env = os.environ if env is None else env
    kind = scheme(uri)
    if kind == "gs":
        # The JSON API client itself, not gcsfs's default export: that one first asks the Storage
        # Control gRPC API for each bucket's type (zonal/hierarchical, experimental) and waits up to
        # a minute per bucket where the API does not answer (an emulator, a proxy that passes HTTP
        # only). Objects of every bucket type are read and written through the JSON API.
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(**gcs_settings_from_env(env))
    if kind == "az":
        import adlfs

        try:
            return adlfs.AzureBlobFileSystem(**azure_settings_from_env(env))
        except ValueError as exc:     # a malformed connection string
            raise StorageError(f"cannot connect for {uri}: {_describe(exc)}") from None
    import s3fs

    return s3fs.S3FileSystem(**settings_from_env(env))


def _describe(exc: BaseException) -> str:
    """The error's class and first line, with every secret the environment holds masked (botocore's,
    gcsfs's and Azure's messages carry none that we know of; a URL with a SAS token would)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    for name, secret in os.environ.items():     # every role's secret, prefixed or not
        if name.endswith(SECRET_VARIABLES) and secret:
            # Longest first, so a secret's own parts are masked inside it, not before it.
            for part in sorted({secret, *(p for p in _secret_parts(secret) if len(p) >= 8)}, key=len, reverse=True):
                text = text.replace(part, "***")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _secret_parts(value: str) -> list[str]:
    """The pieces of a composite secret that may be quoted on their own: a connection string's
    AccountKey= and SharedAccessSignature=, a SAS token's sig=."""
    parts = []
    for item in value.replace("&", ";").lstrip("?").split(";"):
        name, sep, secret = item.partition("=")
        if sep and name.strip().lower() in ("accountkey", "sharedaccesssignature", "sig"):
            parts.append(secret)
    return parts


def _permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: missing objects/buckets and refused permissions. s3fs maps them to
    the OSError subclasses; gcsfs raises a plain OSError("Forbidden: ...") for a 403, and Azure's
    SDK an HttpResponseError carrying the status."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    if getattr(exc, "status_code", None) in (401, 403, 404):
        return True
    return type(exc) is OSError and str(exc).startswith("Forbidden")


def retrying(what: str, uri: str, call: Callable[[], T], attempts: int = UPLOAD_ATTEMPTS,
             sleep: Callable[[float], None] = time.sleep) -> T:
    delay = BACKOFF_START_S
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified right below
            if _permanent(exc) or attempt == attempts:
                raise StorageError(f"{what} {uri} failed after {attempt} attempt(s): {_describe(exc)}") from exc
            log.warning("%s %s failed (%s); retry %d of %d in %.1f s", what, uri, _describe(exc), attempt,
                        attempts - 1, delay)
            sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Checks before training (preflight may call these too)


# What to check when a location cannot be read or written, per scheme.
_READ_HINTS = {
    "s3": "check the bucket name, the endpoint (AWS_ENDPOINT_URL) and that the Secret's credentials may list "
          "and get it",
    "gs": "check the bucket name and that the service account (GCS_SERVICE_ACCOUNT_JSON, or the pod's Workload "
          "Identity) has storage.objects.list and storage.objects.get on it",
    "az": "check the container name, the account in AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME "
          "and that the key, SAS token (sp=rl at least) or identity may list and read blobs",
}
_WRITE_HINTS = {
    "s3": "the bucket must exist and the Secret's credentials need s3:PutObject (and s3:DeleteObject) on it",
    "gs": "the bucket must exist and the service account needs storage.objects.create (and storage.objects.delete) "
          "on it, e.g. the Storage Object User role",
    "az": "the container must exist and the key, SAS token (sp=rwdl) or identity must be allowed to write and "
          "delete blobs, e.g. the Storage Blob Data Contributor role",
}


def check_readable(uri: str, env: Mapping[str, str] | None = None) -> None:
    """The URI holds at least one object this process may list."""
    fs = filesystem(env, uri)
    try:
        found = retrying("listing of", uri, lambda: fs.find(_bucket_key(uri)), attempts=CHECK_ATTEMPTS)
    except StorageError as exc:
        raise StorageError(f"cannot read {uri}: {_describe(exc.__cause__ or exc)}; {_READ_HINTS[scheme(uri)]}") from exc
    if not found:
        raise StorageError(f"{uri} holds no objects; upload the files there or fix the URI")


def check_writable(uri: str, env: Mapping[str, str] | None = None) -> None:
    """A probe object can be put under the URI and deleted again (catches read-only credentials,
    missing buckets and bucket policies before any training time is spent)."""
    fs = filesystem(env, uri)
    probe = posixpath.join(_bucket_key(uri), f".lorakube-write-check-{os.getpid()}-{time.time_ns()}")
    try:
        retrying("write check of", uri, lambda: fs.pipe_file(probe, b"lorakube write check\n"), attempts=CHECK_ATTEMPTS)
    except StorageError as exc:
        raise StorageError(f"cannot write to {uri}: {_describe(exc.__cause__ or exc)}; {_WRITE_HINTS[scheme(uri)]}") from exc
    with contextlib.suppress(Exception):
        fs.rm_file(probe)


# ---------------------------------------------------------------------------------------------
# Inputs: staged once per node


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _listing(fs: Any, uri: str) -> dict[str, dict[str, Any]]:
    """Relative key -> {size, etag} of every object under the URI."""
    base = _bucket_key(uri)
    found = retrying("listing of", uri, lambda: fs.find(base, detail=True))
    objects = {}
    for key, info in found.items():
        if info.get("type") == "directory":
            continue
        rel = posixpath.relpath(key, base) if key != base else posixpath.basename(key)
        if rel.startswith("../") or rel in (".", ".."):
            raise StorageError(f"{uri}: object {key} is outside the prefix")
        objects[rel] = {"size": int(info.get("size") or 0), "etag": _version(info)}
    if not objects:
        raise StorageError(f"{uri} holds no objects; upload the files there or fix the URI")
    return objects


def _version(info: Mapping[str, Any]) -> str:
    """What changes when an object's content does: S3's ETag, a GCS object's generation (its etag
    also changes with metadata only), an Azure blob's etag."""
    for field in ("ETag", "generation", "etag"):
        if info.get(field):
            return str(info[field]).strip('"')
    return ""


def stage_key(uri: str, objects: Mapping[str, Mapping[str, Any]]) -> str:
    """The cache folder's name: the same URI with the same object versions maps to the same folder."""
    body = json.dumps({"uri": uri.rstrip("/"), "objects": objects}, sort_keys=True).encode()
    return hashlib.sha256(body).hexdigest()[:32]


def stage_input(uri: str, env: Mapping[str, str] | None = None,
                on_bytes: input_cache.ByteProgress | None = None) -> Path:
    """A local folder holding the objects under `uri`, downloaded at most once per node and version
    (input_cache.stage: lock, cache hit, eviction, marker); `on_bytes(done, total)` sees the bytes."""
    env = os.environ if env is None else env
    fs = filesystem(env, uri)
    objects = _listing(fs, uri)
    total = sum(o["size"] for o in objects.values())
    base = _bucket_key(uri)

    def fill(partial: Path, progress: input_cache.ByteProgress) -> None:
        log.info("staging %s: %d objects, %d bytes", uri, len(objects), total)
        done = 0
        progress(done, total)
        for rel, info in sorted(objects.items()):
            target = partial / rel
            if not target.resolve().is_relative_to(partial.resolve()):
                raise StorageError(f"{uri}: object name {rel!r} escapes the staging folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            # A retry starts the object again: its bytes count from `done` each time.
            retrying("download of", f"{uri.rstrip('/')}/{rel}",
                     lambda: fs.get_file(posixpath.join(base, rel), str(target),
                                         callback=byte_callback(lambda n: progress(done + n, total))))
            if target.stat().st_size != info["size"]:
                raise StorageError(f"{uri}/{rel}: got {target.stat().st_size} bytes, listed {info['size']}")
            done += info["size"]
            progress(done, total)

    return stage_cached(uri, env, stage_key(uri, objects), total, fill, on_bytes=on_bytes,
                        record={"objects": objects})


def stage_cached(uri: str, env: Mapping[str, str], key: str, total: int | None, fill: input_cache.Filler, *,
                 on_bytes: input_cache.ByteProgress | None = None,
                 record: Mapping[str, object] | None = None) -> Path:
    """Every scheme's input goes through here into the node's cache (input_cache.stage: the lock,
    a cache hit, eviction under $LORAKUBE_CACHE_MAX_BYTES, the marker written last, the in-use
    hold), so entries of any scheme are evicted by one rule and never while in use."""
    try:
        cap = input_cache.max_bytes_from_env(env)
    except ValueError as exc:
        raise StorageError(str(exc)) from None
    return input_cache.stage(cache_root(env) / "inputs", key, uri, total, fill, on_bytes=on_bytes, cap=cap,
                             record=record)


def move_files(source: Path, names: Iterable[str], target: Path) -> None:
    """Move the files `names` (relative paths) from `source` into `target`, keeping their folders."""
    for rel in names:
        destination = target / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source / rel, destination)


def move_verified(source: Path, files: Mapping[str, Any], target: Path,
                  mismatch: Callable[[Path, Any], str | None], uri: str, listed_by: str) -> None:
    """Move the listed files (relative path -> listing entry) into `target` once every one matches its
    entry; a single mismatch refuses the whole input, so a tampered or cut-short download is never
    used. The error names the input's URI, the file and what listed it (`listed_by`)."""
    for rel, entry in sorted(files.items()):
        problem = mismatch(source / rel, entry)
        if problem is not None:
            raise StorageError(f"{uri}: {rel} as downloaded does not match {listed_by} ({problem}); not used")
    move_files(source, sorted(files), target)


def byte_callback(on_value: Callable[[int], None]) -> Any:
    """An fsspec callback that passes the bytes of the current file so far to `on_value`."""
    from fsspec.callbacks import Callback

    class ByteCallback(Callback):
        def call(self, *args: Any, **kwargs: Any) -> None:
            on_value(int(self.value))

    return ByteCallback()


# ---------------------------------------------------------------------------------------------
# Uploads


def sha256_bytes_of(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb", block_size=1 << 22) as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def upload_verified(fs: Any, local: Path, uri: str, sha256: str | None = None) -> None:
    """Put one file, then HEAD it (size) and, if a sha256 is given, read it back and hash it."""
    target = _bucket_key(uri)
    size = local.stat().st_size

    def attempt() -> None:
        fs.put_file(str(local), target)
        info = fs.info(target)
        if int(info.get("size") or 0) != size:
            raise OSError(f"HEAD says {info.get('size')} bytes, uploaded {size}")
        if sha256 is not None and sha256_bytes_of(fs, target) != sha256:
            raise OSError("the object read back has a different sha256")

    retrying("upload to", uri, attempt)


def upload_checkpoint(folder: Path, uri: str, env: Mapping[str, str] | None = None) -> None:
    """A finalized local checkpoint folder to `uri` (its step-NNN prefix): objects first, marker last."""
    fs = filesystem(env, uri)
    marker = folder / contract.CHECKPOINT_COMPLETE_MARKER
    files = json.loads(marker.read_text())["files"]
    for name in sorted(files):
        upload_verified(fs, folder / name, join(uri, name))
    upload_verified(fs, marker, join(uri, marker.name))


def upload_rank_files(folder: Path, uri: str, names: Iterable[str], env: Mapping[str, str] | None = None) -> None:
    fs = filesystem(env, uri)
    for name in names:
        upload_verified(fs, folder / name, join(uri, name))


def download_files(uri: str, folder: Path, names: Iterable[str], env: Mapping[str, str] | None = None) -> None:
    fs = filesystem(env, uri)
    for name in names:
        retrying("download of", join(uri, name), lambda: fs.get_file(_bucket_key(join(uri, name)), str(folder / name)))


def list_remote(uri: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Names directly under a prefix (files and sub-prefixes); [] when there is nothing."""
    fs = filesystem(env, uri)

    def names() -> list[str]:
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(_bucket_key(uri), detail=False))
        except FileNotFoundError:
            return []

    # Retried like the uploads: pruning and resume list the bucket between two checkpoint uploads,
    # and an endpoint restarting then must not end the run.
    return retrying("listing of", uri, names)


def exists(uri: str, env: Mapping[str, str] | None = None) -> bool:
    fs = filesystem(env, uri)
    return retrying("existence check of", uri, lambda: bool(fs.exists(_bucket_key(uri))))


def remove_prefix(uri: str, first: str | None = None, env: Mapping[str, str] | None = None) -> None:
    """Delete everything under `uri`; `first` (the COMPLETE marker) goes before the rest, so that a
    deletion cut short never leaves something that looks complete."""
    fs = filesystem(env, uri)

    def gone(remove: Callable[[], Any]) -> None:
        with contextlib.suppress(FileNotFoundError):
            remove()

    if first is not None:
        retrying("deletion of", join(uri, first), lambda: gone(lambda: fs.rm_file(_bucket_key(join(uri, first)))))
    retrying("deletion of", uri, lambda: gone(lambda: fs.rm(_bucket_key(uri), recursive=True)))


def read_text(uri: str, env: Mapping[str, str] | None = None) -> str:
    return filesystem(env, uri).cat_file(_bucket_key(uri)).decode()


# ---------------------------------------------------------------------------------------------
# Mapping remote locations of a run to local working folders


@dataclasses.dataclass(frozen=True)
class Locations:
    """The URIs the user gave, for the flags that were remote (empty string: a local path)."""

    model: str = ""
    dataset: str = ""
    output: str = ""
    checkpoints: str = ""

    @property
    def any(self) -> bool:
        return any((self.model, self.dataset, self.output, self.checkpoints))


# local working folder -> the URI it stands for (the checkpoint callback looks it up)
_REMOTE_OF: dict[str, str] = {}


def remote_of(local: str | Path) -> str | None:
    return _REMOTE_OF.get(str(Path(local)))


def work_folder(kind: str, uri: str, env: Mapping[str, str] | None = None) -> Path:
    name = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:32]
    folder = cache_root(env) / kind / name
    folder.mkdir(parents=True, exist_ok=True)
    _REMOTE_OF[str(folder)] = uri.rstrip("/")
    return folder
