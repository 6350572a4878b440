"""Stopping what the launchers start (simulations.processes) and sharing the cores between local SuperNodes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from simulations.processes import alive, descendants, lowered_priority, stop_process_trees

# A parent that starts a child which ignores SIGTERM, then sleeps: the worst case a launcher meets.
STUBBORN = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
    stdout=subprocess.PIPE)
child.stdout.readline()
print('ready', flush=True)
time.sleep(600)
"""


def _start_stubborn_trees(count: int) -> list[subprocess.Popen[bytes]]:
    procs = [subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE) for _ in range(count)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return procs


def test_several_trees_stop_together_and_children_that_ignore_sigterm_are_killed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import simulations.processes as processes

    monkeypatch.setattr(processes, "STOP_TIMEOUT", 1.0)
    procs = _start_stubborn_trees(6)
    children = [pid for proc in procs for pid in descendants(proc.pid)]
    assert len(children) == 6 and all(alive(pid) for pid in children)
    started = time.monotonic()
    stop_process_trees(procs)
    took = time.monotonic() - started
    assert all(proc.poll() is not None for proc in procs)
    assert not any(alive(pid) for pid in children)
    # One shared deadline: the children's 1 s SIGTERM wait runs once, not once per tree (6 s or more).
    assert took < 4.0, took


def test_local_supernodes_split_the_cores_and_keep_a_users_setting() -> None:
    from deploy import serve  # an import error fails the test (importorskip would skip it)

    cores = os.cpu_count() or 1
    assert serve.share_cores({"PATH": "/bin"}, 1) == {"PATH": "/bin", "OMP_NUM_THREADS": str(cores)}
    assert serve.share_cores({}, 2 * cores)["OMP_NUM_THREADS"] == "1"  # never zero threads
    assert serve.share_cores({"OMP_NUM_THREADS": "3"}, 20)["OMP_NUM_THREADS"] == "3"


@pytest.mark.skipif(not hasattr(os, "nice"), reason="POSIX niceness")
def test_a_lowered_command_runs_below_the_launcher_under_its_own_pid() -> None:
    ours = os.nice(0)
    report = "import os; print(os.getpid(), os.nice(0))"
    proc = subprocess.Popen(lowered_priority([sys.executable, "-c", report], 5), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    pid, nice = (int(field) for field in out.split())
    assert (pid, nice) == (proc.pid, min(19, ours + 5))  # `nice` execs: the launcher's PID is the command's
    assert lowered_priority(["true"], 0) == ["true"]


def test_a_finished_process_is_not_searched_for_children(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reaped process's PID may belong to another process by now: its children are not ours to stop."""
    import simulations.processes as processes

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    searched: list[int] = []
    monkeypatch.setattr(processes, "descendants", lambda pid: searched.append(pid) or [])
    processes.stop_process_trees([finished, running])
    assert searched == [running.pid] and running.returncode is not None
