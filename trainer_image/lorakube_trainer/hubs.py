"""Hugging Face Hub repos as model, dataset and output locations, through huggingface_hub.

URIs follow the path syntax of huggingface_hub's HfFileSystem:

    hf://<org>/<name>[@<revision>][/<path in the repo>]            a model repo
    hf://datasets/<org>/<name>[@<revision>][/<path in the repo>]   a dataset repo

`<revision>` is a branch, a tag or a commit sha (default `main`; a `/` inside it is written `%2F`,
as in `refs%2Fpr%2F1`). Inputs are resolved to the commit sha first and staged into the node's cache
(storage.py's folder, lock and temp-then-rename) under a key made of the URI and that sha: a second
job, or a restarted rank, on the node downloads nothing while the revision points at the same
commit. Each file is checked against the Hub's listing (size, and the sha256 of an LFS file or the
git blob sha1 of a regular one) before the folder counts as staged.

Output (`spec.output.uri: hf://org/name[@branch][/path]`): the verified local artifacts go up in one
commit (atomic: the repo never shows some files without the others), then the commit's listing is
read back and every file's size and hash compared; only files that match are reported.

Settings come from the environment only: HF_TOKEN (from the job's Secret), HF_ENDPOINT (a mirror or
a private Hub). Messages name the URI, never the token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar
from urllib.parse import unquote

from . import input_cache, storage
from .files import sha256_file

log = logging.getLogger(__name__)

SCHEME = "hf"
ENV_TOKEN = "HF_TOKEN"
ENV_ENDPOINT = "HF_ENDPOINT"
ENV_OFFLINE = "HF_HUB_OFFLINE"
DEFAULT_REVISION = "main"
_KIND_PREFIXES = {"datasets": "dataset", "models": "model"}
T = TypeVar("T")
StorageError = storage.StorageError


@dataclasses.dataclass(frozen=True)
class HfLocation:
    repo_id: str
    repo_type: str = "model"
    revision: str = DEFAULT_REVISION
    path: str = ""
    pinned: bool = False        # the URI named a revision


def parse(uri: str) -> HfLocation:
    """hf://[datasets/]org/name[@rev][/path] -> its parts; StorageError naming the URI otherwise."""
    if storage.scheme(uri) != SCHEME:
        raise StorageError(f"{uri} is not an hf:// URI")
    rest = str(uri).split("://", 1)[1].strip("/")
    parts = rest.split("/")
    repo_type = "model"
    if parts and parts[0] in _KIND_PREFIXES:
        repo_type = _KIND_PREFIXES[parts.pop(0)]
    elif parts and parts[0] == "spaces":
        raise StorageError(f"{uri}: Spaces are not a model or dataset location; use a model or dataset repo")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise StorageError(f"{uri} must look like hf://<org>/<name>[@<revision>][/<path>] "
                           "(hf://datasets/<org>/<name>... for a dataset repo)")
    org, name = parts[0], parts[1]
    revision, pinned = DEFAULT_REVISION, False
    if "@" in name:
        name, _, rev = name.partition("@")
        revision, pinned = unquote(rev), True
        if not revision:
            raise StorageError(f"{uri}: nothing after @; give a branch, tag or commit sha")
    path = "/".join(parts[2:])
    if any(p in ("", ".", "..") for p in path.split("/")) and path:
        raise StorageError(f"{uri}: the path inside the repo may not contain empty, . or .. segments")
    return HfLocation(repo_id=f"{org}/{name}", repo_type=repo_type, revision=revision, path=path, pinned=pinned)



def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def _token(env: Mapping[str, str]) -> str | bool:
    # False, not None: without HF_TOKEN no token is sent (huggingface_hub would otherwise look for
    # one saved on the node).
    return env.get(ENV_TOKEN) or False


def _api(env: Mapping[str, str]) -> Any:
    if (env.get(ENV_OFFLINE) or "").strip().lower() in ("1", "true", "yes", "on"):
        raise StorageError(f"{ENV_OFFLINE}=1 is set, so the Hub may not be reached; remove it (or set it to 0) "
                           "from spec.resources.env or the image to read or write hf:// URIs")
    from huggingface_hub import HfApi

    return HfApi(endpoint=env.get(ENV_ENDPOINT) or None, token=_token(env))


def _scrub(text: str, env: Mapping[str, str]) -> str:
    token = env.get(ENV_TOKEN)
    return text.replace(token, "***") if token else text


class HubError(FileNotFoundError):
    """A permanent answer (storage.retrying retries no FileNotFoundError): a bad request, a missing
    revision or path, or a reply the client cannot use."""


