"""PNG plots of a fleet simulation run: does federated adapter tuning learn, and what does it cost to send?

``accuracy.png`` shows accuracy by round (beside full-model FedAvg's when that run exists); ``bytes.png`` shows the
cumulative bytes the clients uploaded, on a log scale, beside what full-model FedAvg uploaded (or would have
uploaded), with the ratio between the two. A run under differential privacy also gets
``accuracy_vs_epsilon.png``: accuracy against the ε spent so far, round by round. All read a run's ``metrics.json``
as ``server.federation`` writes it.
"""

from __future__ import annotations

import io
from itertools import accumulate
from pathlib import Path
from typing import Any

from fedadapt.checkpoint.atomic_files import write_bytes_atomic

ACCURACY_PNG = "accuracy.png"
BYTES_PNG = "bytes.png"
EPSILON_PNG = "accuracy_vs_epsilon.png"  # runs under [privacy.dp] only
FIGSIZE = (8.0, 5.0)  # inches: 800 x 500 pixels at DPI
DPI = 100
FULL_LABEL = "full-model FedAvg"


def write_plots(out_dir: Path, metrics: dict[str, Any], full_model: dict[str, Any] | None = None) -> list[Path]:
    """Write accuracy.png and bytes.png (and accuracy_vs_epsilon.png under DP) into ``out_dir``; return their paths.

    ``metrics`` is a run's metrics.json; ``full_model``, when given, the metrics.json of the same scenario run as
    full-model FedAvg. Without it, the full-model bytes line is computed from ``summary.full_model_bytes``.
    Raises ValueError when the run has no rounds yet.
    """
    if not metrics.get("rounds"):
        raise ValueError("metrics.json has no rounds yet: nothing to plot")
    out_dir = Path(out_dir)
    paths = [out_dir / ACCURACY_PNG, out_dir / BYTES_PNG]
    draws = [_draw_accuracy, _draw_bytes]
    if any(r.get("epsilon") is not None for r in metrics["rounds"]):
        paths.append(out_dir / EPSILON_PNG)
        draws.append(_draw_epsilon)
    for path, draw in zip(paths, draws, strict=True):
        fig = _figure()
        draw(fig.add_subplot(), metrics, full_model)
        # Rendered in memory, then temp file + rename: a crash never leaves a half-written PNG.
        write_bytes_atomic(path, _png(fig))
        fig.clear()
    return paths


def _figure() -> Any:
    # Imported here so that importing this module stays cheap. A bare Figure on an Agg canvas draws off-screen and
    # is never registered with pyplot, so no state leaks between calls and the figure is freed once dropped.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _run_label(metrics: dict[str, Any]) -> str:
    scenario = metrics.get("scenario", {})
    if scenario.get("method") == "full":
        return FULL_LABEL
    return f"adapters ({scenario.get('method', '?')}, {scenario.get('compression', '?')})"


def _plot_series(ax: Any, rounds: list[dict[str, Any]], key: str, label: str, **style: Any) -> None:
    # Rounds without a value (no evaluation that round) are left out rather than drawn as zero.
    points = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, label=label, **style)


