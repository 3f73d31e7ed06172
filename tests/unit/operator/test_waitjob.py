"""`lorakube wait-job` (what `helm test` runs): its exit code and message follow the job's status."""

from __future__ import annotations

import itertools
import logging

import pytest

from lorakube import cli, waitjob


def job(phase=None, **status):
    return {"metadata": {"name": "j"}, "status": {"phase": phase, **status} if phase else status}


def test_succeeded_is_zero_and_running_is_not_yet():
    assert waitjob.verdict(job("Succeeded")) == (0, "Succeeded")
    assert waitjob.verdict(job("Running", progress={"text": "3/12"})) == (None, "Running, step 3/12")
    assert waitjob.verdict(None) == (None, "not found (yet)")
    assert waitjob.verdict(job("Staging", progress={"text": "model 1.5/3.0 GiB"})) == (None, "Staging, model 1.5/3.0 GiB")


def test_failed_names_the_reason_and_the_last_pod_failure():
    failed = job("Failed", conditions=[{"type": "Failed", "status": "True", "reason": "DatasetError",
                                        "message": "metadata.csv row 3: no such file"}],
                 lastFailure={"pod": "j-node-0", "exitCode": 65, "reason": "DatasetError",
                              "message": "the dataset is malformed"})
    code, message = waitjob.verdict(failed)
    assert code == 1
    assert "DatasetError: metadata.csv row 3: no such file" in message
    assert "j-node-0 exit code 65" in message


def test_wait_polls_until_the_end_and_retries_api_errors(caplog):
    bodies = iter([ConnectionError("apiserver away"), None, job("Pending"), job("Running"), job("Succeeded")])

    def read(namespace, name):
        body = next(bodies)
        if isinstance(body, Exception):
            raise body
        return body

    caplog.set_level(logging.INFO)
    assert waitjob.wait(read, "ns", "j", timeout=60, sleep=lambda s: None) == 0
    assert "reading the job failed: apiserver away" in caplog.text
    assert "LoRATrainingJob ns/j: Succeeded" in caplog.text


def test_wait_times_out_with_its_own_code():
    ticks = itertools.count(0, 5)
    code = waitjob.wait(lambda ns, n: job("Running"), "ns", "j", timeout=12, clock=lambda: next(ticks),
                        sleep=lambda s: None)
    assert code == waitjob.EXIT_TIMED_OUT


def test_the_cli_parses_wait_job():
    args = cli.build_parser().parse_args(["wait-job", "cats", "--namespace", "team-a", "--timeout", "30"])
    assert (args.command, args.name, args.namespace, args.timeout) == ("wait-job", "cats", "team-a", 30.0)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["wait-job"])
