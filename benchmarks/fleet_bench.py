"""What the federated benchmarks share: scenario files written for a run, a run's figures read from its
metrics.json, its final model scored on the whole test split, and the peak memory of the processes it starts.

The figures come from the per-round records ``server.federation`` writes (simulations/README.md):
``accuracy`` (the server's seeded test sample), ``seconds`` (the round's wall time on the server),
``bytes_up`` and ``uploads``, and per device in ``client_results``: ``train-seconds`` (the optimizer
steps), ``prefix-cache-seconds`` (reading or filling its frozen-prefix cache) and ``client-seconds``
(its whole message: decoding, data, cache, training, its own evaluation, the delta).
Heavy imports (torch, the model) happen inside the functions that need them, so the parsing can be
imported and tested on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from fedadapt.fleet.scenario import ScenarioConfig  # noqa: E402
from fedadapt.fleet.scenario_file import load_scenario  # noqa: E402
from fedadapt.privacy.config import PrivacyConfig  # noqa: E402
from simulations.report import best_accuracy, mean_per, time_to_target  # noqa: E402

Record = Mapping[str, Any]


# --- scenario files ---------------------------------------------------------------------------------------------


def scenario_toml(scenario: ScenarioConfig) -> str:
    """The scenario as a TOML file: every field that differs from its default, the method's table last.

    Benchmarks run plain rounds: a scenario with a ``[privacy]`` mode or scripted faults is refused here.
    """
    if scenario.privacy != PrivacyConfig() or scenario.scripted_faults:
        raise ValueError("scenario_toml writes plain scenarios: no [privacy] table, no scripted faults")
    defaults = ScenarioConfig()
    lines: list[str] = []
    for field in dataclasses.fields(scenario):
        value = getattr(scenario, field.name)
        if field.name != "method_settings" and value != getattr(defaults, field.name):
            lines.append(f"{field.name.replace('_', '-')} = {_toml_value(value)}")
    if scenario.method_settings:
        lines += ["", "[method-settings]"]
        lines += [f"{name.replace('_', '-')} = {_toml_value(value)}" for name, value in scenario.method_settings]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are written alike in JSON and TOML


def write_scenario(scenario: ScenarioConfig, path: Path) -> Path:
    """Write ``scenario`` to ``path`` and check that it reads back as the same scenario."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(scenario_toml(scenario))
    if load_scenario(path) != scenario:
        raise RuntimeError(f"{path} does not read back as the scenario written (a path relative to it?)")
    return path


# --- a run's figures --------------------------------------------------------------------------------------------


def wall_curve(records: Sequence[Record]) -> list[tuple[float, float]]:
    """(seconds since the first round began, accuracy) after every scored round."""
    elapsed, points = 0.0, []
    for record in records:
        elapsed += float(record["seconds"])
        if record.get("accuracy") is not None:
            points.append((elapsed, float(record["accuracy"])))
    return points


def device_rounds(records: Sequence[Record]) -> list[Record]:
    """Every device's reply metrics in every round (the devices that trained and answered)."""
    return [c for record in records for c in record.get("client_results", []) if "train-seconds" in c]


def device_compute_seconds(records: Sequence[Record]) -> float | None:
    """Mean seconds of device compute per device-round: its training plus reading or filling its prefix cache."""
    seconds = [float(c["train-seconds"]) + float(c.get("prefix-cache-seconds", 0.0)) for c in device_rounds(records)]
    return statistics.fmean(seconds) if seconds else None


def device_message_seconds(records: Sequence[Record]) -> float | None:
    """Mean seconds a device spent on its whole message per round (``client-seconds``)."""
    seconds = [float(c["client-seconds"]) for c in device_rounds(records) if "client-seconds" in c]
    return statistics.fmean(seconds) if seconds else None


def run_figures(records: Sequence[Record], targets: Sequence[float]) -> dict[str, Any]:
    """The figures of one row from its per-round records (``simulations.report.chain_rounds`` of its phases)."""
    figures: dict[str, Any] = {
        "rounds": len(records),
        "seconds": sum(float(r["seconds"]) for r in records),
        "best_sample_accuracy": best_accuracy(records),
        "final_sample_accuracy": records[-1].get("accuracy") if records else None,
        "device_compute_seconds": device_compute_seconds(records),
        "device_message_seconds": device_message_seconds(records),
        "bytes_up_per_device_round": mean_per(records, "bytes_up", "uploads"),
        "server_peak_rss_mb": max((r.get("server_peak_rss_mb") or 0.0 for r in records), default=None),
    }
    for target in targets:
        reached = time_to_target(records, target)
        figures[f"rounds_to_{target:g}"] = reached["round"] if reached else None
        figures[f"seconds_to_{target:g}"] = reached["seconds"] if reached else None
    return figures


def read_metrics(folder: Path) -> dict[str, Any] | None:
    """A finished run's metrics.json (None when the folder holds none, or an unfinished one)."""
    from fedadapt import jsonsafe

    path = folder / "metrics.json"
    if not path.is_file():
        return None
    metrics = dict(jsonsafe.load_file(path, max_bytes=1024**3))
    return metrics if metrics.get("complete") else None


# --- the final model on the whole test split ---------------------------------------------------------------------


def full_test_accuracy(folder: Path, scenario: ScenarioConfig, test_examples: int | None = None) -> float:
    """The final model of a run on the whole test split (the rounds used a seeded sample), or on a
    seeded ``test_examples`` of it."""
    from fedadapt.checkpoint.folder import load_adapter
    from fedadapt.fleet.build import encode_split
    from fedadapt.fleet.data import load_fleet_data
    from fedadapt.train.loop import evaluate

    whole = dataclasses.replace(scenario, server_test_examples=test_examples)  # with_overrides ignores None
    fleet = load_fleet_data(whole)
    model = load_adapter(folder)
    data = encode_split(model, fleet.splits.test, fleet.labels, scenario.max_length)
    return evaluate(model, data, device=scenario.device).accuracy


# --- memory -------------------------------------------------------------------------------------------------------


class ProcessPeaks:
    """Samples every process below this one twice a second: each one's peak RSS, by its command line.

    A run's devices live in Flower's simulation workers (Ray workers: ``ray/_private/workers/`` in their command line),
    each serving many virtual devices in turn, so a worker's peak is the most one device's work needed
    there plus what the worker holds anyway (the backbone, Ray's own runtime).
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peaks: dict[int, tuple[str, float]] = {}  # pid -> (command line, peak RSS MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mib(self, marker: str = "") -> float | None:
        """The largest peak RSS of the processes whose command line holds ``marker``."""
        peaks = [rss for name, rss in self.peaks.values() if marker in name]
        return max(peaks) if peaks else None

    def largest(self, count: int = 5) -> list[tuple[str, float]]:
        return sorted(self.peaks.values(), key=lambda item: -item[1])[:count]

    def _run(self) -> None:
        from simulations.processes import descendants

        while not self._stop.wait(self.interval):
            for pid in descendants(os.getpid()):
                rss = _status_mib(pid, "VmRSS:")
                name, before = self.peaks.get(pid, (None, 0.0))
                self.peaks[pid] = (name or _command_line(pid), max(before, rss))


def _status_mib(pid: int, field: str) -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return float(line.split()[1]) / 1024
    return 0.0


def _command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
    return "?"
