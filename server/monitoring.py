"""The ServerApp's Prometheus metrics: what the round loop reports, in a registry of its own, on an HTTP port.

Only aggregates leave the server here: counts, bytes, times, the global model's scores, the server's memory,
ε, and rejection counts by a short reason class (never a device id, a key, a delta or a client's text), so
the label values are a fixed, small set whatever clients send. docs/deployment.md lists every metric.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, make_wsgi_app

from fedadapt.errors import ConfigError
from fedadapt.fleet.rejections import CLASSES as REASON_LABELS
from fedadapt.fleet.rejections import round_rejections
from fedadapt.fleet.resources import current_rss_bytes
from fedadapt.fleet.run_config import MetricsEndpoint
from server.run_state import STAGES, STARTING

logger = logging.getLogger(__name__)

# The live page runs no script and loads nothing but its own plots; nothing here is worth caching.
SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
]

PREFIX = "fedadapt"
# Rounds take seconds (tiny models on loopback) to an hour (phones on mobile networks).
SECONDS_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600, math.inf)


@dataclass(frozen=True)
class RunFacts:
    """What the metrics say about the run as a whole."""

    scenario: str
    privacy: str
    planned_rounds: int
    dp: bool = False


class RunMetrics:
    """The run's Prometheus metrics in their own ``CollectorRegistry`` (never the process-wide one)."""

    def __init__(self, facts: RunFacts) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Info(f"{PREFIX}_run", "The run: scenario name and privacy mode.", registry=r).info(
            {"scenario": facts.scenario[:100], "privacy": facts.privacy}
        )
        self.planned = Gauge(f"{PREFIX}_rounds_planned", "Rounds the run is to take.", registry=r)
        self.planned.set(facts.planned_rounds)
        self.completed = Gauge(f"{PREFIX}_rounds_completed", "Rounds completed (metrics.json rounds).", registry=r)
        self.round = Gauge(f"{PREFIX}_round", "The round in progress (the last one once the run ends).", registry=r)
        self.stage = Enum(f"{PREFIX}_stage", "What the server is doing.", states=list(STAGES), registry=r)
        self.connected = Gauge(f"{PREFIX}_devices_connected", "Devices connected when the round sampled.", registry=r)
        self.sampled = Gauge(f"{PREFIX}_devices_sampled", "Devices sampled in the round in progress.", registry=r)
        self.accepted = Gauge(f"{PREFIX}_devices_accepted", "Devices whose update the last round used.", registry=r)
        self.accepted_total = Counter(f"{PREFIX}_updates_accepted", "Updates accepted, all rounds.", registry=r)
        self.rejected = Counter(
            f"{PREFIX}_updates_rejected", "Updates rejected or lost, by reason class.", ["reason"], registry=r
        )
        self.bytes_up = Counter(f"{PREFIX}_bytes_up", "Bytes devices uploaded to the server.", registry=r)
        self.bytes_down = Counter(f"{PREFIX}_bytes_down", "Bytes the server sent to devices.", registry=r)
        self.round_seconds = Histogram(
            f"{PREFIX}_round_seconds", "Seconds per round.", buckets=SECONDS_BUCKETS, registry=r
        )
        self.exchange_seconds = Histogram(
            f"{PREFIX}_exchange_seconds",
            "Seconds from sending the global state to the last reply (or the deadline).",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.accuracy = Gauge(f"{PREFIX}_accuracy", "The global model's accuracy after the last round.", registry=r)
        self.loss = Gauge(f"{PREFIX}_loss", "The global model's loss after the last round (NaN: none).", registry=r)
        self.memory = Gauge(f"{PREFIX}_server_resident_bytes", "The server process's resident memory.", registry=r)
        self.memory.set_function(lambda: float(current_rss_bytes() or math.nan))
        self.epsilon = (
            Gauge(f"{PREFIX}_dp_epsilon", "ε spent so far (differential privacy).", registry=r) if facts.dp else None
        )
        for reason in REASON_LABELS:  # every class shows from the start, at 0
            self.rejected.labels(reason=reason)
        self.stage.state(STARTING)

    def set_stage(self, stage: str, server_round: int | None = None) -> None:
        self.stage.state(stage)
        if server_round is not None:
            self.round.set(server_round)

    def round_sampled(self, server_round: int, connected: int, sampled: int) -> None:
        self.round.set(server_round)
        self.connected.set(connected)
        self.sampled.set(sampled)

    def round_finished(self, record: dict[str, Any], completed: int) -> None:
        """Fold one round's metrics.json record in."""
        self.completed.set(completed)
        self.round.set(_number(record.get("round")))
        self.accepted.set(_number(record.get("accepted")))
        self.add_rounds([record])
        self.round_seconds.observe(_number(record.get("seconds")))
        if "exchange_seconds" in record:
            self.exchange_seconds.observe(_number(record["exchange_seconds"]))
        self.accuracy.set(_number(record.get("accuracy")))
        self.loss.set(_number(record.get("loss")))
        if self.epsilon is not None and record.get("epsilon") is not None:
            self.epsilon.set(_number(record["epsilon"]))

    def add_rounds(self, records: Iterable[dict[str, Any]]) -> None:
        """Add rounds' totals to the counters (all of a resumed run's earlier rounds at start)."""
        for record in records:
            self.accepted_total.inc(max(_number(record.get("accepted")), 0.0))
            self.bytes_up.inc(max(_number(record.get("bytes_up")), 0.0))
            self.bytes_down.inc(max(_number(record.get("bytes_down")), 0.0))
            for reason, count in round_rejections(record).items():
                self.rejected.labels(reason=reason).inc(count)

    def resumed(self, history: list[dict[str, Any]]) -> None:
        """A resumed run: its counters start from the rounds already in metrics.json, so they equal its totals."""
        if history:
            self.add_rounds(history)
            last = history[-1]
            self.completed.set(len(history))
            self.round.set(_number(last.get("round")))
            self.accuracy.set(_number(last.get("accuracy")))
            self.loss.set(_number(last.get("loss")))
            if self.epsilon is not None and last.get("epsilon") is not None:
                self.epsilon.set(_number(last["epsilon"]))


def _number(value: object) -> float:
    """A record's number as a float; NaN for None or anything that is not a finite-or-not number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


class MetricsObserver:
    """A ``RoundObserver`` that keeps ``RunMetrics`` up to date."""

    def __init__(self, metrics: RunMetrics) -> None:
        self.metrics = metrics

    def stage(self, stage: str, server_round: int) -> None:
        self.metrics.set_stage(stage, server_round)

    def round_sampled(self, server_round: int, connected: int, sampled: int) -> None:
        self.metrics.round_sampled(server_round, connected, sampled)

    def round_finished(self, record: dict[str, Any], completed: int) -> None:
        self.metrics.round_finished(record, completed)


class MetricsServer:
    """The HTTP endpoint: ``/metrics`` (the registry, through prometheus-client's own exposition) and, with a
    dashboard, the live page ``/`` and its plots. ``start`` binds it (requests are served in threads), ``stop``
    frees the port."""

    def __init__(self, endpoint: MetricsEndpoint, registry: CollectorRegistry, out_dir: Path | None = None) -> None:
        self.endpoint = endpoint
        self.app = MonitorApp(registry, out_dir if endpoint.dashboard else None)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.endpoint.warn_if_exposed()
        try:
            self._server = _bind(self.endpoint, self.app)
        except OSError as err:
            raise ConfigError(
                f"cannot serve metrics on {self.endpoint.host}:{self.endpoint.port} ({err.strerror or err}): "
                "choose a free --metrics-port"
            ) from err
        self._thread = threading.Thread(target=self._server.serve_forever, name="fedadapt-metrics", daemon=True)
        self._thread.start()
        logger.info("Prometheus metrics on http://%s/metrics", _authority(self.endpoint))
        if self.endpoint.dashboard:
            logger.info("the run's live page on http://%s/", _authority(self.endpoint))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class MonitorApp:
    """The WSGI application behind the endpoint: GET and HEAD of a fixed set of paths, 404 for anything else."""

    def __init__(self, registry: CollectorRegistry, out_dir: Path | None) -> None:
        self.metrics = make_wsgi_app(registry)
        self.out_dir = out_dir  # None: no dashboard

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", "text/plain", b"GET only\n")
        if path == "/metrics":
            return cast(Iterable[bytes], self.metrics(environ, start_response))
        if self.out_dir is None:
            return _respond(start_response, "404 Not Found", "text/plain", b"only /metrics is served here\n")
        from server import dashboard  # matplotlib and the page: only with --dashboard

        if path in ("/", "/index.html"):
            return _respond(start_response, "200 OK", "text/html; charset=utf-8", dashboard.page(self.out_dir).encode())
        png = dashboard.read_plot(self.out_dir, path.removeprefix("/"))
        if png is None:
            return _respond(start_response, "404 Not Found", "text/plain", b"not found\n")
        return _respond(start_response, "200 OK", "image/png", png)


def _respond(start_response: Any, status: str, content_type: str, body: bytes) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *SECURITY_HEADERS]
    start_response(status, headers)
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the run's log."""


def _bind(endpoint: MetricsEndpoint, app: MonitorApp) -> WSGIServer:
    """A threading WSGI server on the endpoint's host and port (IPv4 or IPv6, as the host resolves)."""
    family = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

    return make_server(endpoint.host, endpoint.port, app, Server, handler_class=_QuietHandler)


def _authority(endpoint: MetricsEndpoint) -> str:
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{host}:{endpoint.port}"
