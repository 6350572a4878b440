"""The warm executor's pieces without Flower running: the ClientApp's arguments, forking, reaping, fork safety.

The deployment itself (several rounds from one warm parent, a task that raises) is in test_warm_devices.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from waiting import scaled

from deploy import executors, warm_executor
from deploy import node as node_module
from deploy.warm_executor import ForkExecutor
from simulations import processes
from simulations.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--runtime-api-address", "127.0.0.1:1", "--insecure"]  # the warm executor's own, on plain HTTP


def test_poll_interval_reads_flowers_variable_with_its_bounds() -> None:
    assert warm_executor.poll_interval({}) == 1.0  # Flower's default
    assert warm_executor.poll_interval({warm_executor.POLL_INTERVAL_ENV: "0.1"}) == 0.1
    for bad in ("0", "0.001", "61", "nan", "inf", "fast"):
        with pytest.raises(ValueError, match=warm_executor.POLL_INTERVAL_ENV):
            warm_executor.poll_interval({warm_executor.POLL_INTERVAL_ENV: bad})


def test_fast_polling_sets_the_interval_unless_the_user_did() -> None:
    assert executors.fast_polling({})[warm_executor.POLL_INTERVAL_ENV] == "0.1"
    mine = {warm_executor.POLL_INTERVAL_ENV: "2"}
    assert executors.fast_polling(mine) == mine


def test_clientapp_arguments_are_the_ones_flowers_subprocess_executor_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, SubprocessExecutor, subprocess_executor

    launched: list[list[str]] = []
    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", lambda args, **_: launched.append(args))
    cases = [(True, None, 7, False), (False, "/ca.crt", None, False), (False, None, 9, True)]
    for insecure, certificates, parent, install in cases:
        spec = ExecutionSpec(
            task_type=TaskType.CLIENT_APP,
            runtime_api_address="127.0.0.1:9094",
            token="tok",
            insecure=insecure,
            root_certificates_path=certificates,
            runtime_dependency_install=install,
            parent_pid=parent,
            suppress_output=False,
            task_id=3,
        )
        SubprocessExecutor().launch(spec)
        ours = warm_executor.clientapp_argv("127.0.0.1:9094", "tok", insecure, certificates, parent, install)
        assert launched[-1] == [warm_executor.CLIENTAPP_COMMAND, *ours]
    assert warm_executor.CLIENTAPP_TASK == TaskType.CLIENT_APP


def test_the_entry_point_is_flowers_clientapp_command() -> None:
    entry = warm_executor.load_clientapp_entry_point()
    assert (entry.__module__, entry.__name__) == ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp")


def test_app_modules_are_told_apart_from_third_party_ones() -> None:
    names = ["torch", "fedadapt", "fedadapt.model", "clients.client_app", "server", "deploy.node", "serverless"]
    assert warm_executor.app_modules_loaded(names) == [
        "clients.client_app",
        "deploy.node",
        "fedadapt",
        "fedadapt.model",
        "server",
    ]
    with pytest.raises(RuntimeError, match="app modules"):  # this test process has imported fedadapt
        warm_executor.warm_up(modules=())


def test_a_node_runs_in_process_isolation_unless_cold() -> None:
    base = {"superlink": "127.0.0.1:9092", "partition_id": 0, "num_partitions": 2, "insecure": True}
    warm = node_module.NodeConfig(**base).command(port=9999)
    assert warm[warm.index("--isolation") + 1] == "process" and warm[warm.index("--port") + 1] == "9999"
    assert "--isolation" not in node_module.NodeConfig(**base, cold=True).command()


class _FakePopen:
    """A started process that records its command line and exits at once with 0."""

    def __init__(self, launched: list[list[str]], args: list[str], **_: object) -> None:
        launched.append(list(args))
        self.pid, self.returncode = 4242, 0

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def poll(self) -> int:
        return 0


class _Supervised:
    """Stands in for ``executors.Supervisors``: records what each SuperNode's executor would start with."""

    def __init__(self) -> None:
        self.specs: list[executors.ExecutorSpec] = []

    def add(self, supernode: object, spec: executors.ExecutorSpec) -> None:
        self.specs.append(spec)


