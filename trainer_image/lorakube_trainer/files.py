"""How the trainer writes every file it leaves behind (artifacts, checkpoints, the latent cache).

One writer, so that every file gets the same three properties:
- atomic: the bytes go to a temporary file beside the target, are fsync'ed, then renamed over it,
  so a reader (or a resumed run) sees the old file or the whole new one, never a torn one;
- the umask's mode: created with open()'s default 0666 minus the process umask, like any other
  tool writing a shared volume (0644 under the usual 022). safetensors' own `save_file` goes
  through a private temporary file and leaves 0600, which a reader running as another user cannot
  open;
- bytes that depend only on the content: safetensors keeps `__metadata__` in a hash map whose
  order changes from process to process, so equal LoRAs hashed differently. Its header is
  rewritten here with the metadata keys sorted, which makes sha256 values comparable across runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:        # torch-free at import: the launcher of the local ranks writes through here too
    import torch

_HEADER_LENGTH = struct.Struct("<Q")     # safetensors: little-endian u64 header size, then JSON
_HEADER_ALIGNMENT = 8                    # the writer pads the JSON with spaces to this multiple


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    # The pid keeps ranks that write the same shared path (the latent cache) off each other's temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors serialisation of `tensors`, its JSON header (metadata included) in sorted key order."""
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    raw = save(cpu, metadata=dict(metadata) if metadata else None)
    (size,) = _HEADER_LENGTH.unpack_from(raw)
    header = json.loads(raw[_HEADER_LENGTH.size:_HEADER_LENGTH.size + size])
    # Tensor offsets are relative to the data section, so a re-encoded header leaves them valid.
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    text += b" " * (-len(text) % _HEADER_ALIGNMENT)
    return _HEADER_LENGTH.pack(len(text)) + text + raw[_HEADER_LENGTH.size + size:]


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata))


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 4 MiB pieces (torch-free: preflight and the hub stages use it)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
