"""Faults on a real loopback deployment: devices killed mid-round, stragglers, a device back after a crash (issue 10).

``fedadapt serve`` with 3 local SuperNodes over TLS + node auth, the tiny BERT, 3 rounds each:

- plain FedAvg, personal heads: in round 2 the device of partition 2 (its SuperNode, its warm executor
  and all below them) is SIGKILLed while its ClientApp runs, and partition 1 straggles past the round
  deadline (a scripted stall). The round
  completes with partition 0 alone. The device of partition 2 then comes back (``fedadapt node`` with
  its own key and state folder) and round 3 takes all three: the straggler rejoined, and the
  restarted device picked up its personal part from disk.
- SecAgg+ (3 shares, threshold 2): in round 2 two of the three devices straggle past the deadline,
  beyond the protocol's tolerance: the round fails with a clear error and the global state stays.
  Round 3 proceeds, and the device of partition 2 is killed in its masked-input stage, within the
  tolerance: the two others' shares rebuild its masks and the round completes with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from helpers import write_tiny_scenario
from test_deployment import BIN, _flower_env, _popen, _stop, _Tree, _watch, no_process_left  # noqa: F401
from waiting import scaled

from deploy.serve import SUPERNODE_LOG
from deploy.warm_executor import TASK_LINE
from fedadapt.fleet.device_data import personal_path
from fedadapt.privacy.secagg.stages import MASKED
from simulations.processes import descendants, free_port, parent_pid

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

ROUNDS = 3
NODES = 3
ROUND_TIMEOUT = 70  # seconds: above a round's (or a SecAgg+ stage's) time on 2 loaded cores, so only stragglers miss it
RUN_TIMEOUT = 840.0  # base seconds, times FEDADAPT_TEST_TIME_SCALE (tests/waiting.py), as every wait here


def _scenario(folder: Path, tiny_bert: Path, faults: list[tuple[int, int, str]], **extra: Any) -> Path:
    """The tiny scenario with (round, client, fault) scripted faults; ``extra`` adds keys or ``privacy``."""
    values = {"name": "tiny-faults", "data": "synthetic", "partition": "natural", "num-clients": NODES}
    # The server's own deadlines scale too: honest devices on a busier machine must still make them.
    values |= {"rounds": ROUNDS, "round-timeout": scaled(ROUND_TIMEOUT)}
    values["rejoin-timeout"] = scaled(120)  # round 3 waits this long for every device to be connected again
    values["scripted-faults"] = [{"round": r, "client": c, "fault": f} for r, c, f in faults]
    return write_tiny_scenario(folder, tiny_bert, extra.pop("privacy", None), **values, **extra)


def _below(root_pid: int, program: bytes, marker: bytes = b"") -> list[int]:
    """PIDs below ``root_pid`` running ``program`` whose command line holds ``marker``."""
    found = []
    for pid in descendants(root_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(program) for part in command) and marker in b" ".join(command) + b" ":
            found.append(pid)
    return found


def _supernode_of(partition: int, root_pid: int) -> int:
    found = _below(root_pid, b"flower-supernode", f"partition-id={partition} ".encode())
    assert len(found) == 1, f"expected one SuperNode for partition {partition}, found {found}"
    return found[0]


def _executor_of(partition: int, root_pid: int) -> tuple[int, set[int]]:
    """The warm executor of ``partition`` and its forked ClientApps (which share its command line)."""
    found = set(_below(root_pid, b"warm_executor.py", f"partition-id={partition} ".encode()))
    parents = {pid: parent_pid(pid) for pid in found}
    executors = [pid for pid in found if parents[pid] not in found]
    assert len(executors) == 1, f"expected one warm executor for partition {partition}, found {executors}"
    return executors[0], found - set(executors)


def _kill_tree(pid: int) -> None:
    for victim in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


class _Serve:
    """One ``fedadapt serve --local-supernodes 3`` run and the processes the test adds to it."""

    def __init__(self, tmp_path: Path, scenario: Path) -> None:
        self.tmp, self.out, self.port = tmp_path, tmp_path / "run", free_port()
        self.tree = _Tree()
        self.watch = _watch(self.tree, tmp_path, self.out, checkpoints=self.out / "checkpoints")
        command = [sys.executable, "-m", "fedadapt.cli", "serve", "--config", str(scenario)]
        command += ["--local-supernodes", str(NODES), "--rounds", str(ROUNDS), "--out", str(self.out)]
        command += ["--port", str(self.port)]
        env = _flower_env(tmp_path / "flwr-home")
        self.proc = self.watch.add("fedadapt serve", _popen(command, tmp_path / "serve.out", env, tmp_path))

    def until(self, condition: Callable[[], bool], base_seconds: float, what: str) -> None:
        """Until ``condition()``; fails at once if ``fedadapt serve`` exits first."""
        self.watch.until(condition, what, base_seconds, must_live=["fedadapt serve"])

    def checkpointed(self, server_round: int) -> bool:
        return (self.out / "checkpoints" / f"round-{server_round:04d}.safetensors").exists()

    def forks_of(self, partition: int) -> int:
        """How many ClientApps partition's warm executor has forked so far (its log names each fork).

        Counted from the log, not from live processes: a warm child of a cheap secagg+ stage can start and
        end between two looks at the process list, and a missed stage would shift the kill to a later one.
        """
        log = self.out / SUPERNODE_LOG.format(index=partition)
        return log.read_text(errors="replace").count(TASK_LINE) if log.is_file() else 0

    def kill_mid_round(self, partition: int, stage: int, forks_before: int) -> None:
        """SIGKILL partition's device (its SuperNode, its warm executor and all below them) once it has
        forked the ClientApp of the round's ``stage``-th message."""
        node = _supernode_of(partition, self.proc.pid)
        executor = _executor_of(partition, self.proc.pid)[0]
        self.until(
            lambda: self.forks_of(partition) - forks_before >= stage,
            240,
            f"ClientApp {stage} of partition {partition} in the round",
        )
        _kill_tree(node)
        _kill_tree(executor)

    def restart_node(self, partition: int) -> None:
        """The device comes back: ``fedadapt node`` with its own key; its state folder is the run's."""
        certs = self.out / "certs"
        command = [sys.executable, "-m", "fedadapt.cli", "node", "--superlink", f"127.0.0.1:{self.port}"]
        command += ["--partition-id", str(partition), "--num-partitions", str(NODES)]
        key = certs / "demo-device-keys" / f"device-{partition}.key"
        command += ["--root-certificates", str(certs / "ca.crt"), "--auth-key", str(key)]
        command += ["--trusted-entities", str(certs / "trusted-entities.yaml"), "--roster", str(certs / "roster.pub")]
        # The device names its own state folder (the run config no longer can): the one the demo nodes use.
        command += ["--state-dir", str(self.out / "clients")]
        env = _flower_env(self.tmp / "node-home")
        self.watch.add(f"fedadapt node {partition}", _popen(command, self.tmp / f"node-{partition}.out", env, self.tmp))

    def finish(self) -> dict[str, Any]:
        code = self.watch.exited("fedadapt serve", f"the {ROUNDS}-round run to finish", RUN_TIMEOUT)
        assert code == 0, self.watch.report(f"fedadapt serve exited with code {code}")
        return json.loads((self.out / "metrics.json").read_text())

    def stop(self) -> None:
        for proc in reversed(self.watch.processes.values()):  # the restarted nodes first, the server last
            _stop(proc, self.tree)


