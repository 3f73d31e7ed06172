"""Rank 0's live training metrics over HTTP, in the Prometheus text format.

Standard library only: the trainer image carries no prometheus-client for seven gauges. The
training thread records values as it goes (`TrainingMetrics.update`, after every optimizer step);
a daemon thread answers GET /metrics from the last recorded values, so a scrape never waits for
a training step and never touches the GPU. A port that cannot be bound (another trainer on the
same host, outside a pod) is a warning: metrics never stop a training run.
"""

from __future__ import annotations

import http.server
import logging
import math
import threading
from collections.abc import Mapping
from typing import Any

from lorakube_api import contract

from .config import ConfigError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "lorakube_trainer_"
# (name without the prefix, help); every one is a gauge. docs/metrics.md lists the same.
GAUGES: tuple[tuple[str, str], ...] = (
    ("step", "Optimizer steps done, resumed steps included"),
    ("total_steps", "Optimizer steps the run makes (steps per epoch x max epochs)"),
    ("epoch", "The 0-based epoch of the last step"),
    ("loss", "Mean training loss of the last optimizer step over every process; NaN before the first step"),
    ("samples_per_second", "Training samples per second over every process since the first step this "
                           "process made; NaN until two steps are done"),
    ("gpu_memory_allocated_bytes", "GPU memory rank 0's tensors hold after the last step; 0 on CPU"),
    ("gpu_memory_peak_bytes", "Most GPU memory rank 0's tensors held at once so far; 0 on CPU"),
)


def port_from_env(env: Mapping[str, str]) -> int | None:
    """The port rank 0 serves on: contract.TRAINER_METRICS_PORT unless $LORAKUBE_METRICS_PORT says
    otherwise; None when it is "0" or "off"."""
    raw = (env.get(contract.ENV_METRICS_PORT) or "").strip()
    if not raw:
        return contract.TRAINER_METRICS_PORT
    if raw.lower() in ("0", "off"):
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(contract.ENV_METRICS_PORT, f"{raw!r} is not a port (1-65535); set a port, or 'off' "
                                                     f"to serve no metrics")
    return int(raw)


def _format(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class TrainingMetrics:
    """The last recorded value of each gauge; written by the training thread, read by scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {name: 0.0 for name, _ in GAUGES}
        self._values["loss"] = self._values["samples_per_second"] = math.nan

    def update(self, *, step: int, total_steps: int, epoch: int, loss: float | None,
               samples_per_second: float | None) -> None:
        with self._lock:
            self._values.update(step=float(step), total_steps=float(total_steps), epoch=float(epoch),
                                loss=math.nan if loss is None else float(loss),
                                samples_per_second=math.nan if samples_per_second is None else samples_per_second)

    def set_gpu_memory(self, allocated: int, peak: int) -> None:
        with self._lock:
            self._values.update(gpu_memory_allocated_bytes=float(allocated), gpu_memory_peak_bytes=float(peak))

    def values(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def render(self) -> str:
        values = self.values()
        lines = []
        for name, help_text in GAUGES:
            lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} gauge",
                      f"{PREFIX}{name} {_format(values[name])}"]
        return "\n".join(lines) + "\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.split("?", 1)[0] == "/metrics":
            status, body, content_type = 200, self.server.metrics.render().encode(), CONTENT_TYPE  # type: ignore[attr-defined]
        else:
            status, body, content_type = 404, b"not found: GET /metrics\n", "text/plain; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass        # a scrape every few seconds is not worth a log line


class MetricsServer:
    def __init__(self, metrics: TrainingMetrics, port: int, host: str = "0.0.0.0") -> None:
        self._server = http.server.ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._server.metrics = metrics  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="lorakube-metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_from_env(metrics: TrainingMetrics, env: Mapping[str, str]) -> MetricsServer | None:
    """Start the server where $LORAKUBE_METRICS_PORT says (default contract.TRAINER_METRICS_PORT);
    None when it is off or the port is taken (warned)."""
    port = port_from_env(env)
    if port is None:
        return None
    try:
        server = MetricsServer(metrics, port)
    except OSError as exc:
        log.warning("no training metrics: port %d cannot be bound (%s); set %s to a free port or 'off'",
                    port, exc.strerror or exc, contract.ENV_METRICS_PORT)
        return None
    log.info("serving training metrics on :%d/metrics", server.port)
    return server
