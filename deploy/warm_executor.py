"""A warm device: one long-lived process claims the SuperNode's tasks and forks a child per task.

Flower 1.41 runs every message in a fresh ``flwr-clientapp`` process, which imports flwr, torch,
transformers and PEFT again (9-11 s a message). With ``flower-supernode --isolation process`` the
SuperNode leaves tasks to a separate process that claims them on its Runtime API
(``flwr/supernode/start_client_internal.py:start_client_internal``); Flower's own ``flower-superexec``
is one such process, but it can only ``Popen`` a fresh command per task
(``flwr/supercore/superexec/executor/subprocess_executor.py:SubprocessExecutor.launch``; its
``--executor`` takes ``subprocess`` or ``kubernetes`` only, and the warm pools of the Kubernetes
executor serve agent, model and connector tasks, never ClientApps). This process is the other one:

- at start it imports the heavy third-party modules once (never an app module: Flower's ``load_app``
  reuses a module already in ``sys.modules``, so a preloaded ``clients`` or ``fedadapt`` would run
  instead of the signed FAB's copy) and runs no torch operation, so no OpenMP pool exists to fork,
  and never CUDA, which children cannot use;
- it polls ``AcquireTask`` like ``flwr/supercore/superexec/run_superexec.py:run_superexec`` (every
  ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds) and, for each ClientApp task, forks a child that runs
  Flower's ``flwr-clientapp`` entry point with the arguments ``SubprocessExecutor.launch`` would pass:
  the token handshake, the task's inputs, the reply and the error reply stay Flower's;
- before each claim it checks that it may still fork (CUDA not initialised, no app module loaded); once
  it may not, it claims no more tasks, lets its running children finish and exits with
  ``FORK_REFUSED_EXIT``: a claimed task it could not fork would be lost, and so would its siblings' if
  it stopped them;
- a child that raises is reported by Flower's own code in the child (an error reply and a FAILED task
  status); one that dies is reaped and logged, and the task expires as Flower's would. The parent holds
  nothing per task, so its memory does not grow, and it serves the next task either way;
- a child that runs longer than ``--max-task-seconds`` is stopped with everything it started (each child
  leads its own process group), and so is whatever a finished child left running: a hung ClientApp
  would otherwise hold a task slot forever, and four of them would stop the device.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

logger = logging.getLogger("fedadapt.warm_executor")

CLIENTAPP_TASK = "flwr-clientapp"  # Flower's TaskType.CLIENT_APP, the only task type a SuperNode runs
CLIENTAPP_COMMAND = "flwr-clientapp"  # the console script whose entry point each child runs
# Third-party modules the ClientApp imports on every message (python -X importtime: torch 1.5-3 s,
# transformers 0.8-2.5 s, peft 3-8 s, imported by fedadapt/model/adapter_model.py for every method).
WARM_MODULES = ("numpy", "safetensors", "tokenizers", "torch", "transformers", "transformers.modeling_utils", "peft")
# The project's top-level packages, which the FAB carries: the parent must never import them.
APP_PACKAGES = frozenset({"fedadapt", "clients", "server", "export", "simulations", "deploy"})
POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # the variable Flower's SuperExec reads, same bounds
FAST_POLL_SECONDS = 0.1  # what `fedadapt node` and `serve` set (Flower's default: 1 s)
_POLL_BOUNDS = (0.01, 60.0)
_ERROR_BACKOFF_SECONDS = 1.0
_STOP_GRACE_SECONDS = 10.0
_EXPIRE_GRACE_SECONDS = 5.0  # short: the loop serves no other task while it stops an expired one
MAX_TASK_SECONDS_ENV = "FEDADAPT_MAX_TASK_SECONDS"  # the default of --max-task-seconds; launchers pass it on
# A task may take as long as the server waits for its reply (the scenario's round-timeout), plus its child's
# start and reply: a shorter limit would kill tasks the server still accepts. `serve --local-supernodes` knows
# its scenario and passes round-timeout + TASK_MARGIN_SECONDS; `fedadapt node` cannot know the server's, so
# its default is the largest round-timeout a scenario allows (fedadapt/fleet/scenario.py: one day; a test
# checks the two agree, as this script imports nothing of the project).
TASK_MARGIN_SECONDS = 60.0
MAX_ROUND_TIMEOUT = 86_400.0
DEFAULT_MAX_TASK_SECONDS = MAX_ROUND_TIMEOUT + TASK_MARGIN_SECONDS
MIN_TASK_SECONDS = 1.0  # the least --max-task-seconds (or its variable) takes: a smaller one is a typo
READY_LINE = "warm executor ready"  # logged once per parent: tests count these
TASK_LINE = "forked task"  # logged once per task, with the parent's and the child's PIDs
SUPERNODE_FLAGS = ["--isolation", "process"]  # the SuperNode leaves its tasks to this executor
FORK_REFUSED_EXIT = 3  # the parent's exit code when it must not fork (its log line says why)
# torch's fork-safe CUDA check: with it, torch.cuda.is_available() asks NVML instead of calling cuInit,
# which would leave forked children a CUDA driver they cannot use.
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"
CUDA_DRIVER = "libcuda.so"  # how the CUDA driver library's file name starts (libcuda.so.1, libcuda.so.550.54.15)
CUDA_IN_PARENT = (
    "CUDA is initialised in the warm parent, and children forked after that cannot use it: nothing in the "
    "parent may run a CUDA operation (the ClientApp may, in its child). `fedadapt node` and `fedadapt serve "
    "--local-supernodes` start a new executor if this one ran 30 s or more. Or run with --cold-devices"
)

NO_FORK = (
    "this platform has no os.fork (Windows), which warm devices need: running cold devices instead, a fresh "
    "ClientApp process per message (as --cold-devices does)"
)


class ForkRefused(RuntimeError):
    """The warm parent must not fork in its state; the message says why and what to do."""


def poll_interval(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """Seconds between ``AcquireTask`` polls, from ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (Flower's default 1 s)."""
    raw = environ.get(POLL_INTERVAL_ENV)
    if raw is None:
        return 1.0
    low, high = _POLL_BOUNDS
    value = _seconds_within(raw, low, high)
    if value is None:
        raise ValueError(f"{POLL_INTERVAL_ENV} must be seconds in [{low}, {high}], got {raw!r}")
    return value


def task_seconds(raw: str) -> float:
    """A task time limit from text: finite seconds, at least ``MIN_TASK_SECONDS``; ValueError otherwise."""
    value = _seconds_within(raw, MIN_TASK_SECONDS, math.inf)
    if value is None:
        raise ValueError(f"must be seconds >= {MIN_TASK_SECONDS:g}, got {raw!r}")
    return value


def _seconds_within(raw: str, low: float, high: float) -> float | None:
    """``raw`` as finite seconds in [``low``, ``high``]; None for anything else (text, nan, inf, out of range)."""
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and low <= value <= high else None


def max_task_seconds(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """Seconds a task's child may run, from ``FEDADAPT_MAX_TASK_SECONDS`` (default ``DEFAULT_MAX_TASK_SECONDS``)."""
    raw = environ.get(MAX_TASK_SECONDS_ENV)
    if raw is None:
        return DEFAULT_MAX_TASK_SECONDS
    try:
        return task_seconds(raw)
    except ValueError as error:
        raise ValueError(f"{MAX_TASK_SECONDS_ENV} {error}") from None


@dataclass(frozen=True)
class TaskLimits:
    """How many children run at once, and how long each may run before it is stopped."""

    max_children: int = 4
    max_task_seconds: float = DEFAULT_MAX_TASK_SECONDS

    def __post_init__(self) -> None:
        if self.max_children < 1:
            raise ValueError(f"max_children must be 1 or more, got {self.max_children!r}")
        if not (math.isfinite(self.max_task_seconds) and self.max_task_seconds > 0):
            raise ValueError(f"max_task_seconds must be seconds > 0, got {self.max_task_seconds!r}")


def app_modules_loaded(modules: Iterable[str] | None = None) -> list[str]:
    """Modules of the project's packages in ``sys.modules`` (or ``modules``): a forked ClientApp would reuse them."""
    names = sys.modules if modules is None else modules
    return sorted(name for name in names if name.partition(".")[0] in APP_PACKAGES)


def load_clientapp_entry_point() -> Callable[[], Any]:
    """The function Flower's ``flwr-clientapp`` command runs (its console-script entry point)."""
    found = entry_points(group="console_scripts", name=CLIENTAPP_COMMAND)
    for entry in found:
        loaded: Callable[[], Any] = entry.load()
        return loaded
    raise RuntimeError(f"`{CLIENTAPP_COMMAND}` is not installed: pip install 'flwr[simulation]~=1.41.0'")


def read_maps() -> list[str]:
    """The lines of this process's memory map (Linux /proc; none elsewhere)."""
    try:
        return Path("/proc/self/maps").read_text(errors="replace").splitlines()
    except OSError:
        return []


def cuda_driver_mapped(maps: Iterable[str]) -> bool:
    """Whether a line of a /proc/PID/maps (address, perms, offset, dev, inode, path) maps the CUDA driver."""
    for line in maps:
        if CUDA_DRIVER not in line:  # most lines: a cheap test before splitting
            continue
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and os.path.basename(fields[5]).startswith(CUDA_DRIVER):
            return True
    return False


def cuda_initialized() -> bool:
    """Whether torch has initialised CUDA in this process; never imports torch to find out."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


def cuda_driver_warning(maps: Callable[[], Iterable[str]] | None = None) -> str | None:
    """A warning when the CUDA driver library is mapped here though torch has not initialised CUDA.

    ``torch.cuda.is_available()`` can call cuInit without setting torch's flag (NVML failing, MIG UUIDs in
    CUDA_VISIBLE_DEVICES, PYTORCH_NVML_BASED_CUDA_CHECK=0), which loads the driver. A warning, not a
    refusal: whether a CUDA build of torch maps ``libcuda.so`` at import alone is not checked on a GPU
    here, and a refusal would then stop every warm device on GPU machines. ``maps``: a memory map's lines.
    """
    if not cuda_driver_mapped((maps or read_maps)()):
        return None
    return (
        "the CUDA driver (libcuda.so) is loaded in the warm parent: if a ClientApp fails to use CUDA in its "
        "forked child, run with --cold-devices"
    )


def warm_up(modules: Sequence[str] = WARM_MODULES) -> Callable[[], Any]:
    """Import ``modules`` and Flower's ClientApp entry point once; the entry point.

    Runs no torch operation: a parent that had started torch's OpenMP pool would fork children whose
    first parallel operation hangs (GNU libgomp is not fork-safe). OpenBLAS (numpy's) stops its own
    threads at fork (its atfork handler), and Python's ``random`` reseeds itself in each child.
    A library that asks ``torch.cuda.is_available()`` at import gets NVML's answer, not a CUDA driver.
    """
    os.environ.setdefault(NVML_CHECK_ENV, "1")  # before torch is imported; `main` has children drop it again
    for name in modules:
        importlib.import_module(name)
    entry_point = load_clientapp_entry_point()
    loaded = app_modules_loaded()
    if loaded:
        raise RuntimeError(f"the warm parent imported app modules {loaded}: a ClientApp would run them, not the FAB's")
    if cuda_initialized():
        raise ForkRefused(f"the warm-up initialised CUDA. {CUDA_IN_PARENT}")
    warning = cuda_driver_warning()
    if warning:
        logger.warning(warning)
    return entry_point


def clientapp_argv(
    runtime_api_address: str,
    token: str,
    insecure: bool,
    root_certificates: str | None,
    parent_pid: int | None,
    runtime_dependency_install: bool = False,
) -> list[str]:
    """The arguments of ``flwr-clientapp`` for one task, as ``SubprocessExecutor.launch`` builds them."""
    argv = ["--runtime-api-address", runtime_api_address, "--token", token]
    if insecure:
        argv.append("--insecure")
    elif root_certificates is not None:
        argv += ["--root-certificates", root_certificates]
    if parent_pid is not None:
        argv += ["--parent-pid", str(parent_pid)]
    if runtime_dependency_install:
        argv.append("--allow-runtime-dependency-installation")
    return argv


def run_child(entry_point: Callable[[], Any], argv: Sequence[str], unset: Sequence[str] = ()) -> NoReturn:
    """In a forked child: run Flower's ClientApp entry point with ``argv``, then leave with its exit code.

    ``unset``: variables the parent set for itself alone, removed from the child's environment.
    ``os._exit``: the parent's atexit handlers, its open Runtime API connection and its buffers are the
    parent's; a child never runs their clean-up.
    """
    code = 1
    try:
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)  # its own process group, so that a timeout stops what it started too
        for name in unset:
            os.environ.pop(name, None)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)  # Flower's entry point installs its own
        _reseed()
        sys.argv = [CLIENTAPP_COMMAND, *argv]
        entry_point()
        code = 0
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # Flower exits with readable errors this way; a fresh process prints them
            print(exit_.code, file=sys.stderr)
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: B036 - the child must reach os._exit, whatever happened
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def resident_mib() -> float:
    """This process's resident memory in MiB (Linux /proc; 0 elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reseed() -> None:
    """Fresh random state, as a fresh process has: forked children would otherwise share the parent's."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()


@dataclass(frozen=True)
class Child:
    """A running task's child: which task it serves, and since when (``time.monotonic``)."""

    task_id: int
    started: float


@dataclass
class ForkExecutor:
    """Forks one child per task from this (warm) process, reaps the children, and stops them on close."""

    entry_point: Callable[[], Any]
    limits: TaskLimits = field(default_factory=TaskLimits)
    app_modules: Callable[[], list[str]] = app_modules_loaded  # what must not be loaded when it forks
    child_unset: tuple[str, ...] = ()  # variables the parent set for itself alone (run_child removes them)
    children: dict[int, Child] = field(default_factory=dict)  # by pid
    forked: int = 0  # tasks started so far (a start-up counter for tests and logs)

    def has_capacity(self) -> bool:
        return len(self.children) < self.limits.max_children

    def refusal(self) -> str | None:
        """Why this parent must not fork now, or None. The serve loop asks before it claims each task."""
        if cuda_initialized():  # the parent must never run a CUDA operation
            return CUDA_IN_PARENT
        loaded = self.app_modules()
        if loaded:  # nothing the parent does may import them
            return f"the warm parent holds app modules {loaded}, which a forked ClientApp would run, not the FAB's"
        return None

    def launch(self, task_id: int, argv: Sequence[str]) -> int:
        """Fork a child running the ClientApp entry point with ``argv``; its PID."""
        refused = self.refusal()  # a last guard: the serve loop has checked before claiming the task
        if refused is not None:
            raise ForkRefused(refused)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would print the parent's buffered lines again
        pid = os.fork()
        if pid == 0:
            run_child(self.entry_point, argv, self.child_unset)
        with contextlib.suppress(OSError):  # the child does the same: whichever runs first, the group exists
            os.setpgid(pid, pid)
        self.children[pid] = Child(task_id, time.monotonic())
        self.forked += 1
        logger.info(
            "%s %d: child pid %d, warm parent pid %d, task #%d, parent rss %.1f MiB",
            TASK_LINE,
            task_id,
            pid,
            os.getpid(),
            self.forked,
            resident_mib(),
        )
        return pid

    def reap(self) -> list[tuple[int, int, int]]:
        """Collect the children that have exited: (task id, pid, exit status as ``waitstatus_to_exitcode``).

        What an exited child left running in its process group is killed with it (``_collect``).
        """
        done = []
        for pid, child in list(self.children.items()):
            status = _collect(pid)
            if status is None:
                continue
            del self.children[pid]
            code = os.waitstatus_to_exitcode(status)
            done.append((child.task_id, pid, code))
            _log_exit(child.task_id, pid, code)
        return done

    def expire(self, grace: float = _EXPIRE_GRACE_SECONDS) -> list[tuple[int, int, int]]:
        """Stop the children that have run longer than ``max_task_seconds``: (task id, pid, exit status) each.

        The task's status is left to the Runtime API's expiry, as for a child that died.
        """
        now, limit = time.monotonic(), self.limits.max_task_seconds
        late = [pid for pid, child in self.children.items() if now - child.started > limit]
        for pid in late:
            logger.error(
                "task %d: child pid %d exceeded max task time %g s; stopping it to free its slot",
                self.children[pid].task_id,
                pid,
                limit,
            )
        return self._stop(late, grace)

    def close(self, grace: float = _STOP_GRACE_SECONDS) -> None:
        """SIGTERM every child (Flower's handler pushes its status), SIGKILL those still alive after ``grace``."""
        for task_id, pid, code in self._stop(list(self.children), grace):
            _log_exit(task_id, pid, code)

    def _stop(self, pids: list[int], grace: float) -> list[tuple[int, int, int]]:
        """SIGTERM the process groups of ``pids`` (children, not reaped yet), SIGKILL them after ``grace``, reap.

        Each child leads its own group; while it is unreaped its PID, and so its group, cannot belong to
        another process. The group is killed before its leader is reaped: what the child started dies too.
        """
        _signal_groups(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_groups(pids, signal.SIGKILL)  # also what ignored SIGTERM below a child that obeyed it
        stopped = []
        for pid in pids:
            status = 0
            with contextlib.suppress(ChildProcessError):
                status = os.waitpid(pid, 0)[1]
            stopped.append((self.children.pop(pid).task_id, pid, os.waitstatus_to_exitcode(status)))
        return stopped


def _signal_groups(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signum)
        except OSError:  # no such group (its setpgid failed): the child alone, still ours until reaped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def _collect(pid: int) -> int | None:
    """Reap child ``pid`` if it has exited (its wait status), else None; first kill what is left in its group.

    The group is killed while the child is an unreaped zombie: until ``waitpid`` its PID, and so the group's
    id, cannot belong to another process. Without ``os.waitid`` (macOS before Python 3.13) it is only reaped.
    """
    waitid = getattr(os, "waitid", None)
    try:
        if waitid is None:
            waited, status = os.waitpid(pid, os.WNOHANG)
            return None if waited == 0 else status
        if waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return None  # still running
        with contextlib.suppress(ProcessLookupError, PermissionError):  # no group left, or none of its own
            os.killpg(pid, signal.SIGKILL)
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:  # reaped elsewhere already
        return 0


def _log_exit(task_id: int, pid: int, code: int) -> None:
    if code == 0:
        logger.info("task %d: child pid %d finished", task_id, pid)
    elif code < 0:
        logger.warning("task %d: child pid %d was killed by signal %d; the device serves on", task_id, pid, -code)
    else:
        logger.warning("task %d: child pid %d exited with code %d; the device serves on", task_id, pid, code)


@dataclass(frozen=True)
class RuntimeTarget:
    """Where the SuperNode's Runtime API is, and how to reach it."""

    address: str  # HOST:PORT
    insecure: bool
    root_certificates: str | None = None  # a CA file, with TLS


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (exited, its parent has not reaped it yet) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Stop:
    """SIGTERM/SIGINT set a flag the loop checks: the parent stops its children, then itself."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def serve_tasks(target: RuntimeTarget, executor: ForkExecutor, interval: float, parent_pid: int | None) -> int:
    """Claim ClientApp tasks on the SuperNode's Runtime API and fork one child each, until stopped; an exit code.

    The loop of ``run_superexec``, with this executor and Flower's client and version header, but
    without Flower's retry invoker: it retries a refused connection forever inside one call (and
    answers a 401 by sending itself SIGINT), so neither a stop request nor the SuperNode's exit would
    be seen. Here a failed poll (the SuperNode not up yet, or gone) is retried by this loop.
    Before each claim it asks whether it may still fork: once it may not, it claims nothing more, lets
    the running children finish (the max task time still applies) and returns ``FORK_REFUSED_EXIT``.
    """
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    stop = _Stop()
    client = RuntimeHttpClient.from_server_address(
        server_address=target.address,
        insecure=target.insecure,
        root_certificates=target.root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    claims = _Claims(client, executor, target, interval)
    refused: str | None = None
    try:
        while not stop.requested:
            executor.reap()
            executor.expire()  # a hung child would hold its slot forever
            if parent_pid is not None and not _pid_alive(parent_pid):
                logger.info("the SuperNode (pid %d) has exited: stopping", parent_pid)
                break
            if refused is None and (refused := executor.refusal()) is not None:
                running = len(executor.children)
                logger.error("refusing to fork, exiting once the running tasks (%d) end: %s", running, refused)
            if refused is None:
                time.sleep(claims.claim())
            elif executor.children:
                time.sleep(interval)
            else:
                return FORK_REFUSED_EXIT
    finally:
        executor.close()
        client.close()
        stop.restore()
    return 0


@dataclass
class _Claims:
    """Claims a task when a slot is free and forks its child; a failing or a full streak is logged once."""

    client: Any  # Flower's RuntimeHttpClient
    executor: ForkExecutor
    target: RuntimeTarget
    interval: float
    failing: bool = False
    full: bool = False

    def claim(self) -> float:
        """One poll of ``AcquireTask`` (none while every slot is busy); the seconds to wait before the next."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest

        if not self.executor.has_capacity():
            if not self.full:  # once per streak: a hung child would stop the device
                children = sorted(self.executor.children)
                logger.warning("all task slots are busy (children %s); no new task until one ends", children)
            self.full = True
            return self.interval
        self.full = False
        try:
            reply = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[CLIENTAPP_TASK]))
        except Exception as error:  # noqa: BLE001 - the SuperNode restarting must not end the device
            if not self.failing:  # once per streak, not once a second
                logger.warning("AcquireTask failed (%s); retrying every %g s", error, _ERROR_BACKOFF_SECONDS)
            self.failing = True
            return max(self.interval, _ERROR_BACKOFF_SECONDS)
        if self.failing:
            logger.info("AcquireTask works again")
        self.failing = False
        if reply.HasField("task") and reply.token:
            _launch(self.executor, self.target, reply.task, reply.token)
        return self.interval


