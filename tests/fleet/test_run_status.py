"""`fedadapt status DIR` (issue 23): a finished, a running and a failed run told apart from the run's folder, and
hostile status.json / metrics.json refused with a clear error.

The finished and the failed-server runs are real in-process runs (tests/server_harness.py) on the tiny BERT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message, RecordDict
from server_harness import (
    InProcessGrid,
    run_server,
    server_run_config,
    server_scenario_file,
    task_identity,  # noqa: F401  (autouse: messages need Flower's task identity)
)
from typer.testing import CliRunner

from fedadapt.cli import app
from fedadapt.fleet import rejections, run_status
from fedadapt.fleet.run_status import STATUS_FILE, StatusFile, inspect_run
from fedadapt.privacy.secagg.stages import STAGES as SECAGG_STAGES


def status(folder: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["status", str(folder), *args])
    return result.exit_code, result.output


def emptied(reply: Message) -> Message:
    reply.content = RecordDict()
    return reply


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


INCOMPLETE = {
    "scenario": {"name": "tiny", "rounds": 5},
    "privacy": "none",
    "complete": False,
    "rounds": [{"round": 1, "accuracy": 0.5, "accepted": 2, "clients": 3, "rejected": [{"reason": "client error: x"}]}],
}


def test_a_finished_run_is_reported_finished_with_its_figures(tiny_bert: Path, tmp_path: Path) -> None:
    scenario = server_scenario_file(tmp_path, tiny_bert, **{"clients-per-round": 3})
    metrics = run_server(InProcessGrid(3, server_run_config(scenario, tmp_path / "run"), tamper={103: emptied}))
    written = json.loads((tmp_path / "run" / STATUS_FILE).read_text())
    assert (written["pid"], written["stage"], written["completed"], written["planned"]) == (
        os.getpid(),
        "finished",
        2,
        2,
    )
    code, output = status(tmp_path / "run")
    assert code == 0 and "FINISHED" in output and "rounds: 2 of 2 done" in output
    assert f"last accuracy: {metrics['rounds'][-1]['accuracy']:.4f}" in output and "rejected: 2 (malformed 2)" in output
    code, output = status(tmp_path / "run", "--json")
    report = json.loads(output)
    assert code == 0 and report["state"] == "finished" and report["rejected"] == {"malformed": 2}
    assert [r["accepted"] for r in report["rounds"]] == [2, 2]


def test_a_run_whose_server_process_lives_is_running(tmp_path: Path) -> None:
    write(tmp_path / "metrics.json", INCOMPLETE)
    StatusFile(tmp_path, planned_rounds=5, completed=1).stage("training", 2)  # this process: alive
    code, output = status(tmp_path)
    assert code == 0 and "RUNNING" in output and f"server process {os.getpid()} is alive" in output
    assert "training in round 2" in output and "rounds: 1 of 5 done" in output and "client_error 1" in output


def test_a_run_whose_server_died_before_completing_has_failed(tmp_path: Path) -> None:
    write(tmp_path / "metrics.json", INCOMPLETE)
    StatusFile(tmp_path, planned_rounds=5).stage("waiting", 2)
    data = json.loads((tmp_path / STATUS_FILE).read_text())
    write(tmp_path / STATUS_FILE, data | {"pid": dead_pid(), "pid_start": None})
    code, output = status(tmp_path)
    assert code == 1 and "FAILED" in output and "is gone and the run is incomplete" in output
    # The pid alive again, but another process's (a pid reused after the server died): failed too.
    write(tmp_path / STATUS_FILE, data | {"pid_start": data["pid_start"] + 1})
    assert status(tmp_path)[0] == 1
    # Complete metrics win over a gone process: the server exits once it has written them.
    write(tmp_path / "metrics.json", INCOMPLETE | {"complete": True})
    assert status(tmp_path)[0] == 0


def test_a_server_that_raised_reports_failed(tiny_bert: Path, tmp_path: Path) -> None:
    class BrokenGrid(InProcessGrid):
        def get_node_ids(self) -> list[int]:
            raise RuntimeError("the SuperLink went away")

    scenario = server_scenario_file(tmp_path, tiny_bert)
    with pytest.raises(RuntimeError, match="went away"):
        run_server(BrokenGrid(3, server_run_config(scenario, tmp_path / "run")))
    code, output = status(tmp_path / "run")
    assert code == 1 and "the server reported an error" in output


def test_a_run_of_another_host_or_without_status_is_unknown_not_failed(tmp_path: Path) -> None:
    write(tmp_path / "metrics.json", INCOMPLETE)
    assert inspect_run(tmp_path).state == "unknown"
    StatusFile(tmp_path, planned_rounds=5)
    data = json.loads((tmp_path / STATUS_FILE).read_text())
    write(tmp_path / STATUS_FILE, data | {"host": "elsewhere\x1b[2J"})
    report = inspect_run(tmp_path)
    assert report.state == "unknown" and "elsewhere?[2J" in report.why  # no terminal escape gets through


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("metrics.json", "[" * 100_000 + "]" * 100_000, "nested 100000 levels deep"),
        ("metrics.json", "{not json", "not valid JSON"),
        ("metrics.json", "[1, 2]", "holds a list"),
        ("metrics.json", {"rounds": {"round": 1}}, "rounds is not a list of objects"),
        ("metrics.json", b"\xff\xfe{}", "not UTF-8"),
        ("status.json", {"pid": "1; rm -rf /", "stage": "training"}, "not a process id"),
        ("status.json", {"pid": 2**64 - 1}, "not a process id"),
        ("status.json", {"pid": os.getpid(), "pid_start": "soon"}, "not a process id"),
    ],
)
def test_hostile_files_are_refused_with_a_clear_error(tmp_path: Path, file: str, content: Any, message: str) -> None:
    if isinstance(content, bytes):
        (tmp_path / file).write_bytes(content)
    else:
        write(tmp_path / file, content)
    code, output = status(tmp_path)
    assert code == 2 and output.startswith("error: ") and message in output and "Traceback" not in output


def test_an_oversized_metrics_file_is_refused_before_it_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_status, "MAX_METRICS_BYTES", 1000)
    write(tmp_path / "metrics.json", INCOMPLETE | {"pad": "x" * 2000})
    code, output = status(tmp_path)
    assert code == 2 and "more than the 1000 bytes of JSON allowed" in output


def test_an_empty_folder_is_no_run() -> None:
    code, output = status(Path("/nonexistent-run-folder"))
    assert code == 2 and "holds no run" in output


def test_the_rejection_classes_know_every_secagg_stage() -> None:
    assert rejections.SECAGG_STAGES == SECAGG_STAGES
