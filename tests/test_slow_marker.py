"""The slow marker stays honest: a test that starts Flower without ``@pytest.mark.slow`` is caught.

conftest.py installs ``flower_starts.GUARD`` as an audit hook; these tests drive it with real process
starts and with the commands the launchers really build, then take back what they recorded so that
they themselves (fast tests) pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flower_starts import GUARD, flower_command
from waiting import TIME_SCALE_VARIABLE, WaitTimeout, Watch, scaled, time_scale

PYTHON = sys.executable


@pytest.mark.parametrize(
    "command",
    [
        ["/venv/bin/flower-superlink", "--insecure", "--simulation"],
        ["/venv/bin/flower-supernode", "--superlink", "127.0.0.1:9092"],
        ["/venv/bin/flwr", "run", ".", "local", "--stream"],
        [PYTHON, "-m", "fedadapt.cli", "serve", "--config", "s.toml"],
        [PYTHON, "-m", "fedadapt.cli", "--verbose", "simulate", "--scenario", "s.toml"],
        ["/venv/bin/fedadapt", "node", "--superlink", "127.0.0.1:9092"],
        "/venv/bin/flower-superlink",
    ],
)
def test_commands_that_start_flower_are_recognised(command: list[str] | str) -> None:
    assert flower_command(command) is not None


@pytest.mark.parametrize(
    "command",
    [
        [PYTHON, "-c", "print('flower-superlink')"],
        [PYTHON, "-m", "fedadapt.cli", "export", "--adapter", "a"],
        ["/venv/bin/fedadapt", "serve-docs"],
        ["/venv/bin/flower-superlink-notes.txt"],
        [],
        None,
    ],
)
def test_other_commands_are_not(command: object) -> None:
    assert flower_command(command) is None


def test_a_real_process_named_like_flower_is_recorded_and_the_unmarked_test_is_named(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fake = tmp_path / "flower-superlink"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    subprocess.run([str(fake), "--insecure"], check=True, timeout=scaled(30))
    complaint = GUARD.complaint(request.node.nodeid, marked_slow=False)
    assert GUARD.take() == [f"{fake} --insecure"]  # taken back: this test itself started nothing real
    assert complaint is not None and request.node.nodeid in complaint and "@pytest.mark.slow" in complaint
    assert GUARD.complaint(request.node.nodeid, marked_slow=False) is None  # nothing left once taken


def test_a_slow_test_may_start_flower_and_other_processes_are_not_recorded(request: pytest.FixtureRequest) -> None:
    sys.audit("subprocess.Popen", None, ["/venv/bin/flwr", "run"], None, None)  # the event Popen raises
    assert GUARD.complaint(request.node.nodeid, marked_slow=True) is None
    assert GUARD.take() == ["/venv/bin/flwr run"]
    subprocess.run([PYTHON, "-c", "pass"], check=True, timeout=scaled(60))
    assert GUARD.take() == []


def test_the_time_scale_multiplies_limits_and_refuses_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIME_SCALE_VARIABLE, raising=False)
    assert (time_scale(), scaled(90)) == (1.0, 90.0)
    monkeypatch.setenv(TIME_SCALE_VARIABLE, "2.5")
    assert scaled(90) == 225.0
    for bad in ("0", "-1", "nan", "inf", "fast"):
        monkeypatch.setenv(TIME_SCALE_VARIABLE, bad)
        with pytest.raises(ValueError, match=f"{TIME_SCALE_VARIABLE}='{bad}': expected a positive number"):
            time_scale()


def test_a_wait_that_runs_out_says_which_what_ran_and_what_the_logs_and_checkpoints_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TIME_SCALE_VARIABLE, "0.5")
    log, checkpoints = tmp_path / "serve.out", tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "round-0001.safetensors").write_bytes(b"")
    script = "import sys, time; [print('line', i) for i in range(40)]; sys.stdout.flush(); time.sleep(60)"
    watch = Watch(checkpoints=checkpoints)
    with log.open("wb") as handle:
        proc = watch.add("sleeper", subprocess.Popen([PYTHON, "-c", script], stdout=handle), log)
    try:
        watch.says("sleeper", log, "line 39", 30)  # the event comes: no wait beyond it
        with pytest.raises(WaitTimeout) as caught:
            watch.until(lambda: False, "round 2's checkpoint", 0.4)
    finally:
        proc.kill()
        proc.wait()
    report = str(caught.value)
    assert report.startswith(
        f"timed out waiting for round 2's checkpoint: 0.2 s = 0.4 s base × {TIME_SCALE_VARIABLE}=0.5"
    )
    assert f"sleeper: PID {proc.pid} running (state " in report
    assert f"checkpoints in {checkpoints}: round-0001.safetensors" in report
    assert f"--- last 30 lines of {log} ---\nline 10\n" in report and report.endswith("line 39")
    # A process that must live and exits ends the wait at once, with its exit code.
    with pytest.raises(WaitTimeout, match=r"sleeper \(exit code -9\) exited after \d+ s while waiting for more"):
        watch.until(lambda: False, "more", 600, must_live=["sleeper"])
    assert f"sleeper: PID {proc.pid} exited with code -9" in watch.report("")


# --- the command that runs both sets ----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
CI_BLOCK = "# --- README test command (keep identical to the README) ---\n"


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = ci.split(CI_BLOCK, 1)[1].splitlines()[0]
    assert command.endswith("&& scripts/test"), command
    readme = (ROOT / "README.md").read_text()
    assert f"```bash\n{command}\n```" in readme


FAKE_PYTHON = """#!/bin/sh
echo "$@" >> "$CALLS"
case "$*" in *"not slow"*) exit "$FAST" ;; *) exit "$SLOW" ;; esac
"""


@pytest.mark.parametrize(
    ("fast", "slow", "args", "expected"),
    [
        (0, 0, [], 0),
        (1, 0, [], 1),  # the fast set's failure, and the slow set still ran
        (0, 2, [], 2),
        (1, 2, [], 1),
        (0, 5, [], 5),  # the full run: an empty set fails (.ci/run turns 5 into a failure)
        (5, 0, [], 5),
        (0, 5, ["tests/test_cli.py"], 0),  # a selection without slow tests is fine
        (5, 5, ["-k", "nothing"], 5),
    ],
)
def test_scripts_test_runs_both_sets_always_and_exits_with_the_first_failure(
    tmp_path: Path, fast: int, slow: int, args: list[str], expected: int
) -> None:
    fake, calls = tmp_path / "python", tmp_path / "calls"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "FAST": str(fast), "SLOW": str(slow)}
    done = subprocess.run([str(ROOT / "scripts" / "test"), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == expected, done.stderr
    tail = " ".join(["--durations=15", *args])
    assert calls.read_text().splitlines() == [f"-m pytest -q -m not slow {tail}", f"-m pytest -q -m slow {tail}"]
