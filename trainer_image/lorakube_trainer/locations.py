"""Which scheme each location of a run may use, and the module that handles it.

    model, dataset   s3://, gs://, az:// (storage.py: object storage through fsspec), hf:// (hubs.py),
                     modelscope:// (modelscope_repos.py), https:// archives (archives.py)
    output           s3://, gs://, az:// (storage.py), hf:// (hubs.py: one commit, read back)
    checkpoints      s3://, gs://, az:// only: a checkpoint is rewritten every few steps and pruned,
                     which a Hub repo (one git commit per write, history kept forever) is not made for

Anything without `://` is a local (or volume) path. The operator's spec.py has the same table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

from . import archives, hubs, modelscope_repos, storage

INPUT_SCHEMES = (*storage.REMOTE_SCHEMES, hubs.SCHEME, modelscope_repos.SCHEME, archives.SCHEME)
OUTPUT_SCHEMES = (*storage.REMOTE_SCHEMES, hubs.SCHEME)


def is_remote_input(uri: str) -> bool:
    return storage.scheme(uri) in INPUT_SCHEMES


def is_remote_output(uri: str) -> bool:
    return storage.scheme(uri) in OUTPUT_SCHEMES


def is_hub(uri: str) -> bool:
    return storage.scheme(uri) == hubs.SCHEME


def stage_input(uri: str, env: Mapping[str, str] | None = None,
                on_bytes: Callable[[int, int | None], None] | None = None) -> Path:
    """A local folder holding the input, in the node's cache (storage.stage_cached); `on_bytes(done,
    total)` hears the download's progress (the job's Staging phase) as the bytes arrive, for every
    scheme."""
    kind = storage.scheme(uri)
    if kind == hubs.SCHEME:
        return hubs.stage_input(uri, env, on_bytes)
    if kind == modelscope_repos.SCHEME:
        return modelscope_repos.stage_input(uri, env, on_bytes)
    if kind == archives.SCHEME:
        return archives.stage_input(uri, env, on_bytes)
    return storage.stage_input(uri, env, on_bytes=on_bytes)


def check_readable(uri: str, env: Mapping[str, str] | None = None) -> None:
    kind = storage.scheme(uri)
    if kind == hubs.SCHEME:
        hubs.check_readable(uri, env)
    elif kind == modelscope_repos.SCHEME:
        modelscope_repos.check_readable(uri, env)
    elif kind == archives.SCHEME:
        archives.check_readable(uri, env)
    else:
        storage.check_readable(uri, env)


def check_writable(uri: str, env: Mapping[str, str] | None = None) -> None:
    if is_hub(uri):
        hubs.check_writable(uri, env)
    else:
        storage.check_writable(uri, env)
