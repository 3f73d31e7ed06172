"""The node daemon: one thread owns all pod state and reacts to queued events.

Informers, container supervisors and the heartbeat run on their own threads but only ever
put events on the queue (or make API calls that need no shared state), so every decision
about a pod is made on the main loop without locks. The slow work that needs no shared state
runs off the loop so that many pods start at once: a pool sets up sandboxes and volumes and
hands the result back as an event, and a keyed writer sends statuses, events and deletions
(in order per pod) while the loop goes on.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import events, hostregistry, hostsfile, network, podspec
from .forwarder import Forwarder
from .informer import Informer
from .kubeapi import ApiError, KubeApi
from .kubelet_server import KubeletServer
from .layout import StateLayout
from .nodes import NodeRegistry
from .nodespec import GPU_RESOURCE, NodeSpec
from .podspec import NotReadyYet, PodSpecError
from .prober import ProbeWorker
from .probes import Probe, ProbeTracker, initial_result, parse_probes
from .restarts import RESTART_POLICIES, BackOff, BackOffEntry, backoff_message, should_restart
from .runtime import ContainerProcess, Exit, LaunchSpec
from .status import ContainerRun, PodRun, now_rfc3339, reason_for_exit, status_patch
from .volumes import PodVolumes, VolumeBuilder, container_mounts
from .writer import KeyedWriter

log = logging.getLogger(__name__)

APISERVER_PORT_IN_CLUSTER = 6443
HEARTBEAT_SECONDS = 10.0
RETRY_SECONDS = 2.0
# Dirty pod statuses are sent at least this often, however busy the event queue is (waiting for
# an empty queue starved them for tens of seconds while hundreds of pods started).
FLUSH_SECONDS = 0.2
# Pods whose sandbox and volumes are set up at once: each mostly waits on `ip` and the
# apiserver, so a few in parallel overlap that waiting without swamping a small host.
SETUP_WORKERS = 8
# Threads sending statuses and deletions (each pod's in order), and events (each pod's in order;
# apart, so that a pod's events never delay its status).
WRITER_THREADS = 6
EVENT_THREADS = 2
WRITER_DRAIN_SECONDS = 30.0
DELETE_ATTEMPTS = 3
SHUTDOWN_GRACE_SECONDS = 10.0
DEFAULT_GRACE_SECONDS = 30
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOG_TAIL_BYTES = 2048
NODE_RESTART_MESSAGE = "the process node restarted; the container could not be located"
SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."
PREVIOUS_LOG_SUFFIX = ".previous"  # <container>.log.previous: not matched by *.log


@dataclass
class PodRuntime:
    pod: dict[str, Any]
    run: PodRun
    node: NodeSpec
    dir: Path
    log_dir: Path
    net: network.PodNet | None = None
    volumes: PodVolumes | None = None
    preparing: bool = False  # a setup worker is making its sandbox/volumes right now
    hosts: str | None = None  # the /etc/hosts content last written
    processes: dict[str, ContainerProcess] = field(default_factory=dict)
    gpus: list[int] = field(default_factory=list)
    next_retry: float = 0.0
    deleting: bool = False
    gone: bool = False
    kill_deadline: float | None = None
    torn_down: bool = False
    dirty: bool = True
    restart_policy: str = "Never"
    config_error: str | None = None  # a spec the node cannot run, on a pod that restarts
    # Per container name: restart back-off, when a waiting restart is due, the deadline of
    # a liveness kill's SIGKILL, its probes (parsed, counted, running) and its launch spec
    # (exec probes run through the same launcher, with the same mounts and env).
    backoffs: dict[str, BackOffEntry] = field(default_factory=dict)
    restart_at: dict[str, float] = field(default_factory=dict)
    kill_deadlines: dict[str, float] = field(default_factory=dict)
    probes: dict[str, dict[str, Probe]] = field(default_factory=dict)
    trackers: dict[str, dict[str, ProbeTracker]] = field(default_factory=dict)
    workers: dict[str, list[ProbeWorker]] = field(default_factory=dict)
    launch_specs: dict[str, LaunchSpec] = field(default_factory=dict)
    container_started: dict[str, float] = field(default_factory=dict)

    @property
    def uid(self) -> str:
        return self.run.uid

    def running(self) -> list[ContainerProcess]:
        return [p for p in self.processes.values() if not p.exited.is_set()]


@dataclass(frozen=True)
class DaemonConfig:
    kubeconfig: Path
    state_dir: Path
    nodes: list[NodeSpec]
    path_prefix: list[Path]
    image_env: dict[str, str]
    kubelet_port: int = 10250
    kubelet_client_ca: Path | None = None
    # Kubelet's 10 s doubling to 5 min; tests shrink it rather than sleep through it.
    restart_backoff: BackOff = field(default_factory=BackOff)
    setup_workers: int = SETUP_WORKERS


class NodeDaemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.layout = StateLayout(config.state_dir)
        self.api = KubeApi(config.kubeconfig)
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.stop_event = threading.Event()
        self.nodes = {n.name: n for n in config.nodes}
        self.pods: dict[str, dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.runs: dict[str, PodRuntime] = {}
        self.gpu_in_use: dict[str, set[int]] = {n.name: set() for n in config.nodes}
        self.host_ip = str(hostregistry.GATEWAY)
        self.dns_dirty = True
        self.stopping = False
        self.builders = {
            n.name: VolumeBuilder(self.api, self.layout.pvcs, n.resources()) for n in config.nodes
        }
        self.setup_pool = concurrent.futures.ThreadPoolExecutor(config.setup_workers,
                                                                thread_name_prefix="setup")
        self.writer = KeyedWriter(WRITER_THREADS)
        self.event_writer = KeyedWriter(EVENT_THREADS, name="events")
        self.cluster_records: list[hostsfile.Record] = []

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        with hostregistry.network_lock():
            network.ensure_bridge()
        # One listener on the gateway serves every daemon on the host (whoever binds first);
        # the others take over on their tick if it goes away.
        self.forwarder = Forwarder((self.host_ip, APISERVER_PORT_IN_CLUSTER),
                                   hostregistry.apiserver_for_pod_ip)
        self.forwarder.try_listen()
        client_ca = (self.config.kubelet_client_ca.read_bytes() if self.config.kubelet_client_ca
                     else self.api.endpoint.ca_pem)
        self.kubelet = KubeletServer(self.host_ip, self.config.kubelet_port, self.layout.certs,
                                     self.locate_log, client_ca)
        self.kubelet.start()
        self.registry = NodeRegistry(self.api, self.config.nodes, self.host_ip, self.kubelet.port)
        self.registry.register()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        Informer(self.api, "/api/v1/pods", lambda t, o: self.events.put(("pod", t, o)),
                 self.stop_event).start()
        Informer(self.api, "/api/v1/services", lambda t, o: self.events.put(("service", t, o)),
                 self.stop_event).start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.events.put(("stop",)))
        log.info("process node up: nodes=%s kubelet port=%d", sorted(self.nodes), self.kubelet.port)
        self.layout.ready_marker.write_text(str(self.kubelet.port))
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        next_tick = next_flush = 0.0
        while True:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                event = None
            if event is not None:
                if event[0] == "stop":
                    return
                self._guard(self._dispatch, event)
            now = time.monotonic()
            if now >= next_tick:
                self._guard(self._tick)
                self._guard(self.forwarder.try_listen)
                next_tick = time.monotonic() + 1.0
            if self.events.empty() or now >= next_flush:
                self._guard(self._flush)
                next_flush = time.monotonic() + FLUSH_SECONDS

    def _guard(self, func: Any, *args: Any) -> None:
        try:
            func(*args)
        except ApiError as exc:
            log.warning("API error (will retry): %s", exc)
        except Exception:
            log.exception("node daemon step failed; continuing")

    def _heartbeat_loop(self) -> None:
        while not self.stop_event.wait(HEARTBEAT_SECONDS):
            try:
                self.registry.heartbeat()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)

    def _shutdown(self) -> None:
        log.info("shutting down: terminating pods")
        self.stop_event.set()
        self.stopping = True  # no container may start from here on
        # Sandboxes being made now must be known before teardown, or their devices and IPs
        # would outlive the daemon. (Queued setups return at once now; queued releases run.)
        self.setup_pool.shutdown(wait=True)
        self._drain_prepared()
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        interrupted = [rt for rt in self.runs.values() if not rt.run.terminal() and not rt.gone]
        for rt in self.runs.values():
            for proc in rt.running():
                proc.signal_group(signal.SIGTERM)
        while any(rt.running() for rt in self.runs.values()) and time.monotonic() < deadline:
            self._drain_exits(0.2)
        for rt in self.runs.values():
            for proc in rt.running():
                proc.signal_group(signal.SIGKILL)
        while any(rt.running() for rt in self.runs.values()) and time.monotonic() < deadline + 5:
            self._drain_exits(0.2)
        for rt in interrupted:
            rt.run.phase_override = "Failed"
            rt.run.reason = "Terminated"
            rt.run.message = SHUTDOWN_MESSAGE
            rt.run.disruption = {"type": "DisruptionTarget", "status": "True",
                                 "reason": "TerminationByKubelet", "message": SHUTDOWN_MESSAGE}
            rt.dirty = True
        for rt in self.runs.values():
            rt.preparing = False  # every setup has reported back (drained above)
            self._teardown(rt)
        self._guard(self._flush)
        for writer in (self.writer, self.event_writer):
            if not writer.close(WRITER_DRAIN_SECONDS):
                log.warning("pod statuses or events still unsent after %.0f s; stopping anyway",
                            WRITER_DRAIN_SECONDS)
        self.kubelet.stop()
        self.forwarder.stop()
        with hostregistry.network_lock():
            if not hostregistry.other_daemons(self.config.state_dir):
                network.delete_bridge_if_unused()
        self._guard(self.registry.deregister)
        self.layout.ready_marker.unlink(missing_ok=True)
        log.info("process node stopped")

    def _drain_exits(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        if event[0] in ("exited", "started", "start-failed", "prepared"):
            self._guard(self._dispatch, event)

    def _drain_prepared(self) -> None:
        """At shutdown, once no setup worker runs: take in every sandbox they made (the rest
        of what is queued only matters to a daemon that goes on)."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if event[0] in ("exited", "started", "start-failed", "prepared"):
                self._guard(self._dispatch, event)

    # -- events ---------------------------------------------------------------------------

    def _dispatch(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "pod":
            self._on_pod(event[1], event[2])
        elif kind == "service":
            self._on_service(event[1], event[2])
        elif kind in ("started", "start-failed", "exited"):
            rt = self.runs.get(event[1])
            if rt is not None:
                self._on_container(rt, kind, event[2], event[3])
        elif kind == "probe":
            rt = self.runs.get(event[1])
            if rt is not None and not rt.deleting and not rt.torn_down:
                self._on_probe(rt, *event[2:])
        elif kind == "prepared":
            self._on_prepared(*event[1:])
        elif kind == "status-failed":
            rt = self.runs.get(event[1])
            if rt is not None and not rt.gone:
                rt.dirty = True  # sent again with the next flush

    def _on_service(self, kind: str, obj: Any) -> None:
        if kind == "SYNC":
            self.services = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in obj}
        elif kind == "DELETED":
            self.services.pop((obj["metadata"]["namespace"], obj["metadata"]["name"]), None)
        else:
            self.services[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
        self.dns_dirty = True

    def _on_pod(self, kind: str, obj: Any) -> None:
        self.dns_dirty = True
        if kind == "SYNC":
            self.pods = {p["metadata"]["uid"]: p for p in obj}
            for uid in [u for u in self.runs if u not in self.pods]:
                self._on_pod_gone(self.runs[uid])
            for uid, pod in self.pods.items():
                if pod.get("spec", {}).get("nodeName") in self.nodes:
                    self._reconcile(uid)
            return
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            self.pods.pop(uid, None)
            if uid in self.runs:
                self._on_pod_gone(self.runs[uid])
            else:
                self._forget_logs(obj)
            return
        self.pods[uid] = obj
        if obj.get("spec", {}).get("nodeName") in self.nodes:
            self._reconcile(uid)

    def _reconcile(self, uid: str) -> None:
        pod = self.pods[uid]
        rt = self.runs.get(uid)
        if rt is None:
            self._admit(pod)
            return
        rt.pod = pod
        if pod["metadata"].get("deletionTimestamp") and not rt.deleting:
            self._begin_delete(rt)

    def _admit(self, pod: dict[str, Any]) -> None:
        meta, status = pod["metadata"], pod.get("status", {})
        phase = status.get("phase")
        if meta.get("deletionTimestamp"):  # nothing of it runs here: finish the deletion
            self._delete_object(pod)
            return
        if phase in ("Succeeded", "Failed"):
            return
        if status.get("podIP") or status.get("containerStatuses") or phase == "Running":
            self._fail_lost(pod)
            return
        node = self.nodes[pod["spec"]["nodeName"]]
        run = PodRun(uid=meta["uid"], namespace=meta["namespace"], name=meta["name"])
        spec = pod["spec"]
        for c in spec.get("initContainers") or []:
            run.containers.append(ContainerRun(c["name"], c.get("image", ""), init=True,
                                               waiting_reason="PodInitializing"))
        for c in spec.get("containers") or []:
            reason = "PodInitializing" if spec.get("initContainers") else "ContainerCreating"
            run.containers.append(ContainerRun(c["name"], c.get("image", ""), init=False,
                                               waiting_reason=reason))
        rt = PodRuntime(pod=pod, run=run, node=node, dir=self.layout.pod_dir(meta["uid"]),
                        log_dir=self.layout.log_dir(meta["namespace"], meta["name"], meta["uid"]),
                        restart_policy=spec.get("restartPolicy") or "Always")
        self.runs[rt.uid] = rt
        try:
            if rt.restart_policy not in RESTART_POLICIES:
                raise PodSpecError(f"spec.restartPolicy: {rt.restart_policy!r} is not one of "
                                   f"{', '.join(RESTART_POLICIES)}")
            for cr in run.main_containers:
                rt.probes[cr.name] = parse_probes(pod, cr.name)
        except PodSpecError as exc:
            self._fail_config(rt, str(exc))
            self._maybe_finish(rt)
            return
        self._advance(rt)

    def _fail_lost(self, pod: dict[str, Any]) -> None:
        """A pod this node started before a restart: its processes are gone (they never
        outlive the daemon), so report it as kubelet does for vanished containers."""
        meta = pod["metadata"]
        run = PodRun(uid=meta["uid"], namespace=meta["namespace"], name=meta["name"],
                     phase_override="Failed", reason="NodeRestart", message=NODE_RESTART_MESSAGE,
                     pod_ip=pod["status"].get("podIP"), host_ip=pod["status"].get("hostIP"),
                     start_time=pod["status"].get("startTime"))
        for c in pod["spec"].get("containers") or []:
            cr = ContainerRun(c["name"], c.get("image", ""), init=False)
            cr.terminate(137, "ContainerStatusUnknown", NODE_RESTART_MESSAGE)
            run.containers.append(cr)
        self._patch_status(meta, run.to_status())
        log.info("pod %s/%s was running before a node restart: marked Failed", meta["namespace"],
                 meta["name"])

    # -- pod progress ---------------------------------------------------------------------

    def _advance(self, rt: PodRuntime) -> None:
        if rt.deleting or rt.torn_down or self.stopping or rt.config_error or rt.preparing:
            return  # (while preparing, the worker's result comes back and advances it)
        if rt.net is None or rt.volumes is None:
            rt.preparing = True
            self.setup_pool.submit(self._prepare, rt.uid, rt.pod, rt.node.name, rt.dir,
                                   rt.net is None)
            return
        try:
            self._start_next(rt)
        except NotReadyYet as exc:  # env from a ConfigMap/Secret that is not there (yet)
            if self._set_waiting(rt, "CreateContainerConfigError", str(exc)):
                self._event(rt, "Failed", f"Error: {exc}", warning=True)
            rt.next_retry = time.monotonic() + RETRY_SECONDS
        except PodSpecError as exc:
            self._fail_config(rt, str(exc))
        except ApiError as exc:
            log.warning("pod %s/%s: %s (retrying)", rt.run.namespace, rt.run.name, exc)
            rt.next_retry = time.monotonic() + RETRY_SECONDS
        self._maybe_finish(rt)

    def _prepare(self, uid: str, pod: dict[str, Any], node: str, pod_dir: Path,
                 make_sandbox: bool) -> None:
        """On a setup worker: the pod's sandbox (unless it has one) and volumes. Touches no
        pod state; the result goes back to the loop as a `prepared` event."""
        net = volumes = error = None
        try:
            if not self.stopping:  # else nothing new: the loop tears the pod down
                if make_sandbox:
                    net = self._make_sandbox(uid, pod_dir)
                volumes = self.builders[node].build(pod, pod_dir, self.api.endpoint.ca_pem)
        except Exception as exc:  # judged on the loop, as if raised there
            error = exc
        self.events.put(("prepared", uid, net, volumes, error))

    def _make_sandbox(self, uid: str, pod_dir: Path) -> network.PodNet:
        ip = hostregistry.allocate_ip(self.config.state_dir, uid, network.netns_taken)
        net = network.pod_net_for(ip)
        network.create_pod_net(net)
        (pod_dir / "etc").mkdir(parents=True, exist_ok=True)
        hostsfile.write_in_place(self.layout.resolv_conf(uid), hostsfile.RESOLV_CONF)
        return net

    def _on_prepared(self, uid: str, net: network.PodNet | None, volumes: PodVolumes | None,
                     error: Exception | None) -> None:
        rt = self.runs.get(uid)
        if rt is None or rt.torn_down:
            # Deleted (or the node stopped) while a worker made its sandbox: undo it, devices
            # before the IP (another daemon may take a free IP, and with it these names, at once).
            self._release_sandbox(uid, net)
            if rt is None:
                shutil.rmtree(self.layout.pod_dir(uid), ignore_errors=True)
            else:
                rt.preparing = False
            return
        rt.preparing = False
        if net is not None:
            self._install_sandbox(rt, net)
        if volumes is not None:
            rt.volumes = volumes
        if error is None:
            self._advance(rt)
        elif isinstance(error, NotReadyYet):  # a volume's ConfigMap/Secret/claim is missing
            if self._set_waiting(rt, "ContainerCreating", str(error)):
                self._event(rt, "FailedMount", str(error), warning=True)
            rt.next_retry = time.monotonic() + RETRY_SECONDS
        elif isinstance(error, PodSpecError):
            self._fail_config(rt, str(error))
            self._maybe_finish(rt)
        else:
            log.warning("pod %s/%s: setting up its sandbox or volumes failed: %s (retrying)",
                        rt.run.namespace, rt.run.name, error)
            rt.next_retry = time.monotonic() + RETRY_SECONDS

    def _release_sandbox(self, uid: str, net: network.PodNet | None) -> None:
        """Remove the pod's devices, then free its IP (never the other way round: another
        daemon may take a free IP, and with it these device names, at once). On a setup worker
        (a few `ip` calls per pod held the loop up when hundreds were deleted together), except
        once the node is stopping, when it must be done before the daemon exits."""
        def release() -> None:
            try:
                if net is not None:
                    network.delete_pod_net(net)
                hostregistry.release_ip(self.config.state_dir, uid)
            except Exception:  # the next start's cleanup sweeps what is left
                log.exception("releasing the sandbox of pod %s failed", uid)

        if self.stopping:
            release()
        else:
            self.setup_pool.submit(release)

    def _install_sandbox(self, rt: PodRuntime, net: network.PodNet) -> None:
        rt.net = net
        rt.run.pod_ip = net.ip
        rt.run.host_ip = self.host_ip
        rt.run.start_time = now_rfc3339()
        rt.run.sandbox_ready = True
        rt.gpus = self._allocate_gpus(rt)
        rt.pod = dict(rt.pod, status=dict(rt.pod.get("status", {}), podIP=net.ip,
                                          hostIP=self.host_ip))
        # The records of the last flush: the next one (at most FLUSH_SECONDS away) includes
        # this pod. Recomputing them for every new pod cost O(pods) each, O(pods²) in all.
        self._write_hosts(rt, self.cluster_records)
        self.dns_dirty = True
        rt.dirty = True

    def _allocate_gpus(self, rt: PodRuntime) -> list[int]:
        wanted = 0
        for c in rt.pod["spec"].get("containers") or []:
            limits = c.get("resources", {}).get("limits", {})
            wanted += int(limits.get(GPU_RESOURCE, 0) or 0)
        if not wanted:
            return []
        used = self.gpu_in_use[rt.node.name]
        free = [i for i in range(rt.node.gpus) if i not in used]
        if len(free) < wanted:
            log.warning("pod %s/%s asks for %d GPUs, node %s has %d free; sharing",
                        rt.run.namespace, rt.run.name, wanted, rt.node.name, len(free))
            free = list(range(rt.node.gpus))
        chosen = free[:wanted]
        used.update(chosen)
        return chosen

    def _start_next(self, rt: PodRuntime) -> None:
        containers = {c["name"]: c for c in podspec.all_containers(rt.pod)}
        now = time.monotonic()

        def due(cr: ContainerRun) -> bool:  # waiting, not launched, not backing off
            return (cr.state == "waiting" and cr.name not in rt.processes
                    and rt.restart_at.get(cr.name, 0.0) <= now)

        for cr in rt.run.init_containers:
            if cr.state == "terminated" and cr.exit_code == 0:
                continue
            if due(cr):
                self._start_container(rt, cr, containers[cr.name])
            return  # one init container at a time, in order
        for cr in rt.run.main_containers:
            if due(cr):
                self._start_container(rt, cr, containers[cr.name])

    def _base_env(self, rt: PodRuntime) -> dict[str, str]:
        prefix = ":".join(str(p) for p in self.config.path_prefix)
        # Pods share the host's /tmp (host paths must stay visible), so give each its own
        # TMPDIR: two jobs' temp files never meet.
        tmpdir = rt.dir / "tmp"
        tmpdir.mkdir(parents=True, exist_ok=True)
        env = {"PATH": f"{prefix}:{HOST_PATH}" if prefix else HOST_PATH,
               "HOME": str(Path.home()), "LANG": "C.UTF-8", "TMPDIR": str(tmpdir)}
        env.update(self.config.image_env)
        host, port = self.host_ip, str(APISERVER_PORT_IN_CLUSTER)
        env.update({
            "HOSTNAME": rt.pod["spec"].get("hostname") or rt.run.name,
            "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{host}:{port}",
            "KUBERNETES_PORT_443_TCP": f"tcp://{host}:{port}",
        })
        if rt.gpus or rt.node.gpus:
            visible = ",".join(str(i) for i in rt.gpus)
            env["CUDA_VISIBLE_DEVICES"] = visible
            env["NVIDIA_VISIBLE_DEVICES"] = visible or "void"
        return env

    def _start_container(self, rt: PodRuntime, cr: ContainerRun, container: dict[str, Any]) -> None:
        assert rt.net is not None and rt.volumes is not None
        ns = rt.run.namespace
        builder = self.builders[rt.node.name]

        def lookup_map(kind: str, name: str) -> Mapping[str, str] | None:
            data = builder.object_data(ns, kind, name)
            return None if data is None else {k: v.decode() for k, v in data.items()}

        def lookup_value(kind: str, name: str, key: str) -> str | None:
            data = lookup_map(kind, name)
            return None if data is None else data.get(key)

        env = podspec.container_env(rt.pod, container, self._base_env(rt), lookup_value,
                                    lookup_map, rt.node.resources())
        try:
            argv = podspec.container_argv(container, env)
        except PodSpecError as exc:
            self._event(rt, "Failed", f"Error: {exc}", warning=True, container=cr.name)
            if rt.restart_policy == "Never":
                cr.terminate(128, "CreateContainerConfigError", str(exc))
            else:  # kubelet keeps it waiting; the pod spec cannot change, so no retry
                cr.waiting_reason, cr.waiting_message = "CreateContainerConfigError", str(exc)
                rt.restart_at[cr.name] = float("inf")
            rt.dirty = True
            return
        mounts = container_mounts(container, rt.volumes,
                                  podspec.wants_implicit_sa_mount(rt.pod, container))
        mounts += [
            {"src": str(self.layout.hosts(rt.uid)), "dst": "/etc/hosts", "readOnly": False},
            {"src": str(self.layout.resolv_conf(rt.uid)), "dst": "/etc/resolv.conf",
             "readOnly": False},
        ]
        log_path = rt.log_dir / f"{cr.name}.log"
        if cr.last_terminated is not None and log_path.exists():
            # As kubelet keeps them: `kubectl logs` shows this instance (or, while it backs
            # off, the one that just ended), `--previous` the one before.
            log_path.replace(log_path.with_name(log_path.name + PREVIOUS_LOG_SUFFIX))
        spec = LaunchSpec(netns=rt.net.netns_path,
                          hostname=rt.pod["spec"].get("hostname") or rt.run.name,
                          mounts=mounts, cwd=container.get("workingDir") or "/", argv=argv, env=env)
        uid, name = rt.uid, cr.name
        proc = ContainerProcess(
            spec, rt.dir / f"launch-{name}.json", log_path,
            self.layout.process_record(uid, name),
            on_started=lambda: self.events.put(("started", uid, name, None)),
            on_start_failed=lambda msg: self.events.put(("start-failed", uid, name, msg)),
            on_exit=lambda result: self.events.put(("exited", uid, name, result)),
        )
        rt.processes[name] = proc
        rt.restart_at.pop(name, None)
        rt.launch_specs[name] = spec
        cr.begin_instance(proc.pid)

    def _on_container(self, rt: PodRuntime, kind: str, name: str, detail: Any) -> None:
        cr = next(c for c in rt.run.containers if c.name == name)
        if kind != "exited":  # the launcher has read its spec (which holds the env's secrets)
            (rt.dir / f"launch-{name}.json").unlink(missing_ok=True)
        if kind == "started":
            if cr.state == "waiting":
                cr.state = "running"
                cr.started_at = now_rfc3339()
                self._event(rt, "Started", f"Started container {name}", container=name)
                if not rt.deleting:
                    self._start_probes(rt, cr)
        else:
            if kind == "start-failed":
                cr.terminate(128, "StartError", str(detail))
                self._event(rt, "Failed", f"Error: {detail}", warning=True, container=name)
            else:
                result: Exit = detail
                cr.terminate(result.code, reason_for_exit(result.code),
                             self._termination_message(rt, name, result))
            self._stop_probes(rt, name)
            rt.kill_deadlines.pop(name, None)
        rt.dirty = True
        if rt.deleting:
            if not rt.running():
                self._finish_delete(rt)
            return
        if kind != "started":
            self._maybe_restart(rt, cr)
        self._advance(rt)

    # -- restarts -------------------------------------------------------------------------

    def _maybe_restart(self, rt: PodRuntime, cr: ContainerRun) -> None:
        """Per restartPolicy, an ended container waits (CrashLoopBackOff) and runs again in
        the same pod; `Never` keeps it terminated."""
        if self.stopping or rt.run.phase_override or cr.exit_code is None:
            return
        if not should_restart(rt.restart_policy, cr.exit_code, cr.init):
            return
        now = time.monotonic()
        delay, rt.backoffs[cr.name] = self.config.restart_backoff.plan(rt.backoffs.get(cr.name),
                                                                       now)
        rt.processes.pop(cr.name, None)
        rt.launch_specs.pop(cr.name, None)
        if delay <= 0:
            cr.await_restart("ContainerCreating")
            return
        run = rt.run
        cr.await_restart("CrashLoopBackOff",
                         backoff_message(delay, cr.name, run.name, run.namespace, run.uid))
        rt.restart_at[cr.name] = now + delay
        self._event(rt, "BackOff", f"Back-off restarting failed container {cr.name} in pod "
                    f"{run.name}_{run.namespace}({run.uid})", warning=True, container=cr.name)

    # -- probes ---------------------------------------------------------------------------

    def _start_probes(self, rt: PodRuntime, cr: ContainerRun) -> None:
        probes = rt.probes.get(cr.name, {})
        cr.readiness = False if "readiness" in probes else None
        cr.startup = False if "startup" in probes else None
        rt.container_started[cr.name] = time.monotonic()
        # A startup probe holds the others back until it succeeds.
        kinds = ["startup"] if "startup" in probes else ["liveness", "readiness"]
        for kind in kinds:
            if kind in probes:
                self._start_worker(rt, cr, probes[kind])

    def _start_worker(self, rt: PodRuntime, cr: ContainerRun, probe: Probe) -> None:
        assert rt.run.pod_ip is not None
        rt.trackers.setdefault(cr.name, {})[probe.kind] = ProbeTracker(
            probe, initial_result(probe.kind))
        uid, name, instance, kind = rt.uid, cr.name, cr.restart_count, probe.kind

        def report(ok: bool, message: str) -> None:
            self.events.put(("probe", uid, name, instance, kind, ok, message))

        rt.workers.setdefault(name, []).append(ProbeWorker(
            probe, rt.run.pod_ip, rt.launch_specs.get(name), rt.container_started[name], report,
            name=f"probe-{kind}-{rt.run.name}-{name}"))

    def _stop_probes(self, rt: PodRuntime, name: str, kind: str | None = None) -> None:
        keep = []
        for worker in rt.workers.pop(name, []):
            if kind is None or worker.probe.kind == kind:
                worker.stop()
                rt.trackers.get(name, {}).pop(worker.probe.kind, None)
            else:
                keep.append(worker)
        if keep:
            rt.workers[name] = keep

    def _on_probe(self, rt: PodRuntime, name: str, instance: int, kind: str, ok: bool,
                  message: str) -> None:
        cr = next((c for c in rt.run.containers if c.name == name), None)
        tracker = rt.trackers.get(name, {}).get(kind)
        if cr is None or cr.state != "running" or cr.restart_count != instance or tracker is None:
            return  # a result for an instance that has ended or a probe that was stopped
        changed = tracker.observe(ok, message)
        probe = tracker.probe
        # Kubelet records every failure; here a run of failures is reported up to the
        # threshold, so a pod that stays unready does not write an event every period.
        if not ok and tracker.failures <= probe.failure_threshold:
            self._event(rt, "Unhealthy", f"{probe.label} probe failed: {message}", warning=True,
                        container=name)
        if not changed:
            return
        if kind == "readiness":
            cr.readiness = tracker.result
            rt.dirty = True
        elif tracker.result is False:  # liveness or startup gave up on the container
            self._kill_unhealthy(rt, cr, probe)
        elif kind == "startup":
            cr.startup = True
            rt.dirty = True
            self._stop_probes(rt, name, "startup")
            for other in ("liveness", "readiness"):
                if other in rt.probes.get(name, {}):
                    self._start_worker(rt, cr, rt.probes[name][other])

    def _kill_unhealthy(self, rt: PodRuntime, cr: ContainerRun, probe: Probe) -> None:
        proc = rt.processes.get(cr.name)
        if proc is None or proc.exited.is_set():
            return
        message = f"Container {cr.name} failed {probe.kind} probe"
        if rt.restart_policy != "Never":
            message += ", will be restarted"
        self._event(rt, "Killing", message, container=cr.name)
        self._stop_probes(rt, cr.name)
        if cr.readiness is not None:
            cr.readiness = False
            rt.dirty = True
        grace = probe.termination_grace
        if grace is None:
            grace = rt.pod["spec"].get("terminationGracePeriodSeconds")
        grace = DEFAULT_GRACE_SECONDS if grace is None else int(grace)
        proc.signal_group(signal.SIGTERM)
        rt.kill_deadlines[cr.name] = time.monotonic() + grace

    def _termination_message(self, rt: PodRuntime, name: str, result: Exit) -> str | None:
        container = next((c for c in podspec.all_containers(rt.pod) if c["name"] == name), {})
        if result.code == 0 or container.get("terminationMessagePolicy") != "FallbackToLogsOnError":
            return None
        path = rt.log_dir / f"{name}.log"
        if not path.exists():
            return None
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")

    def _set_waiting(self, rt: PodRuntime, reason: str, message: str) -> bool:
        """Returns whether anything changed (so a repeated problem is reported once)."""
        changed = False
        for cr in rt.run.containers:
            if cr.state == "waiting" and (cr.waiting_reason, cr.waiting_message) != (reason, message):
                cr.waiting_reason, cr.waiting_message = reason, message
                changed = rt.dirty = True
        return changed

    def _event(self, rt: PodRuntime, reason: str, message: str, warning: bool = False,
               container: str | None = None) -> None:
        meta, node = dict(rt.pod["metadata"]), rt.node.name
        # After the pod's earlier events, beside its statuses (best effort, as before).
        self.event_writer.submit(rt.uid, lambda: events.emit(self.api, meta, node, reason,
                                                             message, warning, container))

    def _fail_config(self, rt: PodRuntime, message: str) -> None:
        log.warning("pod %s/%s cannot run: %s", rt.run.namespace, rt.run.name, message)
        self._event(rt, "Failed", f"Error: {message}", warning=True)
        if rt.restart_policy != "Never":
            # Kubelet leaves such a pod Pending with waiting containers. Failing it would make
            # a ReplicaSet replace it with an identical pod, over and over.
            rt.config_error = message
            for cr in rt.run.containers:
                if cr.state == "waiting":
                    cr.waiting_reason, cr.waiting_message = "CreateContainerConfigError", message
            rt.dirty = True
            return
        for cr in rt.run.containers:
            if cr.state == "waiting":
                cr.terminate(128, "CreateContainerConfigError", message)
        rt.run.phase_override = "Failed"
        rt.run.message = message
        rt.dirty = True

    def _maybe_finish(self, rt: PodRuntime) -> None:
        if rt.run.terminal() and not rt.running():
            self._teardown(rt)

    def _teardown(self, rt: PodRuntime) -> None:
        """Release what a finished pod held (processes, network, GPUs); logs stay until the
        pod object is deleted, so `kubectl logs` works on completed pods."""
        if rt.torn_down:
            return
        for name in list(rt.workers):
            self._stop_probes(rt, name)
        rt.launch_specs.clear()
        for proc in rt.running():
            proc.signal_group(signal.SIGKILL)
        # Unless a worker is still making its sandbox: that one's result frees it all.
        if not rt.preparing:
            self._release_sandbox(rt.uid, rt.net)
        self.gpu_in_use[rt.node.name].difference_update(rt.gpus)
        rt.torn_down = True
        self.dns_dirty = True

    # -- deletion -------------------------------------------------------------------------

    def _begin_delete(self, rt: PodRuntime) -> None:
        rt.deleting = True
        for name in list(rt.workers):
            self._stop_probes(rt, name)
        grace = rt.pod["metadata"].get("deletionGracePeriodSeconds")
        grace = DEFAULT_GRACE_SECONDS if grace is None else int(grace)
        running = rt.running()
        if not running:
            self._finish_delete(rt)
            return
        log.info("pod %s/%s deleted: SIGTERM, grace %ds", rt.run.namespace, rt.run.name, grace)
        for name, proc in rt.processes.items():
            if not proc.exited.is_set():
                self._event(rt, "Killing", f"Stopping container {name}", container=name)
                proc.signal_group(signal.SIGTERM)
        rt.kill_deadline = time.monotonic() + grace

    def _finish_delete(self, rt: PodRuntime) -> None:
        self._teardown(rt)
        if rt.gone:
            self._forget(rt)
            return
        self._flush_one(rt)  # the final status, then (in order, on the writer) the deletion
        self._delete_object(rt.pod)

    def _delete_object(self, pod: Mapping[str, Any]) -> None:
        meta = dict(pod["metadata"])
        self.writer.submit(meta["uid"], lambda: self._send_delete(meta))

    def _send_delete(self, meta: Mapping[str, Any]) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}}
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        for attempt in range(1, DELETE_ATTEMPTS + 1):
            try:
                self.api.delete(path, body)
                return
            except ApiError as exc:
                if exc.status in (404, 409):
                    return
                log.warning("deleting pod %s/%s: %s (attempt %d of %d)", meta["namespace"],
                            meta["name"], exc, attempt, DELETE_ATTEMPTS)
            time.sleep(RETRY_SECONDS)

    def _on_pod_gone(self, rt: PodRuntime) -> None:
        rt.gone = True
        if rt.running():
            # Force-deleted while running: still let the processes shut down briefly.
            for proc in rt.running():
                proc.signal_group(signal.SIGTERM)
            rt.deleting = True
            rt.kill_deadline = time.monotonic() + 2.0
            return
        self._teardown(rt)
        self._forget(rt)

    def _forget(self, rt: PodRuntime) -> None:
        self.runs.pop(rt.uid, None)
        directories = (rt.dir, rt.log_dir)  # per uid: nothing else ever uses them again

        def remove() -> None:
            for directory in directories:
                shutil.rmtree(directory, ignore_errors=True)

        # Off the loop while it runs (removing hundreds of pods' files held it up).
        if self.stopping:
            remove()
        else:
            self.setup_pool.submit(remove)

    def _forget_logs(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        shutil.rmtree(self.layout.log_dir(meta["namespace"], meta["name"], meta["uid"]),
                      ignore_errors=True)
        shutil.rmtree(self.layout.pod_dir(meta["uid"]), ignore_errors=True)

    # -- periodic work --------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        for rt in list(self.runs.values()):
            if rt.deleting and rt.kill_deadline is not None and now >= rt.kill_deadline:
                for proc in rt.running():
                    proc.signal_group(signal.SIGKILL)
                rt.kill_deadline = None
            elif not rt.deleting and not rt.torn_down and rt.next_retry and now >= rt.next_retry:
                rt.next_retry = 0.0
                self._advance(rt)
            elif (not rt.deleting and not rt.torn_down and rt.restart_at
                  and min(rt.restart_at.values()) <= now):
                self._advance(rt)  # a back-off is over
            for name, deadline in list(rt.kill_deadlines.items()):
                if now >= deadline:  # a container killed for a failed probe ignored SIGTERM
                    del rt.kill_deadlines[name]
                    proc = rt.processes.get(name)
                    if proc is not None:
                        proc.signal_group(signal.SIGKILL)
            if rt.volumes and not rt.torn_down:
                for token in rt.volumes.tokens:
                    if time.time() >= token.refresh_at:
                        self.builders[rt.node.name].request_token(rt.pod, token)

    def _flush(self) -> None:
        if self.dns_dirty:
            self.dns_dirty = False
            self.cluster_records = self._cluster_records()
            for rt in self.runs.values():
                if rt.net is not None and not rt.torn_down:
                    self._write_hosts(rt, self.cluster_records)
        for rt in list(self.runs.values()):
            if rt.dirty and not rt.gone:
                self._flush_one(rt)

    def _flush_one(self, rt: PodRuntime) -> None:
        """Hand the pod's current status to the writer (replacing one still waiting there);
        a failed write marks the pod dirty again, so the next flush retries it."""
        rt.dirty = False
        meta, status = dict(rt.pod["metadata"]), rt.run.to_status()
        uid = meta["uid"]

        def send() -> None:
            try:
                self._patch_status(meta, status)
            except Exception as exc:
                log.warning("status of pod %s/%s not written (will retry): %s",
                            meta["namespace"], meta["name"], exc)
                self.events.put(("status-failed", uid))

        self.writer.submit(uid, send, replaces="status")

    def _patch_status(self, meta: Mapping[str, Any], status: dict[str, Any]) -> None:
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status"
        try:
            self.api.patch(path, {"metadata": {"uid": meta["uid"]},
                                  "status": status_patch(status)}, strategic=True)
        except ApiError as exc:
            if exc.status == 422:  # a status the apiserver refuses will not improve by retrying
                log.error("status of pod %s/%s rejected: %s", meta["namespace"], meta["name"], exc)
            elif exc.status not in (404, 409):  # 404/409: gone or replaced by a namesake
                raise

    def _cluster_records(self) -> list[hostsfile.Record]:
        if not any(s.get("spec", {}).get("clusterIP") == "None" for s in self.services.values()):
            return []  # only headless Services have records: skip building every pod's view
        return hostsfile.records(self._dns_pods(), self.services.values())

    def _dns_pods(self) -> list[dict[str, Any]]:
        # Our own pods' IPs are known before the status patch lands; prefer that view.
        out = []
        for uid, pod in self.pods.items():
            rt = self.runs.get(uid)
            if rt is not None and rt.run.pod_ip and not rt.torn_down:
                pod = dict(pod, status=dict(pod.get("status", {}), podIP=rt.run.pod_ip,
                                            phase=rt.run.phase(),
                                            conditions=rt.run.to_status()["conditions"]))
            out.append(pod)
        return out

    def _write_hosts(self, rt: PodRuntime, cluster: list[hostsfile.Record]) -> None:
        assert rt.run.pod_ip is not None
        content = hostsfile.render(rt.pod, rt.run.pod_ip, cluster)
        if content != rt.hosts:  # each flush would otherwise read back every pod's file
            hostsfile.write_in_place(self.layout.hosts(rt.uid), content)
            rt.hosts = content

    # -- logs -----------------------------------------------------------------------------

    def locate_log(self, namespace: str, pod: str, container: str, previous: bool = False
                   ) -> Any:
        """Called from the kubelet API thread: read-only look-ups only."""
        for uid, obj in list(self.pods.items()):
            meta = obj["metadata"]
            if meta["namespace"] == namespace and meta["name"] == pod:
                path = self.layout.log_dir(namespace, pod, uid) / f"{container}.log"
                if previous:
                    path = path.with_name(path.name + PREVIOUS_LOG_SUFFIX)
                    return (path, lambda: False) if path.exists() else None
                if not path.exists():
                    return None
                rt = self.runs.get(uid)
                proc = rt.processes.get(container) if rt else None
                return path, (lambda: proc is not None and not proc.exited.is_set())
        return None
