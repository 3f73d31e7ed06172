"""Build the control-plane binaries from Go modules, cached by a key of everything that shapes them.

Layout: ``<cache>/bin/<key>/{etcd,kube-apiserver,...,.complete}``. The key hashes the pinned
versions, ldflags, the Go toolchain version and the tools modules' go.mod/go.sum, so a change to any
of them builds into a fresh directory and a stale binary is never picked up. ``.complete`` is written
last and the directory is renamed into place, so an interrupted build is never mistaken for a
finished one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from localcluster.versions import GoTarget, kueue_targets, targets, training_operator_targets

GO_DIR = Path(__file__).resolve().parent / "go"
COMPLETE_MARKER = ".complete"


class BuildError(RuntimeError):
    """A binary could not be built; the message says which and how to fix it."""


def cache_root() -> Path:
    return Path(os.environ.get("LORAKUBE_CACHE") or Path.home() / ".cache" / "lorakube")


@dataclass(frozen=True)
class Binaries:
    """Paths of one complete set of built binaries."""

    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def etcd(self) -> Path:
        return self.path("etcd")

    @property
    def kube_apiserver(self) -> Path:
        return self.path("kube-apiserver")

    @property
    def kube_controller_manager(self) -> Path:
        return self.path("kube-controller-manager")

    @property
    def kube_scheduler(self) -> Path:
        return self.path("kube-scheduler")

    @property
    def kubectl(self) -> Path:
        return self.path("kubectl")

    @property
    def helm(self) -> Path:
        return self.path("helm")

    @property
    def kueue(self) -> Path:
        return self.path("kueue")

    @property
    def training_operator(self) -> Path:
        return self.path("training-operator")


# Static, reproducible builds with the local toolchain only (no toolchain downloads). No VCS
# stamping: the tools modules sit inside this repository, and a checkout owned by another user
# would make `go build` fail on `git status`.
FIXED_GO_ENV = {"GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOFLAGS": "-trimpath -buildvcs=false"}


def go_env() -> dict[str, str]:
    return {**os.environ, **FIXED_GO_ENV}


def go_module_dir(tools: str, module: str, version: str, expected: str) -> Path:
    """`module`'s folder in the Go module cache at the version the tools module `go/<tools>` pins
    (the build downloaded it; otherwise only its zip is fetched through the module proxy and checked
    against go.sum). `expected` is a path inside it that must exist; RuntimeError says what failed."""
    result = subprocess.run(["go", "mod", "download", "-json", module], cwd=GO_DIR / tools, env=go_env(),
                            capture_output=True, text=True)
    try:
        directory = Path(json.loads(result.stdout)["Dir"])
    except (ValueError, KeyError):
        directory = None
    if result.returncode != 0 or directory is None or not (directory / expected).exists():
        raise RuntimeError(f"{module} {version} could not be fetched into the Go module cache "
                           f"({(result.stderr or result.stdout).strip()}); check that the Go module proxy is "
                           "reachable (GOPROXY)")
    return directory


def _go_binary() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError(
            "`go` is not on PATH: install Go 1.26 or newer (the tools modules in "
            "localcluster/go declare `go 1.26.0`) and retry `python -m localcluster build`."
        )
    return go


def go_version() -> str:
    result = subprocess.run(
        [_go_binary(), "env", "GOVERSION"], env=go_env(), capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def cache_key(go_version_text: str, build_targets: tuple[GoTarget, ...] = targets()) -> str:
    """Hash of everything that changes the produced binaries."""
    digest = hashlib.sha256()
    spec = [(t.name, t.package, t.module_dir, t.version, list(t.ldflags)) for t in build_targets]
    digest.update(json.dumps({"go": go_version_text, "env": FIXED_GO_ENV, "targets": spec},
                             sort_keys=True).encode())
    # Only the tools modules these targets build from: a new module for another set (kueue) must
    # not change this set's key.
    used = {t.module_dir for t in build_targets if t.module_dir is not None}
    module_files = [f for f in sorted(GO_DIR.glob("*/go.mod")) + sorted(GO_DIR.glob("*/go.sum"))
                    if f.parent.name in used]
    for module_file in module_files:
        digest.update(module_file.relative_to(GO_DIR).as_posix().encode())
        digest.update(module_file.read_bytes())
    return digest.hexdigest()[:16]


def binaries_dir(key: str) -> Path:
    return cache_root() / "bin" / key


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # Two test sessions starting at once must not both run a 5-minute build into the same place.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_command(target: GoTarget, out_dir: Path) -> tuple[list[str], Path, dict[str, str]]:
    """The go command for one target, the directory to run it in, and its environment."""
    go = _go_binary()
    ldflags = " ".join(target.ldflags)
    env = go_env()
    if target.module_dir is None:
        env["GOBIN"] = str(out_dir)
        # Outside any module, so `pkg@version` resolves against the target's own go.mod.
        return [go, "install", "-ldflags", ldflags, f"{target.package}@{target.version}"], out_dir, env
    command = [go, "build", "-ldflags", ldflags, "-o", str(out_dir / target.name), target.package]
    return command, GO_DIR / target.module_dir, env


def _build_one(target: GoTarget, out_dir: Path) -> float:
    command, cwd, env = _build_command(target, out_dir)
    started = time.monotonic()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(
            f"building {target.name} ({target.package}@{target.version}) failed with exit code "
            f"{result.returncode}:\n{result.stderr[-4000:]}\n"
            "If modules could not be fetched, check that the Go module proxy is reachable "
            "(GOPROXY) and that localcluster/go/*/go.sum are committed and complete."
        )
    return time.monotonic() - started


def _version_probe(name: str) -> list[str]:
    if name == "kubectl":
        return ["version", "--client"]
    if name == "helm":
        return ["version", "--short"]
    return ["--version"]


def check_version(binary: Path, expected: str) -> None:
    """Fail loudly if stamping did not take: a wrong version breaks clients that parse it."""
    if binary.name in ("kueue", "training-operator", "fake-gcs-server"):
        # None of these has a --version flag (Kueue logs its version once it runs against a
        # cluster); the module versions Go embeds in every binary name the release it was built from.
        command = [_go_binary(), "version", "-m", str(binary)]
    else:
        command = [str(binary), *_version_probe(binary.name)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    if expected.lstrip("v") not in output:
        raise BuildError(f"{binary.name} reports {output.strip()!r}, expected version {expected}")


def build(log: Callable[[str], None] = print,
          build_targets: tuple[GoTarget, ...] | None = None) -> Binaries:
    """Return the cached binaries of `build_targets` (default: the control plane's), building them
    first on a cache miss."""
    build_targets = targets() if build_targets is None else build_targets
    key = cache_key(go_version(), build_targets)
    final_dir = binaries_dir(key)
    with _exclusive(final_dir.with_name(f"{key}.lock")):
        if (final_dir / COMPLETE_MARKER).is_file():
            log(f"binaries up to date in {final_dir}")
            return Binaries(final_dir)
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.partial-", dir=final_dir.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the binaries from other local users
        try:
            total = 0.0
            for target in build_targets:
                log(f"building {target.name} {target.version} ...")
                seconds = _build_one(target, staging)
                check_version(staging / target.name, target.version)
                total += seconds
                log(f"  built {target.name} in {seconds:.1f} s")
            (staging / COMPLETE_MARKER).write_text(
                json.dumps({"key": key, "seconds": round(total, 1)}) + "\n"
            )
            if final_dir.exists():
                shutil.rmtree(final_dir)  # a leftover without .complete
            staging.rename(final_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        log(f"built {', '.join(t.name for t in build_targets)} in {total:.1f} s into {final_dir}")
        return Binaries(final_dir)


def build_kueue(log: Callable[[str], None] = print) -> Binaries:
    """Kueue's manager, cached under its own key (the control plane never needs it)."""
    return build(log, kueue_targets())


def build_training_operator(log: Callable[[str], None] = print) -> Binaries:
    """Kubeflow's training-operator, cached under its own key (only the benchmark's peer)."""
    return build(log, training_operator_targets())
