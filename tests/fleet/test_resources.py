"""The process figures the server and devices record: resident memory now and at peak, and process age."""

from __future__ import annotations

import subprocess
import sys
import time

from fedadapt.fleet.resources import MB, current_rss_bytes, memory_record, peak_rss_bytes, process_age_seconds


def test_resident_memory_follows_an_allocation_and_the_peak_keeps_it() -> None:
    before = current_rss_bytes()
    assert before is not None and before > 10 * MB
    block = bytearray(64 * MB)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    during = current_rss_bytes()
    assert during is not None and during - before > 48 * MB
    assert peak_rss_bytes() >= during - 4 * MB  # the kernel's high-water mark may trail by a few pages
    record = memory_record()
    del block
    assert record["server_peak_rss_mb"] >= record["server_rss_mb"] >= during / MB - 4  # type: ignore[operator]


def test_process_age_counts_from_the_process_start() -> None:
    mine = process_age_seconds()
    assert mine is not None and mine > 0
    time.sleep(0.2)
    assert process_age_seconds() >= mine + 0.15  # type: ignore[operator]
    code = "import time; time.sleep(0.5); from fedadapt.fleet.resources import process_age_seconds as a; print(a())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.5 <= child < mine + 30  # a fresh process is as old as it has lived, not as this one
