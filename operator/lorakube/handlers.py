"""Kopf handlers: thin triggers for one level-based reconcile per job.

A job is reconciled when it changes, when one of its pods changes, on a timer while it is live,
and at the time its last decision asked for (backoff, deadlines). Each trigger only names the job;
`Reconciler` coalesces triggers so at most one pass per job runs at a time, and the pass itself
(kube.reconcile_job) reads the job fresh, so triggers may arrive in any order or twice.

Handlers only schedule a pass and return: a Kopf handler still running when its job is deleted
holds the job's finalizer (Kopf re-checks a busy timer only every `cancellation_polling` seconds,
60 by default), and a busy event handler delays the job's next events, the deletion included.

Every handler returns None: Kopf stores a handler's return value in the object's status, and the
status belongs to the operator's own fields and the trainer's progress.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import kopf

from lorakube import builders, kube, leader, metrics, pods
from lorakube_api import contract
from lorakube import status as st

log = logging.getLogger(__name__)

JOB = {"group": contract.API_GROUP, "version": contract.API_VERSION, "plural": contract.PLURAL}
OUR_PODS = {contract.LABEL_MANAGED_BY: contract.MANAGED_BY}
# The pod watch asks the apiserver for our pods only: other pods of the cluster never reach the
# operator (the handlers below check the label again).
PODS = ("v1", "pods")  # core v1 only (not metrics.k8s.io pods)
POD_LABEL_SELECTOR = ",".join(f"{key}={value}" for key, value in OUR_PODS.items())
# The safety net under the event triggers; decisions that need an earlier look ask for it.
TIMER_INTERVAL_SECONDS = float(os.environ.get("LORAKUBE_RECONCILE_INTERVAL_SECONDS", "10"))
ERROR_RETRY_SECONDS = 5.0
# A pod event starts its job's pass this much later, so the burst of events a gang's pods send
# together (created, scheduled, started, running) costs one pass instead of one each.
POD_EVENT_BATCH_SECONDS = 0.2
# Passes that may wait on the API server at once. A pass is a few round trips of waiting, not
# work: asyncio's default (CPUs + 4, 6 on 2 cores) queued 100 new jobs' first passes six at a time.
PASS_THREADS = 32
KOPF_CONNECT_TIMEOUT = kube.REQUEST_TIMEOUT[0]
KOPF_REQUEST_TIMEOUT = kube.REQUEST_TIMEOUT[1]

Key = tuple[str, str]


class Reconciler:
    """Runs reconcile passes: one at a time per job, a trigger during a pass causes one more."""

    def __init__(self, client: kube.Kube, config: builders.OperatorConfig,
                 leadership: leader.Leadership | None = None) -> None:
        self.kube = client
        self.metrics = client.metrics
        self.config = config
        # With leader election: a pass acts only while this replica's lease is valid (the API
        # client also checks before every write, for a pass that was under way when it lapsed).
        self.leadership = leadership or leader.Leadership.always()
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._requeues: dict[Key, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def schedule(self, key: Key, index: Any) -> None:
        """Run `trigger` in the background (what every handler does; see the module docstring)."""
        task = asyncio.ensure_future(self.trigger(key, index))
        # The loop keeps only weak references to tasks: hold each until it is done.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def trigger(self, key: Key, index: Any) -> None:
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        try:
            while True:
                self._dirty.discard(key)
                await self._pass(key, index)
                if key not in self._dirty:
                    break
        finally:
            self._running.discard(key)

    async def _pass(self, key: Key, index: Any) -> None:
        namespace, name = key
        if not self.leadership.valid():
            log.warning("not reconciling %s/%s: this replica's leader lease lapsed", namespace, name)
            return
        views = list(index.get(key, []))
        now = dt.datetime.now(dt.timezone.utc)
        started = time.monotonic()
        try:
            outcome = await asyncio.to_thread(kube.reconcile_job, self.kube, namespace, name, views, self.config, now)
        except leader.NotLeader as exc:
            self.metrics.reconcile_failed(exc)
            log.warning("stopped reconciling %s/%s before writing: %s", namespace, name, exc)
            return
        except Exception as exc:  # noqa: BLE001 - any API failure or timeout: log and look again shortly
            self.metrics.reconcile_failed(exc)
            log.warning("reconciling %s/%s failed, retrying in %ss: %s", namespace, name, ERROR_RETRY_SECONDS, exc)
            self.requeue(key, index, ERROR_RETRY_SECONDS)
            return
        finally:
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)
        self.metrics.jobs.set(namespace, name, outcome.phase)
        if not self.leadership.valid():
            log.warning("not posting the Events of %s/%s: this replica's leader lease lapsed", namespace, name)
            return
        for event in outcome.events:
            kopf.event(outcome.body, type=event.type, reason=event.reason, message=event.message)
            log.info("%s/%s: %s: %s", namespace, name, event.reason, event.message)
        if outcome.requeue_after is not None:
            self.requeue(key, index, outcome.requeue_after)

    def requeue(self, key: Key, index: Any, delay: float) -> None:
        """A pass in `delay` seconds, unless one is booked sooner (a later one is replaced: every
        pass books its own next look again)."""
        loop = asyncio.get_running_loop()
        previous = self._requeues.get(key)
        if previous is not None and previous.when() <= loop.time() + delay:
            return  # an earlier look is already booked
        if previous is not None:
            previous.cancel()
        self._requeues[key] = loop.call_later(delay, self._fire, key, index)

    def _fire(self, key: Key, index: Any) -> None:
        self._requeues.pop(key, None)
        self.schedule(key, index)

    def forget(self, key: Key) -> None:
        """The job is gone: drop its booked look and what the API client remembers of it."""
        booked = self._requeues.pop(key, None)
        if booked is not None:
            booked.cancel()
        self.kube.forget_job(*key)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Kopf's bookkeeping lives in annotations under our own prefix, never in status: the status
    # belongs to the operator's fields and the trainer's progress.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=contract.API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=contract.API_GROUP)
    settings.persistence.finalizer = f"{contract.API_GROUP}/operator"
    # Only the Events we post on purpose (kopf.event); handler logs stay logs.
    settings.posting.loggers = False
    settings.posting.reporting_component = "lorakube-operator"
    # No cluster scanning: no RBAC on namespaces/CRDs needed; the CRD must exist at startup.
    settings.scanning.disabled = True
    settings.peering.standalone = True
    # Reconnect watches regularly so a silently dropped connection costs minutes, not hours; a
    # stream with no event (not even a bookmark) for inactivity_timeout is reconnected too.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = KOPF_CONNECT_TIMEOUT
    # Kopf's own requests (finalizers, annotations, Events, the initial lists) are bounded as
    # ours are; Kopf retries them with its error backoffs.
    settings.networking.connect_timeout = KOPF_CONNECT_TIMEOUT
    settings.networking.request_timeout = KOPF_REQUEST_TIMEOUT
    settings.watching.label_selectors[PODS] = POD_LABEL_SELECTOR
    leadership = memo.get("leadership") or leader.Leadership.always()
    api = kube.load_api_client(fence=leadership.check, user_agent=memo.get("user_agent"))
    memo.reconciler = Reconciler(kube.Kube(api, memo.get("metrics") or metrics.OPERATOR),
                                 builders.OperatorConfig.from_env(), leadership)


@kopf.on.startup()
async def pass_threads(**_: Any) -> None:
    # Passes run in the loop's default executor (asyncio.to_thread); see PASS_THREADS.
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(PASS_THREADS, thread_name_prefix="lorakube-pass"))


@kopf.index(*PODS)
def pods_by_job(namespace: str, name: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> Any:
    # No client-side label filter here, so this sees every pod the watch delivers: the debug line
    # shows what reaches the operator (only our pods, thanks to the server-side selector).
    log.debug("pod %s/%s received", namespace, name)
    if labels.get(contract.LABEL_MANAGED_BY) != contract.MANAGED_BY:
        return None
    view = pods.from_body(body)
    job = labels.get(contract.LABEL_JOB_NAME)
    return None if view is None or not job else {(namespace, job): view}


def _live(status: Mapping[str, Any], **_: Any) -> bool:
    # Finished jobs need no timer; Kopf drops its finalizer from them, so deleting one never
    # waits for the operator.
    return status.get("phase") not in st.TERMINAL_PHASES


@kopf.timer(**JOB, interval=TIMER_INTERVAL_SECONDS, when=_live)
async def job_timer(namespace: str, name: str, pods_by_job: kopf.Index, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.schedule((namespace, name), pods_by_job)


@kopf.on.event(**JOB)
async def job_event(type: str | None, namespace: str, name: str, body: kopf.Body, pods_by_job: kopf.Index,
                    memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        memo.reconciler.metrics.jobs.set(namespace, name, None)
        memo.reconciler.forget((namespace, name))
    elif not memo.reconciler.kube.wrote(namespace, name, body.metadata.get("resourceVersion")):
        # The echo of the operator's own status write brings nothing new: no pass for it.
        memo.reconciler.schedule((namespace, name), pods_by_job)


@kopf.on.event(*PODS, labels=OUR_PODS)
async def pod_event(namespace: str, labels: Mapping[str, str], pods_by_job: kopf.Index, memo: kopf.Memo,
                    **_: Any) -> None:
    job = labels.get(contract.LABEL_JOB_NAME)
    if job:
        memo.reconciler.requeue((namespace, job), pods_by_job, POD_EVENT_BATCH_SECONDS)
