"""Starting and supervising each SuperNode's warm executor: the launcher's side of ``deploy/warm_executor.py``.

The executor itself runs as a script (``python -P``) and imports nothing of the project; this module is
what ``fedadapt node`` and ``fedadapt serve --local-supernodes`` import to start it, pass it its
environment, and start a new one when it exits while its SuperNode still runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy import warm_executor
from deploy.warm_executor import (
    FAST_POLL_SECONDS,
    MAX_TASK_SECONDS_ENV,
    MIN_TASK_SECONDS,
    NO_FORK,
    POLL_INTERVAL_ENV,
    TASK_MARGIN_SECONDS,
)
from simulations.processes import lowered_priority

logger = logging.getLogger("fedadapt.executors")

MIN_LIFETIME_SECONDS = 30.0  # an executor that dies sooner is not restarted: it cannot start at all
_SUPERNODE_CHECK_SECONDS = 1.0  # how often a supervisor looks at its SuperNode while the executor runs


def command(runtime_api_address: str, supernode_pid: int, label: str = "") -> list[str]:
    """The command line that starts the warm executor of one SuperNode (plain HTTP on its loopback Runtime API).

    Run as a script with ``-P``: neither the ``deploy`` package nor the script's folder gets onto the
    parent's import path, so no module of the project is preloaded for the children.
    """
    script = str(Path(warm_executor.__file__).resolve())
    line = [sys.executable, "-P", script, "--runtime-api-address", runtime_api_address, "--insecure"]
    line += ["--parent-pid", str(supernode_pid)]
    return [*line, "--label", label] if label else line


def run_cold(cold: bool) -> bool:
    """Whether devices run cold: asked for (``--cold-devices``), or forced where ``os.fork`` is missing.

    Called once by each launcher (``fedadapt node``, ``serve --local-supernodes``); the forced case logs why.
    """
    if cold or hasattr(os, "fork"):
        return cold
    logger.warning(NO_FORK)
    return True


def fast_polling(env: dict[str, str]) -> dict[str, str]:
    """``env`` with SuperExec's task poll at ``FAST_POLL_SECONDS`` (Flower's: 1 s), unless the user set it.

    Flower's own SuperExec (the SuperLink's, and a cold SuperNode's) reads the same variable.
    """
    return env if POLL_INTERVAL_ENV in env else env | {POLL_INTERVAL_ENV: str(FAST_POLL_SECONDS)}


def task_time_limit(env: dict[str, str], round_timeout: float) -> dict[str, str]:
    """``env`` with the max task time of a scenario's devices (its round-timeout + a margin), unless the user set it."""
    if MAX_TASK_SECONDS_ENV in env:
        return env
    return env | {MAX_TASK_SECONDS_ENV: repr(max(MIN_TASK_SECONDS, round_timeout + TASK_MARGIN_SECONDS))}


@dataclass(frozen=True)
class ExecutorSpec:
    """What one SuperNode's executor is started with; ``log_file``: append its output there (else inherit);
    ``nice``: nice levels below the launcher (its ClientApps inherit them)."""

    runtime_port: int
    env: dict[str, str]
    label: str = ""
    log_file: Path | None = None
    cwd: Path | None = None
    nice: int = 0


def start(supernode: subprocess.Popen[bytes], spec: ExecutorSpec) -> subprocess.Popen[bytes]:
    """The warm executor of ``supernode`` (whose Runtime API listens on 127.0.0.1:``spec.runtime_port``)."""
    line = lowered_priority(command(f"127.0.0.1:{spec.runtime_port}", supernode.pid, spec.label), spec.nice)
    if spec.log_file is None:
        return subprocess.Popen(line, env=fast_polling(spec.env), cwd=spec.cwd)
    with spec.log_file.open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(line, env=fast_polling(spec.env), cwd=spec.cwd, stdout=log, stderr=subprocess.STDOUT)


def supervise(
    supernode: subprocess.Popen[bytes],
    spec: ExecutorSpec,
    started: list[subprocess.Popen[bytes]],
    stopping: threading.Event | None = None,
    first: subprocess.Popen[bytes] | None = None,
) -> int:
    """Run ``supernode``'s warm executor until the SuperNode exits (its exit code), restarting it if it dies.

    Each executor started is appended to ``started`` (the caller stops them all); ``first``: one the caller
    started already (and appended). One that dies within ``MIN_LIFETIME_SECONDS`` of its start is not
    restarted: supervise returns 1 (``fedadapt node`` then stops with an error). ``stopping`` set: return 0
    at once and start nothing more (the caller is tearing the node down).
    """
    stopping = stopping or threading.Event()  # never set: supervise until the SuperNode exits
    named = f" of {spec.label}" if spec.label else ""
    executor = first
    while not stopping.is_set():
        if executor is None:
            executor = start(supernode, spec)
            started.append(executor)
        born = time.monotonic()
        while executor.poll() is None:
            if stopping.is_set():
                return 0
            with contextlib.suppress(subprocess.TimeoutExpired):
                return supernode.wait(timeout=_SUPERNODE_CHECK_SECONDS)
        if supernode.poll() is not None:
            return supernode.returncode
        if stopping.is_set():
            return 0
        if time.monotonic() - born < MIN_LIFETIME_SECONDS:
            logger.error(
                "the warm executor%s exited with %d right after its start; not restarting it",
                named,
                executor.returncode,
            )
            return 1
        logger.warning("the warm executor%s exited with %d; starting a new one", named, executor.returncode)
        executor = None
    return 0


@dataclass
class Supervisors:
    """One thread per local SuperNode, each running ``supervise`` (``fedadapt serve --local-supernodes``).

    ``stop()`` first tells every thread to start nothing more and waits for them, then the caller stops
    ``started``: an executor killed while its thread still ran would be restarted.
    """

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def add(self, supernode: subprocess.Popen[bytes], spec: ExecutorSpec) -> None:
        """Start ``supernode``'s executor here (an error to start it is the caller's), then watch it in a thread."""
        first = start(supernode, spec)
        self.started.append(first)
        thread = threading.Thread(
            target=self._supervise, args=(supernode, spec, first), name=f"executor {spec.label}", daemon=True
        )
        thread.start()
        self._threads.append(thread)  # only once started: stop() joins what is in the list

    def _supervise(
        self, supernode: subprocess.Popen[bytes], spec: ExecutorSpec, first: subprocess.Popen[bytes]
    ) -> None:
        try:
            supervise(supernode, spec, self.started, self._stopping, first)
        except Exception:  # a thread's error reaches no caller: the log is where the operator looks
            logger.exception("supervising the warm executor of %s failed; it is not restarted", spec.label)

    def stop(self) -> list[subprocess.Popen[bytes]]:
        """Start no more executors; every executor started, for the caller to stop."""
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        return list(self.started)
