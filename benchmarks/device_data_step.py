"""A device's data step in a fresh process, first message vs later ones (its split kept in its state folder).

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/device_data_step.py [--scenario S] [--partition 3]

In deployment every message starts a fresh ClientApp process. The first one loads the scenario's
data and partitions it (importing flwr-datasets and its stack); later ones read the device's own
``data-<id>.json``. Each line is one fresh process: seconds for the data step, the process's RSS
right after it, and whether the partitioner stack was imported.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STEP = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from fedadapt.fleet.device_data import DeviceContext, device_data
from fedadapt.fleet.resources import MB, current_rss_bytes
from fedadapt.fleet.scenario_file import load_scenario
scenario = load_scenario({scenario!r})
start = time.perf_counter()
labels, split = device_data(DeviceContext(scenario, {partition}, Path({state!r})))
seconds = time.perf_counter() - start
print(f"{{seconds:.2f}} {{current_rss_bytes() / MB:.0f}} {{'flwr_datasets' in sys.modules}} {{len(split.train)}}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=PROJECT_ROOT / "simulations" / "banking77-dirichlet.toml")
    parser.add_argument("--partition", type=int, default=3)
    parser.add_argument("--messages", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        code = STEP.format(root=str(PROJECT_ROOT), scenario=str(args.scenario.resolve()), partition=args.partition,
                           state=state)  # fmt: skip
        print("message  data step s  RSS after MiB  partitioner imported  train examples")
        for message in range(1, args.messages + 1):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            seconds, rss, imported, examples = out.split()
            print(f"{message:>7}  {float(seconds):>11.2f}  {int(rss):>13}  {imported:>20}  {examples:>14}")


if __name__ == "__main__":
    main()
