"""The one module that talks to the Kubernetes API: observe a job, carry out a decision.

Everything else is pure. Writes are idempotent: children have deterministic names, a 409 on create
means a previous pass (or a previous operator process) already made it, a 404 on delete means it is
already gone; so a pass interrupted anywhere is simply repeated.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from lorakube import builders, queueing, reconcile, spec
from lorakube_api import contract
from lorakube import status as st
from lorakube.metrics import OPERATOR, OperatorMetrics
from lorakube import pods as pods_mod
from lorakube.pods import PodView, parse_time

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


class Transient(Exception):
    """The API refused for a reason that may pass (quota, our own RBAC, a conflict): try later."""


class Rejected(Exception):
    """The API refused a child the spec asks for, and asking again will not help."""


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or exc.reason or str(exc.status)
    except (ValueError, AttributeError):
        return str(exc.body or exc.reason)


def _classify_create_error(exc: ApiException) -> Exception:
    message = _api_message(exc)
    # A quota may free up, and RBAC on the operator (including granting the trainer's Role, which
    # needs the operator to hold what it grants) is an installation problem, not the job's.
    if exc.status == 403 and ("exceeded quota" in message or "cannot create resource" in message
                              or "attempting to grant RBAC permissions not currently held" in message):
        return Transient(message)
    if exc.status in (400, 403, 422):
        return Rejected(message)
    return Transient(message)


# Every call the operator makes is bounded: (connect, read) seconds. A call that hangs (a dead
# connection, an apiserver that accepted and never answers) fails with a timeout instead of
# holding a job's reconciles until the operator restarts; the caller retries (the Reconciler
# requeues the job). No list or watch goes through this client (Kopf watches), so the read bound
# is far above any answer the apiserver gives to a single request.
REQUEST_TIMEOUT = (5.0, 30.0)
# Connections kept to the API server: above the threads that call at once (handlers.PASS_THREADS
# passes, _CREATES 8 creates).
CONNECTION_POOL_SIZE = 48
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BoundedApiClient(client.ApiClient):
    """An ApiClient whose every request has a timeout (unless the call names its own) and whose
    writes first ask `fence` (a leader that may no longer act raises there, before sending)."""

    def __init__(self, configuration: client.Configuration, timeout: tuple[float, float] = REQUEST_TIMEOUT,
                 fence: Callable[[], None] | None = None) -> None:
        super().__init__(configuration)
        self.timeout = timeout
        self.fence = fence

    def request(self, method: str, url: str, *args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        if self.fence is not None and method.upper() in WRITE_METHODS:
            self.fence()
        return super().request(method, url, *args, _request_timeout=_request_timeout or self.timeout, **kwargs)


def load_api_client(timeout: tuple[float, float] | None = None, fence: Callable[[], None] | None = None,
                    user_agent: str | None = None) -> BoundedApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG, read now:
    the client library reads it only once, at import). `user_agent` names the replica in the
    apiserver's logs (the field manager the apiserver derives from it is the part before the
    first `/`)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    # No silent retries inside urllib3: they would multiply the bound; the callers retry.
    configuration.retries = False
    # Room for every thread that may call at once (the passes' threads and _CREATES): the default
    # (5 per CPU: 10 on 2 cores) made urllib3 discard connections under load, and every new one
    # costs a TLS handshake on both ends.
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    api = BoundedApiClient(configuration, timeout or REQUEST_TIMEOUT, fence)
    if user_agent:
        api.user_agent = user_agent
    return api


def api_problem(api: client.ApiClient) -> str | None:
    """None when the API server answers this client and serves the LoRATrainingJob API (the CRD
    is installed); else what is wrong, for the replica's /readyz."""
    version = f"{contract.API_GROUP}/{contract.API_VERSION}"
    try:
        client.CustomObjectsApi(api).get_api_resources(contract.API_GROUP, contract.API_VERSION)
    except ApiException as exc:
        if exc.status == 404:
            return f"the API server does not serve {version}: install the CRD {contract.PLURAL}.{contract.API_GROUP}"
        return f"the API server answered {exc.status} to GET /apis/{version}: {_api_message(exc)}"
    except Exception as exc:  # noqa: BLE001 - a refused connection, a timeout, a TLS error: say which
        return f"cannot reach the API server: {exc}"
    return None


# How long a pod this operator created counts as present while the pod index does not show it yet
# (the watch is usually a fraction of a second behind; see Expectations).
EXPECTATION_SECONDS = 60.0

