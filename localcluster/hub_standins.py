"""Loopback STAND-INS for the Hugging Face Hub, ModelScope and a plain HTTPS file server, for tests only.

The real hubs cannot be reached here, so these small servers speak just the parts of the HTTP API
that huggingface_hub's client calls for what the trainer does (hubs.py, archives.py):

- `HfHubStandIn` (plain HTTP on 127.0.0.1; point the client at it with HF_ENDPOINT):
  revision resolve `GET /api/{models,datasets}/<org>/<name>/revision/<rev>`, the file listing
  `GET /api/.../tree/<rev>[/<path>]?recursive=`, file resolve `HEAD|GET [/datasets]/<org>/<name>/
  resolve/<rev>/<path>` (ETag, X-Repo-Commit, Content-Length), and upload: `POST /api/.../preupload/
  <rev>` (every file "regular"), `POST /api/validate-yaml` (a README.md's front matter) and
  `POST /api/.../commit/<rev>` (ndjson, base64 contents).
  Commits are content-addressed like git's: a file's oid is its git blob sha1, a commit's sha is
  derived from its parent and its tree.
- `ModelScopeStandIn` (plain HTTP; MODELSCOPE_ENDPOINT): the legacy `/api/v1` calls the
  `modelscope` client makes to list and download a model repo and to upload a folder to one (LFS
  batch, blob PUT, commit); see its docstring.
- `HttpsFileStandIn`: static files over TLS, with a CA of its own (SSL_CERT_FILE makes clients
  trust it), ETag and Last-Modified headers.

Both count the requests they answer (`requests`, `downloads()`), so a test can prove that a second
run downloaded nothing, and can serve a file tampered with or cut short.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import hashlib
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

KINDS = {"models": "model", "datasets": "dataset"}
# Files at least this large are listed as LFS files (sha256 + size), as the Hub lists weights.
LFS_THRESHOLD = 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class Repo:
    repo_id: str
    kind: str = "model"
    refs: dict[str, str] = dataclasses.field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = dataclasses.field(default_factory=dict)

    def commit(self, branch: str, files: dict[str, bytes], deleted: tuple[str, ...] = ()) -> str:
        parent = self.refs.get(branch, "")
        tree = dict(self.commits.get(parent, {}))
        tree.update(files)
        for path in deleted:
            tree.pop(path, None)
        digest = hashlib.sha1(parent.encode())
        for path in sorted(tree):
            digest.update(f"{path}\0{git_blob_sha1(tree[path])}\n".encode())
        sha = digest.hexdigest()
        self.commits[sha] = tree
        self.refs[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        matches = [sha for sha in self.commits if sha.startswith(revision)] if len(revision) >= 7 else []
        return matches[0] if len(matches) == 1 else None


def _entry(path: str, data: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
    if len(data) >= LFS_THRESHOLD:
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _StandIn(abc.ABC):
    """A ThreadingHTTPServer in a thread (on 127.0.0.1, or `host`: the node bridge's address for
    pods of the process node), recording (method, path) of each request."""

    scheme = "http"

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:   # noqa: A002 - the base class's name
                return                                                  # the test reads `requests` instead

            def _dispatch(self) -> None:
                with owner._lock:
                    owner.requests.append((self.command, self.path))
                try:
                    owner.handle(self)
                except BrokenPipeError:
                    return

            do_GET = do_HEAD = do_POST = do_PUT = _dispatch

        self._server = _Server((host, 0), Handler)
        self._wrap()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _wrap(self) -> None:
        return

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @abc.abstractmethod
    def handle(self, request: BaseHTTPRequestHandler) -> None:
        """Answer one request (each stand-in speaks its own API)."""

    @staticmethod
    def reply(request: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_length: int | None = None) -> None:
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)

    @classmethod
    def reply_json(cls, request: BaseHTTPRequestHandler, status: int, body: Any,
                   headers: dict[str, str] | None = None) -> None:
        cls.reply(request, status, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})


class HfHubStandIn(_StandIn):
    """The parts of the Hugging Face Hub API huggingface_hub calls to download and to commit files.

    `token`, when set, is required as `Authorization: Bearer <token>` on every request (as for a
    private repo); `corrupt` names repo paths served with one byte changed, `short` maps a repo path
    to how many of its next downloads end at half the file (the HEAD still tells the whole size)."""

    def __init__(self, token: str | None = None, host: str = "127.0.0.1") -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.token = token
        self.corrupt: set[str] = set()
        self.short: dict[str, int] = {}
        self.commit_payloads: list[list[dict[str, Any]]] = []
        super().__init__(host)

    # --- test helpers -------------------------------------------------------------------------

    def create_repo(self, repo_id: str, kind: str = "model") -> Repo:
        """A repo as the Hub creates one: main holds an initial commit with .gitattributes."""
        if (kind, repo_id) not in self.repos:
            self.repos[(kind, repo_id)] = Repo(repo_id, kind)
            self.repos[(kind, repo_id)].commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        return self.repos[(kind, repo_id)]

    def put_folder(self, repo_id: str, folder: Path, *, kind: str = "model", prefix: str = "",
                   branch: str = "main") -> str:
        files = {"/".join(filter(None, (prefix, p.relative_to(folder).as_posix()))): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.create_repo(repo_id, kind).commit(branch, files)

    def files(self, repo_id: str, revision: str = "main", kind: str = "model") -> dict[str, bytes]:
        repo = self.repos[(kind, repo_id)]
        return dict(repo.commits[repo.resolve(revision) or ""])

    def downloads(self, since: int = 0) -> list[str]:
        """Paths of the file downloads (GET .../resolve/...) answered since request number `since`."""
        return [path for method, path in self.requests[since:] if method == "GET" and "/resolve/" in path]

    def env(self) -> dict[str, str]:
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                **({"HF_TOKEN": self.token} if self.token else {})}

    # --- the API --------------------------------------------------------------------------------

    def _error(self, request: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        self.reply_json(request, status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            self._error(request, 401, "RepoNotFound", "Invalid credentials in Authorization header")
            return
        url = urlsplit(request.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = parse_qs(url.query)
        if parts == ["api", "validate-yaml"] and request.command == "POST":
            self._validate_yaml(request)
            return
        if parts[:1] == ["api"] and len(parts) >= 6 and parts[1] in KINDS:
            self._api(request, KINDS[parts[1]], f"{parts[2]}/{parts[3]}", parts[4], parts[5], parts[6:], query)
            return
        kind = "model"
        if parts[:1] == ["datasets"]:
            kind, parts = "dataset", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(request, kind, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            return
        self._error(request, 404, "EntryNotFound", f"the stand-in does not serve {url.path}")

    def _validate_yaml(self, request: BaseHTTPRequestHandler) -> None:
        """The model card's YAML front matter (huggingface_hub checks a README.md before committing)."""
        import yaml

        content = json.loads(request.rfile.read(int(request.headers.get("Content-Length") or 0)))["content"]
        head, sep, rest = content.partition("---\n")
        errors = []
        if sep and not head.strip():
            try:
                yaml.safe_load(rest.partition("\n---")[0])
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML front matter: {exc}"})
        self.reply_json(request, 400 if errors else 200, {"errors": errors, "warnings": []})

    def _repo(self, request: BaseHTTPRequestHandler, kind: str, repo_id: str) -> Repo | None:
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            self._error(request, 404, "RepoNotFound", f"Repository Not Found for url: {repo_id}")
        return repo

    def _api(self, request: BaseHTTPRequestHandler, kind: str, repo_id: str, action: str, revision: str,
             rest: list[str], query: dict[str, list[str]]) -> None:
        repo = self._repo(request, kind, repo_id)
        if repo is None:
            return
        if action == "commit" and request.command == "POST":
            self._commit(request, repo, revision)
            return
        if action == "preupload" and request.command == "POST":
            body = json.loads(request.rfile.read(int(request.headers.get("Content-Length") or 0)) or b"{}")
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in body.get("files", [])]
            self.reply_json(request, 200, {"files": files})
            return
        sha = repo.resolve(revision)
        if sha is None:
            self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        tree = repo.commits[sha]
        if action == "revision":
            self.reply_json(request, 200, {"id": repo_id, "sha": sha, "private": bool(self.token),
                                           "siblings": [{"rfilename": p} for p in sorted(tree)]})
        elif action == "tree":
            prefix = "/".join(rest).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
            entries, folders = [], set()
            for path in sorted(tree):
                if prefix and not path.startswith(prefix + "/"):
                    continue
                rel = path[len(prefix) + 1:] if prefix else path
                if "/" in rel and not recursive:
                    folders.add(rel.split("/", 1)[0])
                    continue
                entries.append(_entry(path, tree[path]))
            entries += [{"type": "directory", "oid": "0" * 40, "path": "/".join(filter(None, (prefix, f)))}
                        for f in sorted(folders)]
            if not entries and prefix:
                self._error(request, 404, "EntryNotFound", f"{prefix} does not exist at {revision}")
                return
            self.reply_json(request, 200, entries)
        else:
            self._error(request, 404, "EntryNotFound", f"the stand-in does not serve /api/.../{action}")

    def _commit(self, request: BaseHTTPRequestHandler, repo: Repo, revision: str) -> None:
        lines = request.rfile.read(int(request.headers.get("Content-Length") or 0)).decode().splitlines()
        items = [json.loads(line) for line in lines if line.strip()]
        self.commit_payloads.append(items)
        files, deleted = {}, []
        for item in items:
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                deleted.append(item["value"]["path"])
            elif item["key"] != "header":
                self._error(request, 400, "BadRequest", f"the stand-in does not accept {item['key']} operations")
                return
        sha = repo.commit(revision, files, tuple(deleted))
        kind_prefix = "" if repo.kind == "model" else f"{repo.kind}s/"
        self.reply_json(request, 200, {"commitUrl": f"{self.endpoint}/{kind_prefix}{repo.repo_id}/commit/{sha}",
                                       "commitOid": sha})

    def _resolve(self, request: BaseHTTPRequestHandler, kind: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(request, kind, repo_id)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            self._error(request, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        data = repo.commits[sha].get(path)
        if data is None:
            self._error(request, 404, "EntryNotFound", f"{path} does not exist at {revision}")
            return
        entry = _entry(path, data)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "none",
                   "Content-Type": "application/octet-stream"}
        body = data
        if path in self.corrupt:
            body = bytes([data[0] ^ 0xFF]) + data[1:]
        if self.short.get(path) and request.command == "GET":
            self.short[path] -= 1
            body = data[: len(data) // 2]
        self.reply(request, 200, body, headers)


class HttpsFileStandIn(_StandIn):
    """Static files over HTTPS on 127.0.0.1 (or `host`) with a CA of its own (`ca_file`: give it to clients as
    SSL_CERT_FILE), ETag (sha256 of the body) and Last-Modified headers, HEAD and GET."""

    scheme = "https"

    def __init__(self, folder: Path, host: str = "127.0.0.1") -> None:
        self.files: dict[str, bytes] = {}
        self.folder = folder
        self.ca_file = folder / "standin-ca.crt"
        self._make_certificates(host)
        self.on_get: Callable[[str, bytes], bytes] | None = None
        super().__init__(host)

    def _make_certificates(self, host: str) -> None:
        from localcluster.certs import KeyPair, _issue, _make_ca, _name

        ca = KeyPair(self.ca_file, self.folder / "standin-ca.key")
        ca_key, ca_cert = _make_ca(ca, "lorakube https stand-in CA")
        self._leaf = KeyPair(self.folder / "standin.crt", self.folder / "standin.key")
        _issue(self._leaf, ca_key, ca_cert, _name(host), server=True, dns_names=("localhost",),
               ips=tuple(dict.fromkeys(("127.0.0.1", host))))

    def _wrap(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self._leaf.cert), str(self._leaf.key))
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)

    def put(self, path: str, data: bytes) -> str:
        self.files[path.lstrip("/")] = data
        return f"{self.endpoint}/{path.lstrip('/')}"

    def downloads(self, since: int = 0) -> list[str]:
        return [path for method, path in self.requests[since:] if method == "GET"]

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(request.path).path).lstrip("/")
        data = self.files.get(path)
        if data is None:
            self.reply(request, 404, b"not found")
            return
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()[:32]}"', "Content-Type": "application/octet-stream",
                   "Last-Modified": "Tue, 01 Dec 2026 00:00:00 GMT"}
        body = self.on_get(path, data) if self.on_get is not None and request.command == "GET" else data
        self.reply(request, 200, body, headers)


