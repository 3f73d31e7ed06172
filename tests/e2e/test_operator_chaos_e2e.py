"""Chaos: the operator is SIGKILLed and restarted 10 times at random moments while 5 two-pod jobs
run the real trainer; a watch records every pod event and checks, after each one, that

- no two pod objects of the same job and rank are alive at once (alive: exists and not in a
  terminal phase, Terminating included, since its container may still run),
- no two attempts of one job are alive at once,

and every job Succeeds. Two of the jobs also lose a pod mid-run (someone deletes it), so gang
restarts happen under the chaos too and the attempt check has something to bite on.

The operator's safety rests on the attempt number in status being written before any pod of a
new attempt exists, and on pods of older attempts being gone before new ones are created
(reconcile.py); a kill between any two API calls must leave a state the next process continues
from. The kill times come from a seeded RNG (the seed is printed, $LORAKUBE_CHAOS_SEED replays it).

Slow (about 4-6 minutes on 2 cores): runs under `make test-slow`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch

from lorakube_api import contract
from lorakube_dev import sandbox

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

JOBS = 5
KILLS = 10
JOB_TIMEOUT = 900
TERMINAL = ("Succeeded", "Failed")


@dataclasses.dataclass
class PodRecorder:
    """Watches the namespace's trainer pods and checks the invariants after every event, in the
    API server's order (one watch delivers one resource's events in resourceVersion order)."""

    api: client.CoreV1Api
    namespace: str
    alive: dict[str, tuple[str, int, int]] = dataclasses.field(default_factory=dict)   # uid -> (job, rank, attempt)
    events: int = 0
    pods: set[str] = dataclasses.field(default_factory=set)
    attempts: dict[str, set[int]] = dataclasses.field(default_factory=lambda: defaultdict(set))
    max_alive: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None

    def apply(self, kind: str, pod: Any) -> None:
        labels = pod.metadata.labels or {}
        key = (labels.get(contract.LABEL_JOB_NAME), int(labels[contract.LABEL_RANK]),
               int(labels[contract.LABEL_ATTEMPT]))
        uid = pod.metadata.uid
        self.events += 1
        self.pods.add(uid)
        self.attempts[key[0]].add(key[2])
        if kind == "DELETED" or (pod.status and pod.status.phase in TERMINAL):
            self.alive.pop(uid, None)
        else:
            self.alive[uid] = key
        self.max_alive = max(self.max_alive, len(self.alive))
        by_rank: dict[tuple[str, int], int] = defaultdict(int)
        by_job: dict[str, set[int]] = defaultdict(set)
        for job, rank, attempt in self.alive.values():
            by_rank[(job, rank)] += 1
            by_job[job].add(attempt)
        for (job, rank), count in by_rank.items():
            if count > 1:
                self.violations.append(f"event {self.events}: {count} pods of {job} rank {rank} alive")
        for job, attempts in by_job.items():
            if len(attempts) > 1:
                self.violations.append(f"event {self.events}: attempts {sorted(attempts)} of {job} alive")

    def run(self) -> None:
        try:
            self._watch()
        except BaseException as exc:  # noqa: BLE001 - reported by the test, which then fails
            self.error = exc

    def _watch(self) -> None:
        selector = f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY}"
        version = None
        while not self.stop.is_set():
            if version is None:
                listed = self.api.list_namespaced_pod(self.namespace, label_selector=selector)
                # A (re)list: the state as a whole replaces what was known, then it is checked.
                self.alive.clear()
                for pod in listed.items:
                    self.apply("ADDED", pod)
                version = listed.metadata.resource_version
            stream = watch.Watch()
            try:
                for event in stream.stream(self.api.list_namespaced_pod, self.namespace, label_selector=selector,
                                           resource_version=version, timeout_seconds=5):
                    if event["type"] == "ERROR":
                        version = None
                        break
                    self.apply(event["type"], event["object"])
                    version = event["object"].metadata.resource_version
            except client.ApiException as exc:
                if exc.status != 410:
                    raise
                version = None


def delete_when_training(kubectl, namespace: str, victims: list[str]) -> None:
    pending = list(victims)
    deadline = time.monotonic() + JOB_TIMEOUT
    while pending and time.monotonic() < deadline:
        for victim in list(pending):
            if training(kubectl, namespace, victim):
                kubectl("delete", "pod", contract.pod_name(victim, 1), "-n", namespace, "--wait=false")
                pending.remove(victim)
        time.sleep(0.5)


def training(kubectl, namespace: str, name: str) -> bool:
    status = (sandbox.get_job(kubectl, namespace, name) or {}).get("status") or {}
    progress = status.get("progress") or {}
    return status.get("phase") == "Running" and 1 <= (progress.get("step") or 0) < (progress.get("totalSteps") or 0)


def test_operator_killed_ten_times_while_five_jobs_run(local_cluster, job_namespace, data_dir, start_operator):
    seed = int(os.environ.get("LORAKUBE_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"chaos seed {seed} (LORAKUBE_CHAOS_SEED={seed} replays the kill times)")
    kubectl = local_cluster.cluster.kubectl
    api = client.CoreV1Api(config.new_client_from_config(config_file=str(local_cluster.kubeconfig)))
    recorder = PodRecorder(api, job_namespace)
    watcher = threading.Thread(target=recorder.run, daemon=True)
    watcher.start()
    # Every kill lands while the jobs are live: they start with the first operator and, on 2 cores,
    # run for about two and a half minutes; the kills come every 2-20 s (about 2 minutes in all).

    names = [f"chaos-{index}" for index in range(JOBS)]
    for index, name in enumerate(names):
        # The two victims (below) run longer, so their deletion lands mid-training.
        steps = 24 if index < 2 else 8
        job = sandbox.quickstart_job(data_dir, name, training={"stepsPerEpoch": steps, "checkpointEverySteps": 2},
                                     runPolicy={"backoffSeconds": 1})
        job["spec"]["resources"]["resources"] = {"requests": {"cpu": "100m", "memory": "256Mi"}}
        sandbox.apply_job(kubectl, job_namespace, job)

    operator = start_operator()
    started = time.monotonic()
    # Meanwhile someone deletes rank 1 of two jobs once each is training (a pod deleted before the
    # operator saw the gang Running is recreated alone in the same attempt, by design, so the
    # deletion waits for training to be under way); the kills go on regardless.
    victims = names[:2]
    deleter = threading.Thread(target=delete_when_training, args=(kubectl, job_namespace, victims), daemon=True)
    deleter.start()
    kill_times = []
    for kill in range(KILLS):
        time.sleep(rng.uniform(2.0, 20.0))
        operator.kill()
        kill_times.append(round(time.monotonic() - started, 1))
        time.sleep(rng.uniform(0.0, 2.0))   # down for a moment: pods go on without it
        operator = start_operator()

    phases = {}
    try:
        for name in names:
            final = sandbox.follow(kubectl, job_namespace, name, JOB_TIMEOUT - (time.monotonic() - started))
            phases[name] = final["status"]
    finally:
        recorder.stop.set()
        watcher.join(timeout=10)
    assert recorder.error is None, repr(recorder.error)
    elapsed = time.monotonic() - started

    attempts = {name: sorted(recorder.attempts[name]) for name in names}
    print(f"chaos: {KILLS} SIGKILLs at {kill_times} s; {recorder.events} pod events checked over "
          f"{len(recorder.pods)} pods ({recorder.max_alive} alive at most); attempts per job {attempts}; "
          f"{len(recorder.violations)} violations; all {JOBS} jobs done in {elapsed:.0f} s")
    assert recorder.violations == []
    failed = {name: s.get("lastFailure") for name, s in phases.items() if s["phase"] != "Succeeded"}
    assert failed == {}
    for name, status in phases.items():
        assert status["progress"]["step"] == status["progress"]["totalSteps"] > 0, (name, status["progress"])
    # The deleted pods restarted their gangs; the checks above held across those restarts.
    assert all(len(attempts[victim]) >= 2 for victim in victims), attempts
    assert recorder.events >= 4 * JOBS * 2
