"""The warm-devices benchmark's arithmetic (benchmarks/warm_devices.py) on hand-written metrics.json records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import warm_devices as bench

PLAIN = {
    "round": 2,
    "seconds": 20.0,
    "exchange_seconds": 16.0,
    "client_results": [
        {"client": "client 0", "client-seconds": 6.0, "process-seconds": 7.5, "train-seconds": 4.0},
        {"client": "client 1", "client-seconds": 9.0, "process-seconds": 11.0, "train-seconds": 7.0},
        {"client": "client 2", "client-seconds": 10.0, "process-seconds": 10.5, "train-seconds": 8.0},
    ],
}
SECURE = {
    "round": 3,
    "seconds": 40.0,
    "stages": {
        "secagg-setup": {"seconds": 3.0, "replies": 3},
        "secagg-share-keys": {"seconds": 4.0, "replies": 3},
        "secagg-masked": {"seconds": 20.0, "replies": 3},
        "secagg-consistency": {"seconds": 3.5, "replies": 3},
        "secagg-unmask": {"seconds": 4.5, "replies": 3},
    },
    "client_results": [{"client": "client 0", "partition-id": 0}],
}


def test_a_plain_round_splits_at_the_device_whose_process_lived_longest() -> None:
    split = bench.plain_round_split(PLAIN)
    # client 1: process 11 s, of which 9 s its own work; the exchange 16 s; the round 20 s.
    assert split["compute_s"] == pytest.approx(9.0)
    assert split["startup_s"] == pytest.approx(2.0)
    assert split["flower_s"] == pytest.approx(5.0)
    assert split["server_s"] == pytest.approx(4.0)
    assert split["overhead_s"] == pytest.approx(7.0)  # start-up + Flower's waits
    parts = split["compute_s"] + split["startup_s"] + split["flower_s"] + split["server_s"]
    assert parts == pytest.approx(PLAIN["seconds"])


def test_a_cold_handlers_imports_count_as_start_up_not_compute() -> None:
    imported = {"client": "client 1", "client-seconds": 9.0, "import-seconds": 6.5, "process-seconds": 11.0}
    split = bench.plain_round_split(PLAIN | {"client_results": [imported]})
    assert split["compute_s"] == pytest.approx(2.5)
    assert split["startup_s"] == pytest.approx(8.5)  # 2 s before the handler + 6.5 s of imports in it
    assert split["overhead_s"] == pytest.approx(13.5)
    assert split["flower_s"] == pytest.approx(5.0)  # the exchange less the process's life: unchanged


def test_a_device_without_process_seconds_has_no_start_up() -> None:
    record = PLAIN | {"client_results": [{"client-seconds": 5.0}]}
    split = bench.plain_round_split(record)
    assert (split["compute_s"], split["startup_s"], split["flower_s"]) == (5.0, 0.0, 11.0)


def test_a_secure_round_splits_into_its_stages_and_the_server() -> None:
    split = bench.round_split(SECURE)
    assert split["messages"] == 5
    assert split["exchange_s"] == pytest.approx(35.0)
    assert split["server_s"] == pytest.approx(5.0)
    assert split["stages_s"]["secagg-masked"] == 20.0
    assert "compute_s" not in split  # secagg+ devices report no timings


def test_memory_growth_is_read_from_round_2_and_needs_three_rounds() -> None:
    assert bench.memory_growth({1: 300.0, 2: 400.0, 3: 404.0, 4: 410.0}) == pytest.approx(0.025)
    assert bench.memory_growth({1: 300.0, 2: 400.0}) is None


def test_goals_from_hand_written_runs() -> None:
    plain_rows = [bench.plain_round_split(PLAIN | {"round": r}) for r in (1, 2, 3)]
    secure_rows = [bench.secure_round_split(SECURE | {"round": r}) for r in (1, 2)]
    results = [
        {"nodes": 3, "devices": "warm", "privacy": "plain", "rounds": plain_rows, "warm_parent_growth": 0.01},
        {"nodes": 3, "devices": "warm", "privacy": "secagg+", "rounds": secure_rows, "warm_parent_growth": None},
    ]
    found = {g["goal"]: g for g in bench.goals(results)}
    overhead = found["per-message overhead beyond device compute (s)"]
    assert overhead["value"] == pytest.approx(7.0) and overhead["limit"] == pytest.approx(4.5)
    assert overhead["verdict"] == "MISSED"
    ratio = found["plain round / (compute + server)"]
    assert ratio["value"] == pytest.approx(20.0 / 13.0) and ratio["verdict"] == "MISSED"
    secagg = found["secagg+ round / plain round"]
    assert secagg["value"] == pytest.approx(2.0) and secagg["verdict"] == "met"
    assert found["warm parent RSS growth after round 2"]["verdict"] == "met"
    assert {g["verdict"] for g in bench.goals([])} == {"not measured"}


def test_the_sampler_sums_each_devices_pss_alike_for_warm_and_cold_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    warm = ["python", "-P", f"/x/deploy/{bench.WARM_SCRIPT}", "--runtime-api-address", "127.0.0.1:1"]
    cold = ["python", "/bin/flwr-clientapp", "--token", "t"]
    # 10: a warm parent, 11 its forked child; 20 and 21: cold ClientApps of SuperExec 30; 40: a SuperNode
    commands = {10: warm, 11: warm, 20: cold, 21: cold, 30: ["flower-superexec"], 40: ["flower-supernode"]}
    parents = {10: 1, 11: 10, 20: 30, 21: 30, 30: 40, 40: 1}
    rss = {10: 400.0, 11: 150.0, 20: 700.0, 21: 300.0, 30: 90.0, 40: 90.0}
    pss = {10: 300.0, 11: 50.0, 20: 600.0, 21: 100.0, 30: 80.0, 40: 80.0}  # a child shares most of its parent's
    read: list[tuple[int, str]] = []

    def proc_kib(pid: int, file: str, name: str) -> float:
        read.append((pid, file))
        return (rss if name == "VmRSS:" else pss)[pid] * 1024

    monkeypatch.setattr(bench, "descendants", lambda pid: list(commands))
    monkeypatch.setattr(bench, "_cmdline", commands.__getitem__)
    monkeypatch.setattr(bench, "parent_pid", parents.__getitem__)
    monkeypatch.setattr(bench, "proc_kib", proc_kib)
    memory = bench.DeviceMemory(metrics_file=Path("/nonexistent"), rounds=3)
    memory.sample(2)
    # the devices' processes only, each read alike: its PSS and its RSS
    assert sorted(read) == [(pid, file) for pid in (10, 11, 20, 21) for file in ("smaps_rollup", "status")]
    rss[10] = 410.0
    memory.sample(3)
    assert memory.devices == {2: {10: 350.0, 30: 700.0}, 3: {10: 350.0, 30: 700.0}}  # summed PSS per device
    assert memory.processes == {2: 700.0, 3: 700.0}
    assert memory.parents == {2: {10: 400.0}, 3: {10: 410.0}}
    assert memory.parent_growth() == pytest.approx(0.025)  # from round 2 to the last
    rss[10] = 900.0
    memory.sample(4)  # after the last round: the run's teardown, not filed
    assert 4 not in memory.parents and 4 not in memory.devices and memory.parent_growth() == pytest.approx(0.025)
    assert bench.DeviceMemory(metrics_file=Path("/nonexistent"), rounds=3).interval == 2.0


def test_a_secure_round_that_failed_before_any_stage_has_no_per_message_figure() -> None:
    failed = bench.secure_round_split({"round": 2, "seconds": 6.0, "stages": {}})
    assert failed["message_s"] is None and failed["messages"] == 0
    rows = [bench.secure_round_split(SECURE | {"round": 1}), failed, bench.secure_round_split(SECURE | {"round": 3})]
    result = {"rounds": rows, "device_peak_pss_mib": {}, "process_peak_rss_mib": {}}
    assert bench.summary_row(result)["message_s"] == pytest.approx(7.0)  # 35 s over 5 stages; the failed round skipped


def test_goals_and_summaries_of_runs_without_figures_are_not_measured() -> None:
    empty = {"nodes": 3, "devices": "warm", "rounds": [], "warm_parent_growth": None}
    results = [empty | {"privacy": "plain"}, empty | {"privacy": "secagg+"}]
    assert {g["verdict"] for g in bench.goals(results)} == {"not measured"}
    row = bench.summary_row(empty | {"device_peak_pss_mib": {}, "process_peak_rss_mib": {}})
    assert set(row.values()) == {None}
    assert bench.ratio(1.0, 0.0) is None and bench.median_of([None, 3.0, None, 5.0]) == 4.0


def test_results_are_written_after_each_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain_rows = [bench.plain_round_split(PLAIN | {"round": r}) for r in (1, 2, 3)]
    done = {"devices": "cold", "nodes": 3, "privacy": "plain", "rounds": plain_rows, "failures": 0}
    done |= {"device_peak_pss_mib": {2: {30: 700.0}}, "process_peak_rss_mib": {2: 700.0}}
    done |= {"warm_parent_peak_rss_mib": {}, "warm_parent_growth": None}

    def run_variant(nodes: int, devices: str, privacy: str, *_: object) -> dict[str, object]:
        if devices == "warm":
            raise RuntimeError("the second variant failed")
        return done

    monkeypatch.setattr(bench, "run_variant", run_variant)
    monkeypatch.setattr(bench, "check_resources", lambda args: None)
    argv = ["warm_devices.py", "--out", str(tmp_path), "--variants", "cold-plain", "warm-plain"]
    monkeypatch.setattr(bench.sys, "argv", argv)
    with pytest.raises(RuntimeError, match="second variant"):
        bench.main()
    (folder,) = tmp_path.iterdir()
    report = json.loads((folder / "results.json").read_text())
    assert [(r["devices"], r["privacy"]) for r in report["results"]] == [("cold", "plain")]
    assert "| 3 | cold | plain |" in (folder / "results.md").read_text()
