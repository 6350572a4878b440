"""Warm devices on a real loopback deployment (issue 20): one warm parent per device serves every round.
The run uses central DP (issue 22), so it is also the central mode's loopback test.

``fedadapt serve --local-supernodes 2 --insecure``, the tiny BERT, 3 rounds; device 1 raises in round 2
(a scripted crash: the ClientApp raises after training). Each device's log must show one warm parent that
forked a new child for every message, the failed task reported and the device serving round 3 from the
same parent; no ``flower-superexec`` (Flower's cold path) is started for the SuperNodes.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from helpers import write_tiny_scenario
from test_deployment import BIN, _flower_env, _popen, _stop, _Tree, _watch, no_process_left  # noqa: F401

from deploy import serve as serve_module
from deploy import warm_executor
from simulations.processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

ROUNDS = 3
NODES = 2
RUN_TIMEOUT = 480.0  # base seconds, times FEDADAPT_TEST_TIME_SCALE (tests/waiting.py)
TASK = re.compile(
    rf"{warm_executor.TASK_LINE} (\d+): child pid (\d+), warm parent pid (\d+), task #(\d+), parent rss ([\d.]+) MiB"
)
RSS_SLACK_MIB = 8.0  # the parent's resident memory from its first task to its last: flat, not growing per task


@pytest.mark.timeout(900)
def test_each_device_serves_every_round_from_one_warm_parent_even_after_a_task_raises(
    tiny_bert: Path, tmp_path: Path
) -> None:
    if not (BIN / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed beside this Python")
    values = {"data": "synthetic", "partition": "natural", "num-clients": NODES, "rounds": ROUNDS}
    values["scripted-faults"] = [{"round": 2, "client": 1, "fault": "crash"}]
    # Central DP on top (issue 22's loopback test of the central mode): ε in every round of a real deployment.
    dp = {"mode": "central", "noise-multiplier": 1.0, "clip": 1.0, "delta": 1e-3}
    scenario = write_tiny_scenario(tmp_path, tiny_bert, {"mode": "none", "dp": dp}, name="tiny-warm", **values)
    out, tree = tmp_path / "run", _Tree()
    command = [sys.executable, "-m", "fedadapt.cli", "serve", "--config", str(scenario), "--insecure"]
    command += ["--local-supernodes", str(NODES), "--rounds", str(ROUNDS), "--out", str(out)]
    command += ["--port", str(free_port())]
    watch = _watch(tree, tmp_path, out, checkpoints=out / "checkpoints")
    proc = watch.add(
        "fedadapt serve", _popen(command, tmp_path / "serve.out", _flower_env(tmp_path / "home"), tmp_path)
    )
    try:
        code = watch.exited("fedadapt serve", f"the {ROUNDS}-round run", RUN_TIMEOUT)
        assert code == 0, watch.report(f"fedadapt serve exited with {code}")
    finally:
        _stop(proc, tree)
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert metrics["complete"] and [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["accepted"] == NODES and rounds[2]["accepted"] == NODES, rounds
    assert rounds[1]["accepted"] == 1 and len(rounds[1]["rejected"]) == 1, rounds[1]
    epsilons = [r["epsilon"] for r in rounds]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] == metrics["summary"]["epsilon"]
    assert all(r["dp"]["accounted"] and r["dp"]["population"] == NODES for r in rounds)
    for index in range(NODES):
        log = (out / serve_module.SUPERNODE_LOG.format(index=index)).read_text(errors="replace")
        assert log.count(warm_executor.READY_LINE) == 1, log[-3000:]  # warmed up once
        # Below the server, so that training devices cannot starve the SuperLink's heartbeat answers.
        assert f"nice {min(19, os.nice(0) + serve_module.LOCAL_DEVICE_NICE)})" in log, log[-3000:]
        assert "Starting Flower SuperExec" not in log  # Flower's cold SuperExec never ran for this node
        found = list(TASK.finditer(log))
        tasks = [tuple(int(g) for g in m.groups()[:4]) for m in found]
        parents = {parent for _, _, parent, _ in tasks}
        children = [child for _, child, _, _ in tasks]
        rss = [float(m.group(5)) for m in found]
        assert rss[-1] <= rss[0] + RSS_SLACK_MIB, rss
        assert len(parents) == 1 and len(tasks) >= ROUNDS, tasks  # every message: a child of the one parent
        assert len(set(children)) == len(children) and parents.isdisjoint(children)
        assert [n for *_, n in tasks] == list(range(1, len(tasks) + 1))  # the start-up counter of that parent
        if index == 1:  # round 2's task raised: reported with Flower's exit code, and the parent served on
            assert re.search(r"task \d+: child pid \d+ exited with code [1-9]\d*; the device serves on", log), log[
                -3000:
            ]
    assert tree.alive() == []
