"""The live page of a run (``--dashboard``): one HTML page and the run's plots, served beside ``/metrics``.

The page is built on each request from the run's own files (``fedadapt.fleet.run_status.inspect_run``), so it
shows what ``fedadapt status`` shows: the state, the rounds table and the rejections by class; the accuracy and
bytes plots are the PNGs the run draws (``server.plots``), redrawn by the server after every round. Everything
read from the files is escaped; no script runs on the page (a meta refresh reloads it), and its
Content-Security-Policy allows nothing but its own images and inline style.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from fedadapt import jsonsafe
from fedadapt.fleet.run_status import MAX_METRICS_BYTES, METRICS_FILE, RunReport, inspect_run
from server.plots import ACCURACY_PNG, BYTES_PNG, EPSILON_PNG, write_plots

logger = logging.getLogger(__name__)

PLOTS = (ACCURACY_PNG, BYTES_PNG, EPSILON_PNG)  # the only files the page serves
MAX_PNG_BYTES = 16 * 1024 * 1024
REFRESH_SECONDS = 5


class PlotRefresher:
    """A ``RoundObserver`` that redraws the run's PNGs from its metrics.json after every round."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)

    def stage(self, stage: str, server_round: int) -> None:
        """Plots change with rounds only."""

    def round_sampled(self, server_round: int, connected: int, sampled: int) -> None:
        """Plots change with rounds only."""

    def round_finished(self, record: dict[str, Any], completed: int) -> None:
        metrics = jsonsafe.load_file(self.out_dir / METRICS_FILE, max_bytes=MAX_METRICS_BYTES)
        write_plots(self.out_dir, metrics)


def read_plot(out_dir: Path, name: str) -> bytes | None:
    """The bytes of one of ``PLOTS`` in ``out_dir``; None for any other name, a missing or an oversized file."""
    if name not in PLOTS:
        return None
    try:
        with (Path(out_dir) / name).open("rb") as handle:
            data = handle.read(MAX_PNG_BYTES + 1)
    except OSError:
        return None
    return data if len(data) <= MAX_PNG_BYTES else None


def page(out_dir: Path) -> str:
    """The live page of the run in ``out_dir``."""
    try:
        report = inspect_run(out_dir)
    except Exception as err:  # the page says what is wrong rather than failing: the run goes on
        logger.warning("the live page cannot read the run: %s", err)
        return _document("run", f"<p class=error>cannot read the run: {html.escape(str(err)[:300])}</p>")
    plots = [name for name in PLOTS if (Path(out_dir) / name).is_file()]
    body = [_state(report), _rejections(report), _plots(plots, report.completed), _rounds_table(report)]
    return _document(report.scenario or "run", "\n".join(body))


def _document(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta http-equiv=refresh content={REFRESH_SECONDS}>
<title>fedadapt: {html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }}
.state {{ font-weight: bold; }} .failed, .error {{ color: #b00; }} img {{ max-width: 48%; }}
</style></head>
<body>
{body}
</body></html>
"""


def _state(report: RunReport) -> str:
    planned = "?" if report.planned is None else str(report.planned)
    stage = f", {report.stage} in round {report.round}" if report.stage and report.state == "running" else ""
    figures = f"rounds {report.completed} of {planned}"
    if report.accuracy is not None:
        figures += f" · accuracy {report.accuracy:.4f}"
    if report.epsilon is not None:
        figures += f" · ε {report.epsilon:.4g}"
    return (
        f"<h1>{html.escape(report.scenario or 'run')}</h1>\n"
        f"<p id=state class='state {html.escape(report.state)}'>{html.escape(report.state)}{html.escape(stage)}"
        f" ({html.escape(report.why)})</p>\n"
        f"<p>privacy {html.escape(report.privacy or '?')} · {html.escape(figures)}</p>"
    )


def _rejections(report: RunReport) -> str:
    if not report.rejected:
        return "<p id=rejections>no update rejected</p>"
    items = "".join(f"<li>{html.escape(reason)}: {count}</li>" for reason, count in report.rejected.items())
    return f"<p>updates rejected, by reason:</p><ul id=rejections>{items}</ul>"


def _plots(plots: list[str], completed: int) -> str:
    if not plots:
        return "<p id=plots>the plots appear after the first round</p>"
    # The round in the URL makes the browser fetch each round's plot anew.
    images = "".join(
        f"<img src='{html.escape(name)}?round={completed}' alt='{html.escape(name.removesuffix('.png'))}'>"
        for name in plots
    )
    return f"<p id=plots>{images}</p>"


COLUMNS = (
    ("round", "round", "{}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("ε", "epsilon", "{:.4g}"),
    ("accepted", "accepted", "{}"),
    ("sampled", "clients", "{}"),
    ("rejected", "rejected", "{}"),
    ("bytes up", "bytes_up", "{:,}"),
    ("bytes down", "bytes_down", "{:,}"),
    ("seconds", "seconds", "{:.1f}"),
)


def _rounds_table(report: RunReport) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _, _ in COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(key), form))}</td>" for _, key, form in COLUMNS) + "</tr>"
        for row in reversed(report.rounds)  # the newest first
    )
    return f"<table id=rounds><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _cell(value: object, form: str) -> str:
    return "-" if value is None else form.format(value)
