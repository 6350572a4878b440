"""The ServerApp's Prometheus endpoint (issue 23): scraped during and after a real in-process run, it carries the
values metrics.json records; its labels stay a bounded set whatever clients send; it binds to loopback by default.

Runs the real ServerApp and ClientApp in this process (tests/server_harness.py) on the tiny BERT.
"""

from __future__ import annotations

import logging
import math
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message, RecordDict
from prometheus_client.parser import text_string_to_metric_families
from server_harness import (
    InProcessGrid,
    run_server,
    server_run_config,
    server_scenario_file,
    task_identity,  # noqa: F401  (autouse: messages need Flower's task identity)
)

from fedadapt.errors import ConfigError
from fedadapt.fleet.rejections import CLASSES as REASON_LABELS
from fedadapt.fleet.rejections import reason_class
from fedadapt.fleet.run_config import MetricsEndpoint, fleet_run_from_config
from server import monitoring
from server.monitoring import RunFacts, RunMetrics
from simulations.processes import free_port

HOSTILE = 103  # partition 2's node: its replies lose their content


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at http://127.0.0.1:PORT/metrics, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class ScrapingGrid(InProcessGrid):
    """Scrapes the endpoint each time a round sends its messages (the rounds before it are complete)."""

    def __init__(self, port: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.port = port
        self.scrapes: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.scrapes.append(scrape(self.port))
        return super().push_messages(messages)


def emptied(reply: Message) -> Message:
    reply.content = RecordDict()
    return reply


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_the_endpoint_carries_what_metrics_json_records_after_every_round(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    scenario = server_scenario_file(tmp_path, tiny_bert, rounds=3, **{"clients-per-round": 3})
    config = server_run_config(scenario, tmp_path / "run", **{"metrics-port": port})
    grid = ScrapingGrid(port, 3, config, tamper={HOSTILE: emptied})
    stop = monitoring.MetricsServer.stop

    def last_scrape_then_stop(server: monitoring.MetricsServer) -> None:
        grid.scrapes.append(scrape(port))  # after the last round, before the port closes
        stop(server)

    monkeypatch.setattr(monitoring.MetricsServer, "stop", last_scrape_then_stop)
    metrics = run_server(grid)
    rounds = metrics["rounds"]
    assert len(rounds) == 3 and len(grid.scrapes) == 4
    for done, samples in enumerate(grid.scrapes):  # scrape k: k rounds done
        assert value(samples, "fedadapt_rounds_completed") == done
        assert value(samples, "fedadapt_rounds_planned") == 3
        if done == 0:
            assert value(samples, "fedadapt_bytes_up_total") == 0
            continue
        history = rounds[:done]
        assert value(samples, "fedadapt_devices_accepted") == history[-1]["accepted"] == 2
        assert value(samples, "fedadapt_updates_accepted_total") == sum(r["accepted"] for r in history)
        assert value(samples, "fedadapt_bytes_up_total") == sum(r["bytes_up"] for r in history) > 0
        assert value(samples, "fedadapt_bytes_down_total") == sum(r["bytes_down"] for r in history) > 0
        assert value(samples, "fedadapt_accuracy") == pytest.approx(history[-1]["accuracy"], rel=1e-12)
        assert value(samples, "fedadapt_loss") == pytest.approx(history[-1]["loss"], rel=1e-12)
        assert value(samples, "fedadapt_updates_rejected_total", reason="malformed") == done
        assert value(samples, "fedadapt_round_seconds_count") == done
        assert value(samples, "fedadapt_round_seconds_sum") == pytest.approx(sum(r["seconds"] for r in history))
        assert value(samples, "fedadapt_exchange_seconds_sum") == pytest.approx(
            sum(r["exchange_seconds"] for r in history)
        )
        assert value(samples, "fedadapt_server_resident_bytes") > 50e6  # torch and a model: tens of MB at least
        assert not any(name == "fedadapt_dp_epsilon" for name, _ in samples)  # no DP in this run
    during = grid.scrapes[1]  # taken as round 2 sent its messages
    assert value(during, "fedadapt_round") == 2 and value(during, "fedadapt_stage", fedadapt_stage="training") == 1
    assert (value(during, "fedadapt_devices_connected"), value(during, "fedadapt_devices_sampled")) == (3, 3)
    assert value(grid.scrapes[-1], "fedadapt_stage", fedadapt_stage="finished") == 1
    assert [r["rejected"][0]["reason"].startswith("malformed reply") for r in rounds] == [True] * 3
    labels = {dict(k[1]).get("reason") for k in grid.scrapes[-1] if k[0] == "fedadapt_updates_rejected_total"}
    assert labels == set(REASON_LABELS)  # every class from the start; none carries a device id
    assert not any("node" in str(k) or "client " in str(k) for k in grid.scrapes[-1])


def test_epsilon_is_served_under_dp(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    dp = {"mode": "central", "noise-multiplier": 1.0, "clip": 0.05, "delta": 1e-3}
    scenario = server_scenario_file(tmp_path, tiny_bert, privacy={"mode": "none", "dp": dp}, rounds=2)
    grid = ScrapingGrid(port, 3, server_run_config(scenario, tmp_path / "run", **{"metrics-port": port}))
    metrics = run_server(grid)
    assert value(grid.scrapes[1], "fedadapt_dp_epsilon") == pytest.approx(metrics["rounds"][0]["epsilon"], rel=1e-12)


def test_rejection_reasons_fold_into_a_bounded_set_of_classes() -> None:
    reasons = {
        "no reply within the round timeout (60 s): a lost or straggling device": "timeout",
        "client error: CUDA out of memory": "client_error",
        "envelope rejected (tag): bad tag": "envelope",
        "malformed reply: metric 'node 7 says hi' is 'x'": "malformed",
        "payload of 99999999 bytes exceeds the 5000 the largest legal one takes": "too_large",
        "StateError: delta L2 norm 1e+09 exceeds max_norm 10": "norm",
        "num-examples 18446744073709551615 exceeds limit 1000": "examples",
        "a second reply from the same client this round": "duplicate",
        "SchemaMismatch: tensor 'a' has shape (3,), expected (4,)": "schema",
        "unexpected KeyError while reading the reply: 'x'": "unexpected",
        "client 3 (node 12) <script>": "other",
        "": "other",
    }
    assert {reason: reason_class(reason) for reason in reasons} == reasons
    assert reason_class(None) == reason_class(["a list"]) == "other"
    metrics = RunMetrics(RunFacts("tiny", "secagg+", 2))
    hostile = {"round": 1, "accepted": 1, "bytes_up": 10, "bytes_down": 10, "seconds": 1.0}
    hostile["rejected"] = [{"client": f"node {i}", "reason": f"client error {'x' * i}"} for i in range(50)]
    hostile["dropped"] = [{"client": "node 1", "stage": "secagg-masked"}, {"client": "node 2", "stage": "../etc"}]
    metrics.round_finished(hostile, 1)
    samples = {s.labels.get("reason") for f in metrics.registry.collect() for s in f.samples if "rejected" in s.name}
    assert samples <= set(REASON_LABELS) | {None}
    rejected = {s.labels["reason"]: s.value for f in metrics.registry.collect() for s in f.samples
                if s.name == "fedadapt_updates_rejected_total"}  # fmt: skip
    assert (rejected["client_error"], rejected["dropped_masked"], rejected["other"]) == (50, 1, 1)
    assert math.isnan(next(s.value for f in metrics.registry.collect() for s in f.samples if s.name == "fedadapt_loss"))


def test_the_endpoint_binds_loopback_unless_told_and_warns_when_exposed(caplog: pytest.LogCaptureFixture) -> None:
    run = fleet_run_from_config(
        {"scenario": "simulations/quickstart.toml", "out-dir": "x", "metrics-port": 9400}, Path()
    )
    assert run.metrics == MetricsEndpoint(port=9400, host="127.0.0.1") and not run.metrics.exposed
    with caplog.at_level(logging.WARNING):
        for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
            MetricsEndpoint(port=9400, host=host).warn_if_exposed()
        assert not caplog.records
        for host in ("0.0.0.0", "::", "192.0.2.7", "metrics.example.org"):
            MetricsEndpoint(port=9400, host=host).warn_if_exposed()
    assert len(caplog.records) == 4 and all("without TLS or authentication" in r.message for r in caplog.records)
    assert MetricsEndpoint().enabled is False


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"port": 70000}, "--metrics-port must be in 1..65535"),
        ({"port": -1}, "--metrics-port must be in 1..65535"),
        ({"port": 9400, "host": ""}, "--metrics-host"),
        ({"port": 9400, "host": " 0.0.0.0"}, "--metrics-host"),
        ({"dashboard": True}, "add --metrics-port"),
    ],
)
def test_bad_endpoints_are_refused_with_what_to_do(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MetricsEndpoint(**values)


def test_a_taken_port_fails_with_what_to_do() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = MetricsEndpoint(port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match="choose a free --metrics-port"):
            monitoring.MetricsServer(endpoint, RunMetrics(RunFacts("tiny", "none", 1)).registry).start()


def test_simulate_and_serve_pass_the_endpoint_to_the_server_app_through_the_run_config(tmp_path: Path) -> None:
    from simulations.runner import plan_simulation, run_config_values

    endpoint = MetricsEndpoint(port=9401, host="::1", dashboard=True)
    plan = plan_simulation(Path("simulations/quickstart.toml"), 2, tmp_path / "out", False, endpoint=endpoint)
    values = run_config_values(plan)
    assert (values["metrics-port"], values["metrics-host"], values["dashboard"]) == (9401, "::1", True)
    assert fleet_run_from_config(values, Path.cwd()).metrics == endpoint
    assert "metrics-port" not in run_config_values(
        plan_simulation(Path("simulations/quickstart.toml"), 2, tmp_path / "o", False)
    )


def test_the_cli_refuses_a_dashboard_without_a_port_before_anything_starts() -> None:
    from typer.testing import CliRunner

    from fedadapt.cli import app

    result = CliRunner().invoke(app, ["serve", "--config", "simulations/quickstart.toml", "--dashboard"])
    assert result.exit_code == 2 and "add --metrics-port" in result.output
