"""Archive bombs (archives.py): the extracted bytes and the member count are capped, a zip's bytes
are counted as they are written (its declared sizes may lie), and the refusal names the archive,
the member, the limit and the knob. The archives are generated here, a few kilobytes each."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from lorakube_trainer import archives, input_cache
from lorakube_trainer.storage import StorageError

URI = "https://example.invalid/set.zip"
MIB = 1 << 20


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buf.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _lying_zip(real: bytes, declared: int) -> bytes:
    """A one-member zip whose local header and central directory both claim `declared` bytes for
    a member that inflates to `real` (the CRC is the real data's)."""
    body = bytearray(_zip({"big.bin": real}))
    local = body.index(b"PK\x03\x04")
    central = body.index(b"PK\x01\x02")
    struct.pack_into("<I", body, local + 22, declared)
    struct.pack_into("<I", body, central + 24, declared)
    return bytes(body)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _extracted_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("pack", [_zip, _tar_gz], ids=["zip", "tar.gz"])
def test_high_ratio_archive_is_refused_before_anything_is_written(tmp_path, pack):
    # 8 MiB of zeros pack into a few kilobytes: a ratio of about 1000.
    data = pack({"set/a.txt": b"caption", "set/zeros.bin": bytes(8 * MIB)})
    assert len(data) < 64 * 1024
    archive, target = _write(tmp_path, "bomb", data), tmp_path / "out"
    target.mkdir()
    with pytest.raises(StorageError) as refused:
        archives.extract(archive, target, URI, archives.Limits(max_bytes=MIB))
    message = str(refused.value)
    assert message.startswith(f"{URI}: archive member 'set/zeros.bin' takes the extracted size past 1048576 bytes "
                              f"({archives.ENV_MAX_BYTES})"), message
    assert f"raise {archives.ENV_MAX_BYTES} in spec.resources.env" in message
    assert list(target.iterdir()) == []            # the declared sizes refused it: nothing extracted


@pytest.mark.parametrize("pack", [_zip, _tar_gz], ids=["zip", "tar.gz"])
def test_many_member_archive_is_refused_naming_the_first_member_past_the_limit(tmp_path, pack):
    data = pack({f"set/{i:03d}.txt": b"" for i in range(40)})
    archive, target = _write(tmp_path, "many", data), tmp_path / "out"
    target.mkdir()
    with pytest.raises(StorageError, match=rf"archive member 'set/010\.txt' is one more than 10 members "
                                           rf"\({archives.ENV_MAX_MEMBERS}\); refused as an archive bomb"):
        archives.extract(archive, target, URI, archives.Limits(max_members=10))
    assert list(target.iterdir()) == []
    archives.extract(archive, target, URI, archives.Limits(max_members=40))     # at the limit: accepted
    assert len(list((target / "set").iterdir())) == 40


def test_zip_whose_declared_size_lies_is_refused_and_never_written_past_it(tmp_path):
    real = bytes(4 * MIB)
    archive, target = _write(tmp_path, "liar.zip", _lying_zip(real, declared=100)), tmp_path / "out"
    target.mkdir()
    # The declared sizes (100 bytes) pass a 1 MiB cap; the data is what the copy counts.
    with pytest.raises(StorageError, match=r"archive member 'big.bin' cannot be extracted \(BadZipFile: "):
        archives.extract(archive, target, URI, archives.Limits(max_bytes=MIB))
    assert _extracted_bytes(target) <= MIB


def test_the_copy_counts_bytes_read_not_declared_and_stops_at_the_cap():
    # The stream gives more than any header said: the count is of what arrives.
    source, destination = io.BytesIO(bytes(3 * MIB + 5)), io.BytesIO()
    with pytest.raises(StorageError, match="past the cap"):
        archives.copy_capped(source, destination, 0, 2 * MIB, lambda: StorageError("past the cap"))
    assert len(destination.getvalue()) <= 2 * MIB
    # The count runs across members: what earlier members wrote is passed in.
    destination = io.BytesIO()
    assert archives.copy_capped(io.BytesIO(b"x" * 10), destination, 90, 100, lambda: StorageError("no")) == 100
    with pytest.raises(StorageError):
        archives.copy_capped(io.BytesIO(b"x"), io.BytesIO(), 100, 100, lambda: StorageError("past"))


def test_genuine_archives_within_the_limits_extract_as_before(tmp_path):
    members = {"set/a.png": b"\x89PNG" + bytes(1000), "set/a.txt": b"a cat"}
    for name, pack in (("ok.zip", _zip), ("ok.tar.gz", _tar_gz)):
        target = tmp_path / name.replace(".", "-")
        target.mkdir()
        archives.extract(_write(tmp_path, name, pack(members)), target, URI,
                         archives.Limits(max_bytes=1009, max_members=2))
        assert (target / "set" / "a.png").read_bytes() == members["set/a.png"]
        assert (target / "set" / "a.txt").read_bytes() == b"a cat"


def test_limits_from_env():
    assert archives.limits_from_env({}) == archives.Limits(archives.DEFAULT_MAX_BYTES, archives.DEFAULT_MAX_MEMBERS)
    assert archives.limits_from_env({archives.ENV_MAX_BYTES: "500Gi", archives.ENV_MAX_MEMBERS: "2000000"}) == \
        archives.Limits(500 << 30, 2_000_000)
    with pytest.raises(StorageError, match=rf"{archives.ENV_MAX_BYTES}='lots' is not a size"):
        archives.limits_from_env({archives.ENV_MAX_BYTES: "lots"})
    with pytest.raises(StorageError, match=rf"{archives.ENV_MAX_BYTES}='0' must be more than 0 \(unset it for the "
                                           r"default\)"):
        archives.limits_from_env({archives.ENV_MAX_BYTES: "0"})
    with pytest.raises(StorageError, match=rf"{archives.ENV_MAX_MEMBERS}='1e6' is not a whole number"):
        archives.limits_from_env({archives.ENV_MAX_MEMBERS: "1e6"})
    with pytest.raises(StorageError, match=rf"{archives.ENV_MAX_MEMBERS}='-1' must be more than 0"):
        archives.limits_from_env({archives.ENV_MAX_MEMBERS: "-1"})
    # The cache's own cap reads as before.
    with pytest.raises(ValueError, match=r"LORAKUBE_CACHE_MAX_BYTES='0' must be more than 0 \(unset it for no cap\)"):
        input_cache.max_bytes_from_env({input_cache.ENV_CACHE_MAX_BYTES: "0"})
