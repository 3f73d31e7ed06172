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

Archive bombs (a few kilobytes that extract to terabytes, or millions of empty members) are
refused with the member named: LORAKUBE_ARCHIVE_MAX_BYTES caps the extracted bytes (default
256Gi) and LORAKUBE_ARCHIVE_MAX_MEMBERS the number of members (default 1,000,000). The declared
sizes are summed before anything is written, and a zip's bytes are counted again as they are
written (its central directory may lie); a refusal leaves nothing behind (the extraction folder
is temporary and the cache entry's marker is never written).

Plain http:// is not accepted (nothing would tell a tampered archive from the real one). A private
CA is trusted through SSL_CERT_FILE, as for any OpenSSL client.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Mapping
from urllib.parse import urlsplit

from lorakube_api import contract

from . import input_cache, storage
from .files import sha256_file

log = logging.getLogger(__name__)

SCHEME = "https"
# Read size of the download loop, and so the step of its byte reports (fsspec's default is 5 MiB).
DOWNLOAD_CHUNK_BYTES = 1 << 20
ENV_CA_FILE = "SSL_CERT_FILE"
StorageError = storage.StorageError
# Limits on what an archive may extract to (an archive bomb fills the node's disk or inode table).
# Generous: a model archive of a large family is well under 256 GiB, a dataset well under a
# million files; the knobs raise them for a genuine archive beyond that.
ENV_MAX_BYTES = "LORAKUBE_ARCHIVE_MAX_BYTES"
ENV_MAX_MEMBERS = "LORAKUBE_ARCHIVE_MAX_MEMBERS"
DEFAULT_MAX_BYTES = 256 << 30
DEFAULT_MAX_MEMBERS = 1_000_000
# Write size of a zip member's copy, so the extracted bytes are counted at this step.
EXTRACT_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Limits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_members: int = DEFAULT_MAX_MEMBERS


def limits_from_env(env: Mapping[str, str]) -> Limits:
    """The extraction limits from LORAKUBE_ARCHIVE_MAX_BYTES (a size, `500Gi`) and
    LORAKUBE_ARCHIVE_MAX_MEMBERS (a count); unset: the defaults. A bad value is a StorageError."""
    try:
        max_bytes = input_cache.max_bytes_from_env(env, ENV_MAX_BYTES, unset="the default")
    except ValueError as exc:
        raise StorageError(str(exc)) from None
    raw = (env.get(ENV_MAX_MEMBERS) or "").strip()
    try:
        max_members = int(raw) if raw else DEFAULT_MAX_MEMBERS
    except ValueError:
        raise StorageError(f"{ENV_MAX_MEMBERS}={raw!r} is not a whole number of members") from None
    if max_members <= 0:
        raise StorageError(f"{ENV_MAX_MEMBERS}={raw!r} must be more than 0 (unset it for the default)")
    return Limits(DEFAULT_MAX_BYTES if max_bytes is None else max_bytes, max_members)


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
    limits = limits_from_env(env)
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
            # A retry starts the archive again, from 0 bytes, with a new callback.
            storage.retrying("download of", uri, lambda: fs.get_file(
                url, str(archive), chunk_size=DOWNLOAD_CHUNK_BYTES,
                callback=storage.byte_callback(lambda n: progress(n if total is None else min(n, total), total))))
            size = archive.stat().st_size
            if total is not None and size != total:
                raise StorageError(f"{uri}: got {size} bytes, the server announced {total}; not used")
            if pinned is not None:
                got = sha256_file(archive)
                if got != pinned:
                    raise StorageError(f"{uri}: the archive's sha256 is {got}, the URI pins {pinned}; not used")
            content = work / "content"
            content.mkdir()
            extract(archive, content, uri, limits)
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


def _too_big(uri: str, member: str, limits: Limits) -> StorageError:
    return StorageError(f"{uri}: archive member {member!r} takes the extracted size past {limits.max_bytes} bytes "
                        f"({ENV_MAX_BYTES}); refused as an archive bomb (raise {ENV_MAX_BYTES} in "
                        "spec.resources.env if the archive is genuine)")


def _too_many(uri: str, member: str, limits: Limits) -> StorageError:
    return StorageError(f"{uri}: archive member {member!r} is one more than {limits.max_members} members "
                        f"({ENV_MAX_MEMBERS}); refused as an archive bomb (raise {ENV_MAX_MEMBERS} in "
                        "spec.resources.env if the archive is genuine)")


def copy_capped(source: Any, destination: Any, written: int, cap: int, refuse: Any) -> int:
    """Copy the stream `source` into `destination`, counting the bytes actually read: `written`
    (the archive's bytes so far) plus these never exceeds `cap` on disk; past it `refuse()` is
    raised before the chunk is written. Returns the new count."""
    while chunk := source.read(EXTRACT_CHUNK_BYTES):
        written += len(chunk)
        if written > cap:
            raise refuse()
        destination.write(chunk)
    return written


def _member_path(target: Path, name: str) -> Path | None:
    """Where a (checked) zip member goes; None for a name that is only the folder itself."""
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", ".")]
    return target.joinpath(*parts) if parts else None


def _extract_zip(archive: Path, target: Path, uri: str, limits: Limits) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        declared = 0
        for index, member in enumerate(members, 1):
            problem = _unsafe_name(member.filename)
            if problem is None and stat.S_ISLNK(member.external_attr >> 16):
                problem = "a symbolic link (links are not accepted in zip archives)"
            if problem is not None:
                raise StorageError(f"{uri}: archive member {member.filename!r} is {problem}; refused")
            if index > limits.max_members:
                raise _too_many(uri, member.filename, limits)
            declared += member.file_size
            if declared > limits.max_bytes:
                raise _too_big(uri, member.filename, limits)
        # Each member copied by hand, counting what is written: the sizes summed above are the
        # central directory's word, which a crafted archive can make smaller than its data.
        written = 0
        for member in members:
            path = _member_path(target, member.filename)
            try:
                if path is None or member.is_dir():
                    if path is not None:
                        path.mkdir(parents=True, exist_ok=True)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as source, path.open("wb") as destination:
                    written = copy_capped(source, destination, written, limits.max_bytes,
                                          lambda: _too_big(uri, member.filename, limits))
            except StorageError:
                raise                       # the cap (a RuntimeError too, so before the line below)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
                # A CRC or size that does not match the data, an encrypted or unknown method, a
                # member that collides with another: the archive is not usable as it is.
                raise StorageError(f"{uri}: archive member {member.filename!r} cannot be extracted "
                                   f"({type(exc).__name__}: {exc}); refused") from exc


def extract(archive: Path, target: Path, uri: str, limits: Limits = Limits()) -> None:
    """Extract `archive` into `target` after checking every member; StorageError names the first
    member that would write outside `target`, or take the archive past `limits` (nothing is
    extracted then, except a zip whose declared sizes lied: its copy stops at the cap)."""
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, target, uri, limits)
        return
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.TarError as exc:
        raise StorageError(f"{uri} is neither a zip nor a tar archive ({exc})") from exc
    with tf:
        declared = 0
        # Iterated, not getmembers(): a tar of millions of members is refused at the first one
        # past the limit, without reading every header first.
        for index, member in enumerate(tf, 1):
            problem = _unsafe_name(member.name)
            if problem is None and (member.issym() or member.islnk()) and \
                    _link_escapes(member.name, member.linkname, member.islnk()):
                problem = f"a link to {member.linkname!r}, outside the folder"
            if problem is None and not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                problem = "a device, fifo or other special file"
            if problem is not None:
                raise StorageError(f"{uri}: archive member {member.name!r} is {problem}; refused")
            if index > limits.max_members:
                raise _too_many(uri, member.name, limits)
            # A tar member's data is exactly its header's size (tarfile copies that many bytes and
            # fails on fewer; a sparse member's size is its full extent): this sum is what
            # extracting writes. Hard links write nothing new.
            declared += member.size if member.isfile() else 0
            if declared > limits.max_bytes:
                raise _too_big(uri, member.name, limits)
        # The "data" filter checks the same again inside tarfile (and drops setuid bits).
        try:
            tf.extractall(target, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise StorageError(f"{uri}: the archive cannot be extracted ({type(exc).__name__}: {exc}); "
                               "refused") from exc
