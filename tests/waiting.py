"""Waiting on real Flower processes: poll for the event, give up after base seconds × one scale factor.

A test that starts a SuperLink waits for events (a log line, a checkpoint file, a process exit), never
for a fixed time. Every limit is a base measured on 2 idle cores times ``FEDADAPT_TEST_TIME_SCALE``
(default 1): a busy CI machine raises that one variable instead of each test's numbers. When a wait
runs out, the failure says which wait it was, how long it waited and why that long, and what every
process was doing: PID, running or its exit code, what runs below it, the end of each log, and
which checkpoints exist.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from simulations.processes import alive, descendants

TIME_SCALE_VARIABLE = "FEDADAPT_TEST_TIME_SCALE"
LOG_LINES = 30  # per log, in a timeout report
LOG_SUFFIXES = (".log", ".out")
POLL_SECONDS = 0.3


def time_scale() -> float:
    """``FEDADAPT_TEST_TIME_SCALE`` as a positive number (1 when unset)."""
    raw = os.environ.get(TIME_SCALE_VARIABLE, "").strip()
    if not raw:
        return 1.0
    try:
        scale = float(raw)
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{TIME_SCALE_VARIABLE}={raw!r}: expected a positive number such as 1, 2 or 0.5")
    return scale


def scaled(seconds: float) -> float:
    """A base limit in seconds (what 2 idle cores need, with a margin) times ``FEDADAPT_TEST_TIME_SCALE``."""
    return seconds * time_scale()


class WaitTimeout(AssertionError):
    """A wait ran out; the message is the full report."""


@dataclass
class Watch:
    """The processes one test started, where their logs are, and where checkpoints appear.

    ``processes`` maps a name to the process; ``logs`` names log files, ``log_folders`` folders whose
    ``*.log``/``*.out`` files are reported too (the logs a launcher's children write). ``on_poll`` runs
    at every poll (e.g. to note the process tree while it exists).
    """

    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)
    log_folders: list[Path] = field(default_factory=list)
    checkpoints: Path | None = None
    on_poll: Callable[[], None] | None = None

    def add(self, name: str, process: subprocess.Popen[bytes], log: Path | None = None) -> subprocess.Popen[bytes]:
        self.processes[name] = process
        if log is not None and log not in self.logs:
            self.logs.append(log)
        return process

    def until(
        self,
        condition: Callable[[], bool],
        what: str,
        base_seconds: float,
        must_live: Iterable[str] = (),
    ) -> None:
        """Poll ``condition()`` until true; fail with the report after ``base_seconds`` × the scale.

        A process named in ``must_live`` that exits first ends the wait at once: the event cannot come.
        """
        scale = time_scale()
        limit = base_seconds * scale
        started = time.monotonic()
        deadline = started + limit
        watched = [(name, self.processes[name]) for name in must_live]
        while True:
            if self.on_poll is not None:
                self.on_poll()
            if condition():
                return
            dead = [(name, proc.returncode) for name, proc in watched if proc.poll() is not None]
            if dead and condition():  # the event came just before the exit
                return
            if dead:
                names = ", ".join(f"{name} (exit code {code})" for name, code in dead)
                waited = time.monotonic() - started
                raise WaitTimeout(self.report(f"{names} exited after {waited:.0f} s while waiting for {what}"))
            if time.monotonic() > deadline:
                headline = (
                    f"timed out waiting for {what}: {limit:g} s = {base_seconds:g} s base × "
                    f"{TIME_SCALE_VARIABLE}={scale:g} (raise it on a busy machine)"
                )
                raise WaitTimeout(self.report(headline))
            time.sleep(POLL_SECONDS)

    def exited(self, name: str, what: str, base_seconds: float) -> int:
        """Wait until the named process exits; its exit code."""
        proc = self.processes[name]
        self.until(lambda: proc.poll() is not None, what, base_seconds)
        return int(proc.returncode)

    def says(self, name: str, log: Path, text: str, base_seconds: float, then_exits: bool = False) -> str:
        """Until ``log`` holds ``text`` while the named process runs (or, with ``then_exits``, until the process
        has exited having written it); the log's text."""
        if then_exits:
            self.exited(name, f"{name} to exit after writing {text!r} to {log.name}", base_seconds)
            if text not in _read(log):
                raise WaitTimeout(self.report(f"{name} exited without writing {text!r} to {log.name}"))
        else:
            self.until(lambda: text in _read(log), f"{text!r} in {log.name}", base_seconds, must_live=[name])
        return _read(log)

    def report(self, headline: str) -> str:
        """What the processes were doing: the headline, each process and its tree, log tails, checkpoints."""
        lines = [headline, f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", "processes:"]
        for name, proc in self.processes.items():
            lines.append(f"  {name}: {_process_line(proc)}")
            if proc.poll() is None:
                for pid in descendants(proc.pid):
                    lines.append(f"    below it: {pid} {_pid_state(pid)} {_command(pid)}")
        lines.append(_checkpoint_line(self.checkpoints))
        for log in self._all_logs():
            lines.append(f"--- last {LOG_LINES} lines of {log} ---")
            lines.extend(_tail(log))
        return "\n".join(lines)

    def _all_logs(self) -> list[Path]:
        found = list(self.logs)
        for folder in self.log_folders:
            if folder.is_dir():
                found += sorted(p for p in folder.iterdir() if p.suffix in LOG_SUFFIXES and p not in found)
        return found


def _process_line(proc: subprocess.Popen[bytes]) -> str:
    code = proc.poll()
    if code is not None:
        return f"PID {proc.pid} exited with code {code}"
    return f"PID {proc.pid} running ({_pid_state(proc.pid)})"


def _pid_state(pid: int) -> str:
    """'state R, cpu 12.3 s' from /proc; 'gone' once it has exited."""
    if not alive(pid):
        return "gone"
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return f"state {fields[0]}, cpu {(int(fields[11]) + int(fields[12])) / ticks:.1f} s"
    except (OSError, IndexError, ValueError):
        return "gone"


def _command(pid: int, width: int = 160) -> str:
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(Path(p.decode(errors="replace")).name if i == 0 else p.decode(errors="replace")
                    for i, p in enumerate(parts) if p)  # fmt: skip
    return text if len(text) <= width else text[: width - 3] + "..."


def _checkpoint_line(folder: Path | None) -> str:
    if folder is None:
        return "checkpoints: (no folder given)"
    if not folder.is_dir():
        return f"checkpoints: {folder} does not exist yet"
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    return f"checkpoints in {folder}: {', '.join(files) if files else 'none'}"


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _tail(log: Path) -> list[str]:
    if not log.exists():
        return ["(not written)"]
    lines = _read(log).splitlines()
    return lines[-LOG_LINES:] if lines else ["(empty)"]
