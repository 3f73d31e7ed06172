"""Shared test data for the operator's pure parts: a job body as the API server stores it, and pod views."""

from __future__ import annotations

import datetime as dt
from typing import Any

from lorakube_api import contract
from lorakube.pods import PodView

NOW = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
UID = "0b6c1c3e-1111-4222-8333-944455556666"

JOB_SPEC: dict[str, Any] = {
    "model": {"family": "flux", "uri": "/data/models/tiny-flux"},
    "dataset": {"uri": "/data/datasets/cats"},
    "training": {
        "stepsPerEpoch": 8, "height": 64, "width": 64, "centerCrop": True, "randomFlip": False,
        "batchSize": 1, "dataloaderNumWorkers": 0, "precision": "32", "learningRate": 1e-4,
        "loraRank": 4, "gradientCheckpointing": True, "accumulateGradBatches": 1, "strategy": "ddp",
        "maxEpochs": 1, "seed": 7, "checkpointEverySteps": 4,
        "validationPrompts": ["a cat on a mat", "a dog in fog"], "validationEverySteps": 0,
    },
    "resources": {
        "numNodes": 3, "gpusPerNode": 0,
        "volumes": [{"name": "data", "hostPath": {"path": "/srv/lorakube", "type": "Directory"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
    },
    "output": {"uri": "/data/out/cats-lora"},
    "runPolicy": {"maxRestarts": 2, "backoffSeconds": 10},
}


def pod_view(rank: int, phase: str = "Running", attempt: int = 1, job: str = "cats", uid: str = UID,
             **fields: Any) -> PodView:
    fields.setdefault("created_at", NOW - dt.timedelta(seconds=30))
    return PodView(name=contract.pod_name(job, rank), rank=rank, attempt=attempt, owner_uid=uid,
                   phase=phase, **fields)
