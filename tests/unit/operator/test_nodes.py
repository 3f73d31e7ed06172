"""Bad-node avoidance: what a failure blames, the affinity the next attempt carries, the status."""

from __future__ import annotations

import copy
import datetime as dt

from ltj_fixtures import NOW, pod_view
from test_reconcile import CONFIG, condition, observe, running_status

from lorakube import failures, nodes, reconcile
from lorakube.reconcile import decide

XID = "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus."
APP_XID = "NVRM: Xid (PCI:0000:3b:00): 31, pid=1234, Ch 00000008, MMU Fault: ENGINE GRAPHICS"
GLOO_TIMEOUT = ("RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
                "[10.0.1.7]:41922: Connection reset by peer")
NCCL_PEER = ("NCCL WARN NET/Socket : peer cats-node-2.cats.team-a.svc.cluster.local timed out waiting "
             "for a message")


def on(node: str, rank: int, phase: str = "Running", **fields) -> object:
    return pod_view(rank, phase, node_name=node, **fields)


# --- attribution ---------------------------------------------------------------------------


def test_a_failed_pod_on_a_not_ready_node_blames_that_node():
    pods = [on("a", 0), on("b", 1, "Failed", exit_code=137)]
    (blame,) = nodes.attribute(pods, {}, {"b": "NotReady"})
    assert (blame.node, blame.reason) == ("b", nodes.NODE_NOT_READY)


def test_a_missing_node_and_an_admission_error_blame_their_nodes():
    pods = [on("a", 0, "Failed", reason="UnexpectedAdmissionError",
               message="Allocate failed due to device plugin GetPreferredAllocation"),
            pod_view(1, "Running", node_name="b", deleting=True)]
    blames = nodes.attribute(pods, {}, {"b": "Missing", "a": "Ready"})
    assert [(b.node, b.reason) for b in blames] == [("a", nodes.ADMISSION_ERROR), ("b", nodes.NODE_MISSING)]


def test_an_xid_in_the_termination_message_or_the_log_tail_blames_the_pods_node():
    by_message = [on("a", 0, "Failed", exit_code=1, message=f"CUDA error\n{XID}")]
    by_tail = [on("c", 0, "Failed", exit_code=1, message="Traceback ...")]
    assert [(b.node, b.reason) for b in nodes.attribute(by_message, {}, {})] == [("a", nodes.GPU_ERROR)]
    assert nodes.attribute(by_tail, {"cats-node-0": "uncorrectable ECC error on GPU 3"}, {})[0].node == "c"


def test_an_application_xid_and_a_plain_user_error_blame_nobody():
    assert nodes.attribute([on("a", 0, "Failed", exit_code=1, message=APP_XID)], {}, {}) == []
    assert nodes.attribute([on("a", 0, "Failed", exit_code=1, message="KeyError: 'text'")], {}, {}) == []


def test_a_pod_failing_on_a_ready_node_or_preempted_there_blames_nobody():
    preempted = pod_view(0, "Running", node_name="a", deleting=True, disrupted=True)
    assert nodes.attribute([preempted, on("b", 1, "Failed", exit_code=137)], {}, {"a": "Ready", "b": "Ready"}) == []


def test_a_timeout_naming_a_peer_by_ip_or_dns_name_blames_the_peers_node():
    pods = [on("a", 0, "Failed", exit_code=75, message=GLOO_TIMEOUT), on("b", 1, pod_ip="10.0.1.7"),
            on("c", 2, pod_ip="10.0.1.70")]
    assert [(b.node, b.reason) for b in nodes.attribute(pods, {}, {})] == [("b", nodes.PEER_TIMEOUT)]
    pods = [on("a", 0, "Failed", exit_code=75, message=NCCL_PEER), on("b", 1), on("c", 2)]
    assert [b.node for b in nodes.attribute(pods, {}, {})] == ["c"]


def test_a_peer_that_died_on_its_own_is_not_blamed_for_the_connection_it_closed():
    pods = [on("a", 0, "Failed", exit_code=75, message=GLOO_TIMEOUT),
            on("b", 1, "Failed", exit_code=137, pod_ip="10.0.1.7")]
    assert nodes.attribute(pods, {}, {"a": "Ready", "b": "Ready"}) == []


def test_a_peer_named_without_a_timeout_blames_nobody():
    pods = [on("a", 0, "Failed", exit_code=1, message="rank 0 saw cats-node-1 say hello"), on("b", 1)]
    assert nodes.attribute(pods, {}, {}) == []


def test_an_xid_makes_a_user_error_exit_a_restart():
    pod = on("a", 0, "Failed", exit_code=1, message=XID)
    assert failures.classify(pod).rule.reason == "GpuHardwareError"
    assert failures.classify(pod).rule.action is failures.Action.RESTART
    assert failures.classify(on("a", 0, "Failed", exit_code=1, message=APP_XID)).rule.reason == "UserError"


# --- the exclusion list and the affinity ---------------------------------------------------------


def test_exclusions_are_bounded_oldest_first_and_never_duplicated():
    current = [{"node": f"n{i}", "reason": "NodeNotReady", "since": "t", "attempt": i} for i in range(3)]
    blames = [nodes.Blame("n1", "GpuHardwareError", ""), nodes.Blame("x", "PeerTimeout", ""),
              nodes.Blame("y", "PeerTimeout", "")]
    entries, new = nodes.add_exclusions(current, blames, "now", 4, limit=4)
    assert [e["node"] for e in entries] == ["n1", "n2", "x", "y"]
    assert [b.node for b in new] == ["x", "y"]
    assert entries[-1] == {"node": "y", "reason": "PeerTimeout", "since": "now", "attempt": 4}


