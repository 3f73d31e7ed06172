"""The LoRATrainingJob CRD is structurally sound and agrees with the operator–trainer contract.

The CRD (crds/) and contract.py are written by hand in two places; these checks make a drift between
them (a new flag, family, precision, size multiple, env name) fail here instead of in a cluster.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from lorakube_api import contract

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "loratrainingjobs.lorakube.io.yaml"
README_PATH = ROOT / "crds" / "README.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    return only


@pytest.fixture(scope="module")
def root(version: dict[str, Any]) -> dict[str, Any]:
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def spec(root: dict[str, Any]) -> dict[str, Any]:
    return root["properties"]["spec"]


def walk(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its dotted path ([] for list items, {} for map values)."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def rules(schema: dict[str, Any]) -> list[str]:
    return [v["rule"] for v in schema.get("x-kubernetes-validations", [])]


def all_rules(root: dict[str, Any]) -> list[str]:
    return [r for _, node in walk(root, "") for r in rules(node)]


# --- names -----------------------------------------------------------------------------------

def test_names_group_and_version_match_the_contract(crd, version):
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == f"{contract.PLURAL}.{contract.API_GROUP}"
    assert crd["spec"]["group"] == contract.API_GROUP
    assert names["kind"] == contract.KIND
    assert names["plural"] == contract.PLURAL
    assert names["shortNames"] == [contract.SHORT_NAME]
    assert crd["spec"]["scope"] == "Namespaced"
    assert version["name"] == contract.API_VERSION
    assert version["served"] and version["storage"]


def test_category_is_lorakube_and_not_all(crd):
    # `all` would put every job into `kubectl get all`.
    assert crd["spec"]["names"]["categories"] == ["lorakube"]


def test_status_subresource_is_on(version):
    assert version["subresources"] == {"status": {}}


# --- contract agreement ------------------------------------------------------------------------

def test_enums_match_the_contract(spec):
    props = spec["properties"]
    assert tuple(props["model"]["properties"]["family"]["enum"]) == contract.FAMILIES
    training = props["training"]["properties"]
    assert tuple(training["precision"]["enum"]) == contract.PRECISIONS
    assert tuple(training["strategy"]["enum"]) == contract.STRATEGIES
    dataset = props["dataset"]["properties"]
    assert tuple(dataset["format"]["enum"]) == contract.DATASET_FORMATS
    assert dataset["maxImagePixels"]["default"] == contract.DEFAULT_MAX_IMAGE_PIXELS
    formats = props["output"]["properties"]["formats"]
    assert tuple(formats["items"]["enum"]) == contract.OUTPUT_FORMATS
    assert tuple(formats["default"]) == contract.OUTPUT_FORMATS


def test_training_fields_are_exactly_the_trainer_flags(spec):
    # A CRD field without a flag would be accepted and silently ignored; a flag without a field
    # could never be set from a job.
    assert set(spec["properties"]["training"]["properties"]) == set(contract.TRAINING_FLAGS)


def test_training_descriptions_name_the_trainer_flag(spec):
    # `kubectl explain` then tells a researcher which original flag a field is.
    training = spec["properties"]["training"]["properties"]
    for key, flag in contract.TRAINING_FLAGS.items():
        assert flag in training[key]["description"], key


def test_guidance_scale_rule_names_the_contracts_families(root, spec):
    """The API server refuses guidanceScale for exactly the families the trainer refuses it for."""
    field = spec["properties"]["training"]["properties"]["guidanceScale"]
    assert (field["minimum"], field["exclusiveMinimum"], "default" in field) == (0, True, False)
    (rule,) = [r for r in all_rules(root) if "guidanceScale" in r]
    listed = re.search(r"self\.model\.family in \[([^\]]*)\]", rule).group(1)
    assert tuple(re.findall(r"'([^']+)'", listed)) == contract.GUIDANCE_EMBEDDING_FAMILIES


def test_boolean_flags_are_boolean_fields(spec):
    training = spec["properties"]["training"]["properties"]
    booleans = {name for name, s in training.items() if s["type"] == "boolean"}
    assert booleans == set(contract.BOOLEAN_TRAINING_FLAGS)


SIZE_RULE = re.compile(
    r"!\(self\.model\.family in \[([^\]]*)\]\) \|\| self\.training\.(width|height) % (\d+) == 0"
)


def test_size_multiple_rules_use_the_contract_multiples(spec):
    # Rebuild {dimension: {family: multiple}} from the CEL rules and compare with the contract.
    found: dict[str, dict[str, int]] = {"width": {}, "height": {}}
    for rule in rules(spec):
        m = SIZE_RULE.fullmatch(rule.strip())
        if m:
            for family in re.findall(r"'([a-z0-9-]+)'", m.group(1)):
                assert family not in found[m.group(2)], f"{family} has two {m.group(2)} rules"
                found[m.group(2)][family] = int(m.group(3))
    assert found == {"width": contract.SIZE_MULTIPLE, "height": contract.SIZE_MULTIPLE}


def test_size_bounds_are_multiples_of_every_family(spec):
    # The fix a rejection suggests (round down or up) must itself be inside the bounds.
    training = spec["properties"]["training"]["properties"]
    for field in ("width", "height"):
        for bound in (training[field]["minimum"], training[field]["maximum"], training[field]["default"]):
            assert all(bound % m == 0 for m in contract.SIZE_MULTIPLE.values()), (field, bound)


def test_name_length_rule_uses_the_contract_limit(root):
    name = root["properties"]["metadata"]["properties"]["name"]
    (length_rule,) = [r for r in rules(name) if r.startswith("size(self)")]
    assert length_rule == f"size(self) <= {contract.MAX_JOB_NAME_LENGTH}"
    assert len(contract.pod_name("a" * contract.MAX_JOB_NAME_LENGTH, 999)) <= 63


def test_reserved_env_names_are_the_contracts(spec):
    # contract.py is the one list: the API server (this rule) and the operator (lorakube.spec,
    # through contract.is_reserved_env) refuse the same names.
    env_item = spec["properties"]["resources"]["properties"]["env"]["items"]
    (reserved_rule,) = [r for r in rules(env_item) if "self.name in" in r]
    names = re.search(r"self\.name in \[([^\]]*)\]", reserved_rule).group(1)
    assert set(re.findall(r"'([A-Z_]+)'", names)) == set(contract.RESERVED_ENV_NAMES)
    prefixes = re.findall(r"self\.name\.startsWith\('([A-Z_]+)'\)", reserved_rule)
    assert tuple(prefixes) == contract.RESERVED_ENV_PREFIXES
    assert {contract.ENV_MASTER_ADDR, contract.ENV_WORLD_SIZE, *contract.ENV_PET,
            "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"} <= contract.RESERVED_ENV_NAMES
    assert contract.is_reserved_env("TORCHELASTIC_RESTART_COUNT")
    assert not contract.is_reserved_env("NCCL_DEBUG")


def test_reserved_volume_prefix_is_the_one_the_builder_uses(spec):
    from lorakube import builders
    from lorakube.spec import OPERATOR_VOLUME_PREFIX

    volume_item = spec["properties"]["resources"]["properties"]["volumes"]["items"]
    (prefix_rule,) = rules(volume_item)
    assert prefix_rule == f"!self.name.startsWith('{OPERATOR_VOLUME_PREFIX}')"
    assert builders.SHM_VOLUME.startswith(OPERATOR_VOLUME_PREFIX)


def test_shm_size_default_is_the_operators(spec):
    from lorakube.spec import DEFAULT_SHM_SIZE, ResourcesSpec

    shm = spec["properties"]["resources"]["properties"]["shmSize"]
    assert shm["default"] == DEFAULT_SHM_SIZE == ResourcesSpec().shm_size


# Fields a user may change on a stored job; everything else in spec is immutable (crds/README.md).
MUTABLE_RUN_POLICY = {"suspend", "activeDeadlineSeconds", "startupDeadlineSeconds",
                      "ttlSecondsAfterFinished", "maxRestarts", "backoffSeconds",
                      "rendezvousTimeoutSeconds", "terminationGracePeriodSeconds", "failureRules",
                      "nodeAvoidance", "stagingProgressDeadlineSeconds"}
SCHEDULING_DIRECTIVES = {"nodeSelector", "tolerations", "affinity"}


def test_every_spec_field_is_immutable_but_the_ones_meant_to_change(spec):
    # A new spec field must be added to a transition rule (or to the mutable sets above, on
    # purpose): otherwise it could change under a running job and meet an old checkpoint.
    transition = " ".join(r for r in rules(spec) if "oldSelf" in r)
    # The API server cannot bound the cost of optional (?.) selections and refuses such a CRD.
    assert ".?" not in transition
    props = spec["properties"]
    for section in ("model", "dataset", "training", "output"):
        assert f"self.{section} == oldSelf.{section}" in transition, section
    for field in props["resources"]["properties"]:
        compared = re.search(rf"self\.resources\.{field} == oldSelf\.resources\.{field}\b", transition)
        assert compared, f"spec.resources.{field} has no immutability rule"
    for field in props["runPolicy"]["properties"]:
        compared = f"self.runPolicy.{field} == oldSelf.runPolicy.{field}" in transition
        assert compared == (field not in MUTABLE_RUN_POLICY), field
    (scheduling_rule,) = [r for r in rules(spec) if "oldSelf.runPolicy.suspend" in r]
    assert set(re.findall(r"self\.resources\.(\w+) == oldSelf", scheduling_rule)) == SCHEDULING_DIRECTIVES


def test_rendezvous_timeout_default_matches_the_trainer_default(spec):
    run_policy = spec["properties"]["runPolicy"]["properties"]
    assert run_policy["rendezvousTimeoutSeconds"]["default"] == contract.DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS


def test_termination_grace_default_is_the_contracts(spec):
    from lorakube.spec import RunPolicy

    grace = spec["properties"]["runPolicy"]["properties"]["terminationGracePeriodSeconds"]
    assert grace["default"] == contract.DEFAULT_TERMINATION_GRACE_SECONDS == \
        RunPolicy().termination_grace_period_seconds


def test_the_disruption_limit_the_crd_states_is_the_operators(root, spec):
    # kubectl explain promises a number; reconcile enforces it.
    from lorakube.reconcile import MAX_DISRUPTIONS

    max_restarts = spec["properties"]["runPolicy"]["properties"]["maxRestarts"]["description"]
    disruptions = root["properties"]["status"]["properties"]["disruptions"]["description"]
    for text in (max_restarts, disruptions):
        assert f"allows {MAX_DISRUPTIONS}" in text, text


def test_status_progress_holds_what_the_trainer_reports(root):
    progress = root["properties"]["status"]["properties"]["progress"]["properties"]
    sample = contract.Progress(step=3, totalSteps=10, epoch=0, loss=0.25, samplesPerSecond=1.5,
                               etaSeconds=7.9, updatedAt=contract.utc_now_iso()).to_status()
    # text (step/totalSteps, the Progress column) is derived in to_status.
    assert set(sample) == {f.name for f in dataclasses.fields(contract.Progress)} | {"text"}
    json_type = {str: "string", int: "integer", float: "number"}
    for key, value in sample.items():
        assert progress[key]["type"] == json_type[type(value)], key


# --- structure ---------------------------------------------------------------------------------

def test_every_field_has_a_description(root):
    # `kubectl explain ltj.spec...` shows these; an undocumented field is a support ticket.
    # metadata is the exception: the API server forbids anything but its type there.
    missing = [p for p, node in walk(root, "ltj") if not node.get("description") and p != "ltj.metadata"]
    assert missing == []


def test_every_node_is_typed(root):
    untyped = [
        p for p, node in walk(root, "ltj")
        if "type" not in node and not node.get("x-kubernetes-int-or-string")
    ]
    assert untyped == []


def test_status_is_structural_not_preserve_unknown(root):
    # A structural status prunes what it does not declare, so every key the operator writes (and
    # the trainer's progress and artifacts) must be in the schema, and every phase in its enum.
    from lorakube import status as st

    status = root["properties"]["status"]
    assert "x-kubernetes-preserve-unknown-fields" not in status
    assert set(status["properties"]) >= {*st.OPERATOR_KEYS, "progress", "artifacts"}
    phases = {st.PENDING, st.CREATED, st.STAGING, st.RUNNING_PHASE, st.RESTARTING, st.SUCCEEDED_PHASE, st.FAILED,
              st.SUSPENDED, st.QUEUED}
    assert set(status["properties"]["phase"]["enum"]) == phases


def test_spec_strings_and_lists_are_bounded_for_cel_cost(spec):
    unbounded = [
        p for p, node in walk(spec, "spec")
        if (node.get("type") == "string" and "maxLength" not in node and "enum" not in node)
        or (node.get("type") == "array" and "maxItems" not in node)
        or (node.get("type") == "object" and "additionalProperties" in node and "maxProperties" not in node)
    ]
    assert unbounded == []


def test_cel_rules_name_a_field_in_their_message(root):
    for path, node in walk(root, "ltj"):
        for v in node.get("x-kubernetes-validations", []):
            text = v.get("message") or v.get("messageExpression")
            assert text, f"{path}: rule {v['rule']!r} has no message"
            assert re.search(r"(spec|metadata)\.[a-zA-Z]+", text), (path, text)


def _check_value(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """A small subset of OpenAPI validation, enough to prove the defaults are legal values."""
    errors = []
    kind = schema.get("type")
    py = {"integer": int, "number": (int, float), "string": str, "boolean": bool,
          "array": list, "object": dict}
    if kind and not isinstance(value, py[kind]) or (kind in ("integer", "number") and isinstance(value, bool)):
        return [f"{path}: {value!r} is not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in enum")
    if "minimum" in schema and (value < schema["minimum"] or (schema.get("exclusiveMinimum") and value == schema["minimum"])):
        errors.append(f"{path}: {value!r} below minimum")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {value!r} above maximum")
    if kind == "array":
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{path}: {len(value)} items out of bounds")
        for i, item in enumerate(value):
            errors += _check_value(schema["items"], item, f"{path}[{i}]")
    return errors


def test_defaults_are_legal_values(root):
    errors = [e for p, node in walk(root, "ltj") if "default" in node
              for e in _check_value(node, node["default"], p)]
    assert errors == []


def test_defaults_fill_every_section_the_operator_reads(spec):
    # training/resources/runPolicy default to {} so their fields' defaults apply when a job
    # leaves the whole section out.
    for section in ("training", "resources", "runPolicy"):
        assert spec["properties"][section]["default"] == {}


def _resolve(root: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    node = root
    for part in json_path.strip(".").split("."):
        node = node.get("properties", {}).get(part) if part != "metadata" else {"type": "object", "properties": {"creationTimestamp": {"type": "string"}}}
        if node is None:
            return None
    return node


def test_printer_columns_point_at_schema_fields(version, root):
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns)[:5] == ["Phase", "Nodes", "Progress", "Loss", "Attempt"]
    assert list(columns)[-1] == "Age"
    for column in columns.values():
        target = _resolve(root, column["jsonPath"])
        assert target is not None, column
        expected = "string" if column["type"] == "date" else column["type"]
        assert target["type"] == expected, column


# --- examples and reference --------------------------------------------------------------------

def unknown_fields(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """Fields the API server would prune or reject as unknown (strict field validation)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, child in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(schema["properties"][key], child, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(schema["items"], item, f"{path}[{i}]")
    return found


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_use_only_known_fields(example, root):
    for doc in yaml.safe_load_all(example.read_text()):
        if doc and doc.get("kind") == contract.KIND:
            assert doc["apiVersion"] == f"{contract.API_GROUP}/{contract.API_VERSION}"
            assert unknown_fields(root["properties"]["spec"], doc["spec"], "spec") == []


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_run_on_what_the_operator_supports_today(example):
    # The CRD accepts URI schemes and gang schedulers the operator does not implement yet (it fails
    # such a job with InvalidSpec); an example must not end that way.
    from lorakube.spec import parse_job

    for doc in yaml.safe_load_all(example.read_text()):
        if doc and doc.get("kind") == contract.KIND:
            parse_job(doc["metadata"]["name"], doc["spec"], doc["metadata"].get("labels"))


def test_examples_exist():
    assert any(p.name != "quickstart.yaml" for p in EXAMPLES)


def show_default(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(show_default, value)) + "]"
    if isinstance(value, dict):
        return "{}" if not value else repr(value)
    return "" if value is None else str(value)


def reference_rows(spec: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """spec field path -> (type, default) as crds/README.md's table shows them."""
    rows = {}
    for path, node in walk(spec, "spec"):
        # Inside affinity the fields are core/v1 Affinity's, documented by Kubernetes.
        if path == "spec" or "[]" in path or "{}" in path or path.startswith("spec.resources.affinity."):
            continue
        kind = node.get("type", "int-or-string")
        if kind == "array":
            kind = f"[]{node['items'].get('type', 'object')}"
        elif kind == "object" and "additionalProperties" in node:
            kind = "map"
        rows[path] = (kind, show_default(node.get("default")))
    return rows


def test_caption_extension_rules_are_the_contracts(spec):
    """The schema refuses what the operator and the trainer refuse (contract's pattern and image endings)."""
    field = spec["properties"]["dataset"]["properties"]["captionExtension"]
    assert field["pattern"] == contract.CAPTION_EXTENSION_PATTERN
    assert field["default"] == contract.DEFAULT_CAPTION_EXTENSION
    endings = re.findall(r"'(\.[a-z]+)'", field["x-kubernetes-validations"][0]["rule"])
    assert tuple(endings) == contract.IMAGE_SUFFIXES


def test_keep_tokens_separator_pattern_is_the_contracts(spec):
    field = spec["properties"]["dataset"]["properties"]["keepTokensSeparator"]
    assert field["pattern"] == contract.KEEP_TOKENS_SEPARATOR_PATTERN
    pattern = re.compile(field["pattern"])
    assert [bool(pattern.fullmatch(s)) for s in ("|||", "#", "a b", ",", " , ", "   ", "")] == [
        True, True, True, False, False, False, False]


def test_readme_reference_table_matches_the_schema(spec):
    table = {}
    for line in README_PATH.read_text().splitlines():
        m = re.match(r"\|\s*`(spec\.[^`]+)`\s*\|\s*([^|]*?)\s*\|\s*`?([^|`]*?)`?\s*\|", line)
        if m:
            table[m.group(1)] = (m.group(2).strip("`"), m.group(3))
    assert table == reference_rows(spec)