def _classified(call: Callable[[], T]) -> Callable[[], T]:
    """Turn the Hub's permanent answers into the errors storage.retrying does not retry."""
    def wrapped() -> T:
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
        try:
            return call()
        except (GatedRepoError, RepositoryNotFoundError) as exc:
            raise PermissionError(f"repo not found or not accessible ({_first_line(exc)}); check the repo id, "
                                  f"and a private or gated repo needs {ENV_TOKEN} in the job's Secret") from exc
        except RevisionNotFoundError as exc:
            raise HubError(f"revision not found ({_first_line(exc)})") from exc
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise PermissionError(f"refused ({status}); {ENV_TOKEN} in the job's Secret must grant access") from exc
            if status in (400, 404, 409, 422):
                raise HubError(f"{status}: {_first_line(exc)}") from exc
            raise
        except ValueError as exc:
            raise HubError(_first_line(exc)) from exc
    return wrapped


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _call(what: str, uri: str, env: Mapping[str, str], call: Callable[[], T],
          attempts: int = storage.UPLOAD_ATTEMPTS) -> T:
    try:
        return storage.retrying(what, uri, _classified(call), attempts=attempts)
    except StorageError as exc:
        raise StorageError(_scrub(str(exc), env)) from exc.__cause__


def git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(local: Path, entry: Any) -> str | None:
    """Why `local` is not the Hub file `entry` (a RepoFile), or None when size and hash agree."""
    size = local.stat().st_size
    if size != entry.size:
        return f"{size} bytes, the Hub lists {entry.size}"
    if entry.lfs is not None:
        if sha256_file(local) != entry.lfs.sha256:
            return "its sha256 differs from the Hub's"
    elif git_blob_sha1(local) != entry.blob_id:
        return "its git blob sha1 differs from the Hub's"
    return None


def _resolve(api: Any, where: HfLocation, uri: str, env: Mapping[str, str], attempts: int) -> str:
    info = _call("revision lookup of", uri, env,
                 lambda: api.repo_info(where.repo_id, repo_type=where.repo_type, revision=where.revision),
                 attempts=attempts)
    if not info.sha:
        raise StorageError(f"{uri}: the Hub returned no commit sha for revision {where.revision}")
    return str(info.sha)


