"""Pure pieces of the storage emulators' setup (localcluster/gcsserver.py, localcluster/azurite.py):
their own build set and cache keys, the pinned npm tree, the request counting the tests rely on,
and a clear error without node. The servers themselves run in
tests/integration/trainer/test_cloud_storage_emulated.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localcluster import azurite, build, gcsserver, versions


def test_fake_gcs_server_is_a_set_of_its_own_that_leaves_the_other_keys_alone():
    (target,) = versions.gcs_targets()
    assert (target.name, target.package, target.module_dir, target.version) == \
        ("fake-gcs-server", "github.com/fsouza/fake-gcs-server", None, "v1.56.1")
    assert versions.TARGET_SETS["gcs"] is versions.gcs_targets
    keys = {build.cache_key("go1.26.8", targets()) for targets in (versions.targets, versions.s3_targets,
                                                                  versions.gcs_targets)}
    assert len(keys) == 3


def test_the_azurite_tree_is_pinned_by_a_lock_without_registry_addresses():
    package = json.loads((azurite.NPM_DIR / "package.json").read_text())
    assert package["dependencies"] == {"azurite": versions.AZURITE_VERSION}
    lock = json.loads((azurite.NPM_DIR / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/azurite"]["version"] == versions.AZURITE_VERSION
    # every package pinned by its hash; no host baked in (npm resolves against its configured registry)
    entries = {name: entry for name, entry in lock["packages"].items() if name}
    assert entries and all(entry.get("integrity", "").startswith("sha512-") for entry in entries.values())
    assert not [name for name, entry in entries.items() if "resolved" in entry]


def test_the_azurite_install_key_follows_the_lock_and_node(monkeypatch, tmp_path: Path):
    key = azurite.install_key("v20.20.2")
    assert azurite.install_key("v22.1.0") != key
    copy = tmp_path / "azurite"
    copy.mkdir()
    for name in ("package.json", "package-lock.json"):
        (copy / name).write_bytes((azurite.NPM_DIR / name).read_bytes())
    monkeypatch.setattr(azurite, "NPM_DIR", copy)
    assert azurite.install_key("v20.20.2") == key
    (copy / "package-lock.json").write_text("{}")
    assert azurite.install_key("v20.20.2") != key


def test_without_node_the_install_says_what_to_install(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(build.BuildError, match="install Node.js 20 or newer with npm"):
        azurite.install(log=lambda _: None)


def test_requests_are_read_from_each_emulators_log(tmp_path: Path):
    gcs = gcsserver.GcsServer(tmp_path, "127.0.0.1", 1)
    gcs.output.write_text(
        'time=T level=INFO msg="127.0.0.1 - - [02/Dec/2026:10:05:06 +0000] \\"GET /storage/v1/b/m/o?prefix=a/ '
        'HTTP/1.1\\" 200 49\\n"\n'
        'time=T level=INFO msg="127.0.0.1 - - [02/Dec/2026:10:05:07 +0000] \\"GET /download/storage/v1/b/m/o/a%2Fx'
        '?alt=media HTTP/1.1\\" 200 5\\n"\n')
    assert gcs.requests() == [("GET", "/storage/v1/b/m/o?prefix=a/"), ("GET", "/download/storage/v1/b/m/o/a%2Fx?alt=media")]
    assert gcs.count("GET", "alt=media") == 1 and gcs.count("GET", "alt=media", after=2) == 0
    blob = azurite.AzuriteServer(tmp_path, "127.0.0.1", 1, "key")
    blob.debug_log.write_text("2026-12-02T10:08:14.481Z a1 info: DispatchMiddleware: Operation=Blob_Download\n"
                              "2026-12-02T10:08:14.482Z a1 info: BlobHandler:downloadBlockBlobOrAppendBlob() x\n"
                              "2026-12-02T10:08:14.490Z b2 info: DispatchMiddleware: Operation=BlockBlob_Upload\n")
    assert blob.requests() == ["Blob_Download", "BlockBlob_Upload"]
    assert blob.count("Blob_Download") == 1 and blob.count("Blob_Download", after=1) == 0
