"""ModelScope model repos as model and dataset locations, and as a place the LoRA is published to
(the original framework's --modelscope_model_id), through the `modelscope` client.

    modelscope://<owner>/<name>[@<revision>][/<path in the repo>]     revision: default master

Inputs are listed first (path, size, sha256 of every file at the revision) and staged into the
node's cache (storage.py's folder, lock and temp-then-rename) under a key made of the URI and that
listing: a second job on the node downloads nothing while the files are the same. Every file is
checked against the listing's sha256 and size before the folder counts as staged.

Publishing: the repo must exist (the client would otherwise create it, public); the verified local
artifacts are uploaded under the optional path, then the repo is listed again and each file's size
and sha256 compared; only files that match are reported.

Settings come from the environment only: MODELSCOPE_API_TOKEN (from the job's Secret; the flag
--modelscope_access_token still works), MODELSCOPE_ENDPOINT (or the older MODELSCOPE_DOMAIN) for
another site. Messages name the URI, never the token.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from . import hubs, input_cache, storage
from .files import sha256_file

log = logging.getLogger(__name__)

SCHEME = "modelscope"
ENV_TOKEN = "MODELSCOPE_API_TOKEN"
ENV_ENDPOINT = "MODELSCOPE_ENDPOINT"
ENV_DOMAIN = "MODELSCOPE_DOMAIN"
DEFAULT_REVISION = "master"
StorageError = storage.StorageError
T = TypeVar("T")


def parse(uri: str) -> hubs.HfLocation:
    """modelscope://owner/name[@rev][/path] -> its parts (the same shape as an hf:// model URI)."""
    if storage.scheme(uri) != SCHEME:
        raise StorageError(f"{uri} is not a modelscope:// URI")
    where = hubs.parse("hf://" + str(uri).split("://", 1)[1])
    if where.repo_type != "model":
        raise StorageError(f"{uri}: only ModelScope model repos are read; put the dataset in a model repo")
    return where if where.pinned else hubs.HfLocation(where.repo_id, "model", DEFAULT_REVISION, where.path)


def model_uri(model_id: str) -> str:
    return f"{SCHEME}://{model_id.strip('/')}"


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _api(env: Mapping[str, str], token: str | None = None) -> Any:
    from modelscope.hub.api import HubApi

    return HubApi(endpoint=env.get(ENV_ENDPOINT) or env.get(ENV_DOMAIN) or None,
                  token=token or env.get(ENV_TOKEN) or None)


def _classified(call: Callable[[], T]) -> Callable[[], T]:
    """The client's permanent errors (missing repo or file, refused credentials) as the errors
    storage.retrying does not retry."""
    def wrapped() -> T:
        try:
            return call()
        except Exception as exc:
            name, status = type(exc).__name__, getattr(exc, "status_code", None)
            if name in ("AuthenticationError", "PermissionDeniedError") or status in (401, 403):
                raise PermissionError(f"refused ({hubs._first_line(exc)}); {ENV_TOKEN} in the job's Secret must "
                                      "grant access") from exc
            if name in ("NotExistError", "InvalidParameter", "NotSupportedError") or status in (400, 404):
                raise hubs.HubError(hubs._first_line(exc)) from exc
            raise
    return wrapped


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _call(what: str, uri: str, token: str | None, call: Callable[[], T], attempts: int = storage.UPLOAD_ATTEMPTS) -> T:
    try:
        return storage.retrying(what, uri, _classified(call), attempts=attempts)
    except StorageError as exc:
        raise StorageError(_scrub(str(exc), token)) from exc.__cause__


def _listing(api: Any, where: hubs.HfLocation, uri: str, token: str | None,
             attempts: int = storage.UPLOAD_ATTEMPTS) -> dict[str, dict[str, Any]]:
    """Path relative to where.path -> {path, size, sha256} of every file under it."""
    found = _call("listing of", uri, token, lambda: api.list_repo_files(where.repo_id, "model",
                                                                         revision=where.revision), attempts)
    files = {}
    prefix = where.path.strip("/")
    for info in found:
        if info.type == "tree" or not info.path:
            continue
        if prefix and not info.path.startswith(prefix + "/"):
            continue
        rel = info.path[len(prefix) + 1:] if prefix else info.path
        if rel.startswith("/") or ".." in rel.split("/"):
            raise StorageError(f"{uri}: the listing names {info.path!r}, outside the repo folder")
        files[rel] = {"path": info.path, "size": int(info.size), "sha256": info.sha256}
    return files


def _mismatch(local: Path, entry: Mapping[str, Any]) -> str | None:
    size = local.stat().st_size if local.is_file() else None
    if size != entry["size"]:
        return f"{size} bytes, ModelScope lists {entry['size']}"
    if not entry.get("sha256"):
        return "ModelScope lists no sha256 for it, so it cannot be verified"
    if sha256_file(local) != entry["sha256"]:
        return "its sha256 differs from ModelScope's"
    return None


def check_readable(uri: str, env: Mapping[str, str] | None = None) -> None:
    env = _env(env)
    where = parse(uri)
    if not _listing(_api(env), where, uri, env.get(ENV_TOKEN), storage.CHECK_ATTEMPTS):
        raise StorageError(f"{uri} holds no files at {where.revision}; fix the model id, revision or path")


