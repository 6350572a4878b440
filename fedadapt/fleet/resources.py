"""This process's footprint for the figures in metrics.json: resident memory now and at peak, and its age.

The server records its memory after every round (a flat line across rounds means nothing piles up),
and a device records how long its process has lived when it replies: in deployment every message
starts a fresh ClientApp process, so that age is the device's whole cost of the message.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

MB = 1024 * 1024


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux: /proc/self/statm); None where that is not readable."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc); None where that is not readable."""
    try:
        # Field 22 of /proc/self/stat is the start time in clock ticks after boot; the name in field 2
        # may hold spaces, so split after its closing parenthesis.
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


def memory_record() -> dict[str, float | None]:
    """The server's memory after a round, in MiB, for its metrics.json record."""
    now = current_rss_bytes()
    peak = max(peak_rss_bytes(), now or 0)  # the kernel's high-water mark can trail the current size a little
    return {"server_rss_mb": None if now is None else now / MB, "server_peak_rss_mb": peak / MB}
