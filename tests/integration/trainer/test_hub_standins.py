"""The trainer against loopback STAND-INS of the Hugging Face Hub and of an HTTPS file server
(localcluster/hub_standins.py): the real huggingface_hub and fsspec clients, pointed at them with
HF_ENDPOINT and SSL_CERT_FILE, since the real hubs cannot be reached here. The stand-ins count the
requests they answer, serve tampered or cut-short files, and keep what a commit uploaded."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from test_multiprocess import EXAMPLE_DATASET, PROCESS_TIMEOUT, base_env, tiny_flux  # noqa: F401
from test_s3_staging import Recorder, api  # noqa: F401

from localcluster.hub_standins import LFS_THRESHOLD, HfHubStandIn, HttpsFileStandIn, ModelScopeStandIn
from lorakube_api import contract
from lorakube_trainer import archives, hubs, input_cache, locations, modelscope_repos, storage
from lorakube_trainer.staging import StagingReporter

TOKEN = "hf_standin_secret_token_5d1c"
MS_TOKEN = "ms-standin-secret-token-93af"


@pytest.fixture
def hub_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test session runs with HF_HUB_OFFLINE=1, which huggingface_hub read at import; the
    in-process tests here talk to the stand-in, so that switch is turned off for them."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub() -> HfHubStandIn:
    server = HfHubStandIn(token=TOKEN)
    yield server
    server.stop()


@pytest.fixture
def modelscope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelScopeStandIn:
    # The client keeps a cache and credentials under these; not the test machine's.
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope-cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "modelscope-home"))
    server = ModelScopeStandIn(token=MS_TOKEN)
    yield server
    server.stop()


@pytest.fixture
def https(tmp_path: Path) -> HttpsFileStandIn:
    folder = tmp_path / "https-standin"
    folder.mkdir()
    server = HttpsFileStandIn(folder)
    yield server
    server.stop()


def _env(tmp_path: Path, *servers: object, cache: str = "cache") -> dict[str, str]:
    env = {storage.ENV_CACHE_DIR: str(tmp_path / cache)}
    for server in servers:
        if isinstance(server, (HfHubStandIn, ModelScopeStandIn)):
            env.update(server.env())
        elif isinstance(server, HttpsFileStandIn):
            env[archives.ENV_CA_FILE] = str(server.ca_file)
    return env


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
    return root


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != storage.STAGED_MARKER}


FILES = {"model_index.json": b'{"_class_name": "FluxPipeline"}', "transformer/weights.bin": bytes(range(256)) * 20}


# --- hf:// inputs -------------------------------------------------------------------------------


def test_hf_standin_input_is_staged_once_per_commit_and_a_second_job_downloads_nothing(hub, hub_online, tmp_path):
    sha = hub.put_folder("org/tiny", _folder(tmp_path / "src", FILES))
    hub.put_folder("org/shapes", EXAMPLE_DATASET, kind="dataset")
    env = _env(tmp_path, hub)

    model = hubs.stage_input("hf://org/tiny", env)
    assert _tree(model) == {".gitattributes": hub.files("org/tiny")[".gitattributes"], **FILES}
    assert sorted(hub.downloads()) == sorted(f"/org/tiny/resolve/{sha}/{n}" for n in [".gitattributes", *FILES])
    dataset = hubs.stage_input("hf://datasets/org/shapes", env)
    assert _tree(dataset) == {**_tree(EXAMPLE_DATASET), ".gitattributes": hub.files("org/shapes", kind="dataset")[
        ".gitattributes"]}

    # The same URIs again (a second job on the node, a restarted rank): no file is downloaded.
    before = len(hub.requests)
    assert hubs.stage_input("hf://org/tiny", env) == model
    assert hubs.stage_input("hf://datasets/org/shapes", env) == dataset
    assert hub.downloads(before) == []

    # A revision pinned by sha and a path inside the repo: its own folder with only that path.
    sub = hubs.stage_input(f"hf://org/tiny@{sha[:12]}/transformer", env)
    assert _tree(sub) == {"weights.bin": FILES["transformer/weights.bin"]}

    # main moves on: the same URI now resolves to another commit, which is downloaded.
    hub.repos[("model", "org/tiny")].commit("main", {"model_index.json": b'{"_class_name": "FluxPipeline", "v": 2}'})
    before = len(hub.requests)
    moved = hubs.stage_input("hf://org/tiny", env)
    assert moved != model and (moved / "model_index.json").read_bytes().endswith(b'"v": 2}')
    assert hub.downloads(before)
    assert (model / "model_index.json").read_bytes() == FILES["model_index.json"]     # the old one untouched


def test_hf_standin_staging_of_an_lfs_file_loads_no_torch(hub, hub_online, tmp_path):
    """Staging runs in the pod's first process before torch loads: checking an LFS file's sha256
    against the Hub must not pull torch in (several seconds of CPU per pod)."""
    weights = os.urandom(LFS_THRESHOLD)            # the stand-in lists it with its LFS sha256, as the Hub does
    hub.put_folder("org/lfs", _folder(tmp_path / "src", {"model_index.json": b"{}", "transformer/w.safetensors": weights}))
    code = ("import sys; from lorakube_trainer import hubs; folder = hubs.stage_input('hf://org/lfs'); "
            "assert (folder / 'transformer/w.safetensors').is_file(); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **_env(tmp_path, hub), "HF_HUB_OFFLINE": "0"},
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_hf_standin_input_follows_the_node_caches_rules(hub, hub_online, tmp_path):
    """Hub inputs go through the cache s3:// inputs use (storage.stage_cached): the download is
    reported to the Staging phase (its start and end), and an entry in use is never evicted, even
    under a cap smaller than both entries."""
    hub.put_folder("org/tiny", _folder(tmp_path / "src", FILES))
    env = {**_env(tmp_path, hub), "LORAKUBE_CACHE_MAX_BYTES": "1"}
    seen: list[tuple[int, int | None]] = []
    first = hubs.stage_input("hf://org/tiny", env, lambda done, total: seen.append((done, total)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] == sum(p.stat().st_size for p in first.rglob("*")
                                                                  if p.is_file() and not p.name.startswith(".lorakube"))
    hub.repos[("model", "org/tiny")].commit("main", {"model_index.json": b'{"_class_name": "FluxPipeline", "v": 3}'})
    second = hubs.stage_input("hf://org/tiny", env)
    assert second != first
    assert (first / "model_index.json").read_bytes() == FILES["model_index.json"]   # in use here: kept


def test_hf_standin_tampered_or_short_download_is_never_used(hub, hub_online, tmp_path):
    hub.put_folder("org/tiny", _folder(tmp_path / "src", FILES))
    env = _env(tmp_path, hub)
    inputs = tmp_path / "cache" / "inputs"

    # One byte changed on the way: the sha256 the Hub lists does not match, nothing is staged.
    hub.corrupt.add("transformer/weights.bin")
    with pytest.raises(storage.StorageError, match=r"hf://org/tiny: transformer/weights.bin as downloaded does "
                                                   r"not match the Hub \(its sha256 differs"):
        hubs.stage_input("hf://org/tiny", env)
    assert not any(p.is_dir() for p in inputs.iterdir())

    # A download that ends at half the file is retried; what arrives in the end is whole.
    hub.corrupt.clear()
    hub.short["transformer/weights.bin"] = 1
    staged = hubs.stage_input("hf://org/tiny", env)
    assert (staged / "transformer/weights.bin").read_bytes() == FILES["transformer/weights.bin"]
    assert hub.short["transformer/weights.bin"] == 0


def test_hf_standin_leftover_of_a_crashed_download_is_replaced(hub, hub_online, tmp_path):
    sha = hub.put_folder("org/tiny", _folder(tmp_path / "src", FILES))
    env = _env(tmp_path, hub)
    leftover = tmp_path / "cache" / "inputs" / storage.stage_key("hf://org/tiny", {"commit": {"sha": sha}})
    _folder(leftover, {"model_index.json": b"torn"})            # no staged marker: cut short by a crash
    staged = hubs.stage_input("hf://org/tiny", env)
    assert staged == leftover and (staged / "model_index.json").read_bytes() == FILES["model_index.json"]


def test_hf_standin_refusals_name_the_uri_and_the_fix_never_the_token(hub, hub_online, tmp_path):
    hub.put_folder("org/tiny", _folder(tmp_path / "src", FILES))
    env = _env(tmp_path, hub)
    with pytest.raises(storage.StorageError) as caught:
        hubs.stage_input("hf://org/tiny", {**env, "HF_TOKEN": "hf_wrong_token"})
    assert "hf://org/tiny" in str(caught.value) and "HF_TOKEN" in str(caught.value)
    assert "hf_wrong_token" not in str(caught.value)
    with pytest.raises(storage.StorageError, match="revision lookup of hf://org/tiny@v9 failed.*revision not found"):
        hubs.stage_input("hf://org/tiny@v9", env)
    with pytest.raises(storage.StorageError, match="HF_HUB_OFFLINE=1 is set.*remove it"):
        hubs.stage_input("hf://org/tiny", {**env, "HF_HUB_OFFLINE": "1"})
    with pytest.raises(storage.StorageError, match="must look like hf://<org>/<name>"):
        hubs.parse("hf://just-a-name")
    with pytest.raises(storage.StorageError, match="cannot write to hf://org/tiny: HF_TOKEN is not set"):
        hubs.check_writable("hf://org/tiny", {k: v for k, v in env.items() if k != "HF_TOKEN"})
    assert TOKEN not in "".join(path for _, path in hub.requests)


def test_hf_uri_syntax_is_hffilesystems():
    assert hubs.parse("hf://org/name") == hubs.HfLocation("org/name")
    assert hubs.parse("hf://datasets/org/set@v1.0/train") == hubs.HfLocation("org/set", "dataset", "v1.0", "train", True)
    assert hubs.parse("hf://org/name@refs%2Fpr%2F3/a/b").revision == "refs/pr/3"
    with pytest.raises(storage.StorageError, match=r"\.\. segments"):
        hubs.parse("hf://org/name/../other")


# --- hf:// output -------------------------------------------------------------------------------


def _artifacts(folder: Path) -> dict[str, dict]:
    folder.mkdir()
    bodies = {contract.ARTIFACT_LORA_DIFFUSERS: bytes(range(256)) * 40, contract.ARTIFACT_MODEL_CARD: b"# card\n"}
    files = {}
    for name, body in bodies.items():
        (folder / name).write_bytes(body)
        files[name] = {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    (folder / contract.ARTIFACT_MANIFEST).write_text(json.dumps({"files": files}))
    return files


def test_hf_standin_upload_commits_every_file_and_reads_them_back(hub, hub_online, tmp_path):
    from lorakube_trainer import remote

    hub.create_repo("org/lora")
    files = _artifacts(tmp_path / "out")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in hub.env().items():
            mp.setenv(key, value)
        verified = remote.publish_artifacts(tmp_path / "out", "hf://org/lora@main/cats", {"files": files})
    assert set(verified) == {*files, contract.ARTIFACT_MANIFEST}
    in_repo = hub.files("org/lora")
    for name in verified:
        body = (tmp_path / "out" / name).read_bytes()
        assert in_repo[f"cats/{name}"] == body
        assert verified[name] == {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    assert json.loads(in_repo[f"cats/{contract.ARTIFACT_MANIFEST}"])["files"] == files
    assert len(hub.commit_payloads) == 1                       # one commit: all files or none
    assert TOKEN.encode() not in b"".join(in_repo.values())


def test_hf_standin_upload_that_reads_back_different_reports_nothing(hub, hub_online, tmp_path):
    hub.create_repo("org/lora")
    files = _artifacts(tmp_path / "out")
    original = hub.repos[("model", "org/lora")].commit

    def mangling(branch, new_files, deleted=()):
        changed = {k: (v[:-1] + b"!" if k.endswith(".safetensors") else v) for k, v in new_files.items()}
        return original(branch, changed, deleted)

    hub.repos[("model", "org/lora")].commit = mangling
    with pytest.raises(storage.StorageError, match=rf"hf://org/lora: {contract.ARTIFACT_LORA_DIFFUSERS} read back "
                                                   r"from commit \w+ does not match \(its sha256 differs"):
        hubs.publish_artifacts(tmp_path / "out", "hf://org/lora", [*files, contract.ARTIFACT_MANIFEST],
                               _env(tmp_path, hub))


# --- modelscope:// inputs and the ModelScope upload -------------------------------------------------


def test_modelscope_standin_input_is_staged_once_and_a_second_job_downloads_nothing(modelscope, tmp_path):
    modelscope.put_folder("org/tiny", _folder(tmp_path / "src", FILES))
    env = _env(tmp_path, modelscope)
    model = modelscope_repos.stage_input("modelscope://org/tiny", env)
    assert _tree(model) == {**FILES, ".gitattributes": modelscope.files("org/tiny")[".gitattributes"]}
    assert len(modelscope.downloads()) == len(FILES) + 1
    before = len(modelscope.requests)
    assert modelscope_repos.stage_input("modelscope://org/tiny", env) == model
    assert modelscope.downloads(before) == []                 # only the listing was asked for
    sub = modelscope_repos.stage_input("modelscope://org/tiny@master/transformer", env)
    assert _tree(sub) == {"weights.bin": FILES["transformer/weights.bin"]}

    # A changed file is a new version: downloaded again into its own folder.
    modelscope.repos["org/tiny"].commit("master", {"model_index.json": b'{"v": 2}'})
    assert (modelscope_repos.stage_input("modelscope://org/tiny", env) / "model_index.json").read_bytes() == b'{"v": 2}'


def test_modelscope_standin_tampered_download_is_never_used(modelscope, tmp_path):
    modelscope.put_folder("org/tiny", _folder(tmp_path / "src", FILES))
    modelscope.corrupt.add("transformer/weights.bin")
    with pytest.raises(storage.StorageError, match="download of modelscope://org/tiny failed"):
        modelscope_repos.stage_input("modelscope://org/tiny", _env(tmp_path, modelscope))
    assert not any(p.is_dir() for p in (tmp_path / "cache" / "inputs").iterdir())
    with pytest.raises(storage.StorageError) as caught:
        modelscope_repos.stage_input("modelscope://org/tiny", {**_env(tmp_path, modelscope),
                                                               "MODELSCOPE_API_TOKEN": "ms-wrong-token"})
    assert "modelscope://org/tiny" in str(caught.value) and "ms-wrong-token" not in str(caught.value)


def test_modelscope_standin_upload_needs_the_repo_and_reads_back_every_file(modelscope, tmp_path):
    files = _artifacts(tmp_path / "out")
    names = [*files, contract.ARTIFACT_MANIFEST]
    env = _env(tmp_path, modelscope)
    # A missing repo is not created (the client would create it public): refused, nothing uploaded.
    with pytest.raises(storage.StorageError, match="cannot publish to modelscope://org/lora: the model repo does "
                                                   "not exist; create it on ModelScope first"):
        modelscope_repos.publish_artifacts(tmp_path / "out", "org/lora", names, env=env)
    assert modelscope.created == [] and "org/lora" not in modelscope.repos
    with pytest.raises(storage.StorageError, match="MODELSCOPE_API_TOKEN is not set"):
        modelscope_repos.check_publishable("org/lora", None, {})

    modelscope.create_repo("org/lora")
    verified = modelscope_repos.publish_artifacts(tmp_path / "out", "org/lora", names, env=env)
    assert set(verified) == set(names) and modelscope.created == []
    in_repo = modelscope.files("org/lora")
    for name in names:
        body = (tmp_path / "out" / name).read_bytes()
        assert in_repo[name] == body
        assert verified[name] == {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    assert any(method == "PUT" for method, _ in modelscope.requests)          # the LoRA went up as an LFS blob
    assert all(MS_TOKEN.encode() not in body for body in in_repo.values())


# --- staging progress: the bytes as they arrive, for every hub -------------------------------------

# huggingface_hub reads 10 MiB at a time, the modelscope client 1 MiB, archives.py 1 MiB: a 32 MiB
# file shows at least three counts of its own between its start and its end with each of them.
BIG_FILE = 32 << 20


def _big_input(scheme: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str], int]:
    """A model with one multi-MB file behind `scheme`'s stand-in: (URI, env, bytes before the big file)."""
    files = {"model_index.json": b'{"_class_name": "FluxPipeline"}', "weights.bin": os.urandom(BIG_FILE)}
    if scheme == "https":
        server = request.getfixturevalue("https")
        # An uncompressed tar: the big file's bytes arrive as they are; the header comes first.
        return server.put("big/model.tar", _tar({f"model/{k}": v for k, v in files.items()}, mode="w")), \
            _env(tmp_path, server), 0
    if scheme == "hf":
        request.getfixturevalue("hub_online")
        server = request.getfixturevalue("hub")
        server.put_folder("org/big", _folder(tmp_path / "src", files))
        uri = "hf://org/big"
    else:
        server = request.getfixturevalue("modelscope")
        server.put_folder("org/big", _folder(tmp_path / "src", files))
        uri = "modelscope://org/big"
    # Files arrive in name order (.gitattributes, model_index.json, weights.bin).
    before = sum(len(body) for name, body in server.files("org/big").items() if name != "weights.bin")
    return uri, _env(tmp_path, server), before


