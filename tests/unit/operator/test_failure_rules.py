"""spec.runPolicy.failureRules: a job's own rules go before the built-in table, first match wins."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from ltj_fixtures import pod_view
from test_reconcile import CONFIG, condition, observe, running_status

from lorakube import failures
from lorakube.reconcile import decide
from lorakube.spec import FailureRuleSpec, InvalidSpec, parse_job

NCCL_HANG = "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE) ran for 600012 ms"


def with_rules(job_spec: dict[str, Any], *rules: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(job_spec)
    spec["runPolicy"]["failureRules"] = list(rules)
    return spec


def test_no_rules_means_exactly_the_built_in_table():
    assert failures.rules_for(()) == failures.RULES
    assert [r.reason for r in failures.RULES] == [
        "PodDisrupted", "PreflightFailed", "PreflightFailed", "RetryableExit", "OutOfMemory", "InvalidDataset",
        "GpuHardwareError", "KilledBySignal", "UserError", "PodLost"]


def test_a_log_pattern_rule_turns_a_user_error_into_an_uncounted_restart(job_spec):
    spec = with_rules(job_spec, {"name": "NcclTimeout", "action": "RestartWithoutCounting",
                                 "onMessagePattern": r"collective operation timeout"})
    pods = [pod_view(0, "Running"), pod_view(1, "Failed", exit_code=1, reason="Error", message=NCCL_HANG),
            pod_view(2, "Running")]
    patch = decide(observe(spec, running_status(), pods), CONFIG).status_patch
    assert patch["phase"] == "Restarting"
    assert condition(patch, "Restarting")["reason"] == "NcclTimeout"
    assert patch["disruptions"] == 1 and "restarts" not in patch


def test_without_the_rule_the_same_pod_fails_the_job(job_spec):
    pods = [pod_view(0, "Running"), pod_view(1, "Failed", exit_code=1, reason="Error", message=NCCL_HANG),
            pod_view(2, "Running")]
    patch = decide(observe(job_spec, running_status(), pods), CONFIG).status_patch
    assert patch["phase"] == "Failed" and condition(patch, "Failed")["reason"] == "UserError"


def test_a_fail_rule_stops_retrying_an_exit_code_the_table_would_restart(job_spec):
    spec = with_rules(job_spec, {"name": "BadShard", "action": "Fail", "onExitCodes": [75],
                                 "onMessagePattern": "shard .* checksum mismatch"})
    pods = [pod_view(0, "Failed", exit_code=75, message="data shard 7 checksum mismatch"),
            pod_view(1, "Running"), pod_view(2, "Running")]
    patch = decide(observe(spec, running_status(), pods), CONFIG).status_patch
    assert patch["phase"] == "Failed" and condition(patch, "Failed")["reason"] == "BadShard"
    assert "spec.runPolicy.failureRules BadShard" in condition(patch, "Failed")["message"]


def test_a_restart_rule_spends_max_restarts(job_spec):
    spec = with_rules(job_spec, {"name": "FlakyStorage", "action": "Restart", "onExitCodes": [5]})
    pods = [pod_view(0, "Failed", exit_code=5), pod_view(1, "Running"), pod_view(2, "Running")]
    patch = decide(observe(spec, running_status(), pods), CONFIG).status_patch
    assert patch["phase"] == "Restarting" and patch["restarts"] == 1
    assert condition(patch, "Restarting")["reason"] == "FlakyStorage"


def test_all_conditions_of_a_rule_must_hold_and_the_first_match_wins():
    rules = failures.rules_for(parse_job("cats", {**_minimal(), "runPolicy": {"failureRules": [
        {"name": "Both", "action": "Fail", "onExitCodes": [1], "onPodReasons": ["OOMKilled"]},
        {"name": "ExitOne", "action": "RestartWithoutCounting", "onExitCodes": [1]},
        {"name": "AlsoExitOne", "action": "Fail", "onExitCodes": [1]},
    ]}}).run_policy.failure_rules)
    assert failures.classify(pod_view(0, "Failed", exit_code=1, reason="OOMKilled"), rules).rule.reason == "Both"
    assert failures.classify(pod_view(0, "Failed", exit_code=1, reason="Error"), rules).rule.reason == "ExitOne"
    # Unmatched pods fall through to the built-in table.
    assert failures.classify(pod_view(0, "Failed", exit_code=137), rules).rule.reason == "KilledBySignal"


def _minimal() -> dict[str, Any]:
    return {"model": {"family": "flux", "uri": "/m"}, "dataset": {"uri": "/d"}, "output": {"uri": "/o"}}


@pytest.mark.parametrize(("rule", "field", "words"), [
    ({"name": "X", "action": "Fail", "onMessagePattern": "(unclosed"}, "failureRules[0].onMessagePattern",
     "not a valid regular expression"),
    ({"name": "X", "action": "Fail"}, "failureRules[0]", "at least one of onExitCodes"),
    ({"name": "nccl-timeout", "action": "Fail", "onExitCodes": [1]}, "failureRules[0].name", "CamelCase"),
    ({"name": "X", "action": "Retry", "onExitCodes": [1]}, "failureRules[0].action",
     "Restart, RestartWithoutCounting, Fail"),
    ({"name": "X", "action": "Fail", "onExitCodes": [0]}, "failureRules[0].onExitCodes", "between 1 and 255"),
])
def test_a_bad_rule_is_an_invalid_spec_naming_the_field(rule, field, words):
    with pytest.raises(InvalidSpec) as raised:
        parse_job("cats", {**_minimal(), "runPolicy": {"failureRules": [rule]}})
    assert f"spec.runPolicy.{field}" in str(raised.value) and words in str(raised.value)


def test_a_parsed_rule_keeps_what_the_user_wrote():
    parsed = parse_job("cats", {**_minimal(), "runPolicy": {"failureRules": [
        {"name": "Xid", "action": "RestartWithoutCounting", "onPodReasons": ["Error"],
         "onMessagePattern": r"NVRM: Xid \(PCI:"}]}}).run_policy.failure_rules
    assert parsed == (FailureRuleSpec(name="Xid", action="RestartWithoutCounting", on_pod_reasons=("Error",),
                                      on_message_pattern=r"NVRM: Xid \(PCI:"),)