def _finish(ax: Any, metrics: dict[str, Any], title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(f"{metrics.get('scenario', {}).get('name', 'run')}: {title}")
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an empty legend only draws a warning
        ax.legend(loc="best")


def _draw_accuracy(ax: Any, metrics: dict[str, Any], full_model: dict[str, Any] | None) -> None:
    label = _run_label(metrics)
    source = metrics.get("summary", {}).get("accuracy_source", "central")
    _plot_series(ax, metrics["rounds"], "accuracy", f"{label}: {source} accuracy", marker="o")
    if source != "clients":  # with personal heads, accuracy already is the clients' accuracy
        own = f"{label}: clients' accuracy on own test splits"
        _plot_series(ax, metrics["rounds"], "client_accuracy", own, marker="o", linestyle="--")
    if full_model:
        full_source = full_model.get("summary", {}).get("accuracy_source", "central")
        _plot_series(ax, full_model["rounds"], "accuracy", f"{FULL_LABEL}: {full_source} accuracy", marker="s")
    ax.set_ylim(0, 1)
    _finish(ax, metrics, "accuracy by round", "accuracy")


def _draw_bytes(ax: Any, metrics: dict[str, Any], full_model: dict[str, Any] | None) -> None:
    rounds = [r["round"] for r in metrics["rounds"]]
    adapter = list(accumulate(r["bytes_up"] for r in metrics["rounds"]))
    ax.plot(rounds, adapter, marker="o", label=_run_label(metrics))

    full_rounds, full = [], []
    if full_model and full_model.get("rounds"):
        full_rounds = [r["round"] for r in full_model["rounds"]]
        full = list(accumulate(r["bytes_up"] for r in full_model["rounds"]))
        ax.plot(full_rounds, full, marker="s", label=f"{FULL_LABEL} (measured)")
    elif per_upload := metrics.get("summary", {}).get("full_model_bytes"):
        # No full-model run to compare with: what the same uploads would cost if each carried the whole model.
        full_rounds = rounds
        full = list(accumulate(per_upload * r["uploads"] for r in metrics["rounds"]))
        ax.plot(rounds, full, ls="--", label=f"{FULL_LABEL} (computed: {per_upload / 1e6:,.1f} MB per upload)")

    if full:
        _annotate_ratio(ax, rounds, adapter, full_rounds, full)
    if max(adapter + full) > 0:  # a log axis needs a positive value
        ax.set_yscale("log")
    _finish(ax, metrics, "cumulative bytes uploaded", "cumulative bytes uploaded (bytes, log scale)")


def _annotate_ratio(ax: Any, rounds: list[int], adapter: list[int], full_rounds: list[int], full: list[int]) -> None:
    # Compared at the last round both runs reached, so a full-model run still in progress isn't unfair to it.
    last = min(rounds[-1], full_rounds[-1])
    ours, theirs = _at(rounds, adapter, last), _at(full_rounds, full, last)
    if ours <= 0 or theirs <= 0:
        return
    ratio = theirs / ours
    factor, word = (ratio, "fewer") if ratio >= 1 else (1 / ratio, "more")
    text = f"{factor:,.0f}× {word} bytes" if factor >= 10 else f"{factor:,.1f}× {word} bytes"
    ax.annotate("", xy=(last, theirs), xytext=(last, ours), arrowprops={"arrowstyle": "<->", "color": "0.4"})
    ax.annotate(
        text,
        xy=(last, (ours * theirs) ** 0.5),  # the middle of the gap on a log axis
        xytext=(-8, 0),
        textcoords="offset points",
        ha="right",
        va="center",
        fontweight="bold",
    )


def _at(rounds: list[int], cumulative: list[int], last: int) -> int:
    """The cumulative value at round ``last``: that of the latest record at or before it."""
    return next((value for r, value in zip(reversed(rounds), reversed(cumulative), strict=True) if r <= last), 0)


def _draw_epsilon(ax: Any, metrics: dict[str, Any], full_model: dict[str, Any] | None) -> None:
    """Accuracy against the ε spent after each round (δ as in the summary), each point labelled with its round."""
    points = [(r["epsilon"], r["accuracy"], r["round"]) for r in metrics["rounds"] if r.get("epsilon") is not None]
    points = [p for p in points if p[1] is not None]
    if points:
        epsilons, accuracies, rounds = zip(*points, strict=True)
        ax.plot(epsilons, accuracies, marker="o", label=_run_label(metrics))
        for epsilon, accuracy, number in points:
            ax.annotate(str(number), (epsilon, accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    delta = metrics.get("summary", {}).get("delta")
    ax.set_ylim(0, 1)
    ax.set_title(f"{metrics.get('scenario', {}).get('name', 'run')}: accuracy against privacy spent")
    ax.set_xlabel("ε after the round" + (f" (δ = {delta:.2g})" if isinstance(delta, float) else ""))
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(loc="best")
