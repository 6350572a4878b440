"""The warm-devices benchmark's arithmetic (benchmarks/warm_devices.py) on hand-written metrics.json records."""

from __future__ import annotations

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


def test_the_sampler_files_a_warm_parent_and_its_child_under_one_device(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["python", "-P", f"/x/deploy/{bench.WARM_SCRIPT}", "--runtime-api-address", "127.0.0.1:1"]
    commands = {10: argv, 11: argv, 20: ["python", "/bin/flwr-clientapp", "--token", "t"], 30: ["flower-supernode"]}
    parents = {10: 1, 11: 10, 20: 30, 30: 1}
    rss = {10: 400.0, 11: 150.0, 20: 700.0, 30: 90.0}
    monkeypatch.setattr(bench, "descendants", lambda pid: list(commands))
    monkeypatch.setattr(bench, "_cmdline", commands.__getitem__)
    monkeypatch.setattr(bench, "_ppid", parents.__getitem__)
    pss = {10: 300.0, 11: 50.0}  # the child shares most of its parent's pages
    monkeypatch.setattr(bench, "proc_kib", lambda pid, file, name: (rss if name == "VmRSS:" else pss)[pid] * 1024)
    memory = bench.DeviceMemory(metrics_file=bench.Path("/nonexistent"), rounds=3)
    memory.sample(2)
    rss[10] = 410.0
    memory.sample(3)
    assert memory.parents == {2: {10: 400.0}, 3: {10: 410.0}}
    assert memory.devices == {2: 350.0, 3: 350.0}
    assert memory.clientapps == {2: 700.0, 3: 700.0}
    assert memory.parent_growth() == pytest.approx(0.025)  # from round 2 to the last
    rss[10] = 900.0
    memory.sample(4)  # after the last round: the run's teardown, not filed
    assert 4 not in memory.parents and memory.parent_growth() == pytest.approx(0.025)