def _no_warm_executor(*_: object, **__: object) -> None:
    raise AssertionError("a warm executor was started")


def test_a_node_runs_cold_where_there_is_no_fork(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    launched: list[list[str]] = []
    monkeypatch.delattr(os, "fork")  # as on Windows
    monkeypatch.setattr(node_module.subprocess, "Popen", lambda args, **kw: _FakePopen(launched, args, **kw))
    monkeypatch.setattr(node_module, "stop_process_trees", lambda processes: None)
    monkeypatch.setattr(executors, "supervise", _no_warm_executor)
    config = node_module.NodeConfig(superlink="127.0.0.1:9092", partition_id=0, num_partitions=2, insecure=True)
    with caplog.at_level("WARNING", logger=executors.logger.name):
        assert node_module.run_node(config) == 0
    assert len(launched) == 1 and launched[0][0].endswith("flower-supernode")
    assert "--isolation" not in launched[0]  # Flower's default: a fresh flower-superexec, a fresh ClientApp
    assert [r.getMessage() for r in caplog.records] == [warm_executor.NO_FORK]


@pytest.mark.parametrize("fork", [True, False])
def test_local_supernodes_run_cold_where_there_is_no_fork(
    fork: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from deploy import serve as serve_module

    launched: list[list[str]] = []
    supervised = _Supervised()
    if not fork:
        monkeypatch.delattr(os, "fork")
    monkeypatch.setattr(serve_module.subprocess, "Popen", lambda args, **kw: _FakePopen(launched, args, **kw))
    deployment = serve_module.Deployment(insecure=True, local_supernodes=2)
    plan = SimpleNamespace(out_dir=tmp_path, scenario=SimpleNamespace(round_timeout=600.0))
    nodes: list[subprocess.Popen[bytes]] = []
    with caplog.at_level("WARNING", logger=executors.logger.name):
        serve_module._supernodes(tmp_path, {}, plan, "127.0.0.1:9092", deployment, None, supervised, nodes)  # type: ignore[arg-type]
    assert len(launched) == 2 and len(nodes) == 2
    labels = [spec.label for spec in supervised.specs]
    if fork:
        assert all("--isolation" in line for line in launched)
        assert labels == ["partition-id=0", "partition-id=1"] and caplog.records == []
        assert all(spec.log_file == tmp_path / f"supernode-{i}.log" for i, spec in enumerate(supervised.specs))
    else:
        assert not any("--isolation" in line for line in launched) and labels == []
        assert [r.getMessage() for r in caplog.records] == [warm_executor.NO_FORK]  # once, not once a node


@pytest.mark.parametrize("mine", [None, "90"])
def test_local_executors_may_run_a_task_as_long_as_the_round_timeout_allows(
    mine: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from deploy import serve as serve_module

    supervised = _Supervised()
    monkeypatch.setattr(serve_module.subprocess, "Popen", lambda args, **kw: _FakePopen([], args, **kw))
    deployment = serve_module.Deployment(insecure=True, local_supernodes=2)
    plan = SimpleNamespace(out_dir=tmp_path, scenario=SimpleNamespace(round_timeout=7200.0))
    env = {} if mine is None else {warm_executor.MAX_TASK_SECONDS_ENV: mine}
    serve_module._supernodes(tmp_path, env, plan, "127.0.0.1:9092", deployment, None, supervised, [])  # type: ignore[arg-type]
    envs = [spec.env for spec in supervised.specs]
    expected = 7200.0 + warm_executor.TASK_MARGIN_SECONDS if mine is None else 90.0  # the user's value is kept
    assert len(envs) == 2
    assert all(warm_executor.max_task_seconds(e) == expected for e in envs)


def test_the_executor_command_keeps_the_project_off_the_parents_path() -> None:
    line = executors.command("127.0.0.1:9094", 123, "partition-id=1")
    assert line[:3] == [sys.executable, "-P", str(ROOT / "deploy" / "warm_executor.py")]
    assert line[line.index("--parent-pid") + 1] == "123" and line[-2:] == ["--label", "partition-id=1"]


# --- forking and reaping (fake entry points: no Flower) ------------------------------------------------------------


def _write_whole(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name, then rename: a reader never sees half of it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def _report(path: Path) -> None:
    """A fake entry point: write this child's PID, parent PID and argv, then act as argv[-1] says."""
    import numpy

    _write_whole(
        path.with_name(f"{os.getpid()}.txt"),
        f"{os.getpid()} {os.getppid()} {numpy.random.randint(2**31)} {' '.join(sys.argv)}",
    )
    action = sys.argv[-1]
    if action == "raise":
        raise ValueError("the ClientApp failed")
    if action == "exit3":
        sys.exit(3)
    if action == "segv":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "sleep":
        time.sleep(60)


def _wait_reaped(executor: ForkExecutor, count: int) -> list[tuple[int, int, int]]:
    done: list[tuple[int, int, int]] = []
    deadline = time.monotonic() + scaled(30)
    while len(done) < count and time.monotonic() < deadline:
        done += executor.reap()
        time.sleep(0.05)
    return done


def test_each_task_gets_its_own_child_of_one_parent_and_failures_do_not_stop_it(tmp_path: Path) -> None:
    executor = ForkExecutor(lambda: _report(tmp_path / "x"), app_modules=list)  # this process holds fedadapt
    actions = ["ok", "raise", "exit3", "segv", "ok"]
    pids = [executor.launch(task_id, ["--token", "t", action]) for task_id, action in enumerate(actions, start=1)]
    done = _wait_reaped(executor, len(actions))
    assert sorted(done) == [(1, pids[0], 0), (2, pids[1], 1), (3, pids[2], 3), (4, pids[3], -9), (5, pids[4], 0)]
    assert executor.forked == 5 and executor.children == {}  # nothing per task is kept
    reports = [(tmp_path / f"{pid}.txt").read_text().split() for pid in pids]
    assert len(set(pids)) == 5 and os.getpid() not in pids
    assert all(int(r[1]) == os.getpid() for r in reports)  # one parent: this (warm) process
    assert reports[0][3:] == [warm_executor.CLIENTAPP_COMMAND, "--token", "t", "ok"]  # Flower's argv
    assert len({r[2] for r in reports}) == 5  # each child has its own random state, as a fresh process has


def test_capacity_and_close_stop_running_children(tmp_path: Path) -> None:
    limits = warm_executor.TaskLimits(max_children=2)
    executor = ForkExecutor(lambda: _report(tmp_path / "x"), limits, app_modules=list)
    first = executor.launch(1, ["sleep"])
    executor.launch(2, ["sleep"])
    assert not executor.has_capacity()
    executor.close(grace=scaled(10))
    assert executor.children == {}
    with pytest.raises(ChildProcessError):
        os.waitpid(first, os.WNOHANG)  # reaped


def _hang(path: Path) -> None:
    """A fake entry point that hangs: it ignores SIGTERM, starts a grandchild that hangs too, and sleeps."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(60)
        os._exit(0)
    _write_whole(path, f"{os.getpid()} {grandchild}")
    time.sleep(60)


def _leave_a_grandchild(path: Path) -> None:
    """A fake entry point that starts a grandchild that hangs, then returns (the child exits with 0)."""
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(60)
        os._exit(0)
    _write_whole(path, str(grandchild))


def test_what_a_finished_child_left_running_is_stopped_when_it_is_reaped(tmp_path: Path) -> None:
    report = tmp_path / "grandchild.txt"
    executor = ForkExecutor(lambda: _leave_a_grandchild(report), app_modules=list)
    pid = executor.launch(1, [])
    assert _wait_reaped(executor, 1) == [(1, pid, 0)]
    grandchild = int(report.read_text())
    try:
        deadline = time.monotonic() + scaled(10)
        while processes.alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not processes.alive(grandchild)  # killed with its group, not left to init
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


BAD_TASK_SECONDS = ("0", "0.5", "-1", "nan", "inf", "-inf", "soon")


def test_limits_are_checked_and_read_from_the_environment() -> None:
    assert warm_executor.max_task_seconds({}) == warm_executor.DEFAULT_MAX_TASK_SECONDS
    assert warm_executor.max_task_seconds({warm_executor.MAX_TASK_SECONDS_ENV: "90"}) == 90
    for bad in BAD_TASK_SECONDS:
        with pytest.raises(ValueError, match=f"{warm_executor.MAX_TASK_SECONDS_ENV} must be seconds >= 1"):
            warm_executor.max_task_seconds({warm_executor.MAX_TASK_SECONDS_ENV: bad})
    with pytest.raises(ValueError, match="max_children"):
        warm_executor.TaskLimits(max_children=0)


def test_a_node_lets_a_task_run_as_long_as_any_scenario_lets_the_server_wait() -> None:
    from fedadapt.fleet.scenario import SCENARIO_BOUNDS

    longest = SCENARIO_BOUNDS["round-timeout"].high  # the warm executor imports nothing of the project
    assert longest == warm_executor.MAX_ROUND_TIMEOUT
    assert longest <= warm_executor.DEFAULT_MAX_TASK_SECONDS


@pytest.mark.parametrize("bad", BAD_TASK_SECONDS)
def test_a_bad_max_task_time_is_a_usage_error(
    bad: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(warm_executor.MAX_TASK_SECONDS_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        warm_executor._parse_args([*ARGS, f"--max-task-seconds={bad}"])
    assert exit_.value.code == 2 and "--max-task-seconds" in capsys.readouterr().err
    monkeypatch.setenv(warm_executor.MAX_TASK_SECONDS_ENV, bad)
    with pytest.raises(SystemExit) as exit_:
        warm_executor._parse_args(ARGS)
    assert exit_.value.code == 2 and f"{warm_executor.MAX_TASK_SECONDS_ENV} must be" in capsys.readouterr().err
    assert warm_executor._parse_args([*ARGS, "--max-task-seconds", "90"]).max_task_seconds == 90  # the flag wins
    with pytest.raises(SystemExit) as exit_:
        warm_executor._parse_args(["--help"])  # the variable is not read for --help
    assert exit_.value.code == 0


def test_the_max_task_time_comes_from_the_flag_else_the_variable_else_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(warm_executor.MAX_TASK_SECONDS_ENV, raising=False)
    assert warm_executor._parse_args(ARGS).max_task_seconds == warm_executor.DEFAULT_MAX_TASK_SECONDS
    monkeypatch.setenv(warm_executor.MAX_TASK_SECONDS_ENV, "120")
    assert warm_executor._parse_args(ARGS).max_task_seconds == 120
    assert warm_executor._parse_args([*ARGS, "--max-task-seconds", "1"]).max_task_seconds == 1


def test_a_child_over_the_max_task_time_is_stopped_with_what_it_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    report = tmp_path / "pids.txt"
    limits = warm_executor.TaskLimits(max_children=1, max_task_seconds=0.2)
    executor = ForkExecutor(lambda: _hang(report), limits, app_modules=list)
    pid = executor.launch(7, [])
    deadline = time.monotonic() + scaled(30)
    while not report.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child, grandchild = map(int, report.read_text().split())
    stopped: list[tuple[int, int, int]] = []
    with caplog.at_level("INFO", logger=warm_executor.logger.name):
        while not stopped and time.monotonic() < deadline:
            stopped = executor.expire(grace=0.5)
            time.sleep(0.05)
    assert child == pid and stopped == [(7, pid, -signal.SIGKILL)]  # it ignored SIGTERM
    assert executor.children == {} and executor.has_capacity()  # the slot is free
    lines = [r.getMessage() for r in caplog.records if "exceeded" in r.getMessage()]
    assert lines == [f"task 7: child pid {pid} exceeded max task time 0.2 s; stopping it to free its slot"]
    while processes.alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes.alive(grandchild)  # its process group went with it


class _FakeRuntime:
    """The SuperNode's Runtime API: a ClientApp task per AcquireTask; after ``tasks`` of them, a stop request."""

    def __init__(self, tasks: int) -> None:
        self.tasks, self.handed, self.calls = tasks, 0, 0

    def AcquireTask(self, request: object) -> object:  # noqa: N802 - Flower's name
        from flwr.proto.runtime_pb2 import AcquireTaskResponse

        self.calls += 1
        if self.handed == self.tasks:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler: stop after this pass
            return AcquireTaskResponse()
        self.handed += 1
        reply = AcquireTaskResponse(token="tok")
        reply.task.task_id, reply.task.type = self.handed, warm_executor.CLIENTAPP_TASK
        return reply

    def close(self) -> None:
        pass


def _fake_runtime(monkeypatch: pytest.MonkeyPatch, tasks: int) -> _FakeRuntime:
    from flwr.supercore.runtime import RuntimeHttpClient

    runtime = _FakeRuntime(tasks)
    monkeypatch.setattr(RuntimeHttpClient, "from_server_address", staticmethod(lambda **_: runtime))
    return runtime


def test_hung_tasks_lose_their_slot_and_the_device_serves_the_next(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fake_runtime(monkeypatch, tasks=3)
    limits = warm_executor.TaskLimits(max_children=1, max_task_seconds=0.2)
    executor = ForkExecutor(lambda: time.sleep(60), limits, app_modules=list)  # every task hangs
    target = warm_executor.RuntimeTarget("127.0.0.1:1", insecure=True)
    with caplog.at_level("INFO", logger=warm_executor.logger.name):
        assert warm_executor.serve_tasks(target, executor, 0.01, None) == 0
    assert executor.forked == 3 and executor.children == {}  # one slot, three tasks: each hung one was stopped
    expired = [r.getMessage().split(":")[0] for r in caplog.records if "exceeded max task time" in r.getMessage()]
    assert expired == ["task 1", "task 2", "task 3"]


def test_the_parent_refuses_to_fork_while_it_holds_app_modules() -> None:
    executor = ForkExecutor(lambda: None)
    with pytest.raises(warm_executor.ForkRefused, match="holds app modules"):  # this test process has imported fedadapt
        executor.launch(1, [])
    assert executor.forked == 0


def test_the_parent_refuses_to_fork_once_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    executor = ForkExecutor(lambda: None, app_modules=list)
    with pytest.raises(warm_executor.ForkRefused, match="CUDA is initialised in the warm parent"):
        executor.launch(1, [])
    assert executor.forked == 0 and executor.children == {}
    monkeypatch.setattr(warm_executor, "app_modules_loaded", list)  # this process holds fedadapt
    # set, then removed: monkeypatch records the variable's absence and restores it after warm_up sets it
    monkeypatch.setenv(warm_executor.NVML_CHECK_ENV, "0")
    monkeypatch.delenv(warm_executor.NVML_CHECK_ENV)
    with pytest.raises(warm_executor.ForkRefused, match="the warm-up initialised CUDA"):
        warm_executor.warm_up(modules=())
    assert os.environ[warm_executor.NVML_CHECK_ENV] == "1"  # torch's fork-safe is_available()


DRIVER = "7f2a1c000000-7f2a1c200000 r-xp 00000000 103:02 1835 /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"
MAPS = [
    "55d4c8a00000-55d4c8a21000 r--p 00000000 103:02 42 /usr/bin/python3.11",
    "7f2a1b000000-7f2a1b100000 r-xp 00000000 103:02 1836 /venv/lib/nvidia/cuda_runtime/lib/libcudart.so.12",
    "7f2a1a000000-7f2a1a100000 r-xp 00000000 103:02 1837 /home/me/libcuda.so.d/libtorch_cuda.so",
    "7ffd5c000000-7ffd5c021000 rw-p 00000000 00:00 0                          [stack]",
    "7ffd5c100000-7ffd5c101000 rw-p 00000000 00:00 0",
]


def test_a_mapped_cuda_driver_is_a_warning_not_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    # torch's flag misses a cuInit from is_available() (NVML failing, MIG UUIDs, the NVML check off); whether
    # a CUDA build maps the driver at import alone is unchecked, so a mapped driver only warns
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert warm_executor.cuda_driver_warning(lambda: MAPS) is None  # the runtime library alone, or a folder's name
    assert "--cold-devices" in (warm_executor.cuda_driver_warning(lambda: [*MAPS, DRIVER]) or "")
    assert warm_executor.cuda_driver_warning(lambda: [f"{DRIVER.rsplit('/', 1)[0]}/libcuda.so.1 (deleted)"])
    monkeypatch.setattr(warm_executor, "read_maps", lambda: [*MAPS, DRIVER])  # as if this process had loaded it
    assert ForkExecutor(lambda: None, app_modules=list).refusal() is None


@pytest.mark.parametrize("users", [None, "0"])
def test_children_lose_the_nvml_check_only_if_the_parent_set_it(
    users: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = warm_executor.NVML_CHECK_ENV
    monkeypatch.setenv(name, users or "0")  # first set: monkeypatch then restores even an absent variable
    if users is None:
        monkeypatch.delenv(name)
    executors: list[ForkExecutor] = []

    def warm_up() -> Callable[[], None]:
        os.environ.setdefault(name, "1")  # as the real warm-up does
        return lambda: _write_whole(tmp_path / f"{os.getpid()}.env", os.environ.get(name, "absent"))

    monkeypatch.setattr(warm_executor, "warm_up", warm_up)
    monkeypatch.setattr(warm_executor, "_log_to_stderr", lambda: None)
    monkeypatch.setattr(warm_executor, "serve_tasks", lambda target, ex, *_: executors.append(ex) or 0)
    assert warm_executor.main(ARGS) == 0
    executor = dataclasses.replace(executors[0], app_modules=list)  # this process holds fedadapt
    pid = executor.launch(1, [])
    assert _wait_reaped(executor, 1) == [(1, pid, 0)]
    assert (tmp_path / f"{pid}.env").read_text() == ("absent" if users is None else users)
    assert os.environ[name] == ("1" if users is None else users)  # the parent keeps its own


def test_a_parent_with_cuda_claims_no_task_and_exits_non_zero_saying_what_to_do(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    runtime = _fake_runtime(monkeypatch, tasks=1)
    monkeypatch.setattr(warm_executor, "warm_up", lambda: lambda: None)
    monkeypatch.setattr(warm_executor, "_log_to_stderr", lambda: None)  # it would take the records from caplog
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as if something in the parent ran CUDA
    with caplog.at_level("INFO", logger=warm_executor.logger.name):
        code = warm_executor.main(ARGS)
    assert code == warm_executor.FORK_REFUSED_EXIT != 0 and runtime.calls == 0  # no task was claimed, none lost
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("refusing to fork") and warm_executor.CUDA_IN_PARENT in errors[0]
    assert "start a new executor" in errors[0] and "--cold-devices" in errors[0]
    assert not any(warm_executor.TASK_LINE in r.getMessage() for r in caplog.records)  # nothing was forked


def _finish_late(path: Path) -> None:
    """A fake entry point that works a little, then records that it finished."""
    time.sleep(0.5)
    _write_whole(path, "finished")


def test_a_parent_that_must_stop_forking_claims_no_task_and_lets_the_running_ones_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _fake_runtime(monkeypatch, tasks=3)
    done = tmp_path / "done.txt"
    limits = warm_executor.TaskLimits(max_children=4, max_task_seconds=scaled(60))

    def loaded() -> list[str]:  # as if the parent imported an app module after its first fork
        return ["fedadapt"] if executor.forked else []

    executor = ForkExecutor(lambda: _finish_late(done), limits, app_modules=loaded)
    target = warm_executor.RuntimeTarget("127.0.0.1:1", insecure=True)
    with caplog.at_level("INFO", logger=warm_executor.logger.name):
        code = warm_executor.serve_tasks(target, executor, 0.01, None)
    assert code == warm_executor.FORK_REFUSED_EXIT and runtime.calls == 1  # one task claimed, then none
    assert executor.forked == 1 and executor.children == {} and done.read_text() == "finished"  # not stopped
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if m.startswith("refusing to fork")] == [
        "refusing to fork, exiting once the running tasks (1) end: the warm parent holds app modules ['fedadapt'], "
        "which a forked ClientApp would run, not the FAB's"
    ]
    assert any(m.startswith("task 1: child pid") and m.endswith("finished") for m in messages)


def test_a_refusal_at_the_fork_itself_loses_only_that_task(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = _fake_runtime(monkeypatch, tasks=3)
    answers = iter([[], ["fedadapt"]])  # allowed when the loop checks, refused when launch checks again
    executor = ForkExecutor(lambda: None, app_modules=lambda: next(answers, ["fedadapt"]))
    target = warm_executor.RuntimeTarget("127.0.0.1:1", insecure=True)
    with caplog.at_level("INFO", logger=warm_executor.logger.name):
        assert warm_executor.serve_tasks(target, executor, 0.01, None) == warm_executor.FORK_REFUSED_EXIT
    assert runtime.calls == 1 and executor.forked == 0
    assert any(r.getMessage().startswith("could not fork for task_id 1: the warm parent") for r in caplog.records)


def test_supervise_gives_up_on_an_executor_that_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started: list[subprocess.Popen[bytes]] = []
    monkeypatch.setattr(executors, "start", lambda *_: subprocess.Popen([sys.executable, "-c", "pass"]))
    try:
        assert executors.supervise(supernode, executors.ExecutorSpec(1, {}), started) == 1
        assert len(started) == 1
    finally:
        supernode.kill()
        supernode.wait()


def test_local_supervisors_restart_a_dead_executor_until_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve's executors come back like `fedadapt node`'s, and none starts once stop() has returned."""
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(executors, "MIN_LIFETIME_SECONDS", 0.0)  # each short-lived executor counts as one that ran
    monkeypatch.setattr(executors, "_SUPERNODE_CHECK_SECONDS", 0.05)
    monkeypatch.setattr(executors, "start", lambda *_: subprocess.Popen([sys.executable, "-c", "pass"]))
    supervisors = executors.Supervisors()
    try:
        supervisors.add(supernode, executors.ExecutorSpec(1, {}, "partition-id=0"))
        deadline = time.monotonic() + scaled(30)
        while len(supervisors.started) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(supervisors.started) >= 3  # the first and two restarts
        stopped = supervisors.stop()
        assert stopped == supervisors.started
        time.sleep(0.3)
        assert len(supervisors.started) == len(stopped)  # nothing after stop()
        assert supernode.poll() is None  # the SuperNode is the caller's to stop
    finally:
        supernode.kill()
        supernode.wait()
        for process in supervisors.started:
            process.wait()


def test_an_executor_that_cannot_start_stops_serve_and_its_supernode_is_still_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from deploy import serve as serve_module

    def refuse(*_: object) -> subprocess.Popen[bytes]:
        raise OSError("no such interpreter")

    monkeypatch.setattr(serve_module.subprocess, "Popen", lambda args, **kw: _FakePopen([], args, **kw))
    monkeypatch.setattr(executors, "start", refuse)
    supervisors = executors.Supervisors()
    nodes: list[_FakePopen] = []
    plan = SimpleNamespace(out_dir=tmp_path, scenario=SimpleNamespace(round_timeout=600.0))
    deployment = serve_module.Deployment(insecure=True, local_supernodes=2)
    with pytest.raises(OSError, match="no such interpreter"):  # the caller's error, not a thread's
        serve_module._supernodes(tmp_path, {}, plan, "127.0.0.1:9092", deployment, None, supervisors, nodes)  # type: ignore[arg-type]
    assert len(nodes) == 1  # the SuperNode whose executor failed is in the list the caller stops
    assert supervisors.stop() == []  # no thread was started, so none is joined


def test_a_supervisor_thread_that_fails_logs_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    starts = iter([subprocess.Popen([sys.executable, "-c", "pass"])])

    def second_start_fails(*_: object) -> subprocess.Popen[bytes]:
        return next(starts)  # StopIteration on the restart: an error inside the thread

    monkeypatch.setattr(executors, "MIN_LIFETIME_SECONDS", 0.0)
    monkeypatch.setattr(executors, "_SUPERNODE_CHECK_SECONDS", 0.05)
    monkeypatch.setattr(executors, "start", second_start_fails)
    supervisors = executors.Supervisors()
    try:
        with caplog.at_level("ERROR", logger=executors.logger.name):
            supervisors.add(supernode, executors.ExecutorSpec(1, {}, "partition-id=4"))
            supervisors._threads[0].join(scaled(30))
        assert not supervisors._threads[0].is_alive()
        assert [r.getMessage() for r in caplog.records] == [
            "supervising the warm executor of partition-id=4 failed; it is not restarted"
        ]
    finally:
        supervisors.stop()
        supernode.kill()
        supernode.wait()
        for process in supervisors.started:
            process.wait()


def test_a_supervisor_ends_with_its_supernode(monkeypatch: pytest.MonkeyPatch) -> None:
    supernode = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    executor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(executors, "start", lambda *_: executor)
    started: list[subprocess.Popen[bytes]] = []
    try:
        assert executors.supervise(supernode, executors.ExecutorSpec(1, {}), started) == 7
        assert started == [executor] and executor.poll() is None  # the caller stops what was started
    finally:
        executor.kill()
        executor.wait()


def test_the_loop_retries_an_unreachable_runtime_api_and_stops_when_the_supernode_is_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])  # exits, unreaped: a zombie
    target = warm_executor.RuntimeTarget(f"127.0.0.1:{free_port()}", insecure=True)  # nothing listens there
    executor = ForkExecutor(lambda: None, app_modules=list)  # this process holds fedadapt
    handler = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    try:
        with caplog.at_level("INFO", logger=warm_executor.logger.name):
            assert warm_executor.serve_tasks(target, executor, 0.1, supernode.pid) == 0
    finally:
        supernode.kill()
        supernode.wait()
    assert time.monotonic() - started < scaled(30)
    assert signal.getsignal(signal.SIGTERM) == handler  # the loop's own handlers are gone again
    failures = [r for r in caplog.records if "AcquireTask failed" in r.getMessage()]
    assert len(failures) == 1  # logged once for the streak, retried quietly
    assert any("has exited: stopping" in r.getMessage() for r in caplog.records)


# --- fork safety in a warm parent (a fresh interpreter: this one has run torch) -------------------------------

FORK_CHECK = """
import os, sys
from deploy import warm_executor as w
sys.modules.pop("deploy.warm_executor"); sys.modules.pop("deploy")  # the check below is about the warm-up
entry = w.warm_up()
import torch
assert not torch.cuda.is_initialized() and os.environ[w.NVML_CHECK_ENV] == "1"
assert w.app_modules_loaded() == [], w.app_modules_loaded()
import threading
from flwr.supercore.exit import exit_handler
assert threading.active_count() == 1  # no thread of the parent's holds a lock a child would inherit
assert exit_handler.registered_exit_handlers == []  # a child's flwr_exit runs only the handlers it adds itself
import torch
def task():
    torch.set_num_interop_threads(1)  # raises if the parent had started torch's inter-op pool
    torch.set_num_threads(2)
    x = torch.randn(64, 64)
    for _ in range(5):
        x = torch.tanh(x @ x)  # hangs if the parent had started an OpenMP pool
    print("child ok", torch.get_num_threads(), flush=True)
executor = w.ForkExecutor(task)
for task_id in (1, 2):
    executor.launch(task_id, [])
import time
while executor.children:
    executor.reap(); time.sleep(0.05)
print("threads", len(os.listdir("/proc/self/task")), "parent ok", flush=True)
"""


def test_a_warm_parent_forks_children_that_can_size_and_use_torchs_thread_pools() -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", FORK_CHECK], capture_output=True, text=True, env=env, timeout=scaled(180), cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("child ok 2") == 2, result.stdout + result.stderr[-2000:]
    # After the forks only the main thread is left: no OpenMP pool; numpy's OpenBLAS stops its threads at fork.
    assert "threads 1 parent ok" in result.stdout, result.stdout
