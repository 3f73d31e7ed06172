"""An https:// archive reports its bytes as they arrive, not only at its start and end: the
operator restarts a job whose staging reports stop (spec.runPolicy.stagingProgressDeadlineSeconds),
so a long download must show that it moves. Against the https stand-in (localcluster/hub_standins.py)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from localcluster.hub_standins import HttpsFileStandIn
from lorakube_trainer import archives, storage


def test_https_standin_archive_reports_bytes_while_it_downloads(tmp_path: Path):
    folder = tmp_path / "https-standin"
    folder.mkdir()
    server = HttpsFileStandIn(folder)
    try:
        payload = os.urandom(12 << 20)        # incompressible: the archive is as large
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo("model/weights.bin")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        body = buf.getvalue()
        url = server.put("models/big.tar", body)
        seen: list[tuple[int, int | None]] = []
        env = {storage.ENV_CACHE_DIR: str(tmp_path / "cache"), archives.ENV_CA_FILE: str(server.ca_file)}
        staged = archives.stage_input(url, env, on_bytes=lambda done, total: seen.append((done, total)))
    finally:
        server.stop()
    assert (staged / "weights.bin").read_bytes() == payload
    assert seen[0] == (0, len(body)) and seen[-1] == (len(body), len(body))
    between = [done for done, _ in seen if 0 < done < len(body)]
    assert len(between) >= 2, seen               # 5 MiB reads: at least two reports on the way
    assert between == sorted(between)
