"""Copy the CRD from its single source (`crds/` in the repository) to where it is shipped.

    python -m lorakube_dev.sync_crd           # write the copies
    python -m lorakube_dev.sync_crd --check   # exit 1 and name the stale copies

The copies are package data of `lorakube_api` (so a wheel carries the CRD) and, where the Helm chart
exists, its template. Run it after every
edit of `crds/`; tests/unit/test_package_layering.py fails while a copy differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lorakube_api

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE = REPO_ROOT / "crds" / lorakube_api.CRD_FILE_NAME


def copies(source_text: str) -> dict[Path, str]:
    """Every shipped copy of the CRD and the text it must hold."""
    return {lorakube_api.crd_path(): source_text}


def stale(source_text: str) -> list[Path]:
    return [path for path, text in copies(source_text).items()
            if not path.exists() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakube_dev.sync_crd", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report copies that differ from crds/")
    args = parser.parse_args(argv)
    source_text = SOURCE.read_text()
    if args.check:
        bad = stale(source_text)
        for path in bad:
            print(f"stale CRD copy: {path.relative_to(REPO_ROOT)} (run python -m lorakube_dev.sync_crd)")
        return 1 if bad else 0
    for path, text in copies(source_text).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
