"""Helpers of the image tier, which runs the images `make images` built (buildah, vfs storage) as their own users.

Each test module gets one working container of its image (`buildah from`, removed afterwards);
commands run in it with `buildah run --isolation chroot --user <the image's USER>`, with the image's
environment and working directory, the way a container runtime would start them. Root is needed
(chroot isolation), as for the build; `make test-images` builds the images first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILDAH = ["buildah", "--storage-driver", "vfs"]


def project_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


def image_ref(name: str) -> str:
    # devtools/images.sh tags them so; the version is pyproject's.
    return f"localhost/{name}:{project_version()}"


@dataclass
class ImageContainer:
    """A working container of one image, and the image's OCI config it was made from."""

    image: str
    name: str
    config: dict

    @property
    def user(self) -> str:
        return self.config.get("User", "")

    @property
    def entrypoint(self) -> list[str]:
        return list(self.config.get("Entrypoint") or [])

    def run(self, argv: Sequence[str], *, volumes: Sequence[tuple[Path, str, str]] = (),
            env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run argv in the container as the image's USER; volumes are (host, container, "ro"|"rw")."""
        cmd = [*BUILDAH, "run", "--isolation", "chroot", "--user", self.user]
        for host, target, mode in volumes:
            cmd += ["-v", f"{host}:{target}:{mode}"]
        for key, value in (env or {}).items():
            cmd += ["-e", f"{key}={value}"]
        return subprocess.run([*cmd, self.name, "--", *argv], capture_output=True, text=True, timeout=timeout)


def _require_buildah() -> None:
    if os.geteuid() != 0:
        pytest.fail("the image tier runs buildah with chroot isolation, which needs root: sudo make test-images")
    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed: `make images` installs it (apt-get) and builds the images")


def image_container(name: str) -> Iterator[ImageContainer]:
    _require_buildah()
    ref = image_ref(name)
    inspected = subprocess.run([*BUILDAH, "inspect", "--type", "image", ref], capture_output=True, text=True)
    if inspected.returncode != 0:
        pytest.fail(f"image {ref} is not in buildah's vfs storage: run `make images` first "
                    f"({inspected.stderr.strip()})")
    config = json.loads(inspected.stdout)["OCIv1"]["config"]
    created = subprocess.run([*BUILDAH, "from", "--pull-never", ref], capture_output=True, text=True, check=True)
    container = ImageContainer(image=ref, name=created.stdout.strip().splitlines()[-1], config=config)
    try:
        yield container
    finally:
        # vfs keeps a full copy of the root file system per container: never leave one behind.
        subprocess.run([*BUILDAH, "rm", container.name], capture_output=True)


def assert_import_fails(container: ImageContainer, module: str) -> None:
    """`import module` must fail for the missing module itself, not for some other reason."""
    result = container.run(["python", "-c", f"import {module}"])
    assert result.returncode != 0, f"{module} is importable in {container.image}"
    assert f"No module named '{module}'" in result.stderr, result.stderr
