"""Processes the launchers start: free ports, console scripts of this environment, and stopping by PID.

Every Flower process that ``fedadapt simulate``, ``fedadapt serve`` or ``fedadapt node`` starts is
stopped by PID with its whole process tree, on success, error or Ctrl-C: a leftover SuperLink
holds ports and can hang a CI job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fedadapt.errors import ConfigError

STOP_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_tool(name: str) -> str:
    """A console script of this environment (flwr, flower-superlink), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise ConfigError(f"`{name}` is not installed: pip install 'flwr[simulation]~=1.41.0'")
    return found


def lowered_priority(command: list[str], increment: int) -> list[str]:
    """``command`` run ``increment`` nice levels below this process (POSIX ``nice``), else as it is.

    ``nice`` execs the command, so the PID a launcher holds is the command's own. Without ``nice``
    (Windows) the command runs at this process's priority.
    """
    if increment <= 0:
        return command
    tool = shutil.which("nice")
    return [tool, "-n", str(increment), *command] if tool else command


def stop_process_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``process``, then any of its descendants still alive; SIGKILL what ignores it."""
    stop_process_trees([process])


def stop_process_trees(processes: list[subprocess.Popen[bytes]]) -> None:
    """Stop several process trees at once: one shared deadline, not one per tree.

    Twenty local SuperNodes stopped one after the other could take twenty timeouts under load.
    """
    running = [p for p in processes if p.poll() is None]
    # Only live ones: a reaped process's PID may already belong to another process, whose tree is not ours.
    below = [pid for process in running for pid in descendants(process.pid)]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _signal_all_until_gone(below)  # the SuperLink's SuperExec and the ClientApps normally exit with them


def _stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/PID/stat after the command name (state, parent PID, ...); the name may hold spaces."""
    return stat.read_text().rsplit(")", 1)[1].split()


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (Linux /proc); None when it is gone or there is no /proc."""
    try:
        return int(_stat_fields(Path(f"/proc/{pid}/stat"))[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """PIDs below ``pid`` (Linux /proc; empty elsewhere), deepest last."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int(_stat_fields(stat)[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _signal_all_until_gone(pids: list[int]) -> None:
    """SIGTERM every PID, wait for them together, then SIGKILL those still alive."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        left = [pid for pid in pids if alive(pid)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [pid for pid in left if alive(pid)]
        if not left:
            return


def alive(pid: int) -> bool:
    try:
        state = _stat_fields(Path(f"/proc/{pid}/stat"))[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent reaps it


@contextlib.contextmanager
def terminate_gracefully() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit, so ``finally`` clauses stop what the block started.

    Python's default SIGTERM handling ends the process at once, leaving every child it started
    running. Outside the main thread (where signal handlers cannot be set) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
