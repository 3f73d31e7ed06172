"""Rank 0's live metrics: the port setting, the exposition (read back with prometheus-client's own
parser, as Prometheus would), the HTTP server, and a real toy training run scraped mid-run."""

from __future__ import annotations

import io
import math
import socket
import urllib.error
import urllib.request
from typing import Any

import lightning.pytorch as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families
from toy_family import ToyFamily

from lorakube_api import contract
from lorakube_trainer import metrics_server
from lorakube_trainer.config import ConfigError
from lorakube_trainer.metrics_server import MetricsServer, TrainingMetrics
from lorakube_trainer.progress import ProgressReporter
from lorakube_trainer.train import run


def parse(text: str) -> dict[str, float]:
    families = list(text_string_to_metric_families(text))
    assert all(f.type == "gauge" for f in families)
    return {s.name: s.value for f in families for s in f.samples}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.mark.parametrize("value, port", [
    (None, contract.TRAINER_METRICS_PORT), ("", contract.TRAINER_METRICS_PORT), ("9500", 9500),
    ("0", None), ("off", None), ("OFF", None)])
def test_the_port_comes_from_the_environment(value, port):
    env = {} if value is None else {contract.ENV_METRICS_PORT: value}
    assert metrics_server.port_from_env(env) == port


@pytest.mark.parametrize("value", ["http", "70000", "-1"])
def test_a_bad_port_names_the_variable_and_the_way_out(value):
    with pytest.raises(ConfigError, match=f"{contract.ENV_METRICS_PORT}: '{value}' is not a port.*'off'"):
        metrics_server.port_from_env({contract.ENV_METRICS_PORT: value})


def test_before_the_first_step_loss_and_rate_are_nan_and_the_rest_zero():
    values = parse(TrainingMetrics().render())
    assert set(values) == {f"lorakube_trainer_{name}" for name, _ in metrics_server.GAUGES}
    assert math.isnan(values["lorakube_trainer_loss"]) and math.isnan(values["lorakube_trainer_samples_per_second"])
    assert values["lorakube_trainer_step"] == 0 and values["lorakube_trainer_gpu_memory_peak_bytes"] == 0


def test_the_reporter_records_every_step_even_those_the_rate_limit_keeps_off_stdout():
    now = [0.0]
    live = TrainingMetrics()
    out = io.StringIO()
    reporter = ProgressReporter(10, interval_s=60.0, out=out, clock=lambda: now[0], live=live)
    for step in range(1, 4):
        now[0] += 2.0
        reporter.report(step, 0, 1.0 / step, samples_per_step=4)
    assert len(out.getvalue().splitlines()) == 1, "only the first step went to stdout"
    values = parse(live.render())
    assert values["lorakube_trainer_step"] == 3 and values["lorakube_trainer_total_steps"] == 10
    assert values["lorakube_trainer_loss"] == pytest.approx(1 / 3)
    assert values["lorakube_trainer_samples_per_second"] == pytest.approx(2.0)   # 4 samples every 2 s
    live.set_gpu_memory(1024, 4096)
    values = parse(live.render())
    assert values["lorakube_trainer_gpu_memory_allocated_bytes"] == 1024
    assert values["lorakube_trainer_gpu_memory_peak_bytes"] == 4096


def test_the_server_answers_metrics_and_nothing_else():
    live = TrainingMetrics()
    live.update(step=5, total_steps=12, epoch=1, loss=0.25, samples_per_second=8.0)
    server = MetricsServer(live, 0, host="127.0.0.1")
    try:
        status, content_type, body = scrape(server.port)
        assert status == 200 and content_type == metrics_server.CONTENT_TYPE
        assert parse(body)["lorakube_trainer_step"] == 5
        assert scrape(server.port, "/")[0] == 404
    finally:
        server.stop()


def test_a_taken_port_is_a_warning_not_a_failure(caplog):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert metrics_server.serve_from_env(TrainingMetrics(), {contract.ENV_METRICS_PORT: str(port)}) is None
    assert f"port {port} cannot be bound" in caplog.text and contract.ENV_METRICS_PORT in caplog.text
    assert metrics_server.serve_from_env(TrainingMetrics(), {contract.ENV_METRICS_PORT: "off"}) is None


class ScrapeAt(pl.Callback):
    """Scrapes rank 0's server after the given optimizer step, from inside the real run."""

    def __init__(self, port: int, step: int) -> None:
        self.port, self.step = port, step
        self.seen: dict[str, float] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step and self.seen is None:
            self.seen = parse(scrape(self.port)[2])


def test_a_real_training_run_serves_step_and_loss_while_it_trains_and_stops_serving_after(make_cfg):
    port = free_port()
    spy = ScrapeAt(port, step=3)
    cfg = make_cfg("--checkpoint_every_n_steps", "0")
    result = run(cfg, env={contract.ENV_METRICS_PORT: str(port)}, family=ToyFamily(), extra_callbacks=[spy])
    assert result.steps_done == 4
    assert spy.seen is not None, "the server did not answer during training"
    assert spy.seen["lorakube_trainer_step"] == 3 and spy.seen["lorakube_trainer_total_steps"] == 4
    assert math.isfinite(spy.seen["lorakube_trainer_loss"]) and spy.seen["lorakube_trainer_loss"] > 0
    assert spy.seen["lorakube_trainer_samples_per_second"] > 0
    with pytest.raises(OSError):
        scrape(port)
