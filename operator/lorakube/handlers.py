"""Kopf handlers: thin triggers for one level-based reconcile per job.

A job is reconciled when it changes, when one of its pods changes, on a timer while it is live,
and at the time its last decision asked for (backoff, deadlines). Each trigger only names the job;
`Reconciler` coalesces triggers so at most one pass per job runs at a time, and the pass itself
(kube.reconcile_job) reads the job fresh, so triggers may arrive in any order or twice.

Every handler returns None: Kopf stores a handler's return value in the object's status, and the
status belongs to the operator's own fields and the trainer's progress.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from lorakube import builders, contract, kube, pods
from lorakube import status as st

log = logging.getLogger(__name__)

JOB = {"group": contract.API_GROUP, "version": contract.API_VERSION, "plural": contract.PLURAL}
OUR_PODS = {contract.LABEL_MANAGED_BY: contract.MANAGED_BY}
# The safety net under the event triggers; decisions that need an earlier look ask for it.
TIMER_INTERVAL_SECONDS = float(os.environ.get("LORAKUBE_RECONCILE_INTERVAL_SECONDS", "10"))
ERROR_RETRY_SECONDS = 5.0

Key = tuple[str, str]


class Reconciler:
    """Runs reconcile passes: one at a time per job, a trigger during a pass causes one more."""

    def __init__(self, client: kube.Kube, config: builders.OperatorConfig) -> None:
        self.kube = client
        self.config = config
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._requeues: dict[Key, asyncio.TimerHandle] = {}

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
        views = list(index.get(key, []))
        now = dt.datetime.now(dt.timezone.utc)
        try:
            outcome = await asyncio.to_thread(kube.reconcile_job, self.kube, namespace, name, views, self.config, now)
        except Exception as exc:  # noqa: BLE001 - any API failure: log and look again shortly
            log.warning("reconciling %s/%s failed, retrying in %ss: %s", namespace, name, ERROR_RETRY_SECONDS, exc)
            self._requeue(key, index, ERROR_RETRY_SECONDS)
            return
        for event in outcome.events:
            kopf.event(outcome.body, type=event.type, reason=event.reason, message=event.message)
            log.info("%s/%s: %s: %s", namespace, name, event.reason, event.message)
        if outcome.requeue_after is not None:
            self._requeue(key, index, outcome.requeue_after)

    def _requeue(self, key: Key, index: Any, delay: float) -> None:
        loop = asyncio.get_running_loop()
        previous = self._requeues.get(key)
        if previous is not None and previous.when() <= loop.time() + delay:
            return  # an earlier look is already booked
        if previous is not None:
            previous.cancel()
        self._requeues[key] = loop.call_later(
            delay, lambda: asyncio.ensure_future(self._fire(key, index)))

    async def _fire(self, key: Key, index: Any) -> None:
        self._requeues.pop(key, None)
        await self.trigger(key, index)


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
    # Reconnect watches regularly so a silently dropped connection costs minutes, not hours.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    memo.reconciler = Reconciler(kube.Kube(kube.load_api_client()), builders.OperatorConfig.from_env())


@kopf.index("pods", labels=OUR_PODS)
def pods_by_job(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> Any:
    view = pods.from_body(body)
    job = labels.get(contract.LABEL_JOB_NAME)
    return None if view is None or not job else {(namespace, job): view}


def _live(status: Mapping[str, Any], **_: Any) -> bool:
    # Finished jobs need no timer; Kopf drops its finalizer from them, so deleting one never
    # waits for the operator.
    return status.get("phase") not in st.TERMINAL_PHASES


@kopf.timer(**JOB, interval=TIMER_INTERVAL_SECONDS, when=_live)
async def job_timer(namespace: str, name: str, pods_by_job: kopf.Index, memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.trigger((namespace, name), pods_by_job)


@kopf.on.event(**JOB)
async def job_event(type: str | None, namespace: str, name: str, pods_by_job: kopf.Index, memo: kopf.Memo,
                    **_: Any) -> None:
    if type != "DELETED":
        await memo.reconciler.trigger((namespace, name), pods_by_job)


@kopf.on.event("pods", labels=OUR_PODS)
async def pod_event(namespace: str, labels: Mapping[str, str], pods_by_job: kopf.Index, memo: kopf.Memo,
                    **_: Any) -> None:
    job = labels.get(contract.LABEL_JOB_NAME)
    if job:
        await memo.reconciler.trigger((namespace, job), pods_by_job)