def _files(api: Any, where: HfLocation, sha: str, uri: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Path relative to where.path -> RepoFile, for every file under it at commit `sha`."""
    from huggingface_hub.hf_api import RepoFile

    entries = _call("listing of", uri, env, lambda: list(api.list_repo_tree(
        where.repo_id, path_in_repo=where.path or None, recursive=True, revision=sha, repo_type=where.repo_type)))
    files = {}
    for entry in entries:
        if not isinstance(entry, RepoFile):
            continue
        rel = posixpath.relpath(entry.path, where.path) if where.path else entry.path
        if rel.startswith("../") or rel in (".", ".."):
            raise StorageError(f"{uri}: the Hub listed {entry.path}, outside {where.path}")
        files[rel] = entry
    return files


def check_readable(uri: str, env: Mapping[str, str] | None = None) -> None:
    env = _env(env)
    where = parse(uri)
    api = _api(env)
    sha = _resolve(api, where, uri, env, storage.CHECK_ATTEMPTS)
    if where.path and not _files(api, where, sha, uri, env):
        raise StorageError(f"{uri} holds no files at {where.revision} ({sha[:12]}); fix the path after the repo id")


def check_writable(uri: str, env: Mapping[str, str] | None = None) -> None:
    """The repo and branch exist and a token is there to write with; the Hub checks the token's
    rights at the commit (a write-scope token is needed)."""
    env = _env(env)
    where = parse(uri)
    if not env.get(ENV_TOKEN):
        raise StorageError(f"cannot write to {uri}: {ENV_TOKEN} is not set; put a write token under that key in "
                           "the Secret named by spec.output.secretRef")
    _resolve(_api(env), where, uri, env, storage.CHECK_ATTEMPTS)


def stage_input(uri: str, env: Mapping[str, str] | None = None, on_bytes: Any = None) -> Path:
    """A local folder holding the files under `uri` at its resolved commit, downloaded at most once
    per node and commit (storage.stage_cached); `on_bytes` hears the bytes as each file arrives."""
    env = _env(env)
    where = parse(uri)
    api = _api(env)
    sha = _resolve(api, where, uri, env, storage.UPLOAD_ATTEMPTS)
    key = storage.stage_key(uri, {"commit": {"sha": sha}})

    def fill(folder: Path, progress: Any) -> None:
        # Listed only on a cache miss: a second job on the node asks for the commit alone.
        files = _files(api, where, sha, uri, env)
        if not files:
            raise StorageError(f"{uri} holds no files at {where.revision} ({sha[:12]}); fix the repo or the path")
        total = sum(f.size for f in files.values())
        log.info("staging %s (commit %s): %d files, %d bytes", uri, sha, len(files), total)
        progress(0, total)
        with tempfile.TemporaryDirectory(prefix=".hf-download-", dir=folder.parent) as tmp:
            download_root = Path(tmp)
            _download(where, sha, files, download_root, uri, env, input_cache.FileBytes(progress, total))
            source = download_root / where.path if where.path else download_root
            # Only the repo's files: hf_hub_download's own bookkeeping (.cache/) stays behind.
            storage.move_verified(source, files, folder, _matches, uri, "the Hub")
        progress(total, total)

    return storage.stage_cached(uri, env, key, None, fill, on_bytes=on_bytes, record={"commit": sha})


def _download(where: HfLocation, sha: str, files: Mapping[str, Any], target: Path, uri: str,
              env: Mapping[str, str], counted: input_cache.FileBytes) -> None:
    from huggingface_hub import hf_hub_download

    for rel, entry in sorted(files.items()):
        local = target / entry.path
        if not local.resolve().is_relative_to(target.resolve()):
            raise StorageError(f"{uri}: file name {entry.path!r} escapes the staging folder")
        _call("download of", f"{uri.rstrip('/')}/{rel}", env, lambda: hf_hub_download(
            where.repo_id, entry.path, repo_type=where.repo_type, revision=sha, local_dir=str(target),
            endpoint=env.get(ENV_ENDPOINT) or None, token=_token(env), force_download=True,
            tqdm_class=_counting_bar(counted, rel)))


def _counting_bar(counted: input_cache.FileBytes, name: str) -> type:
    """The progress-bar class hf_hub_download drives for one file (its tqdm_class): it keeps the
    file's byte count in `counted` and shows nothing. huggingface_hub calls these methods on such
    a class, over plain HTTP and Xet alike (with update_transfer there, one bar counts the bytes
    written; the network bytes, deduplicated and compressed, are not the file's)."""

    class CountingBar:
        def __init__(self, *args: Any, initial: int = 0, total: int | None = None, **kwargs: Any) -> None:
            self.n, self.total = initial, total
            counted.set(name, initial)      # a download started again counts from where it resumes

        def update(self, n: int | float | None = 1) -> None:
            self.n += int(n or 0)
            counted.add(name, int(n or 0))

        def update_transfer(self, n: int | float | None = 1) -> None:
            """Network bytes: not counted (see above)."""

        def set_postfix_str(self, postfix: str = "", refresh: bool = False) -> None:
            """No display."""

        def set_transfer_postfix_str(self, postfix: str = "", refresh: bool = False) -> None:
            """No display."""

        def refresh(self) -> None:
            """No display."""

        def close(self) -> None:
            """Nothing to release."""

        def __enter__(self) -> "CountingBar":
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    return CountingBar


def work_folder(uri: str, env: Mapping[str, str] | None = None) -> Path:
    """The local folder the artifacts for `uri` are written to before the commit."""
    folder = storage.cache_root(env) / "outputs" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:32]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def publish_artifacts(local: Path, uri: str, names: Iterable[str], env: Mapping[str, str] | None = None,
                      message: str = "lorakube: trained LoRA") -> dict[str, dict[str, Any]]:
    """Commit the files `names` of `local` (the manifest among them) in one commit, then list the
    commit and compare each file's size and hash. Returns name -> {sha256, bytes} of those that match."""
    from huggingface_hub import CommitOperationAdd

    env = _env(env)
    where = parse(uri)
    api = _api(env)
    names = sorted(set(names))

    def commit() -> Any:
        operations = [CommitOperationAdd(path_in_repo=posixpath.join(where.path, name) if where.path else name,
                                         path_or_fileobj=str(local / name)) for name in names]
        return api.create_commit(where.repo_id, operations=operations, commit_message=message,
                                 repo_type=where.repo_type, revision=where.revision)

    info = _call("upload to", uri, env, commit)
    listed = _files(api, where, info.oid, uri, env)
    verified: dict[str, dict[str, Any]] = {}
    for name in names:
        entry = listed.get(name)
        problem = "missing from the commit" if entry is None else _matches(local / name, entry)
        if problem is not None:
            raise StorageError(f"{uri}: {name} read back from commit {info.oid[:12]} does not match ({problem})")
        verified[name] = {"sha256": sha256_file(local / name), "bytes": (local / name).stat().st_size}
    log.info("uploaded %d artifacts to %s in commit %s", len(verified), uri, info.oid)
    return verified
