"""What the chart is generated from stays in step with it (no cluster, no helm): the values
reference in charts/lorakube/README.md and the values.schema.json it is made from."""

from __future__ import annotations

import json

import yaml

from lorakube_dev import chart_docs


def test_the_values_reference_in_the_chart_readme_is_up_to_date() -> None:
    readme = (chart_docs.CHART / "README.md").read_text()
    assert chart_docs.render(readme) == readme, "run python -m lorakube_dev.chart_docs"


def test_every_value_in_values_yaml_has_a_row_and_every_row_a_description() -> None:
    schema = json.loads((chart_docs.CHART / "values.schema.json").read_text())
    values = yaml.safe_load((chart_docs.CHART / "values.yaml").read_text())
    keys = {key for key, _, _, description in chart_docs.rows(schema, values) if description}

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value and f"{prefix}{key}" not in keys:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    undocumented = [key for key in leaves(values)
                    if key not in keys and not any(row.startswith(f"{key}.") for row in keys)]
    assert not undocumented, f"values without a described schema row: {undocumented}"


def test_every_object_in_the_schema_refuses_unknown_keys() -> None:
    schema = json.loads((chart_docs.CHART / "values.schema.json").read_text())
    loose = []

    def walk(node, path):
        if node.get("type") == "object" and path not in ("global",) and "additionalProperties" not in node:
            # Kubernetes objects passed through verbatim are the API server's to check.
            if not path.startswith("affinity.") and path != "tests.job.volumes[]":
                loose.append(path)
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema, "")
    assert not loose, f"objects that accept any key: {loose}"


def test_the_table_names_each_leaf_with_its_default() -> None:
    table = chart_docs.table()
    assert "| `replicaCount` | integer | `2` |" in table
    assert "| `watch.namespaces` | array of strings | `[]` |" in table
    assert "| `podAntiAffinityPreset` | `soft` \\| `hard` \\| `none` | `\"soft\"` |" in table