def test_the_exclusion_is_anded_into_every_term_of_the_users_affinity():
    user = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n9"]}]}]},
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": {}}]},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
    }
    before = copy.deepcopy(user)
    merged = nodes.with_exclusion(user, ["n2", "n1"])
    assert user == before     # the spec is not modified
    not_in = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1", "n2"]}
    terms = merged["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}, not_in]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n9"]}], "matchExpressions": [not_in]}]
    assert merged["podAntiAffinity"] == user["podAntiAffinity"]
    assert merged["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == [{"weight": 1, "preference": {}}]


def test_without_exclusions_the_users_affinity_is_unchanged():
    assert nodes.with_exclusion(None, []) is None
    assert nodes.with_exclusion(None, ["n1"]) == {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]}]}]}}}


# --- decide ------------------------------------------------------------------------------------


def gpu_failure(job_spec, **status):
    pods = [on("good", 0), on("bad", 1, "Failed", exit_code=1, message=XID), on("good", 2)]
    return decide(observe(job_spec, running_status(**status), pods), CONFIG)


def test_a_failure_blamed_on_a_node_restarts_and_records_the_exclusion(job_spec):
    decision = gpu_failure(job_spec)
    patch = decision.status_patch
    assert patch["phase"] == "Restarting" and patch["attempt"] == 2
    assert condition(patch, "Restarting")["reason"] == "GpuHardwareError"
    assert patch["excludedNodes"] == [
        {"node": "bad", "reason": "GpuHardwareError", "since": "2026-05-01T12:00:00Z", "attempt": 1}]
    (event,) = [e for e in decision.events if e.reason == "NodeExcluded"]
    assert "bad" in event.message and "GpuHardwareError" in event.message


def test_the_next_attempts_pods_avoid_the_excluded_nodes(job_spec):
    status = {"phase": "Restarting", "attempt": 2, "restarts": 1,
              "excludedNodes": [{"node": "bad", "reason": "GpuHardwareError", "since": "t", "attempt": 1}],
              "conditions": [{"type": "Restarting", "status": "True", "reason": "GpuHardwareError", "message": "",
                              "lastTransitionTime": "2026-05-01T11:00:00Z"}]}
    decision = decide(observe(job_spec, status, service_account_exists=True), CONFIG)
    assert len(decision.create_pods) == 3
    for pod in decision.create_pods:
        terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"] == [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["bad"]}]}]


def test_node_avoidance_off_records_nothing_and_builds_no_affinity(job_spec):
    job_spec["runPolicy"]["nodeAvoidance"] = False
    patch = gpu_failure(job_spec).status_patch
    assert patch["phase"] == "Restarting" and "excludedNodes" not in patch
    status = {"phase": "Created", "attempt": 2, "restarts": 1,
              "excludedNodes": [{"node": "bad", "reason": "GpuHardwareError", "since": "t", "attempt": 1}]}
    decision = decide(observe(job_spec, status, service_account_exists=True), CONFIG)
    assert all("affinity" not in p["spec"] for p in decision.create_pods)
    assert decision.status_patch["excludedNodes"] is None     # turned off: the list goes


def test_the_exclusions_are_cleared_when_the_job_ends(job_spec):
    excluded = [{"node": "bad", "reason": "NodeNotReady", "since": "t", "attempt": 1}]
    pods = [on("good", r, "Succeeded", attempt=2, exit_code=0) for r in range(3)]
    patch = decide(observe(job_spec, running_status(attempt=2, excludedNodes=excluded), pods), CONFIG).status_patch
    assert patch["phase"] == "Succeeded" and patch["excludedNodes"] is None
    user_error = [on("good", 0, attempt=2), on("good", 1, "Failed", attempt=2, exit_code=1), on("good", 2, attempt=2)]
    patch = decide(observe(job_spec, running_status(attempt=2, excludedNodes=excluded), user_error),
                   CONFIG).status_patch
    assert patch["phase"] == "Failed" and patch["excludedNodes"] is None


def test_a_fatal_failure_excludes_nothing(job_spec):
    pods = [on("a", 0, "Failed", exit_code=1, message="KeyError"), on("b", 1), on("c", 2)]
    patch = decide(observe(job_spec, running_status(), pods, node_states={"a": "NotReady"}), CONFIG).status_patch
    assert patch["phase"] == "Failed" and "excludedNodes" not in patch


def test_the_nodes_of_failed_pods_are_read_only_on_a_failure_pass():
    live = [on("a", 0), on("b", 1)]
    failed = [on("a", 0), on("b", 1, "Failed", exit_code=137)]
    assert reconcile.nodes_to_check(running_status(), live, live[0].owner_uid, NOW) == []
    assert reconcile.nodes_to_check(running_status(), failed, live[0].owner_uid, NOW) == ["b"]
    restarting = running_status(phase="Restarting")
    assert reconcile.nodes_to_check(restarting, failed, live[0].owner_uid, NOW + dt.timedelta(seconds=1)) == []


def test_the_bound_the_crd_states_is_the_operators():
    from pathlib import Path

    import yaml

    crd = yaml.safe_load((Path(__file__).parents[3] / "crds" / "loratrainingjobs.lorakube.io.yaml").read_text())
    status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["excludedNodes"]["maxItems"] == nodes.MAX_EXCLUDED_NODES
