"""Where this process sits in the job, read from the environment the operator (or torchrun) sets,
and the bounded check that rank 0 is reachable before joining.

The same code runs on a workstation (nothing set: one node), in an operator pod (NNODES,
NPROC_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT, WORLD_SIZE) and under torchrun
(TORCHELASTIC_RUN_ID, LOCAL_WORLD_SIZE, GROUP_RANK, ...): no code change between them.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import Callable, Mapping

from lorakube_api import contract

from .config import ConfigError, TrainConfig


class RendezvousTimeout(RuntimeError):
    """Rank 0 did not resolve or accept TCP in time: retryable (the gang restarts)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    num_nodes: int
    devices: int                 # processes per node
    node_rank: int
    master_addr: str | None
    master_port: int | None
    torchrun: bool

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(name, f"environment value {raw!r} is not an integer") from exc


def resolve_topology(env: Mapping[str, str], num_nodes: int | None, devices: int | None,
                     default_devices: int = 1) -> Topology:
    """Flags win over the environment; the environment wins over defaults."""
    port = _int_env(env, contract.ENV_MASTER_PORT)
    addr = env.get(contract.ENV_MASTER_ADDR) or None
    if env.get("TORCHELASTIC_RUN_ID"):
        world = _int_env(env, "WORLD_SIZE") or 1
        local = _int_env(env, "LOCAL_WORLD_SIZE") or 1
        nodes, devs = num_nodes or world // local, devices or local
        node_rank = _int_env(env, "GROUP_RANK") or 0
        if nodes * devs != world:
            raise ConfigError("--num_nodes", f"{nodes} nodes x {devs} devices != torchrun's WORLD_SIZE {world}; "
                                             "drop --num_nodes/--devices under torchrun")
        return Topology(nodes, devs, node_rank, addr, port, torchrun=True)

    nodes = num_nodes or _int_env(env, contract.ENV_NNODES) or 1
    devs = devices or _int_env(env, contract.ENV_NPROC_PER_NODE) or default_devices
    node_rank = _int_env(env, contract.ENV_NODE_RANK) or 0
    world = _int_env(env, contract.ENV_WORLD_SIZE)
    if world is not None and world != nodes * devs:
        raise ConfigError(contract.ENV_WORLD_SIZE,
                          f"{world} != {nodes} nodes x {devs} processes per node; set {contract.ENV_NNODES} and "
                          f"{contract.ENV_NPROC_PER_NODE} (or --num_nodes/--devices) to match")
    if not 0 <= node_rank < nodes:
        raise ConfigError(contract.ENV_NODE_RANK, f"{node_rank} is outside 0..{nodes - 1} for {nodes} node(s)")
    if nodes > 1 and port is None:
        # Without it every node would pick its own random port and never meet.
        raise ConfigError(contract.ENV_MASTER_PORT, f"must be set when {nodes} nodes train together")
    if nodes > 1 and addr is None:
        raise ConfigError(contract.ENV_MASTER_ADDR, f"must name rank 0's host when {nodes} nodes train together")
    return Topology(nodes, devs, node_rank, addr, port, torchrun=False)


def plan_topology(cfg: TrainConfig, env: Mapping[str, str]) -> Topology:
    """Nodes, processes per node and this node's rank, as train.run() uses them. torch is imported
    only to count GPUs when neither --devices nor the environment says how many processes to run,
    so the launcher of several local ranks decides without loading it (its children start sooner)."""
    default_devices = 1
    if devices_unknown(cfg, env) and cfg.accelerator != "cpu":
        import torch

        if cfg.accelerator == "gpu" or torch.cuda.is_available():
            default_devices = torch.cuda.device_count()
    return resolve_topology(env, cfg.num_nodes, cfg.devices, default_devices=default_devices)


def devices_unknown(cfg: TrainConfig, env: Mapping[str, str]) -> bool:
    return not cfg.devices and not _int_env(env, contract.ENV_NPROC_PER_NODE) and not env.get("TORCHELASTIC_RUN_ID")


def needs_rendezvous_check(topology: Topology) -> bool:
    # torchrun's own rendezvous already met rank 0; processes on node 0 talk to it locally.
    return not topology.torchrun and topology.node_rank > 0


def wait_for_master(addr: str, port: int, timeout: float, *,
                    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> float:
    """Block until addr resolves and accepts TCP on port; return the seconds waited.

    Raises RendezvousTimeout naming what failed last (DNS or connect) once `timeout` has passed.
    """
    start = clock()
    deadline = start + timeout
    last_error = "never tried"
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            raise RendezvousTimeout(f"rank 0 at {addr}:{port} was not reachable within {timeout:g} s "
                                    f"({last_error}); is the node-0 pod running?")
        try:
            infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            last_error = f"{addr} does not resolve: {exc.strerror}"
        else:
            family, socktype, proto, _, sockaddr = infos[0]
            try:
                with socket.socket(family, socktype, proto) as sock:
                    sock.settimeout(max(0.1, min(5.0, remaining)))
                    sock.connect(sockaddr)
                return clock() - start
            except OSError as exc:
                last_error = f"TCP connect to port {port} failed: {exc.strerror or exc}"
        sleep(min(1.0, max(0.0, deadline - clock())))


def is_retryable(exc: BaseException) -> bool:
    """Infrastructure failures the gang restart can cure: rendezvous, store and collective timeouts,
    a peer that vanished mid-collective."""
    import torch.distributed as dist

    if isinstance(exc, RendezvousTimeout):
        return True
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    markers = ("timed out", "timeout", "connection reset", "connection closed by peer", "connection refused",
               "broken pipe", "nccl", "gloo")
    return isinstance(exc, RuntimeError) and any(m in text for m in markers)