class ModelScopeStandIn(_StandIn):
    """The parts of ModelScope's API (the legacy `/api/v1`) that the `modelscope` client calls to
    download a model repo and to upload a folder to one:

    repo info `GET /api/v1/models/<owner>/<name>`, the recursive listing `GET .../repo/files?
    Revision=&Recursive=` (Path, Size, Sha256 of every file), a file `GET .../repo?Revision=
    &FilePath=`, repo creation `POST /api/v1/models` (recorded in `created`; refused for a repo that
    exists), the LFS batch `POST /api/v1/repos/models/<id>/info/lfs/objects/batch` with an upload
    href on this server (`PUT /lfs-upload/<sha256>`, checked against the sha256), and the commit
    `POST /api/v1/repos/models/<id>/commit/<revision>` (normal files base64, LFS files by sha256).
    Point the client at it with MODELSCOPE_ENDPOINT. `token`, when set, is required as
    `Authorization: Bearer <token>`; `corrupt` names repo paths served with one byte changed."""

    def __init__(self, token: str | None = None, host: str = "127.0.0.1") -> None:
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.created: list[dict[str, Any]] = []
        self.token = token
        self.corrupt: set[str] = set()
        super().__init__(host)

    def create_repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            self.repos[repo_id] = Repo(repo_id)
            self.repos[repo_id].commit("master", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        return self.repos[repo_id]

    def put_folder(self, repo_id: str, folder: Path, branch: str = "master") -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.create_repo(repo_id).commit(branch, files)

    def files(self, repo_id: str, revision: str = "master") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision) or ""])

    def downloads(self, since: int = 0) -> list[str]:
        return [path for method, path in self.requests[since:]
                if method == "GET" and urlsplit(path).path.endswith("/repo")]

    def env(self) -> dict[str, str]:
        return {"MODELSCOPE_ENDPOINT": self.endpoint, **({"MODELSCOPE_API_TOKEN": self.token} if self.token else {})}

    def _fail(self, request: BaseHTTPRequestHandler, status: int, message: str) -> None:
        self.reply_json(request, status, {"Code": status, "Message": message, "Success": False})

    def _ok(self, request: BaseHTTPRequestHandler, data: Any) -> None:
        self.reply_json(request, 200, {"Code": 200, "Message": "success", "Success": True, "Data": data})

    def _body(self, request: BaseHTTPRequestHandler) -> bytes:
        return request.rfile.read(int(request.headers.get("Content-Length") or 0))

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        url = urlsplit(request.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            self._fail(request, 401, "authentication failed")
            return
        if parts[:1] == ["lfs-upload"] and request.command == "PUT":
            body = self._body(request)
            if hashlib.sha256(body).hexdigest() != parts[1]:
                self._fail(request, 400, "the blob does not match its sha256")
                return
            self.blobs[parts[1]] = body
            self._ok(request, {})
            return
        if parts[:3] == ["api", "v1", "models"] and len(parts) == 3 and request.command == "POST":
            spec = json.loads(self._body(request))
            repo_id = f"{spec['Path']}/{spec['Name']}"
            if repo_id in self.repos:
                self._fail(request, 400, f"repo {repo_id} already exists")
                return
            self.created.append(spec)
            self.create_repo(repo_id)
            self._ok(request, {"Name": spec["Name"]})
            return
        if parts[:4] == ["api", "v1", "repos", "models"] and len(parts) >= 7:
            repo = self.repos.get(f"{parts[4]}/{parts[5]}")
            if repo is None:
                self._fail(request, 404, "repo not found")
            elif parts[6:9] == ["info", "lfs", "objects"]:
                objects = json.loads(self._body(request))["objects"]
                self._ok(request, {"objects": [
                    {"oid": o["oid"], "size": o["size"],
                     **({} if o["oid"] in self.blobs else
                        {"actions": {"upload": {"href": f"{self.endpoint}/lfs-upload/{o['oid']}"}}})}
                    for o in objects]})
            elif parts[6] == "commit" and len(parts) == 8:
                self._commit(request, repo, parts[7])
            else:
                self._fail(request, 404, f"the stand-in does not serve {url.path}")
            return
        if parts[:3] == ["api", "v1", "models"] and len(parts) >= 5:
            repo = self.repos.get(f"{parts[3]}/{parts[4]}")
            if repo is None:
                self._fail(request, 404, "repo not found")
                return
            if len(parts) == 5:
                self._ok(request, {"Path": parts[3], "Name": parts[4]})
                return
            sha = repo.resolve(query.get("Revision", "master"))
            if sha is None:
                self._fail(request, 404, f"revision {query.get('Revision')} not found")
                return
            tree = repo.commits[sha]
            if parts[5:] == ["repo", "files"]:
                root = (query.get("Root") or "").strip("/")
                files = [{"Path": path, "Name": path.rsplit("/", 1)[-1], "Type": "blob", "Size": len(data),
                          "Sha256": hashlib.sha256(data).hexdigest(), "Revision": sha}
                         for path, data in sorted(tree.items()) if not root or path.startswith(root + "/")]
                self._ok(request, {"Files": files})
            elif parts[5:] == ["repo"]:
                data = tree.get(query.get("FilePath", ""))
                if data is None:
                    self._fail(request, 404, "file not found")
                    return
                body = bytes([data[0] ^ 0xFF]) + data[1:] if query["FilePath"] in self.corrupt else data
                self.reply(request, 200, body, {"Content-Type": "application/octet-stream",
                                                "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
            else:
                self._fail(request, 404, f"the stand-in does not serve {url.path}")
            return
        self._fail(request, 404, f"the stand-in does not serve {url.path}")

    def _commit(self, request: BaseHTTPRequestHandler, repo: Repo, revision: str) -> None:
        payload = json.loads(self._body(request))
        files, deleted = {}, []
        for action in payload["actions"]:
            if action["action"] == "delete":
                deleted.append(action["path"])
            elif action.get("type") == "lfs":
                blob = self.blobs.get(action["sha256"])
                if blob is None:
                    self._fail(request, 400, f"LFS object {action['sha256']} was never uploaded")
                    return
                files[action["path"]] = blob
            else:
                files[action["path"]] = base64.b64decode(action["content"])
        sha = repo.commit(revision, files, tuple(deleted))
        self._ok(request, {"CommitId": sha, "Revision": revision})