@pytest.mark.parametrize("scheme", ["hf", "modelscope", "https"])
def test_standin_staging_reports_the_bytes_as_they_arrive(scheme, request, api, tmp_path):
    """Like s3:// (test_s3_staging.py), hf://, modelscope:// and https:// inputs report their bytes
    into status.progress.staging while they download, not only the start and the end."""
    uri, env, before = _big_input(scheme, request, tmp_path)
    reporter = StagingReporter(1, patcher=api, interval_s=0.0)         # every callback is a report
    reporter.begin("model", uri)
    folder = locations.stage_input(uri, env, on_bytes=reporter.on_bytes)
    reporter.end(input_cache.entry_bytes(folder), complete=True)

    reports = [body["status"]["progress"]["staging"] for body in Recorder.bodies]
    done = [r["bytesDone"] for r in reports]
    total = reports[-1]["bytesTotal"]
    assert done == sorted(done), f"bytes never go back: {done}"
    inside_big = {d for d in done if before < d < before + BIG_FILE}
    assert len(inside_big) >= 3, done                                  # the big file seen growing
    assert all(r["bytesTotal"] == total for r in reports[1:-1] if r["bytesDone"]), reports
    assert done[-1] == total and reports[-1]["complete"] is True and reports[-1]["cached"] is False
    assert total >= BIG_FILE and (scheme == "https" or total == input_cache.entry_bytes(folder))
    assert (folder / "weights.bin").stat().st_size == BIG_FILE


