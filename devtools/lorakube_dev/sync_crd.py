"""Copy the CRD from its single source (`crds/` in the repository) to where it is shipped.

    python -m lorakube_dev.sync_crd           # write the copies
    python -m lorakube_dev.sync_crd --check   # exit 1 and name the stale copies

The copies are package data of `lorakube_api` (so a wheel carries the CRD) and the Helm chart's
template `charts/lorakube/templates/crd.yaml`: the same text wrapped in `crds.install` and kept on
uninstall. The chart carries it in templates/, not crds/, because Helm never upgrades what is in
crds/. Run it after every edit of `crds/`; tests/unit/test_package_layering.py fails while a copy
differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lorakube_api

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE = REPO_ROOT / "crds" / lorakube_api.CRD_FILE_NAME
CHART_CRD = REPO_ROOT / "charts" / "lorakube" / "templates" / "crd.yaml"

CHART_HEADER = (
    "{{- /* Generated from crds/%s by python -m lorakube_dev.sync_crd: edit the source. */}}\n"
    "{{- if .Values.crds.install }}\n" % lorakube_api.CRD_FILE_NAME
)
CHART_FOOTER = "{{- end }}\n"
# Helm leaves a resource with this annotation in place on uninstall (users' jobs live in it).
KEEP_ANNOTATION = "  annotations:\n    helm.sh/resource-policy: keep\n"


def chart_template(source_text: str) -> str:
    """The CRD as a chart template: behind `crds.install`, annotated to survive `helm uninstall`.
    Nothing else differs, so stripping the added lines gives the source back (strip_chart_template)."""
    anchor = "\nmetadata:\n"
    if source_text.count(anchor) != 1 or "\n  annotations:" in source_text.split(anchor, 1)[1].split("\nspec:", 1)[0]:
        raise ValueError(f"{SOURCE.name}: expected one top-level `metadata:` without annotations")
    body = source_text.replace(anchor, anchor + KEEP_ANNOTATION, 1)
    if "{{" in body:
        raise ValueError(f"{SOURCE.name}: contains `{{{{`, which Helm would read as a template action")
    return CHART_HEADER + body + CHART_FOOTER


def strip_chart_template(template_text: str) -> str:
    """The inverse of chart_template: the source text the chart's copy was made from."""
    if not (template_text.startswith(CHART_HEADER) and template_text.endswith(CHART_FOOTER)):
        raise ValueError("the chart's CRD template lacks the generated header or footer")
    body = template_text[len(CHART_HEADER):-len(CHART_FOOTER)]
    return body.replace("\nmetadata:\n" + KEEP_ANNOTATION, "\nmetadata:\n", 1)


def copies(source_text: str) -> dict[Path, str]:
    """Every shipped copy of the CRD and the text it must hold."""
    return {lorakube_api.crd_path(): source_text, CHART_CRD: chart_template(source_text)}


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
