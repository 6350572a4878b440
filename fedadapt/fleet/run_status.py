"""A run's state from its folder: the server's ``status.json`` heartbeat, and what ``fedadapt status`` makes of it.

The ServerApp rewrites ``<out>/status.json`` (atomically) at every stage: its pid and that process's start time,
the stage, the round. Read beside ``metrics.json``, it tells a finished run from a running one and from one whose
server died: an incomplete run whose recorded process is gone (or is another process with the same pid) failed.
Both files are read as hostile input, with size and depth limits.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedadapt import jsonsafe
from fedadapt.checkpoint.atomic_files import write_bytes_atomic
from fedadapt.errors import ConfigError, JsonInputError
from fedadapt.fleet.rejections import round_rejections

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"  # written by server.federation
# The stages the server reports: the round loop moves through WAITING..CHECKPOINTING every round; a run ends
# FINISHED (its planned rounds), STOPPED (early: the privacy budget) or FAILED (an error ended the server).
STARTING, WAITING, TRAINING, AGGREGATING, EVALUATING, CHECKPOINTING = (
    *("starting", "waiting", "training", "aggregating", "evaluating", "checkpointing"),
)
FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"
STAGES = (STARTING, WAITING, TRAINING, AGGREGATING, EVALUATING, CHECKPOINTING, FINISHED, STOPPED, FAILED)
RUNNING, UNKNOWN = "running", "unknown"  # verdicts of a run that has not ended (alive, or not checkable here)
MAX_STATUS_BYTES = 64 * 1024
MAX_METRICS_BYTES = 1024 * 1024 * 1024  # as simulations.runner reads it: a few KB a round
MAX_PID = 2**22  # Linux's pid_max ceiling


class StatusFile:
    """Writes ``<out>/status.json`` for this process; a ``server.run_state.RoundObserver``."""

    def __init__(self, out_dir: Path, planned_rounds: int, completed: int = 0) -> None:
        self.path = Path(out_dir) / STATUS_FILE
        self.fields: dict[str, Any] = {
            "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "host": socket.gethostname(),
            "started": time.time(),
            "stage": STARTING,
            "round": completed,
            "completed": completed,
            "planned": planned_rounds,
        }
        self.write()

    def stage(self, stage: str, server_round: int) -> None:
        self.fields |= {"stage": stage, "round": server_round}
        self.write()

    def round_sampled(self, server_round: int, connected: int, sampled: int) -> None:
        """Nothing to record: the stage says the round is on."""

    def round_finished(self, record: dict[str, Any], completed: int) -> None:
        self.fields["completed"] = completed
        self.write()

    def write(self) -> None:
        self.fields["updated"] = time.time()
        write_bytes_atomic(self.path, (json.dumps(self.fields, indent=2) + "\n").encode())


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (Linux /proc); None where that is unreadable.

    With the pid it names one process: a pid the system gave to a new process after the server died
    has another start time."""
    try:
        # Field 22 of /proc/<pid>/stat; the name in field 2 may hold spaces, so split after its parenthesis.
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, start: int | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` (None: not recorded) still runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    now = process_start(pid)
    return start is None or now is None or now == start


@dataclass(frozen=True)
class RunReport:
    """What ``fedadapt status`` prints: the run's verdict and its figures so far."""

    folder: str
    state: str  # finished, stopped, running, failed or unknown
    why: str  # one line: how the state was found
    scenario: str | None = None
    privacy: str | None = None
    stage: str | None = None
    round: int | None = None
    completed: int = 0
    planned: int | None = None
    accuracy: float | None = None
    epsilon: float | None = None
    rejected: dict[str, int] = field(default_factory=dict)  # by reason class, all rounds
    rounds: list[dict[str, Any]] = field(default_factory=list)  # round, accuracy, accepted, clients, rejected, ε

    @property
    def failed(self) -> bool:
        return self.state == FAILED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_run(folder: Path) -> RunReport:
    """The state of the run in ``folder`` from its metrics.json and status.json.

    ConfigError when the folder holds neither; JsonInputError (naming the file) when one is oversized,
    too deep, not JSON, or not the object the server writes.
    """
    folder = Path(folder)
    metrics = _read_object(folder / METRICS_FILE, MAX_METRICS_BYTES)
    status = _read_object(folder / STATUS_FILE, MAX_STATUS_BYTES)
    if metrics is None and status is None:
        raise ConfigError(f"{folder} holds no run: no {METRICS_FILE} or {STATUS_FILE} (give the run's --out folder)")
    metrics, status = metrics or {}, status or {}
    rounds = _rounds(metrics, folder / METRICS_FILE)
    state, why = _verdict(metrics, status, folder / STATUS_FILE)
    rejected: Counter[str] = Counter()
    for record in rounds:
        rejected += round_rejections(record)
    last = rounds[-1] if rounds else {}
    scenario = metrics.get("scenario")
    return RunReport(
        folder=str(folder),
        state=state,
        why=why,
        scenario=_text(scenario.get("name")) if isinstance(scenario, dict) else None,
        privacy=_text(metrics["privacy"]) if "privacy" in metrics else None,
        stage=_text(status.get("stage")) if status.get("stage") in STAGES else None,
        round=_count(status.get("round")),
        completed=len(rounds),
        planned=_planned(metrics) or _count(status.get("planned")),
        accuracy=_number(last.get("accuracy")),
        epsilon=_number(last.get("epsilon")),
        rejected=dict(sorted(rejected.items())),
        rounds=[_round_row(record) for record in rounds],
    )


def _verdict(metrics: dict[str, Any], status: dict[str, Any], status_path: Path) -> tuple[str, str]:
    """(state, why) from the two files: metrics' ``complete`` first, then the server's recorded process."""
    if metrics.get("complete") is True:
        summary = metrics.get("summary")
        stopped = summary.get("stopped") if isinstance(summary, dict) else None
        return (STOPPED, f"stopped early: {_text(stopped)}") if stopped is not None else (FINISHED, "metrics complete")
    if status.get("stage") == FAILED:
        return FAILED, "the server reported an error (see flwr.log in this folder)"
    if not status:
        return UNKNOWN, f"incomplete, and no {STATUS_FILE}: cannot tell a running server from a dead one"
    pid, start = _count(status.get("pid")), _count(status.get("pid_start"))
    if pid is None or not 0 < pid <= MAX_PID or (start is None and status.get("pid_start") is not None):
        shown = _text(f"{status.get('pid')!r} (started {status.get('pid_start')!r})", 100)
        raise JsonInputError(str(status_path), f"pid {shown} is not a process id: not a status file fedadapt wrote")
    host = _text(status.get("host"))
    if host != socket.gethostname():
        return UNKNOWN, f"the server runs on {host}: run fedadapt status there"
    if process_alive(pid, start):
        return RUNNING, f"server process {pid} is alive"
    return FAILED, f"server process {pid} is gone and the run is incomplete"


def _planned(metrics: dict[str, Any]) -> int | None:
    """The rounds metrics.json's scenario plans, with a chained head warm-up's (simulate) counted in."""
    scenario, summary = metrics.get("scenario"), metrics.get("summary")
    rounds = _count(scenario.get("rounds")) if isinstance(scenario, dict) else None
    warmup = _count(summary.get("head_warmup_rounds")) if isinstance(summary, dict) else None
    return None if rounds is None else rounds + (warmup or 0)


def _read_object(path: Path, max_bytes: int) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file does not exist."""
    if not path.exists():
        return None
    data = jsonsafe.load_file(path, max_bytes=max_bytes)
    if not isinstance(data, dict):
        raise JsonInputError(str(path), f"holds a {type(data).__name__}, not the object fedadapt writes")
    return data


def _rounds(metrics: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    rounds = metrics.get("rounds", [])
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise JsonInputError(str(path), "rounds is not a list of objects")
    return rounds


def _round_row(record: dict[str, Any]) -> dict[str, Any]:
    """The figures of one round that the status and the live page show (aggregates only)."""
    return {
        "round": _count(record.get("round")),
        "accuracy": _number(record.get("accuracy")),
        "loss": _number(record.get("loss")),
        "epsilon": _number(record.get("epsilon")),
        "accepted": _count(record.get("accepted")),
        "clients": _count(record.get("clients")),
        "rejected": sum(round_rejections(record).values()),
        "bytes_up": _count(record.get("bytes_up")),
        "bytes_down": _count(record.get("bytes_down")),
        "seconds": _number(record.get("seconds")),
    }


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _text(value: object, limit: int = 200) -> str:
    """A string from the files, cut to ``limit`` and stripped of control characters (it goes to a terminal)."""
    text = value if isinstance(value, str) else "" if value is None else repr(value)
    return "".join(c if c.isprintable() else "?" for c in text[:limit])
