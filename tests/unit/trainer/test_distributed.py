"""Topology from the operator's / torchrun's environment, the bounded rendezvous check, the
strategy and precision mapping, and retryable-failure classification."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from lorakube_api import contract
from lorakube_trainer.config import ConfigError
from lorakube_trainer.distributed import (RendezvousTimeout, Topology, is_retryable, needs_rendezvous_check,
                                          resolve_topology, wait_for_master)
from lorakube_trainer.strategies import (StrategyPlan, build_strategy, lightning_precision, resolve_precision,
                                         weight_dtype)

OPERATOR_ENV = {contract.ENV_MASTER_ADDR: "job-node-0.job.ns.svc", contract.ENV_MASTER_PORT: "29500",
                contract.ENV_NNODES: "3", contract.ENV_NPROC_PER_NODE: "2", contract.ENV_NODE_RANK: "1",
                contract.ENV_WORLD_SIZE: "6"}


def test_operator_env_gives_nodes_devices_and_rank() -> None:
    topo = resolve_topology(OPERATOR_ENV, None, None)
    assert topo == Topology(3, 2, 1, "job-node-0.job.ns.svc", 29500, torchrun=False)
    assert topo.world_size == 6 and needs_rendezvous_check(topo)
    assert not needs_rendezvous_check(resolve_topology({**OPERATOR_ENV, contract.ENV_NODE_RANK: "0"}, None, None))


def test_flags_override_the_environment() -> None:
    env = {**OPERATOR_ENV, contract.ENV_WORLD_SIZE: "8"}
    topo = resolve_topology(env, num_nodes=4, devices=2)
    assert (topo.num_nodes, topo.devices) == (4, 2)


def test_workstation_defaults() -> None:
    topo = resolve_topology({}, None, None, default_devices=1)
    assert topo.world_size == 1 and topo.node_rank == 0 and not needs_rendezvous_check(topo)


def test_torchrun_env() -> None:
    env = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    topo = resolve_topology(env, None, None)
    assert (topo.num_nodes, topo.devices, topo.node_rank, topo.torchrun) == (2, 2, 1, True)
    assert not needs_rendezvous_check(topo)


@pytest.mark.parametrize(("env", "flag"), [
    ({**OPERATOR_ENV, contract.ENV_WORLD_SIZE: "5"}, contract.ENV_WORLD_SIZE),
    ({**OPERATOR_ENV, contract.ENV_NODE_RANK: "3"}, contract.ENV_NODE_RANK),
    ({k: v for k, v in OPERATOR_ENV.items() if k != contract.ENV_MASTER_PORT}, contract.ENV_MASTER_PORT),
    ({k: v for k, v in OPERATOR_ENV.items() if k != contract.ENV_MASTER_ADDR}, contract.ENV_MASTER_ADDR),
    ({**OPERATOR_ENV, contract.ENV_NNODES: "two"}, contract.ENV_NNODES),
])
def test_inconsistent_env_is_a_config_error(env: dict[str, str], flag: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_topology(env, None, None)
    assert err.value.flag == flag


def test_wait_for_master_succeeds_once_rank0_listens() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        waited = wait_for_master("127.0.0.1", server.getsockname()[1], timeout=5)
    assert waited < 5


def test_wait_for_master_times_out_when_nothing_listens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # free, and closed again below: nothing listens
    start = time.monotonic()
    with pytest.raises(RendezvousTimeout, match=rf"127.0.0.1:{port} was not reachable within 1\.5 s.*TCP connect"):
        wait_for_master("127.0.0.1", port, timeout=1.5)
    assert 1.4 < time.monotonic() - start < 4


def test_wait_for_master_reports_dns_failures() -> None:
    with pytest.raises(RendezvousTimeout, match="does not resolve"):
        wait_for_master("no-such-host.invalid", 29500, timeout=0.5)


def test_retryable_classification() -> None:
    assert is_retryable(RendezvousTimeout("x"))
    assert is_retryable(torch.distributed.DistStoreError("Timed out after 16 seconds waiting for clients"))
    assert is_retryable(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234"))
    assert not is_retryable(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_retryable(ValueError("timed out"))


def test_strategy_mapping() -> None:
    ddp = build_strategy(StrategyPlan("auto", world_size=2, on_gpu=False, timeout_s=7))
    assert isinstance(ddp, DDPStrategy) and ddp._process_group_backend == "gloo"
    assert ddp._timeout.total_seconds() == 7
    assert build_strategy(StrategyPlan("ddp", 1, False, 7)) == "auto"       # one process: no group
    assert build_strategy(StrategyPlan("ddp", 4, True, 7))._process_group_backend == "nccl"
    for stage in (1, 2, 3):
        ds = build_strategy(StrategyPlan(f"deepspeed_stage_{stage}", 1, True, 9))
        assert isinstance(ds, DeepSpeedStrategy)
        assert ds.config["zero_optimization"]["stage"] == stage and ds._timeout.total_seconds() == 9


def test_default_precision_follows_the_accelerator_and_cpu_refuses_fp16() -> None:
    assert resolve_precision(None, on_gpu=True) == "16-mixed" and resolve_precision(None, on_gpu=False) == "32"
    assert resolve_precision("bf16-mixed", on_gpu=False) == "bf16-mixed"
    with pytest.raises(ConfigError, match="needs a GPU; on CPU use 32 or bf16-mixed"):
        resolve_precision("16-mixed", on_gpu=False)


def test_precision_mapping_loads_the_matching_weight_dtype() -> None:
    assert (lightning_precision("32"), weight_dtype("32")) == ("32-true", torch.float32)
    assert (lightning_precision("16"), weight_dtype("16")) == ("16-mixed", torch.float16)
    assert (lightning_precision("16-mixed"), weight_dtype("16-mixed")) == ("16-mixed", torch.float16)
    assert (lightning_precision("bf16-mixed"), weight_dtype("bf16-mixed")) == ("bf16-mixed", torch.bfloat16)