# --- https:// archives --------------------------------------------------------------------------


def _tar(members: dict[str, bytes], links: dict[str, str] | None = None, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


def test_https_standin_archive_is_staged_once_and_extracted(https, tmp_path):
    url = https.put("models/tiny-flux.tar.gz", _tar({f"tiny-flux/{k}": v for k, v in FILES.items()}))
    env = _env(tmp_path, https)
    staged = archives.stage_input(url, env)
    assert _tree(staged) == FILES                     # the one top-level folder stands for the model
    assert https.downloads() == ["/models/tiny-flux.tar.gz"]
    before = len(https.requests)
    assert archives.stage_input(url, env) == staged
    assert https.downloads(before) == []              # a second job on the node: only a HEAD

    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        for name, body in FILES.items():
            zf.writestr(name, body)
    body = zipped.getvalue()
    url = https.put("sets/flat.zip", body)
    staged = archives.stage_input(f"{url}#sha256={hashlib.sha256(body).hexdigest()}", env)
    assert _tree(staged) == FILES


@pytest.mark.parametrize("members,links,refused", [
    ({"model/../../escape.txt": b"x"}, None, "archive member 'model/../../escape.txt' is a .. segment"),
    ({"/etc/owned": b"x"}, None, "archive member '/etc/owned' is an absolute path"),
    ({"model/a.txt": b"x"}, {"model/link": "../../outside"}, "archive member 'model/link' is a link to '../../outside'"),
])
def test_https_standin_archive_with_a_member_escaping_the_folder_is_refused(https, tmp_path, members, links, refused):
    url = https.put("evil.tar.gz", _tar(members, links))
    with pytest.raises(storage.StorageError, match=f"{url}: {refused}"):
        archives.stage_input(url, _env(tmp_path, https))
    assert not (tmp_path / "escape.txt").exists() and not any(
        p.is_dir() for p in (tmp_path / "cache" / "inputs").iterdir())


def test_https_standin_zip_with_dotdot_member_is_refused(https, tmp_path):
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("../escape.txt", b"x")
    url = https.put("evil.zip", zipped.getvalue())
    with pytest.raises(storage.StorageError, match=r"archive member '\.\./escape.txt' is a \.\. segment"):
        archives.stage_input(url, _env(tmp_path, https))


def test_https_standin_archive_bomb_is_refused_and_nothing_is_kept(https, tmp_path):
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("set/a.txt", b"a cat")
        zf.writestr("set/zeros.bin", bytes(4 << 20))       # 4 MiB in a few kilobytes
    url = https.put("bomb.zip", zipped.getvalue())
    env = {**_env(tmp_path, https), archives.ENV_MAX_BYTES: "1Mi"}
    with pytest.raises(storage.StorageError, match=rf"{url}: archive member 'set/zeros.bin' takes the extracted size "
                                                   rf"past 1048576 bytes \({archives.ENV_MAX_BYTES}\)"):
        archives.stage_input(url, env)
    inputs = tmp_path / "cache" / "inputs"
    assert not any(p.is_dir() for p in inputs.iterdir()), sorted(p.name for p in inputs.iterdir())
    # Raised for this archive, it is staged (and taken from the cache afterwards).
    staged = archives.stage_input(url, {**env, archives.ENV_MAX_BYTES: "5Mi"})
    assert (staged / "zeros.bin").stat().st_size == 4 << 20
    assert (staged / input_cache.STAGED_MARKER).is_file()


def test_https_standin_tampered_or_short_archive_is_not_used(https, tmp_path):
    body = _tar({"a.txt": b"hello"})
    url = https.put("set.tar.gz", body)
    env = _env(tmp_path, https)
    wrong = "0" * 64
    with pytest.raises(storage.StorageError, match=f"the archive's sha256 is {hashlib.sha256(body).hexdigest()}, "
                                                   f"the URI pins {wrong}; not used"):
        archives.stage_input(f"{url}#sha256={wrong}", env)
    https.on_get = lambda path, data: data[: len(data) // 2]
    with pytest.raises(storage.StorageError, match=f"{url}: got {len(body) // 2} bytes, the server announced "
                                                   f"{len(body)}; not used"):
        archives.stage_input(url, env)
    assert not any(p.is_dir() for p in (tmp_path / "cache" / "inputs").iterdir())
    with pytest.raises(storage.StorageError, match="only https:// archives"):
        archives.split("http://example.invalid/set.tar.gz")
    with pytest.raises(storage.StorageError, match="must name an archive ending in"):
        archives.split("https://example.invalid/set.rar")


# --- the trainer, end to end --------------------------------------------------------------------


def _cli(args: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "lorakube_trainer", *args], env={**base_env(), **env},
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    log.write_text(done.stdout + done.stderr)
    return done.returncode, done.stdout + done.stderr


def _flags(model: str, dataset: str, output: str, checkpoints: Path | None, *extra: str) -> list[str]:
    return ["--model_family", "flux", "--model_path", model, "--dataset_path", dataset, "--output_path", output,
            *(["--checkpoint_dir", str(checkpoints)] if checkpoints else []), "--height", "32", "--width", "32", "--precision", "32",
            "--steps_per_epoch", "2", "--max_epochs", "1", "--batch_size", "1", "--checkpoint_every_n_steps", "2",
            "--validation_inference_steps", "2", "--accelerator", "cpu", "--seed", "3", *extra]


def test_hf_standin_output_without_a_token_fails_before_training(hub, tmp_path):
    hub.create_repo("org/lora")
    env = {k: v for k, v in _env(tmp_path, hub).items() if k != "HF_TOKEN"}
    code, log = _cli(_flags(str(tmp_path / "model"), str(EXAMPLE_DATASET), "hf://org/lora", tmp_path / "ckpt"),
                     env, tmp_path / "no-token.log")
    last = log.strip().splitlines()[-1]
    assert code == contract.EXIT_PREFLIGHT_OUTPUT, log[-3000:]
    assert "output not writable: hf://org/lora" in last and "HF_TOKEN is not set" in last, last
    code, log = _cli(_flags(str(tmp_path / "model"), str(EXAMPLE_DATASET), "hf://org/lora", None),
                     env, tmp_path / "no-ckpt.log")
    assert code != 0 and "--checkpoint_dir: is required when --output_path is an hf:// repo" in log, log[-3000:]


# Two tiny trainings (about 2 minutes each on 2 busy cores), so in the slow tier; the tests above
# cover staging, verification and upload without training.
@pytest.mark.slow
def test_hub_standins_model_and_dataset_in_lora_out_through_the_trainer(hub, modelscope, https, tiny_flux, tmp_path):
    hub.put_folder("org/tiny-flux", tiny_flux)
    hub.create_repo("org/cats-lora")
    modelscope.put_folder("org/shapes", EXAMPLE_DATASET)
    modelscope.create_repo("org/cats-lora")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(EXAMPLE_DATASET, arcname="shapes")
    dataset_url = https.put("datasets/shapes.tar.gz", buf.getvalue())
    env = _env(tmp_path, hub, modelscope, https)
    env.update(MODELSCOPE_CACHE=str(tmp_path / "modelscope-cache"), MODELSCOPE_HOME=str(tmp_path / "modelscope-home"))

    # The model from the Hub, the dataset from an https archive, the LoRA to a Hub repo and to
    # ModelScope (the original flag).
    code, log = _cli(_flags("hf://org/tiny-flux", dataset_url, "hf://org/cats-lora/run1",
                            tmp_path / "ckpt1", "--modelscope_model_id", "org/cats-lora"), env, tmp_path / "run1.log")
    assert code == 0, log[-4000:]
    # The staged dataset's images were read once, by the first process (dataset_checked.py); the
    # training process only listed the records.
    assert log.count("the other processes using cache entry") == 1, log[-4000:]
    assert "images (headers checked by preflight)" in log and "images checked in" in log, log[-4000:]
    repo = hub.files("org/cats-lora")
    manifest = json.loads(repo[f"run1/{contract.ARTIFACT_MANIFEST}"])
    assert contract.ARTIFACT_LORA_DIFFUSERS in manifest["files"]
    for name, entry in manifest["files"].items():
        body = repo[f"run1/{name}"]
        assert (hashlib.sha256(body).hexdigest(), len(body)) == (entry["sha256"], entry["bytes"]), name
    config = json.loads(repo[f"run1/{contract.ARTIFACT_TRAINING_CONFIG}"])
    assert config["model_path"] == "hf://org/tiny-flux" and config["output_path"] == "hf://org/cats-lora/run1"
    assert "`tiny-flux`" in repo[f"run1/{contract.ARTIFACT_MODEL_CARD}"].decode()
    on_modelscope = modelscope.files("org/cats-lora")
    for name in [*manifest["files"], contract.ARTIFACT_MANIFEST]:
        assert on_modelscope[name] == repo[f"run1/{name}"], name

    # A second job on the node: the model from the Hub again (nothing downloaded), the dataset from
    # ModelScope; the same data gives the same LoRA.
    before = len(hub.requests)
    code, log2 = _cli(_flags("hf://org/tiny-flux", "modelscope://org/shapes", "hf://org/cats-lora/run2",
                             tmp_path / "ckpt2"), env, tmp_path / "run2.log")
    assert code == 0, log2[-4000:]
    assert hub.downloads(before) == [], "the second run on the same node downloaded the model again"
    assert https.downloads() == ["/datasets/shapes.tar.gz"] and modelscope.downloads()
    repo = hub.files("org/cats-lora")
    lora = contract.ARTIFACT_LORA_DIFFUSERS
    assert repo[f"run1/{lora}"] == repo[f"run2/{lora}"]

    # No token in the repos' files (training_config.json and the model card among them) or the logs.
    for body in [*repo.values(), *modelscope.files("org/cats-lora").values()]:
        assert TOKEN.encode() not in body and MS_TOKEN.encode() not in body
    for text in (log, log2):
        assert TOKEN not in text and MS_TOKEN not in text
