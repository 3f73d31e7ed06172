"""The trainer's per-job identity: names, the one rule, owners, and which rank gets a token."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ltj_fixtures import UID

from lorakube import builders, rbac
from lorakube_api import contract
from lorakube.spec import JobRef, parse_job

JOB = JobRef(name="cats", namespace="team-a", uid=UID)
CONFIG = builders.OperatorConfig(trainer_image="example/trainer:1")
POLICY = Path(rbac.__file__).parent / "manifests" / "trainer-status-policy.yaml"


@pytest.fixture
def job(job_spec):
    return parse_job("cats", job_spec)


def test_the_job_gets_its_own_account_role_and_binding_owned_by_it(job):
    account, role, binding = rbac.build_trainer_access(job, JOB)
    for manifest in (account, role, binding):
        assert manifest["metadata"]["name"] == "cats-trainer"
        assert manifest["metadata"]["namespace"] == "team-a"
        # Garbage collection deletes them with the job.
        assert manifest["metadata"]["ownerReferences"] == [JOB.owner_reference()]
        assert manifest["metadata"]["labels"][contract.LABEL_JOB_NAME] == "cats"
    assert account["kind"] == "ServiceAccount" and account["automountServiceAccountToken"] is False
    assert role["kind"] == "Role" and role["rules"] == [{
        "apiGroups": ["lorakube.io"], "resources": ["loratrainingjobs/status"],
        "resourceNames": ["cats"], "verbs": ["get", "patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cats-trainer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cats-trainer", "namespace": "team-a"}]


def test_only_rank_0_of_the_jobs_own_account_gets_a_token(job):
    pods = builders.build_pods(job, JOB, 1, CONFIG)
    assert [p["spec"]["serviceAccountName"] for p in pods] == ["cats-trainer"] * 3
    assert [p["spec"]["automountServiceAccountToken"] for p in pods] == [True, False, False]


def test_a_user_account_runs_every_rank_and_keeps_its_own_token_setting_off_rank_0(job_spec):
    job_spec["resources"]["serviceAccountName"] = "storage"
    job = parse_job("cats", job_spec)
    pods = builders.build_pods(job, JOB, 1, CONFIG)
    assert [p["spec"]["serviceAccountName"] for p in pods] == ["storage"] * 3
    assert pods[0]["spec"]["automountServiceAccountToken"] is True
    assert all("automountServiceAccountToken" not in p["spec"] for p in pods[1:])


def test_the_admission_policy_names_the_same_per_job_account():
    # The policy spells the account in CEL; it must agree with trainer_account_name.
    policy = next(d for d in yaml.safe_load_all(POLICY.read_text()) if d["kind"] == "ValidatingAdmissionPolicy")
    (condition,) = policy["spec"]["matchConditions"]
    assert f"oldObject.metadata.name + '{rbac.TRAINER_ACCOUNT_SUFFIX}'" in condition["expression"]
    assert rbac.trainer_account_name("cats") == "cats" + rbac.TRAINER_ACCOUNT_SUFFIX
