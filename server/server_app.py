"""The Flower ServerApp: parses the run config and runs fedadapt's own round loop on the grid."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedadapt.checkpoint.rounds import list_checkpoints
from fedadapt.errors import ConfigError
from fedadapt.fleet.run_config import fleet_run_from_config
from fedadapt.fleet.run_status import StatusFile
from server.federation import Federation

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # inside the FAB Flower unpacks, or the checkout

app = ServerApp()


def _log_rounds() -> None:
    """INFO from fedadapt and the server (one line per round) into the run's log; other libraries stay quiet."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in ("fedadapt", "server"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the scenario named in the run config."""
    _log_rounds()
    run = fleet_run_from_config(context.run_config, PROJECT_ROOT)
    if list_checkpoints(run.out_dir) and not run.resume:
        raise ConfigError(
            f"{run.out_dir} already holds checkpoints: set resume=true to continue, or use another out-dir"
        )
    federation = Federation(run, context.run_id)
    if run.resume:
        federation.resume()
    with watched(federation):
        federation.run_rounds(grid)


@contextlib.contextmanager
def watched(federation: Federation) -> Iterator[None]:
    """The run's status.json, and its metrics endpoint when the run config asks for one, while the rounds run."""
    scenario = federation.scenario
    federation.observers.append(StatusFile(federation.run.out_dir, scenario.rounds, federation.completed_rounds))
    endpoint = federation.run.metrics
    if not endpoint.enabled:
        yield
        return
    from server.monitoring import MetricsObserver, MetricsServer, RunFacts, RunMetrics  # prometheus: only when asked

    facts = RunFacts(scenario.name, federation.privacy.mode, scenario.rounds, dp=federation.dp is not None)
    metrics = RunMetrics(facts)
    metrics.resumed(federation.history)
    server = MetricsServer(endpoint, metrics.registry, federation.run.out_dir)
    server.start()
    federation.observers.append(MetricsObserver(metrics))
    if endpoint.dashboard:
        from server.dashboard import PlotRefresher  # matplotlib: only with the live page

        federation.observers.append(PlotRefresher(federation.run.out_dir))
    try:
        yield
    finally:
        server.stop()
