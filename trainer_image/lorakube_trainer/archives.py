"""Model and dataset folders packed in an archive behind an https:// URL, through fsspec's HTTP
filesystem.

    https://host/path/name.tar.gz            .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz or .zip
    https://host/path/name.zip#sha256=<hex>  the fragment pins the archive's sha256 (never sent)

The archive is staged into the node's cache like any input (storage.py's folder, lock and
temp-then-rename) under a key made of the URL and what the server says identifies this version of
it (ETag, Last-Modified, size) and the pinned sha256: a second job on the node downloads nothing.
The download must have the size the server announced (and the pinned sha256); then every member is
checked before anything is extracted: an absolute name, a `..` segment, a link (symbolic or hard)
pointing outside the folder, a device file, or a zip symlink refuses the whole archive, naming the
member. An archive holding one top-level folder and nothing else stands for that folder.

Plain http:// is not accepted (nothing would tell a tampered archive from the real one). A private
CA is trusted through SSL_CERT_FILE, as for any OpenSSL client.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Mapping
from urllib.parse import urlsplit

from lorakube_api import contract

from . import storage
from .files import sha256_file

log = logging.getLogger(__name__)

SCHEME = "https"
ENV_CA_FILE = "SSL_CERT_FILE"
StorageError = storage.StorageError


def split(uri: str) -> tuple[str, str | None]:
    """The URL to fetch and the pinned sha256 (from `#sha256=<hex>`), checking the suffix."""
    url, _, fragment = str(uri).partition("#")
    if storage.scheme(url) != SCHEME:
        raise StorageError(f"{uri}: only https:// archives are fetched (plain http:// cannot be trusted)")
    if not urlsplit(url).path.lower().endswith(contract.ARCHIVE_SUFFIXES):
        raise StorageError(f"{uri} must name an archive ending in {', '.join(contract.ARCHIVE_SUFFIXES)}")
    pinned = None
    if fragment:
        key, _, value = fragment.partition("=")
        if key != "sha256" or len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower()):
            raise StorageError(f"{uri}: the fragment must be #sha256=<64 hex digits>, got #{fragment}")
        pinned = value.lower()
    return url, pinned


def _filesystem(env: Mapping[str, str]) -> Any:
    import fsspec

    # The CA file is read from the mapping given (a test or a preflight check may pass its own).
    context = ssl.create_default_context(cafile=env.get(ENV_CA_FILE) or None)
    return fsspec.filesystem("https", skip_instance_cache=True, ssl=context)


def _head(fs: Any, url: str, uri: str, attempts: int) -> dict[str, Any]:
    return storage.retrying("HEAD of", uri, lambda: fs.info(url), attempts=attempts)


def check_readable(uri: str, env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    url, _ = split(uri)
    try:
        _head(_filesystem(env), url, uri, storage.CHECK_ATTEMPTS)
    except StorageError as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from exc


def _version(info: Mapping[str, Any], pinned: str | None) -> dict[str, Any]:
    return {"etag": info.get("ETag"), "last_modified": info.get("Last-Modified"), "size": info.get("size"),
            "sha256": pinned}


def stage_input(uri: str, env: Mapping[str, str] | None = None, on_bytes: Any = None) -> Path:
    """The archive's contents in a local folder, downloaded and extracted at most once per node and
    version of the archive (storage.stage_cached); `on_bytes` hears the bytes as they arrive."""
    env = os.environ if env is None else env
    url, pinned = split(uri)
    fs = _filesystem(env)
    info = _head(fs, url, uri, storage.UPLOAD_ATTEMPTS)
    version = _version(info, pinned)
    if not (version["etag"] or version["last_modified"] or pinned):
        log.warning("%s: the server sends no ETag or Last-Modified; the cached copy is reused while the size "
                    "stays the same (pin the archive with #sha256=<hex> to be sure)", uri)
    key = storage.stage_key(uri, {"archive": version})
    total = int(info["size"]) if info.get("size") is not None else None

    def fill(folder: Path, progress: Any) -> None:
        log.info("staging %s: %s bytes", uri, info.get("size", "an unknown number of"))
        progress(0, total)
        with tempfile.TemporaryDirectory(prefix=".archive-download-", dir=folder.parent) as tmp:
            work = Path(tmp)
            archive = work / "archive"
            # Bytes as they arrive: the operator restarts a job whose staging reports stop
            # (spec.runPolicy.stagingProgressDeadlineSeconds), so a long download must show it moves.
            storage.retrying("download of", uri, lambda: fs.get_file(
                url, str(archive), callback=storage._byte_callback(lambda n: progress(n, total))))
            size = archive.stat().st_size
            if total is not None and size != total:
                raise StorageError(f"{uri}: got {size} bytes, the server announced {total}; not used")
            if pinned is not None:
                got = sha256_file(archive)
                if got != pinned:
                    raise StorageError(f"{uri}: the archive's sha256 is {got}, the URI pins {pinned}; not used")
            content = work / "content"
            content.mkdir()
            extract(archive, content, uri)
            top = _single_folder(content)
            storage.move_files(top, sorted(p.name for p in top.iterdir()), folder)
        progress(size, size)

    return storage.stage_cached(uri, env, key, total, fill, on_bytes=on_bytes, record={"archive": version})


def _single_folder(folder: Path) -> Path:
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder


def _unsafe_name(name: str) -> str | None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")):
        return "an absolute path"
    if ".." in path.parts:
        return "a .. segment that would write outside the folder"
    return None


def _link_escapes(member_name: str, target: str, hard: bool) -> bool:
    """Whether a link stored as `member_name` pointing at `target` leaves the extraction folder."""
    if target.startswith("/") or PurePosixPath(target).is_absolute():
        return True
    base = PurePosixPath() if hard else PurePosixPath(member_name).parent
    depth = 0
    for part in (base / target).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def extract(archive: Path, target: Path, uri: str) -> None:
    """Extract `archive` into `target` after checking every member; StorageError names the first
    member that would write outside `target` (nothing is extracted then)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                problem = _unsafe_name(member.filename)
                if problem is None and stat.S_ISLNK(member.external_attr >> 16):
                    problem = "a symbolic link (links are not accepted in zip archives)"
                if problem is not None:
                    raise StorageError(f"{uri}: archive member {member.filename!r} is {problem}; refused")
            zf.extractall(target)
        return
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.TarError as exc:
        raise StorageError(f"{uri} is neither a zip nor a tar archive ({exc})") from exc
    with tf:
        for member in tf.getmembers():
            problem = _unsafe_name(member.name)
            if problem is None and (member.issym() or member.islnk()) and \
                    _link_escapes(member.name, member.linkname, member.islnk()):
                problem = f"a link to {member.linkname!r}, outside the folder"
            if problem is None and not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                problem = "a device, fifo or other special file"
            if problem is not None:
                raise StorageError(f"{uri}: archive member {member.name!r} is {problem}; refused")
        # The "data" filter checks the same again inside tarfile (and drops setuid bits).
        tf.extractall(target, filter="data")

