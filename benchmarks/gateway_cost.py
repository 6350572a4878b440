"""The gateway's cost: one Fleet call straight to the loopback SuperLink vs through the gateway, in the same run.

One unauthenticated ``pull-messages`` (the SuperLink answers 401) over TLS, 100 timed calls after 5
warm-up ones, each path twice, alternating. Prints the median and p90 of each and their ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gateway_cost.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # the apps are not installed
    sys.path.insert(0, str(PROJECT_ROOT))

from deploy import serve  # noqa: E402
from simulations.processes import free_port  # noqa: E402

CALLS, WARMUP = 100, 5
HEADERS = {"content-type": "application/protobuf"}


def time_calls(url: str, ca: Path) -> list[float]:
    with httpx.Client(verify=str(ca)) as client:
        for _ in range(WARMUP):
            client.post(url, content=b"", headers=HEADERS)
        times = []
        for _ in range(CALLS):
            start = time.perf_counter()
            client.post(url, content=b"", headers=HEADERS)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-cost-") as folder:
        root = Path(folder)
        out, home = root / "run", root / "home"
        out.mkdir()
        home.mkdir()
        deployment = serve.Deployment(host="127.0.0.2", port=free_port(), local_supernodes=0)
        certs = serve._certs(SimpleNamespace(out_dir=out), deployment)  # type: ignore[arg-type]
        with serve._superlink(home, out, deployment, certs) as link:
            inner = (home / "config.toml").read_text().split('address = "')[1].split('"')[0]
            medians: dict[str, list[float]] = {"direct": [], "gateway": []}
            for name, address in (("direct", inner), ("gateway", link.address)) * 2:
                times = sorted(time_calls(f"https://{address}/v1/fleet/pull-messages", certs.ca))
                medians[name].append(statistics.median(times))
                p90 = times[int(0.9 * CALLS) - 1]
                print(f"{name:8s} median {medians[name][-1] * 1000:6.1f} ms  p90 {p90 * 1000:6.1f} ms")
    direct, gateway = statistics.mean(medians["direct"]), statistics.mean(medians["gateway"])
    print(f"gateway / direct (medians): {gateway / direct:.2f}x, +{(gateway - direct) * 1000:.1f} ms a call")


if __name__ == "__main__":
    main()