# A job's headless Service, once created or seen, is read again only after this long: no watch
# tells the operator that someone deleted it, so it is looked for as often as the timer looks
# (handlers.TIMER_INTERVAL_SECONDS), not on every pass a pod event starts.
SERVICE_RECHECK_SECONDS = 10.0

JobKey = tuple[str, str]


class Expectations:
    """What this operator's own writes did that its watches may not show yet, per job.

    A pass that creates pods writes the job's status too, and the echo of either can start the
    next pass before the pod index holds the new pods; that pass would create them again (409).
    So the pods a pass created count as present (`merge`) until the index shows them, as
    Kubernetes' own controllers do with their expectations; after EXPECTATION_SECONDS without
    seeing one (a watch gap), the next pass asks the API again (a create that adopts on 409).
    Deletions likewise: a pod this operator asked to delete counts as being deleted (the view the
    DELETE answered with, keyed by the pod's uid since names repeat across attempts) until the
    index shows it terminating or it is gone, so the passes of a gang restart send one DELETE per
    pod; after the same EXPECTATION_SECONDS a pod the index still shows alive is deleted again.
    The resourceVersion of the job's last status write lets the handlers skip that write's echo.
    """

    def __init__(self, ttl: float = EXPECTATION_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()   # passes of different jobs run in different threads
        self._pods: dict[JobKey, dict[tuple[str, int], tuple[PodView, float]]] = {}
        self._deleted: dict[JobKey, dict[str, tuple[PodView, float]]] = {}   # by pod uid
        self._written: dict[JobKey, str] = {}
        self._services: dict[tuple[str, str], float] = {}   # (namespace, name) -> when known to exist

    def service_known(self, namespace: str, name: str) -> bool:
        with self._lock:
            since = self._services.get((namespace, name))
            return since is not None and self.clock() - since < SERVICE_RECHECK_SECONDS

    def service_exists(self, namespace: str, name: str, exists: bool) -> None:
        with self._lock:
            if exists:
                self._services[(namespace, name)] = self.clock()
            else:
                self._services.pop((namespace, name), None)

    def created(self, key: JobKey, view: PodView) -> None:
        with self._lock:
            self._pods.setdefault(key, {})[(view.name, view.attempt)] = (view, self.clock())

    def expected(self, key: JobKey, name: str, attempt: int) -> PodView | None:
        """The view of a pod this operator created that the index has not shown yet, if any."""
        with self._lock:
            found = self._pods.get(key, {}).get((name, attempt))
        return found[0] if found else None

    def deleted(self, key: JobKey, view: PodView) -> None:
        """A pod this operator deleted (`view`: as the DELETE answered, or as last seen marked
        deleting when the API said it was already gone)."""
        if view.uid is None:
            return
        with self._lock:
            self._deleted.setdefault(key, {})[view.uid] = (view, self.clock())

    def merge(self, key: JobKey, views: Iterable[PodView]) -> tuple[PodView, ...]:
        """The indexed views plus the created pods the index does not show yet, with the pods
        this operator deleted shown as deleting until the index does."""
        views = tuple(views)
        seen = {(v.name, v.attempt, v.owner_uid) for v in views}
        now = self.clock()
        with self._lock:
            pending = self._pods.get(key, {})
            for ident, (view, since) in list(pending.items()):
                if (view.name, view.attempt, view.owner_uid) in seen or now - since > self.ttl:
                    del pending[ident]
            if not pending:
                self._pods.pop(key, None)
            merged = views + tuple(view for view, _ in pending.values())
            deleted = self._deleted.get(key, {})
            present = {v.uid for v in merged if v.uid is not None}
            indexed = {v.uid: v for v in views if v.uid is not None}
            for uid, (asked, since) in list(deleted.items()):
                # Gone, or the index shows this deletion (its view is then as new), or no sign of
                # it for too long (a lost watch event or a lost DELETE): the index decides again.
                if uid not in present or _shows_deletion(indexed.get(uid), asked) or now - since > self.ttl:
                    del deleted[uid]
            if not deleted:
                self._deleted.pop(key, None)
            return tuple(deleted[v.uid][0] if v.uid in deleted else v for v in merged)

    def wrote(self, key: JobKey, resource_version: str | None) -> None:
        with self._lock:
            if resource_version:
                self._written[key] = resource_version

    def is_own_write(self, key: JobKey, resource_version: str | None) -> bool:
        with self._lock:
            return resource_version is not None and self._written.get(key) == resource_version

    def forget(self, key: JobKey) -> None:
        with self._lock:
            self._pods.pop(key, None)
            self._deleted.pop(key, None)
            self._written.pop(key, None)
            self._services.pop(key, None)   # the Service has the job's name


def _shows_deletion(indexed: PodView | None, asked: PodView) -> bool:
    """Whether the index's view of a pod reflects the deletion the operator asked for: it is
    being deleted, with a grace period no longer than the one asked (a grace period only ever
    shortens, so a forced deletion, grace 0, is seen only once the index shows grace 0)."""
    if indexed is None or not indexed.deleting:
        return False
    return (asked.deletion_grace_seconds is None or indexed.deletion_grace_seconds is None
            or indexed.deletion_grace_seconds <= asked.deletion_grace_seconds)


@dataclasses.dataclass
class Kube:
    api: client.ApiClient
    # Counts the pods really created/deleted and what each written decision reported.
    metrics: OperatorMetrics = dataclasses.field(default_factory=lambda: OPERATOR)
    expectations: Expectations = dataclasses.field(default_factory=Expectations)

    def wrote(self, namespace: str, name: str, resource_version: str | None) -> bool:
        """Whether this version of the job is the one the operator's last status write made."""
        return self.expectations.is_own_write((namespace, name), resource_version)

    def forget_job(self, namespace: str, name: str) -> None:
        self.expectations.forget((namespace, name))

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        return client.RbacAuthorizationV1Api(self.api)

    # --- the job --------------------------------------------------------------------------

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(
                contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_job_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        written = self.custom.patch_namespaced_custom_object_status(
            contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, name,
            {"status": dict(patch)}, _content_type=MERGE_PATCH)
        version = (written or {}).get("metadata", {}).get("resourceVersion") if isinstance(written, dict) else None
        self.expectations.wrote((namespace, name), version)

    def delete_job(self, namespace: str, name: str) -> None:
        self._delete_custom(contract.API_GROUP, contract.API_VERSION, namespace, contract.PLURAL, name)

    def _delete_custom(self, group: str, version: str, namespace: str, plural: str, name: str) -> None:
        """Delete a custom object; one that is already gone is what the caller wanted."""
        try:
            self.custom.delete_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # --- children -------------------------------------------------------------------------

    def service_exists(self, namespace: str, name: str) -> bool:
        if self.expectations.service_known(namespace, name):
            return True
        exists = _exists(self.core.read_namespaced_service, namespace, name)
        self.expectations.service_exists(namespace, name, exists)
        return exists

    def service_account_exists(self, namespace: str, name: str) -> bool:
        return _exists(self.core.read_namespaced_service_account, namespace, name)

    def create(self, manifest: Mapping[str, Any]) -> bool:
        """Create a child; False when it already exists (made by an earlier pass: adopt it)."""
        namespace = manifest["metadata"]["namespace"]
        create, read = {
            "Pod": (self.core.create_namespaced_pod, None),
            "Service": (self.core.create_namespaced_service, None),
            "ServiceAccount": (self.core.create_namespaced_service_account,
                               self.core.read_namespaced_service_account),
            "Role": (self.rbac.create_namespaced_role, self.rbac.read_namespaced_role),
            "RoleBinding": (self.rbac.create_namespaced_role_binding, self.rbac.read_namespaced_role_binding),
        }[manifest["kind"]]
        try:
            made = create(namespace, dict(manifest))
            if manifest["kind"] == "Pod":
                self.metrics.pods_created.labels(namespace).inc()
                self._expect(manifest, made)
            elif manifest["kind"] == "Service":
                self.expectations.service_exists(namespace, manifest["metadata"]["name"], True)
            return True
        except ApiException as exc:
            if exc.status != 409:
                raise _classify_create_error(exc) from exc
        if read is not None:
            _check_owner(manifest, read(manifest["metadata"]["name"], namespace))
        return False

    def _expect(self, manifest: Mapping[str, Any], made: Any) -> None:
        """Remember a pod just created (see Expectations), as the API server returned it."""
        body = self.api.sanitize_for_serialization(made) if made is not None else dict(manifest)
        view = pods_mod.from_body(body)
        job = (manifest["metadata"].get("labels") or {}).get(contract.LABEL_JOB_NAME)
        if view is not None and job:
            self.expectations.created((manifest["metadata"]["namespace"], job), view)

    def delete_pod(self, namespace: str, name: str, force: bool = False, job: str | None = None,
                   seen: PodView | None = None) -> bool:
        """Delete a pod; `force` (grace 0) removes the object without waiting for its kubelet.
        False when it was already gone. With the job's name and the pod's view, the deletion is
        remembered (see Expectations) so the next passes do not ask again."""
        try:
            answer = self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0 if force else None)
        except ApiException as exc:
            if exc.status != 404:
                raise
            answer = None
        if answer is not None:
            self.metrics.pods_deleted.labels(namespace).inc()
        if job and seen is not None:
            body = self.api.sanitize_for_serialization(answer) if answer is not None else None
            view = pods_mod.from_body(body) if isinstance(body, dict) else None
            # The answer is the pod as deleted (deletionTimestamp set). Without one (already gone:
            # 404; or removed at once) the pod is shown deleting until the index drops it.
            if view is None or view.uid != seen.uid or not view.deleting:
                view = dataclasses.replace(seen, deleting=True,
                                           deletion_grace_seconds=0 if force else seen.deletion_grace_seconds)
            self.expectations.deleted((namespace, job), view)
        return answer is not None

    def node_state(self, name: str) -> str:
        """Ready, NotReady (its Ready condition is False or Unknown) or Missing (the Node object is
        gone); Unknown when it cannot be read, which never leads to a force deletion."""
        try:
            node = self.core.read_node(name)
        except ApiException as exc:
            if exc.status == 404:
                return reconcile.NODE_MISSING
            log.warning("cannot read node %s: %s", name, _api_message(exc))
            return reconcile.NODE_UNKNOWN
        conditions = (node.status.conditions if node.status else None) or []
        ready = next((c for c in conditions if c.type == "Ready"), None)
        return reconcile.NODE_READY if ready is not None and ready.status == "True" else reconcile.NODE_NOT_READY

    def get_workload(self, namespace: str, name: str) -> queueing.WorkloadView | None:
        """The Kueue Workload of a pod group; None when it does not exist (yet) or cannot be read
        (then the job still says Queued, without Kueue's reason, and the log says why)."""
        try:
            body = self.custom.get_namespaced_custom_object(
                queueing.WORKLOAD_GROUP, queueing.WORKLOAD_VERSION, namespace, queueing.WORKLOAD_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("cannot read Kueue workload %s/%s: %s", namespace, name, _api_message(exc))
            return None
        return queueing.workload_from_body(body)

    def delete_workload(self, namespace: str, name: str) -> None:
        self._delete_custom(queueing.WORKLOAD_GROUP, queueing.WORKLOAD_VERSION, namespace, queueing.WORKLOAD_PLURAL,
                            name)

    def log_tail(self, namespace: str, name: str, lines: int) -> str | None:
        try:
            # The raw body, decoded here: kubernetes-client 36.0.x hands back the repr of the bytes
            # (b'...\\n') as the "text" of a log (kubernetes-client/python#2596).
            response = self.core.read_namespaced_pod_log(
                name, namespace, container=contract.TRAINER_CONTAINER, tail_lines=lines, _preload_content=False)
            text = response.data.decode("utf-8", errors="replace")
        except ApiException as exc:
            log.info("no log tail for pod %s/%s: %s", namespace, name, _api_message(exc))
            return None
        return text.rstrip("\n") or None


# --- observe and act ------------------------------------------------------------------------


def job_ref(body: Mapping[str, Any]) -> spec.JobRef:
    meta = body["metadata"]
    return spec.JobRef(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def observe(kube: Kube, body: Mapping[str, Any], pods: Iterable[PodView], now: dt.datetime) -> reconcile.Observation:
    """Everything `decide` reads, from a fresh job body and the indexed pods."""
    job = job_ref(body)
    meta = body["metadata"]
    status = body.get("status") or {}
    pods = tuple(pods)
    try:
        parsed, error = spec.parse_job(job.name, body.get("spec"), meta.get("labels")), None
    except spec.InvalidSpec as exc:
        parsed, error = None, exc
    sa_exists = None
    if parsed is not None and status.get("phase") not in st.TERMINAL_PHASES:
        attempt = reconcile.current_attempt(status)
        present = {p.rank for p in pods if p.owner_uid == job.uid and p.attempt == attempt}
        # The job's own account is the operator's to create; only a user-named one must exist.
        if parsed.resources.service_account_name and len(present) < parsed.resources.num_nodes:
            sa_exists = kube.service_account_exists(job.namespace, parsed.resources.service_account_name)
    tails = {name: kube.log_tail(job.namespace, name, reconcile.LOG_TAIL_LINES)
             for name in reconcile.pods_needing_log_tail(status, pods, job.uid, parsed, now)}
    nodes = {name: kube.node_state(name) for name in reconcile.nodes_to_check(status, pods, job.uid, now)}
    workload_name = reconcile.workload_to_read(status, parsed, pods, job)
    workload = kube.get_workload(job.namespace, workload_name) if workload_name else None
    return reconcile.Observation(
        job=job,
        generation=meta.get("generation"),
        spec=parsed,
        spec_error=error,
        status=status,
        pods=pods,
        service_exists=kube.service_exists(job.namespace, job.name),
        now=now,
        deleting=bool(meta.get("deletionTimestamp")),
        service_account_exists=sa_exists,
        log_tails={k: v for k, v in tails.items() if v},
        node_states=nodes,
        created_at=parse_time(meta.get("creationTimestamp")),
        workload=workload,
    )


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a pass leaves for the handler: the job body (Events attach to it), the Events to
    post, when to look again (None: the timer and the watch triggers suffice) and the job's
    phase after the pass (None: the job is gone), which the jobs-by-phase metric shows."""

    body: Mapping[str, Any] | None = None
    events: tuple[reconcile.Event, ...] = ()
    requeue_after: float | None = None
    phase: str | None = None


# A refusal that may pass (quota, our own RBAC): look again after this long.
TRANSIENT_RETRY_SECONDS = 15.0


def act(kube: Kube, obs: reconcile.Observation, decision: reconcile.Decision) -> Outcome:
    """Carry a decision out. Status first: a new attempt number or a terminal phase is on record
    before any pod of that attempt is created or any pod is deleted for it."""
    job = obs.job
    events = list(decision.events)
    if decision.status_patch:
        try:
            kube.patch_job_status(job.namespace, job.name, decision.status_patch)
        except ApiException as exc:
            if exc.status not in (400, 422):
                raise
            return _status_refused(kube, obs, exc)
    kube.metrics.status_written(decision.gang_restart, decision.pods_running)
    phase = _phase(obs, decision.status_patch)
    created: list[str] = []
    try:
        # The pods' ServiceAccount must exist before them (admission refuses a pod without it);
        # the Role and RoleBinding go first too, so a pod never runs without its rights.
        for manifest in decision.create_access:
            kube.create(manifest)
        service = [decision.create_service] if decision.create_service else []
        _create_together(kube, service + list(decision.create_pods), created)
    except Rejected as exc:
        failed = reconcile.rejected(obs, _describe(decision), str(exc))
        kube.patch_job_status(job.namespace, job.name, failed.status_patch)
        # Remembered as deleted like any other deletion (as created: the index may not show
        # them yet), or the failed job's next pass would see them alive and delete them again.
        attempts = {m["metadata"]["name"]: int(m["metadata"]["labels"][contract.LABEL_ATTEMPT])
                    for m in decision.create_pods}
        for name in created:
            seen = kube.expectations.expected((job.namespace, job.name), name, attempts[name])
            kube.delete_pod(job.namespace, name, job=job.name, seen=seen)
        return _outcome(obs, events + _created(decision, created) + list(failed.events),
                        phase=_phase(obs, failed.status_patch))
    except Transient as exc:
        events += _created(decision, created)
        events.append(reconcile.Event("Warning", "CreateFailed",
                                      f"creating {_describe(decision)} failed, retrying: {exc}"))
        return _outcome(obs, events, TRANSIENT_RETRY_SECONDS, phase)
    events += _created(decision, created)
    # The views the decision was made on: each deletion is remembered by the pod's uid.
    views = {p.name: p for p in sorted(obs.pods, key=lambda p: not p.deleting) if p.owner_uid == job.uid and p.uid}
    for name in decision.delete_pods:
        kube.delete_pod(job.namespace, name, job=job.name, seen=views.get(name))
    for name in decision.force_delete_pods:
        kube.delete_pod(job.namespace, name, force=True, job=job.name, seen=views.get(name))
    for name in decision.delete_workloads:
        kube.delete_workload(job.namespace, name)
    if decision.delete_job:
        kube.delete_job(job.namespace, job.name)
        phase = None
    return _outcome(obs, events, decision.requeue_after, phase)


def _phase(obs: reconcile.Observation, patch: Mapping[str, Any]) -> str:
    """The job's phase once `patch` is written (a patch holds only what changed)."""
    return patch.get("phase") or obs.status.get("phase") or st.PENDING


def _status_refused(kube: Kube, obs: reconcile.Observation, exc: ApiException) -> Outcome:
    """The API server refused the status write (422: the schema, 400: a malformed patch). The
    same pass would compute the same patch again, so instead of retrying it every few seconds the
    job fails with a small status the server accepts, and the refusal is logged and posted."""
    job = obs.job
    message = _api_message(exc)
    log.error("the API server refused the status of %s/%s (%s): %s", job.namespace, job.name, exc.status,
              st.bounded(message))
    fallback = reconcile.status_refused(obs, message)
    kube.patch_job_status(job.namespace, job.name, fallback.status_patch)
    return _outcome(obs, list(fallback.events), phase=_phase(obs, fallback.status_patch))


def _outcome(obs: reconcile.Observation, events: Sequence[reconcile.Event],
             requeue_after: float | None = None, phase: str | None = None) -> Outcome:
    """The Outcome of a pass, with every Event message bounded (some quote the API server)."""
    bounded = tuple(reconcile.Event(e.type, e.reason, st.bounded(e.message, st.EVENT_MESSAGE_LIMIT)) for e in events)
    return Outcome(obs_body(obs), bounded, requeue_after, phase)


def _created(decision: reconcile.Decision, created: list[str]) -> list[reconcile.Event]:
    """An Event naming the pods this pass really created (a 409 means an earlier pass did)."""
    if not created:
        return []
    attempt = decision.create_pods[0]["metadata"]["labels"][contract.LABEL_ATTEMPT]
    return [reconcile.Event("Normal", "PodsCreated", f"created {', '.join(created)} (attempt {attempt})")]


def obs_body(obs: reconcile.Observation) -> dict[str, Any]:
    """The smallest body Kopf needs to attach an Event to the job."""
    return {
        "apiVersion": f"{contract.API_GROUP}/{contract.API_VERSION}",
        "kind": contract.KIND,
        "metadata": {"name": obs.job.name, "namespace": obs.job.namespace, "uid": obs.job.uid},
    }


# A gang's pods (and its Service) are created concurrently: one after another, a 4-pod job's last
# pod waited for three round trips more, which under load was most of apply -> all pods created.
_CREATES = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="lorakube-create")


def _create_together(kube: Kube, manifests: Sequence[Mapping[str, Any]], created: list[str]) -> None:
    """Create all at once; the names of the pods really created go into `created` (also when one
    create fails: the caller deletes them on a rejection), then the first refusal is raised."""
    futures = [(manifest, _CREATES.submit(kube.create, manifest)) for manifest in manifests]
    refused: Exception | None = None
    for manifest, future in futures:
        try:
            if future.result() and manifest["kind"] == "Pod":
                created.append(manifest["metadata"]["name"])
        except (Rejected, Transient) as exc:
            refused = refused or exc
    if refused is not None:
        raise refused


def _check_owner(manifest: Mapping[str, Any], existing: Any) -> None:
    """An existing trainer account, Role or RoleBinding is adopted only when it is this job's: one
    left by an earlier job of the same name is about to be garbage-collected (and its rules would
    vanish under the running pods), and one made by someone else is not ours to bind."""
    uid = manifest["metadata"]["ownerReferences"][0]["uid"]
    owners = existing.metadata.owner_references or []
    if not any(owner.uid == uid for owner in owners):
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        raise Transient(f"{kind} {name} already exists and does not belong to this job: waiting "
                        f"for it to go (an earlier job of the same name is being deleted), or delete "
                        f"it if someone else made it")


def _describe(decision: reconcile.Decision) -> str:
    names = [m["metadata"]["name"] for m in decision.create_pods]
    return f"pod(s) {', '.join(names)}" if names else "the job's Service"


def reconcile_job(kube: Kube, namespace: str, name: str, pods: Iterable[PodView],
                  config: builders.OperatorConfig, now: dt.datetime) -> Outcome:
    """One pass for one job: fresh GET, observe, decide, act."""
    body = kube.get_job(namespace, name)
    if body is None:
        return Outcome()
    obs = observe(kube, body, kube.expectations.merge((namespace, name), pods), now)
    return act(kube, obs, reconcile.decide(obs, config))


def _exists(read: Callable[[str, str], Any], namespace: str, name: str) -> bool:
    """True when the read succeeds, False on 404; any other API error propagates."""
    try:
        read(name, namespace)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