def _partitions(record: dict[str, Any]) -> set[int]:
    return {int(c["partition-id"]) for c in record["client_results"]}


def _skip_without_flower() -> None:
    if not (BIN / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed beside this Python")


LOST = ("Node Unavailable", "no reply within the round timeout")


@pytest.mark.timeout(960)
def test_killed_node_and_straggler_are_left_out_then_both_rejoin(tiny_bert: Path, tmp_path: Path) -> None:
    _skip_without_flower()
    # Device 1 straggles in round 2. Device 2 stalls too, so that the kill below lands while its ClientApp
    # runs, however fast a warm child trains.
    stalls = [(2, 1, "stall"), (2, 2, "stall")]
    serve = _Serve(tmp_path, _scenario(tmp_path, tiny_bert, stalls, **{"personal-head": True}))
    try:
        serve.until(lambda: serve.checkpointed(1), 300, "round 1")
        head = personal_path(serve.out / "clients", 2)
        saved = head.read_bytes()  # the personal part partition 2 kept after round 1
        serve.kill_mid_round(2, stage=1, forks_before=serve.forks_of(2))
        serve.until(lambda: serve.checkpointed(2), 300, "round 2")
        assert head.read_bytes() == saved, "the killed device's personal part changed on disk"
        serve.restart_node(2)
        metrics = serve.finish()
    finally:
        serve.stop()
    rounds = metrics["rounds"]
    assert metrics["complete"] and [r["round"] for r in rounds] == [1, 2, 3]
    assert (rounds[0]["accepted"], _partitions(rounds[0])) == (3, {0, 1, 2})
    # Round 2: the killed device and the straggler are left out, each named; the round completes with one.
    second = rounds[1]
    assert (second["clients"], second["accepted"], _partitions(second)) == (3, 1, {0}), second
    assert len(second["rejected"]) == 2 and all(any(w in r["reason"] for w in LOST) for r in second["rejected"])
    assert second["seconds"] >= scaled(ROUND_TIMEOUT)  # the straggler's reply came after the deadline
    # Round 3: both are back; the straggler rejoined, the restarted device resumed its personal part.
    third = rounds[2]
    assert (third["clients"], third["accepted"], third["rejected"]) == (3, 3, []), third
    personal = {int(c["partition-id"]): c["personal-restored"] for c in third["client_results"]}
    assert personal == {0: 1, 1: 1, 2: 1}
    assert serve.tree.alive() == []


@pytest.mark.timeout(960)
def test_secagg_fails_beyond_its_tolerance_then_recovers_a_node_killed_mid_round(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """With distributed DP on top (issue 22's loopback test): the failed round spends no privacy, and the round a
    device is killed in is accounted with the noise of the two shares that made it into the sum."""
    _skip_without_flower()
    dp = {"mode": "distributed", "noise-multiplier": 1.0, "clip": 0.1, "delta": 1e-3}  # ±1 carries the shares
    privacy = {"mode": "secagg+", "num-shares": 3, "reconstruction-threshold": 2, "dp": dp}
    # Round 3's stall of device 2 holds its masked-input ClientApp past the kill below, so the kill lands in
    # that stage however fast the warm child trains (a kill after it replied would hit the consistency stage).
    faults = [(2, 1, "stall"), (2, 2, "stall"), (3, 2, "stall")]
    serve = _Serve(tmp_path, _scenario(tmp_path, tiny_bert, faults, privacy=privacy))
    try:
        serve.until(lambda: serve.checkpointed(2), 600, "round 2")
        forks = serve.forks_of(2)  # round 2's, its straggling ClientApp's included
        serve.kill_mid_round(2, stage=3, forks_before=forks)  # setup, share-keys, then the masked input
        metrics = serve.finish()
    finally:
        serve.stop()
    rounds = metrics["rounds"]
    assert metrics["complete"] and [r["round"] for r in rounds] == [1, 2, 3]
    assert metrics["privacy"] == "secagg+"
    assert (rounds[0]["accepted"], rounds[0]["dropped"]) == (3, [])
    # Round 2: two of three devices missed the masked-input deadline; one cannot rebuild anything.
    second = rounds[1]
    assert second["accepted"] == 0 and "error" in second, second
    assert len(second["dropped"]) == 2 and all(d["stage"] == MASKED for d in second["dropped"]), second["dropped"]
    checkpoints = serve.out / "checkpoints"
    assert (checkpoints / "round-0002.safetensors").exists()
    assert second["loss"] == rounds[0]["loss"]  # the global state stayed as it was
    # Round 3 proceeds: the killed device is dropped at its masked stage; the two others' shares of its
    # mask key cancel the masks it shares with them, so the sum of their two deltas comes out.
    third = rounds[2]
    assert third["accepted"] == 2 and "error" not in third, third
    assert [d["stage"] for d in third["dropped"]] == [MASKED] and "Node Unavailable" in third["dropped"][0]["reason"]
    assert third["stages"]["secagg-unmask"]["replies"] == 2
    assert _partitions(third) == {0, 1} and (third["total_examples"], rounds[0]["total_examples"]) == (2, 3)
    assert third["loss"] != second["loss"]  # the aggregate moved the global state
    # DP: every device weighs 1; round 2 released nothing; round 3 had 2 of the 3 planned noise shares.
    assert [r["dp"]["accounted"] for r in rounds] == [True, False, True]
    # z = 1, less SecAgg+'s rounding slack (a few %: C / (C + step·√n)), and √(2/3) of it with two shares.
    full, short = rounds[0]["dp"]["noise_multiplier"], third["dp"]["noise_multiplier"]
    assert 0.9 < full < 1.0 and short == pytest.approx(full * (2 / 3) ** 0.5)
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for z in (full, short):
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(3, 3, dp_accounting.GaussianDpEvent(z / 2)))
    assert metrics["summary"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-9)
    assert second["epsilon"] == rounds[0]["epsilon"] < third["epsilon"]
    assert serve.tree.alive() == []