def stage_input(uri: str, env: Mapping[str, str] | None = None, on_bytes: Any = None) -> Path:
    """A local folder holding the files under `uri`, downloaded at most once per node and version
    (storage.stage_cached); `on_bytes` hears the bytes as each file arrives."""
    from modelscope.hub.snapshot_download import snapshot_download

    env = _env(env)
    where = parse(uri)
    token = env.get(ENV_TOKEN)
    api = _api(env)
    files = _listing(api, where, uri, token)
    if not files:
        raise StorageError(f"{uri} holds no files at {where.revision}; fix the model id, revision or path")
    key = storage.stage_key(uri, {"files": {rel: [f["size"], f["sha256"]] for rel, f in files.items()},
                                  "revision": where.revision})
    total = sum(f["size"] for f in files.values())

    def fill(folder: Path, progress: Any) -> None:
        log.info("staging %s: %d files, %d bytes", uri, len(files), total)
        progress(0, total)
        counted = input_cache.FileBytes(progress, total)
        with tempfile.TemporaryDirectory(prefix=".modelscope-download-", dir=folder.parent) as tmp:
            download = Path(tmp) / "download"
            _call("download of", uri, token, lambda: snapshot_download(
                repo_id=where.repo_id, revision=where.revision, local_dir=str(download),
                allow_patterns=[f["path"] for f in files.values()], max_workers=1,
                progress_callbacks=[_counting_callback(counted)],
                endpoint=env.get(ENV_ENDPOINT) or env.get(ENV_DOMAIN) or None, token=token),
                # The client retries each file (and checks its sha256) itself: one more round here.
                attempts=2)
            source = download / where.path if where.path else download
            # Only the listed files, each verified (the client keeps bookkeeping files of its own).
            storage.move_verified(source, files, folder, _mismatch, uri, "ModelScope")
        progress(total, total)

    return storage.stage_cached(uri, env, key, total, fill, on_bytes=on_bytes, record={"revision": where.revision})


def _counting_callback(counted: input_cache.FileBytes) -> type:
    """A ProgressCallback class for the client, which makes one per file (filename, size) and calls
    update(bytes) per chunk; a fresh one for a file that starts over (a retry) counts it from 0."""
    from modelscope.hub.callback import ProgressCallback

    class Counting(ProgressCallback):
        def __init__(self, filename: str, file_size: int) -> None:
            super().__init__(filename, file_size)
            counted.set(filename, 0)

        def update(self, size: int) -> None:
            counted.add(self.filename, size)

    return Counting


def check_publishable(model_id: str, token: str | None, env: Mapping[str, str] | None = None) -> None:
    """Before training: the repo exists (the client would create a missing one, public) and a token
    is there to write with."""
    env = _env(env)
    uri = model_uri(model_id)
    token = token or env.get(ENV_TOKEN)
    if not token:
        raise StorageError(f"cannot publish to {uri}: {ENV_TOKEN} is not set; put an access token under that key in "
                           "the Secret named by spec.output.secretRef")
    where = parse(uri)
    exists = _call("lookup of", uri, token, lambda: _api(env, token).repo_exists(where.repo_id, repo_type="model",
                                                                                 re_raise=True),
                   storage.CHECK_ATTEMPTS)
    if not exists:
        raise StorageError(f"cannot publish to {uri}: the model repo does not exist; create it on ModelScope first "
                           "(private or public, as you choose)")


def publish_artifacts(local: Path, model_id: str, names: Iterable[str], token: str | None = None,
                      env: Mapping[str, str] | None = None,
                      message: str = "lorakube: trained LoRA") -> dict[str, dict[str, Any]]:
    """Upload the files `names` of `local` to the model repo, then list it and compare each file's
    size and sha256. Returns name -> {sha256, bytes} of those that match (a StorageError otherwise)."""
    env = _env(env)
    uri = model_uri(model_id)
    token = token or env.get(ENV_TOKEN)
    check_publishable(model_id, token, env)
    where = parse(uri)
    api = _api(env, token)
    names = sorted(set(names))
    with tempfile.TemporaryDirectory(prefix="lorakube-modelscope-") as tmp:
        folder = Path(tmp) / "upload"
        folder.mkdir()
        for name in names:
            shutil.copy2(local / name, folder / name)
        # ModelScope shows a model page from configuration.json.
        (folder / "configuration.json").write_text(json.dumps({"framework": "Pytorch",
                                                               "task": "text-to-image-synthesis"}))
        _call("upload to", uri, token, lambda: api.upload_folder(
            repo_id=where.repo_id, folder_path=str(folder), path_in_repo=where.path, commit_message=message,
            revision=where.revision, use_cache=False, disable_tqdm=True, max_workers=1,
            tracker_path=str(Path(tmp) / "tracker")))
    listed = _listing(api, where, uri, token)
    verified: dict[str, dict[str, Any]] = {}
    for name in names:
        entry = listed.get(name)
        problem = "missing after the upload" if entry is None else _mismatch(local / name, entry)
        if problem is not None:
            raise StorageError(f"{uri}: {name} read back does not match ({problem})")
        verified[name] = {"sha256": entry["sha256"], "bytes": entry["size"]}
    log.info("uploaded %d artifacts to %s", len(verified), uri)
    return verified

