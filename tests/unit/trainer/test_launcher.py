"""The launcher's pure parts: which exit decides the pod's code, what each child is told."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakube_api import contract
from lorakube_trainer.distributed import Topology
from lorakube_trainer.launcher import (ENV_FAILURE_FILE, RankExit, _rank_exit, child_env, describe, report_failure,
                                       root_cause, shell_code, should_launch, terminated_code)

TWO_PER_NODE = Topology(num_nodes=2, devices=2, node_rank=1, master_addr="job-node-0.job.ns.svc", master_port=29500,
                        torchrun=False)


def ended(rank: int, code: int, stopped: bool = False, message: str | None = None) -> RankExit:
    return RankExit(rank, 2 + rank, code, stopped, message)


def test_a_user_error_anywhere_beats_signals_and_retryable_exits() -> None:
    exits = [ended(0, contract.EXIT_RETRYABLE), ended(3, 137), ended(1, contract.EXIT_DATASET_ERROR), ended(2, 1)]
    assert root_cause(exits).local_rank == 1      # the first user error to end


def test_codes_of_ranks_the_launcher_stopped_do_not_count() -> None:
    exits = [ended(1, contract.EXIT_RETRYABLE), ended(0, 2, stopped=True), ended(2, 143, stopped=True)]
    assert root_cause(exits).code == contract.EXIT_RETRYABLE
    assert root_cause([ended(0, 0), ended(1, 0)]) is None


def test_a_death_by_signal_beats_a_peer_that_only_noticed_it() -> None:
    assert root_cause([ended(0, contract.EXIT_RETRYABLE), ended(1, 137)]).local_rank == 1
    assert shell_code(-9) == 137 and shell_code(65) == 65


def test_the_message_names_the_rank_and_the_reason() -> None:
    assert describe(ended(1, 65, message="dataset: a.png: cannot decode image")) == \
        "local rank 1 (global rank 3) exited with code 65: dataset: a.png: cannot decode image"
    assert describe(ended(0, 137)) == "local rank 0 (global rank 2) was killed by SIGKILL (exit code 137)"


@pytest.mark.parametrize(("topology", "env", "expected"), [
    (TWO_PER_NODE, {}, True),
    (TWO_PER_NODE, {"LOCAL_RANK": "1"}, False),                       # a launched child
    (Topology(1, 1, 0, None, None, torchrun=False), {}, False),
    (Topology(1, 2, 0, None, None, torchrun=True), {}, False),         # torchrun started them
])
def test_only_a_pod_with_several_processes_launches(topology, env, expected) -> None:
    assert should_launch(topology, env) is expected


def test_each_child_gets_what_lightning_needs_to_treat_it_as_externally_launched(tmp_path: Path) -> None:
    env = child_env({"PATH": "/bin", "LOCAL_RANK": "x"}, TWO_PER_NODE, 1, "job-node-0.job.ns.svc", 29500,
                    tmp_path / "r1.json")
    assert env["LOCAL_RANK"] == "1" and env[contract.ENV_NODE_RANK] == "1" and env[contract.ENV_WORLD_SIZE] == "4"
    assert env[contract.ENV_MASTER_ADDR] == "job-node-0.job.ns.svc" and env[contract.ENV_MASTER_PORT] == "29500"
    assert env[ENV_FAILURE_FILE] == str(tmp_path / "r1.json") and env["PATH"] == "/bin"


def test_a_failing_child_reports_its_code_and_message(tmp_path: Path) -> None:
    target = tmp_path / "r1.json"
    report_failure(65, "dataset: a.png: cannot decode image", env={ENV_FAILURE_FILE: str(target)})
    assert json.loads(target.read_text()) == {"code": 65, "message": "dataset: a.png: cannot decode image"}


def test_a_stopped_rank_that_had_reported_its_own_failure_still_counts() -> None:
    silent = _rank_exit(TWO_PER_NODE, 0, 143, stopped=True, report=None)
    reported = _rank_exit(TWO_PER_NODE, 1, 143, stopped=True, report=(65, "dataset: a.png: cannot decode image"))
    assert silent.stopped_by_launcher and silent.global_rank == 2
    assert not reported.stopped_by_launcher and reported.code == 65 and reported.global_rank == 3
    assert root_cause([silent, reported]) is reported


def test_after_a_sigterm_the_pod_is_retryable_only_if_every_rank_checkpointed_its_stop() -> None:
    retry = contract.EXIT_RETRYABLE
    assert terminated_code([retry, retry]) == retry            # both stopped at the agreed step
    assert terminated_code([0, retry]) == retry                # one had just finished
    assert terminated_code([0, 0]) == contract.EXIT_OK
    assert terminated_code([retry, 143]) == 143                # one was cut short (deadline, second SIGTERM)
    assert terminated_code([retry, 137]) == 143
    assert terminated_code([]) == 143
