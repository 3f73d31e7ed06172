"""lorakube_api: what the operator, the trainer and the dev tools agree on.

Standard library only, so both images (the operator's without torch, the trainer's without kopf)
carry it: `contract` (env and flag names, exit codes, progress schema, checkpoint and artifact
layout) and the LoRATrainingJob CRD as package data. The CRD's single source is `crds/` in the
repository; `python -m lorakube_dev.sync_crd` copies it here and into the Helm chart, and
tests/unit/test_package_layering.py proves the copies identical.
"""

from __future__ import annotations

from pathlib import Path

CRD_FILE_NAME = "loratrainingjobs.lorakube.io.yaml"


def crd_path() -> Path:
    """The packaged CustomResourceDefinition manifest (YAML)."""
    return Path(__file__).resolve().parent / "crd" / CRD_FILE_NAME