def _launch(executor: ForkExecutor, target: RuntimeTarget, task: Any, token: str) -> None:
    if task.type != CLIENTAPP_TASK:  # not requested; Flower's plugin refuses such a task the same way
        logger.error("unknown task type %r for task_id %d", task.type, task.task_id)
        return
    argv = clientapp_argv(target.address, token, target.insecure, target.root_certificates, os.getpid())
    # A fork that fails (memory, process limits) or is refused (checked before the claim: only if that changed
    # since) leaves the task to expire as a failed launch would; the loop's next check stops the claims.
    try:
        executor.launch(task.task_id, argv)
    except (OSError, ForkRefused) as error:
        logger.error("could not fork for task_id %d: %s", task.task_id, error)


def _log_to_stderr() -> None:
    """This module's lines on stderr (the node's log). Not the root logger's: the children inherit it, and
    Flower's ClientApp would then log every Runtime API request through httpx."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A warm SuperExec for one SuperNode in process isolation.")
    parser.add_argument("--runtime-api-address", required=True, help="The SuperNode's Runtime API, HOST:PORT.")
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument("--insecure", action="store_true", help="Plain HTTP to the Runtime API (loopback).")
    security.add_argument("--root-certificates", help="CA file of the Runtime API's TLS certificate.")
    parser.add_argument("--parent-pid", type=int, help="The SuperNode's PID: stop when it exits.")
    parser.add_argument("--label", default="", help="Shown in the process list (e.g. the device's partition).")
    parser.add_argument("--max-tasks", type=int, default=4, help="Children running at once (default 4).")
    parser.add_argument(
        "--max-task-seconds",
        type=_task_seconds_argument,
        help=f"Stop a task's child after this long, at least {MIN_TASK_SECONDS:g} s (default {MAX_TASK_SECONDS_ENV}, "
        f"else {DEFAULT_MAX_TASK_SECONDS:g} s: the largest round-timeout a scenario allows, plus a margin).",
    )
    args = parser.parse_args(argv)
    if args.max_task_seconds is None:  # read only now: a bad variable must not break --help
        try:
            args.max_task_seconds = max_task_seconds()
        except ValueError as error:
            parser.error(str(error))
    return args


def _task_seconds_argument(raw: str) -> float:
    try:
        return task_seconds(raw)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    _log_to_stderr()
    interval = poll_interval()
    limits = TaskLimits(max_children=args.max_tasks, max_task_seconds=args.max_task_seconds)
    target = RuntimeTarget(args.runtime_api_address, args.insecure, args.root_certificates)
    started = time.monotonic()
    # The NVML check is the warm-up's, set for the parent's imports; a child's is_available() behaves as on a
    # cold device unless the user set the variable.
    child_unset: tuple[str, ...] = () if NVML_CHECK_ENV in os.environ else (NVML_CHECK_ENV,)
    try:
        entry_point = warm_up()
    except ForkRefused as error:  # the warm-up itself initialised CUDA; no task was claimed
        logger.error("refusing to fork, exiting: %s", error)
        return FORK_REFUSED_EXIT
    logger.info(
        "%s (pid %d%s, nice %d): %s imported in %.1f s; polling every %g s, tasks stopped after %g s",
        READY_LINE,
        os.getpid(),
        f", {args.label}" if args.label else "",
        os.nice(0),
        ", ".join(WARM_MODULES),
        time.monotonic() - started,
        interval,
        limits.max_task_seconds,
    )
    executor = ForkExecutor(entry_point, limits, child_unset=child_unset)
    return serve_tasks(target, executor, interval, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
